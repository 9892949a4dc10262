"""hart-train: train a HART stage with Ray Train (`python -m jobs.train --stage joint --config FILE`).

Parse the command line, build the run config, run `trainer.driver.run_training` (its docstring has
the design: preflight, resume, checkpoints, export, registry).
"""

from __future__ import annotations

import argparse
import sys

from configuration.cli import HelpFormatter
from pipelines.storage import storage_error_line
from trainer.config import load_train_config
from trainer.driver import run_training
from trainer.ray_session import ADDRESS_HELP, connect, offline_models


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hart-train", formatter_class=HelpFormatter,
                                     description="Train a HART stage with Ray Train (checkpoints + MLflow).")
    parser.add_argument("--stage", choices=("tokenizer", "ar", "diffusion", "joint"),
                        help="the stage to train (default: the config file's `stage`)")
    parser.add_argument("--config", help="run config (.yaml/.toml/.json), e.g. jobs/configs/train_tiny.yaml "
                                         "(default: the built-in defaults)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set run.max_steps=200 --set scaling.num_workers=8")
    parser.add_argument("--export-dir", help="local folder for the exported llm/ + tokenizer/ (default: a temporary "
                                             "folder; the export is also copied to <run.storage_path>/<run.name>/export)")
    parser.add_argument("--address", help=ADDRESS_HELP)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_train_config(args.config, args.stage, args.set)
    except ValueError as exc:
        print(f"hart-train: error: {exc}", file=sys.stderr)
        return 2
    offline_models()
    connect(args.address, ray_train=True)
    try:
        outcome = run_training(config, args.export_dir)
    except ValueError as exc:
        print(f"hart-train: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a store that stopped answering after the preflight: one line, not a traceback
        line = storage_error_line("hart-train", exc, "run.endpoint_url", config.run.endpoint_url)
        if not line:
            raise
        print(line, file=sys.stderr)
        return 1
    print(f"[train] done: step {outcome['final_step']}, checkpoint {outcome['checkpoint_path']}, "
          f"export {outcome['export_dir']}, model version {outcome['model_version']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
