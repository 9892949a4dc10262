"""One way to reach files: local paths, `file://` and `s3://` URIs through `pyarrow.fs` (contract 5).

Design: every stage (driver, read tasks, writer) calls `resolve(uri, endpoint_url)` and gets a
`(pyarrow FileSystem, path)` pair, so no code branches on the scheme after this point. S3 goes
through the native `pyarrow.fs.S3FileSystem` (faster than an fsspec wrapper; docs/design/ray.md,
"Native S3 filesystem"); any S3-compatible endpoint is reached through `endpoint_url` or, when
that is empty, the standard `AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_S3` env vars. Credentials and
region come from the usual AWS chain (env vars, profile, instance role): nothing secret is ever
stored in configs or manifests.
Every S3 request retries transient errors (503 SlowDown, connection resets, short reads) with
the AWS "standard" strategy: exponential backoff with jitter, at most `S3_MAX_ATTEMPTS` tries
(env `HART_S3_MAX_ATTEMPTS`), and bounded connect/request timeouts, so a flaky store is
survived and a dead one fails in seconds with the SDK's error instead of hanging.
`storage_error_line` turns such a failure, wherever it was raised (driver, Ray task, Ray Data
stage, Ray Train worker), into the one line a job's CLI ends with, naming the endpoint setting.

Commit semantics differ per backend and are hidden here: `write_bytes_atomic` writes a temporary
sibling and renames it on local disks (rename is atomic on POSIX), and does a single PUT on S3
(an S3 object becomes visible whole or not at all, and there is no rename). Writers rely on that:
no reader ever sees half of a file written through this module. A local write killed before its
rename leaves its temporary file (hidden: `TEMPORARY_PREFIX`), which readers skip and
`remove_temporaries` removes once its owner knows no write into the folder is in flight.
"""

from __future__ import annotations

import builtins
import hashlib
import os
import posixpath
import re
import tempfile
import uuid
from urllib.parse import urlparse

import pyarrow.fs as pafs


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def endpoint_from_env() -> str:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""


S3_MAX_ATTEMPTS = 6  # tries per request (1 + 5 retries), backoff with jitter in between
S3_CONNECT_TIMEOUT_S = 10.0
S3_REQUEST_TIMEOUT_S = 60.0


def s3_max_attempts() -> int:
    value = os.environ.get("HART_S3_MAX_ATTEMPTS", "")
    if not value:
        return S3_MAX_ATTEMPTS
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"HART_S3_MAX_ATTEMPTS must be a positive integer, got {value!r}")
    return int(value)


def s3_filesystem(endpoint_url: str = "") -> pafs.S3FileSystem:
    """Native S3 filesystem for AWS or any S3-compatible endpoint (MinIO, moto, R2 ...)."""
    return pafs.S3FileSystem(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=s3_max_attempts()),
                             connect_timeout=S3_CONNECT_TIMEOUT_S, request_timeout=S3_REQUEST_TIMEOUT_S,
                             **_s3_options(endpoint_url or endpoint_from_env()))


def _s3_options(endpoint_url: str) -> dict:
    """Region (AWS_REGION / AWS_DEFAULT_REGION) and endpoint of an `S3FileSystem`."""
    kwargs: dict = {}
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    if endpoint_url:
        parsed = urlparse(endpoint_url if "://" in endpoint_url else f"https://{endpoint_url}")
        if not parsed.netloc:
            raise ValueError(f"endpoint_url {endpoint_url!r} is not a host[:port] or http(s)://host[:port] URL")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme or "https"
    return kwargs


