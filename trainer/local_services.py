"""Local services on loopback, started and stopped by whoever needs them: a free port, an S3
server, an MLflow tracking server.

Design: the demo (`jobs.demo --storage s3`), `make mlflow-ui-check`, the tests and the benchmarks
need the same three things, so they are written once here. Every service binds to 127.0.0.1
only and lives exactly as long as its context manager: nothing is left running and nothing is
reachable from another machine. The S3 server is moto's in-process `ThreadedMotoServer` (a real
HTTP endpoint that boto3 and pyarrow talk to); it accepts any credentials and keeps everything in
memory. The MLflow server is a real `mlflow server` process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

from trainer.tracking import probe_server


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def s3_server(verbose: bool = False) -> Iterator[str]:
    """moto's S3 server on a free loopback port; yields its endpoint URL and stops it on exit."""
    from moto.server import ThreadedMotoServer  # optional: the `dev` extra (the demo's S3 mode, the tests)

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=verbose)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@contextlib.contextmanager
def mlflow_server(backend_store_uri: str, log_path: str | Path, extra_args: tuple[str, ...] = (),
                  timeout_s: float = 90.0) -> Iterator[str]:
    """An `mlflow server` on a free loopback port over `backend_store_uri`, its output in `log_path`;
    yields its URL once /health answers and stops it on exit. One worker and no job executor: a local
    server needs no more, and each costs seconds of start-up on 2 cores. RuntimeError naming the log
    when it does not come up within `timeout_s`."""
    url = f"http://127.0.0.1:{free_port()}"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1],
             "--backend-store-uri", backend_store_uri, "--workers", "1", *extra_args],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        try:
            deadline = time.time() + timeout_s
            while True:
                try:
                    probe_server(url, timeout_s=2)
                    break
                except ValueError:
                    if time.time() > deadline or server.poll() is not None:
                        raise RuntimeError(f"mlflow server did not start; see {log_path}") from None
                    time.sleep(1)
            yield url
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def wait_for_port(process: subprocess.Popen, port: int, what: str, timeout_s: float = 60.0) -> None:
    """Return once 127.0.0.1:`port` accepts connections; RuntimeError naming `what` when `process`
    exits first or `timeout_s` passes."""
    deadline = time.time() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.time() > deadline or process.poll() is not None:
                raise RuntimeError(f"{what} did not start on port {port}") from None
            time.sleep(0.2)


def stop_process_group(process: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM to a service started with `start_new_session=True` (its whole process group), SIGKILL
    after `grace_s`; returns once the leader has exited."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


__all__ = ["free_port", "s3_server", "mlflow_server", "wait_for_port", "stop_process_group"]
