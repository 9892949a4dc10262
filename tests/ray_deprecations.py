"""Ray deprecations caused by project code fail the test that caused them (imported once by tests/conftest.py).

Ray reports a deprecation in two ways, and each is caught where it can be told apart from Ray's own:
- a deprecated *argument or setting* (`map_batches(concurrency=...)`, `parallelism=`, a deprecated
  DataContext field or env var) is a `logger.warning` from a `ray.*` logger, always caused by what the
  caller passed: `RayDeprecationLog` collects such records during a test and the autouse fixture
  `no_ray_deprecations` fails the test with them;
- a deprecated *function or class* warns with `warnings.warn(..., stacklevel=2)`, attributed to its caller:
  pyproject.toml's `filterwarnings` turns a DeprecationWarning attributed to a project package into an
  error. Deprecations Ray's own code triggers (Ray Train building `ExecutionOptions` with
  `exclude_resources`, DataContext reading its deprecated fields) are attributed to Ray's files and stay
  warnings: they are not ours to fix.
Both act in the test's process, where jobs configure Ray Data pipelines and Ray Train runs; code running
inside Ray workers (the training loop's `ray.train.*` calls) is not covered.
"""

from __future__ import annotations

import logging

# Loggers Ray configures with propagate=False: a record reaches a handler on one of them, not the root's.
RAY_LOGGERS = ("ray", "ray.data", "ray.train")


class RayDeprecationLog(logging.Handler):
    """Collects warnings from Ray's loggers that announce a deprecation, while attached."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "deprecated" in message.lower():
            self.messages.append(f"{record.name}: {message}")

    def __enter__(self) -> "RayDeprecationLog":
        for name in RAY_LOGGERS:
            logging.getLogger(name).addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        for name in RAY_LOGGERS:
            logging.getLogger(name).removeHandler(self)