def resolve(uri: str, endpoint_url: str = "") -> tuple[pafs.FileSystem, str]:
    """Map a local path, `file://` or `s3://bucket/key` URI to (filesystem, path inside it)."""
    if not uri:
        raise ValueError("empty path or URI")
    if is_s3(uri):
        path = uri[len("s3://"):].rstrip("/")
        if not path or path.startswith("/"):
            raise ValueError(f"S3 URI {uri!r} must look like s3://bucket/prefix")
        return s3_filesystem(endpoint_url), path
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    elif "://" in uri:
        raise ValueError(f"unsupported URI scheme in {uri!r}: use a local path, file:// or s3://")
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def absolute(uri: str) -> str:
    """A local path (or `file://` URI) made absolute against this process's working directory; other
    URIs (`s3://`, `http(s)://`, `sqlite://`) and "" unchanged. Jobs call it on the driver for every
    path setting, so Ray workers and actors, which do not start in the driver's working directory,
    checkpoints and MLflow params all see the path the user meant. Glob characters and braces are kept."""
    if not uri:
        return uri
    if uri.startswith("file://"):
        return "file://" + os.path.abspath(os.path.expanduser(uri[len("file://"):]))
    if "://" in uri:
        return uri
    return os.path.abspath(os.path.expanduser(uri))


# A line "OSError: <message>" (or another OSError class) of a remote traceback printed into an error's text.
_EXCEPTION_LINE = re.compile(r"^([A-Za-z]\w*): (.+)$", re.MULTILINE)
_HANDLING_ANOTHER = "During handling of the above exception, another exception occurred:"


def storage_failure(exc: BaseException) -> str:
    """The message of the storage error that `exc` is or was caused by, on one line; "" if none.

    A storage error is an `OSError`: pyarrow raises one for every filesystem failure, S3's once its
    bounded retries are spent. It reaches a driver as itself, as the `__cause__` of another error,
    as the `cause` of a Ray task's error, as a failed Ray Train worker's error (`WorkerGroupError
    .worker_failures`, `ControllerError.controller_failure`), or only as text: Ray Data re-raises a
    failed stage as `UserCodeException`, whose message holds the remote traceback but whose object
    holds no original error. In such text the last OSError line of the final exception's chain
    counts (an OSError handled before another error was raised is not its cause)."""
    seen, pending = set(), [exc]
    while pending:
        error = pending.pop(0)
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        cause = getattr(error, "cause", None)  # ray.exceptions.RayTaskError: the error raised in the task
        if isinstance(cause, BaseException):
            pending.append(cause)
        elif isinstance(error, OSError):
            return " ".join(str(error).split())
        pending += [error.__cause__, getattr(error, "controller_failure", None),
                    *(getattr(error, "worker_failures", None) or {}).values()]
    for error in (e for e in _chain(exc) if type(e).__module__.split(".")[0] == "ray"):
        text = str(error).rsplit(_HANDLING_ANOTHER, 1)[-1]
        for name, message in reversed(_EXCEPTION_LINE.findall(text)):
            kind = getattr(builtins, name, None)
            if isinstance(kind, type) and issubclass(kind, OSError):
                return " ".join(message.split())
    return ""


def _chain(exc: BaseException | None):
    while exc is not None:
        yield exc
        exc = exc.__cause__


def storage_error_line(prog: str, exc: BaseException, endpoint_setting: str = "", endpoint_url: str = "") -> str:
    """`<prog>: storage error after retries: <message> (S3 endpoint <url>, from <setting>)` for an
    S3 error, `<prog>: storage error: <message>` for a local one, "" when `exc` is no storage error
    (`storage_failure`). How every job's CLI ends on a store that stops answering after its preflight."""
    message = storage_failure(exc)
    if not message:
        return ""
    if "AWS Error" not in message:  # pyarrow's S3 errors all say so; a local filesystem error is not retried
        return f"{prog}: storage error: {message}"
    variable = "AWS_ENDPOINT_URL_S3" if os.environ.get("AWS_ENDPOINT_URL_S3") else "AWS_ENDPOINT_URL"
    endpoint, source = (endpoint_url, endpoint_setting) if endpoint_url else (endpoint_from_env(), variable)
    where = f"S3 endpoint {endpoint}, from {source}" if endpoint else f"AWS S3: {endpoint_setting or variable} unset"
    return f"{prog}: storage error after retries: {message} ({where})"


# A preflight request: one try, short timeouts. A job's own requests retry (S3_MAX_ATTEMPTS) because a
# store that answered once is worth waiting for; one that does not answer now is a configuration error.
PROBE_TIMEOUT_S = 5.0
CREDENTIALS_HELP = "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"


