"""A fault-injecting HTTP proxy on loopback, in front of an S3-compatible server (moto in tests).

Design: clients (pyarrow's S3FileSystem, boto3) are pointed at the proxy's URL as their
endpoint; the proxy forwards each request to the real server unless a seeded coin says to
inject a fault instead. Faults are the ones object stores really produce under load:

- `slowdown`: answer `503 SlowDown` (S3's throttling reply) without forwarding;
- `reset`:    close the connection with a TCP RST before answering (not forwarded either);
- `truncate`: forward, then send the real status and headers (full Content-Length) but only
              half of the body, and close: the client sees a short read.

`rate` is the probability that one request gets a fault (0.0 .. 1.0), the kind drawn from
`kinds`; the first `forward_first` requests are forwarded untouched (a store that dies after a
job's preflight: `rate=1.0, forward_first=<the preflight's requests>`). Non-forwarded faults (slowdown, reset) are safe for every method; truncation is only
applied to responses that carry a body (GET), so a PUT is never half-applied by the proxy.
Every request and every injected fault is counted (`counts`), so a test can prove that faults
really happened. The proxy is a plain `ThreadingHTTPServer` on 127.0.0.1 and a free port:
`with FaultProxy(upstream, rate=0.05) as proxy: ... proxy.url ...`.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULT_KINDS = ("slowdown", "reset", "truncate")
HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}
SLOWDOWN_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                 b"<Message>Please reduce your request rate.</Message></Error>")


class FaultProxy:
    """Forward HTTP to `upstream` ("http://127.0.0.1:PORT"), injecting faults at `rate`."""

    def __init__(self, upstream: str, rate: float = 0.0, kinds: tuple[str, ...] = FAULT_KINDS, seed: int = 0,
                 forward_first: int = 0):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must be in [0, 1], got {rate}")
        unknown = set(kinds) - set(FAULT_KINDS)
        if unknown or not kinds:
            raise ValueError(f"kinds must be a non-empty subset of {FAULT_KINDS}, got {kinds}")
        parts = urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname, parts.port or 80
        self.rate, self.kinds, self.forward_first = rate, tuple(kinds), forward_first
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.counts: Counter = Counter()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_class(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="s3-fault-proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def draw(self, method: str) -> str:
        """The fault for one request ("" = forward normally); counted."""
        with self.lock:
            self.counts["requests"] += 1
            if self.counts["requests"] <= self.forward_first or self.random.random() >= self.rate:
                return ""
            choices = [k for k in self.kinds if k != "truncate" or method == "GET"] or ["slowdown"]
            kind = self.random.choice(choices)
            self.counts[kind] += 1
            return kind

    def set_rate(self, rate: float) -> None:
        with self.lock:
            self.rate = rate

    def faults(self) -> int:
        return sum(self.counts[k] for k in FAULT_KINDS)

    def start(self) -> "FaultProxy":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _handler_class(proxy: FaultProxy):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, like a real S3 endpoint

        def log_message(self, *args) -> None:  # quiet: tests print their own summary
            pass

        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                raw = bytearray()  # forwarded as-is (aws-chunked uploads carry their own framing)
                while True:
                    line = self.rfile.readline()
                    raw += line
                    size = int(line.split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while True:  # trailers up to the empty line
                            trailer = self.rfile.readline()
                            raw += trailer
                            if trailer in (b"\r\n", b"\n", b""):
                                return bytes(raw)
                    raw += self.rfile.read(size + 2)
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _reset(self) -> None:
            # SO_LINGER(on, 0) makes close() send RST: the client sees "connection reset by peer".
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()

        def _handle(self) -> None:
            body = self._read_body()
            fault = proxy.draw(self.command)
            if fault == "reset":
                self._reset()
                return
            if fault == "slowdown":
                self.send_response(503, "Slow Down")
                self.send_header("Content-Type", "application/xml")
                body = b"" if self.command == "HEAD" else SLOWDOWN_BODY  # HEAD replies carry no body
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS | {"host"}}
            headers["Host"] = f"{proxy.upstream_host}:{proxy.upstream_port}"
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                headers["Transfer-Encoding"] = "chunked"
            upstream = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
            try:
                upstream.request(self.command, self.path, body=body or None, headers=headers)
                response = upstream.getresponse()
                payload = response.read()
                response_headers = [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_HEADERS]
            finally:
                upstream.close()
            self.send_response(response.status, response.reason)
            for key, value in response_headers:
                if key.lower() != "content-length":
                    self.send_header(key, value)
            if self.command == "HEAD":
                self.send_header("Content-Length", response.getheader("Content-Length") or "0")
                self.end_headers()
                return
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if fault == "truncate" and len(payload) > 1:
                self.wfile.write(payload[: len(payload) // 2])
                self.wfile.flush()
                self._reset()
                return
            self.wfile.write(payload)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    return Handler


def assert_storage_error_line(stderr: str, prog: str, endpoint: str, setting: str) -> None:
    """What a job's CLI prints when the store behind `endpoint` died after its preflight: no traceback,
    and one `<prog>: ` line, the storage error naming the endpoint and the setting it came from."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith(f"{prog}: ")]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: storage error after retries: "), stderr[-3000:]
    assert "AWS Error" in lines[0] and lines[0].endswith(f"(S3 endpoint {endpoint}, from {setting})"), lines[0]
