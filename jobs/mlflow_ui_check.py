"""`make mlflow-ui-check`: what a user sees of a store's runs in the MLflow UI, checked in a real browser.

Usage:
    python -m jobs.mlflow_ui_check --store runs/mlflow.db [--artifacts DIR] [--experiment hart-demo]
        [--out runs/mlflow-ui-check] [--browser /usr/bin/chromium]

The checks and their design: `trainer.mlflow_ui_check`. Exit code 0: all passed; 1: a check failed;
2: a setup problem (no store, no browser, the server not starting).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from configuration.cli import HelpFormatter
from trainer.mlflow_ui_check import SetupProblem, UiCheckConfig, run_ui_check


def parse_args(argv: list[str] | None = None) -> UiCheckConfig:
    defaults = UiCheckConfig()
    parser = argparse.ArgumentParser(prog="mlflow-ui-check", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--store", default=defaults.store, help="the sqlite file of the runs")
    parser.add_argument("--artifacts", default=defaults.artifacts, help="where proxied (mlflow-artifacts:/) artifacts now live")
    parser.add_argument("--experiment", default=defaults.experiment, help="the experiment whose runs are checked")
    parser.add_argument("--out", default=defaults.out, help="folder of the screenshots")
    parser.add_argument("--browser", default=defaults.browser, help="Chromium executable")
    parser.add_argument("--max-runs", type=int, default=defaults.max_runs,
                        help="newest training runs whose Dataset cell is checked, and newest checkpoint models "
                             "checked in the Models view")
    parser.add_argument("--timeout-s", type=float, default=defaults.timeout_s, help="wait for each expected text")
    args = parser.parse_args(argv)
    return UiCheckConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(UiCheckConfig)})


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    try:
        return run_ui_check(config)
    except SetupProblem as problem:
        print(f"[ui-check] {problem}", flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