def check_store(uri: str, endpoint_url: str, setting: str, endpoint_setting: str) -> None:
    """Before a job's first side effect, for an `s3://` URI: the endpoint answers, the credentials are
    accepted and the bucket exists, each tried once with a short timeout; local paths pass. A failure
    is one ValueError line naming `setting` (where the URI came from), the endpoint setting
    (`endpoint_setting`, or AWS_ENDPOINT_URL) and the credential variables: the fix, not a retry loop."""
    if not is_s3(uri):
        return
    _, path = resolve(uri, endpoint_url)
    bucket = path.split("/")[0]
    endpoint = endpoint_url or endpoint_from_env()
    where = f"{setting}={uri}"
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
        source = endpoint_setting if endpoint_url else "AWS_ENDPOINT_URL"
        fix = f"check {source} (now {parsed.scheme}://{host}:{port})"
    else:
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        host, port = f"s3.{region}.amazonaws.com", 443
        fix = f"for an S3-compatible server set {endpoint_setting} or AWS_ENDPOINT_URL to its URL"
    try:
        import socket

        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:
        what = f"the S3 endpoint {host}:{port}" if endpoint else f"no S3 endpoint is set and AWS S3 ({host})"
        raise ValueError(f"{where}: {what} does not answer ({exc}); {fix}") from None
    probe = pafs.S3FileSystem(**{**_s3_options(endpoint), "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=1),
                                 "connect_timeout": PROBE_TIMEOUT_S, "request_timeout": PROBE_TIMEOUT_S})
    try:
        info = probe.get_file_info(bucket)
    except OSError as exc:
        reason = str(exc).split(": ", 1)[-1]
        if any(code in str(exc) for code in ("ACCESS_DENIED", "INVALID_ACCESS_KEY", "SIGNATURE", "403")):
            raise ValueError(f"{where}: the S3 server at {host}:{port} refused access to bucket {bucket!r} ({reason}); "
                             f"set {CREDENTIALS_HELP} to a key with access to it") from None
        raise ValueError(f"{where}: the S3 request to {host}:{port} failed ({reason}); {fix}") from None
    if info.type == pafs.FileType.NotFound:
        raise ValueError(f"{where}: bucket {bucket!r} does not exist at {host}:{port} (create it, or fix the URI)")


def check_stores(uris: dict[str, str], endpoint_url: str, endpoint_setting: str) -> None:
    """`check_store` for each `setting: uri` of `uris`, once per bucket (local paths pass)."""
    probed = set()
    for setting, uri in uris.items():
        bucket = uri.removeprefix("s3://").split("/")[0] if is_s3(uri) else None
        if bucket not in probed:
            check_store(uri, endpoint_url, setting, endpoint_setting)
            probed.add(bucket)


def check_exists(uri: str, endpoint_url: str, setting: str, endpoint_setting: str) -> None:
    """`check_store`, then: the file or folder (for S3, the object or any object under the prefix)
    is there. ValueError naming `setting` otherwise."""
    check_store(uri, endpoint_url, setting, endpoint_setting)
    fs, path = resolve(uri, endpoint_url)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise ValueError(f"{setting}={uri}: not found")


def join(base: str, *names: str) -> str:
    """Join URI/path parts with '/' (also for s3:// URIs, which os.path.join would not know)."""
    return posixpath.join(base.rstrip("/"), *names) if is_s3(base) else os.path.join(base, *names)


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type == pafs.FileType.File


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as stream:
        return stream.read()


