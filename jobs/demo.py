"""The one-command demo (`make demo`): the whole HART pipeline on embedded defaults, on a laptop.

Data, tokenizer, precompute, joint stage, generation and evaluation, each the real job's function
run in-process on one local Ray instance (`demo.chain` has the steps and the design), tracked in
MLflow, then a check that every step left its outputs: the demo exits non-zero when one is missing.
`--smoke` runs the same chain at tiny step counts, in about two and a half minutes on 2 cores, in a
temporary workdir that is removed when every check passes (or in `--workdir`, kept): it checks the
plumbing, not the quality. `make demo-smoke` runs it under pytest together with the tests of the
check itself (tests/jobs/test_demo_smoke.py). `--storage s3` (or STORAGE=s3) runs it against a
loopback S3 server and an `mlflow server` process, both started and stopped by the demo.

Design: parse the flags into a `DemoConfig` (one flag per field, typed and documented by the
field), run `demo.chain.run`, and turn its summary into the exit code.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import typing
from pathlib import Path

from configuration.cli import HelpFormatter
from demo.chain import run
from demo.config import SMOKE, DemoConfig


def parse_args(argv: list[str] | None = None) -> DemoConfig:
    """`--smoke` plus one flag per DemoConfig field (`--joint-steps` for joint_steps), typed and
    documented by the field itself; unset flags keep the base config's values."""
    parser = argparse.ArgumentParser(prog="hart-demo", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="the whole chain at tiny step counts, in a temporary workdir unless --workdir is given; "
                             "checks that every step produces its outputs, not their quality")
    hints = typing.get_type_hints(DemoConfig)
    for spec in dataclasses.fields(DemoConfig):
        kind = next(t for t in typing.get_args(hints[spec.name]) or (hints[spec.name],) if t is not type(None))
        parser.add_argument("--" + spec.name.replace("_", "-"), type=kind, choices=spec.metadata["choices"],
                            help=f"{spec.metadata['help']} (default {spec.default!r})")
    args = vars(parser.parse_args(argv))
    # Unset flags keep the base config's values: the defaults, or the smoke sizes with --smoke.
    base = dataclasses.replace(DemoConfig(), workdir="", **SMOKE) if args.pop("smoke") else DemoConfig()
    base = dataclasses.replace(base, storage=os.environ.get("STORAGE", base.storage))
    return dataclasses.replace(base, **{name: value for name, value in args.items() if value is not None})


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    temporary = None
    if not config.workdir:
        if config.from_step != "data":
            raise SystemExit("--from-step needs the --workdir of an earlier demo")
        temporary = Path(tempfile.mkdtemp(prefix="hart-demo-"))
        config = dataclasses.replace(config, workdir=str(temporary / "demo"))
    summary = run(config, temporary=temporary is not None)
    if summary["problems"]:
        print(f"[demo] FAILED: {len(summary['problems'])} outputs missing or unreadable; kept {config.workdir}", flush=True)
        return 1
    if temporary is not None:
        shutil.rmtree(temporary)
        print(f"[demo] every output checked; removed the temporary workdir {temporary} and its MLflow store", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