TEMPORARY_PREFIX = ".tmp-"  # `write_bytes_atomic`'s temporary siblings on local filesystems


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write `data` so that readers see either the old file, or all of the new one."""
    parent = posixpath.dirname(path)
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(parent, recursive=True)
        temporary = posixpath.join(parent, f"{TEMPORARY_PREFIX}{uuid.uuid4().hex}-{posixpath.basename(path)}")
        try:
            with fs.open_output_stream(temporary) as stream:
                stream.write(data)
            fs.move(temporary, path)  # os.replace underneath: atomic on one POSIX filesystem
        finally:
            if exists(fs, temporary):
                fs.delete_file(temporary)
        return
    # Object stores: one PUT (or one completed multipart upload) is atomic by itself.
    with fs.open_output_stream(path) as stream:
        stream.write(data)


def remove_temporaries(fs: pafs.FileSystem, directory: str) -> list[str]:
    """Remove the temporary files that `write_bytes_atomic` writes killed before their rename left
    directly in `directory`; returns their paths. Local filesystems only: an S3 write has no
    temporary object. The caller must know that no write into `directory` is in flight (it would
    fail at its rename), e.g. a job before its writers start."""
    if not isinstance(fs, pafs.LocalFileSystem):
        return []
    stale = [path for path in list_files(fs, directory) if posixpath.basename(path).startswith(TEMPORARY_PREFIX)]
    for path in stale:
        delete_if_exists(fs, path)
    return stale


def delete_if_exists(fs: pafs.FileSystem, path: str) -> None:
    if exists(fs, path):
        fs.delete_file(path)


def copy_tree(source: str, destination: str, endpoint_url: str = "") -> None:
    """Copy a folder, file by file, between local paths, `file://` and `s3://` prefixes (either way)."""
    source_fs, source_path = resolve(source, endpoint_url)
    destination_fs, destination_path = resolve(destination, endpoint_url)
    if isinstance(destination_fs, pafs.LocalFileSystem):
        destination_fs.create_dir(destination_path, recursive=True)
    pafs.copy_files(source_path, destination_path, source_filesystem=source_fs, destination_filesystem=destination_fs)


def list_files(fs: pafs.FileSystem, directory: str) -> list[str]:
    """Paths of the files directly inside `directory` (empty if it does not exist)."""
    info = fs.get_file_info(directory)
    if info.type == pafs.FileType.NotFound:
        return []
    selector = pafs.FileSelector(directory, recursive=False, allow_not_found=True)
    return sorted(i.path for i in fs.get_file_info(selector) if i.type == pafs.FileType.File)


def check_reachable(paths: dict[str, str], num_nodes: int, shared_filesystem: bool) -> None:
    """ValueError when a cluster of several nodes would be handed a path only one machine sees.

    `paths` maps a setting's name to its value (empty values are skipped; so are names that are
    not paths, which callers leave out). On one node every path works. On several, `s3://` is
    always fine; a local or `file://` path is refused unless `shared_filesystem` declares that
    every node mounts it at the same place (NFS, FSx, a hostPath...), and a relative path is refused
    even then, since remote workers do not start in the driver's working directory."""
    if num_nodes <= 1:
        return
    for name, uri in paths.items():
        if not uri or is_s3(uri):
            continue
        local = uri.removeprefix("file://")
        if not os.path.isabs(local):
            raise ValueError(
                f"{name}={uri!r} is a relative path, but this Ray cluster has {num_nodes} nodes whose processes "
                f"do not share the driver's working directory: use s3://... or an absolute path on a filesystem "
                f"every node mounts")
        if not shared_filesystem:
            raise ValueError(
                f"{name}={uri!r} is a local path, but this Ray cluster has {num_nodes} nodes: a remote process "
                f"would not find it (or would write to its own disk). Use s3://..., or declare that every node "
                f"mounts it at the same place with shared_filesystem=true")


def local_copy(uri: str, endpoint_url: str = "") -> str:
    """A local path for a weights file or folder: local paths as given; s3:// ones are copied once
    per machine to a temp folder named by the URI's hash (a folder's files, not its subfolders).
    How every process on a cluster reads checkpoints that live only in object storage."""
    if not is_s3(uri):
        return uri[len("file://"):] if uri.startswith("file://") else uri
    fs, path = resolve(uri, endpoint_url)
    target = os.path.join(tempfile.gettempdir(), "hart-checkpoints", hashlib.sha1(uri.encode()).hexdigest()[:16])
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        local = os.path.join(target, path.rsplit("/", 1)[-1])
        files = [(path, local)]
    elif info.type == pafs.FileType.Directory:
        local = target
        files = [(p, os.path.join(target, p.rsplit("/", 1)[-1])) for p in list_files(fs, path)]
    else:
        raise ValueError(f"checkpoint not found: {uri}")
    os.makedirs(target, exist_ok=True)
    for remote, destination in files:
        if not os.path.exists(destination):
            write_bytes_atomic(pafs.LocalFileSystem(), destination, read_bytes(fs, remote))
    return local
