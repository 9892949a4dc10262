"""Pre-tokenization job: WebDataset shards -> token + residual cache (Parquet) with a manifest.

Usage:
    python -m jobs.precompute --config jobs/configs/precompute.yaml [--set key=value ...]
    hart-precompute --config ... --set input.shards='[s3://bucket/raw/shard-{00000..00999}.tar]' \
        --set output=s3://bucket/tokens/hart-256 --set compute.tokenizer_gpus=1 --set compute.tokenizer_actors=8

On a cluster, submit the same command as a Ray job (the working dir carries the code):
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python -m jobs.precompute --config jobs/configs/precompute.yaml --set output=s3://bucket/tokens/run1

Design: a thin shell. It parses the config, keeps Hugging Face offline (`trainer.ray_session.offline_models`),
connects to Ray (`trainer.ray_session.connect`: a cluster
only when --address or RAY_ADDRESS names one, as under `ray job submit`; otherwise a private local
instance sized by `--num-cpus`), runs `pipelines.plan.run_precompute`, prints the summary table, and
exits non-zero naming any shard that could not be read. Rerunning the same command resumes:
committed shards are skipped, partial ones redone. Bad input (a store that does not answer, refused
credentials, a missing bucket or tokenizer) fails before the cache's manifest is written; a store
that stops answering later ends the job with one line (`storage.storage_error_line`) and exit code 1.
"""

from __future__ import annotations

import argparse
import sys

from configuration.cli import HelpFormatter
from pipelines.config import load_precompute_config
from pipelines.plan import run_precompute
from pipelines.storage import storage_error_line
from trainer.ray_session import ADDRESS_HELP, connect, offline_models


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hart-precompute", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--config", help="YAML/TOML/JSON run config (default: the built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set compute.tokenizer_batch_size=64 (repeatable)")
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="CPUs of the local Ray instance (default: all of this machine's; unused with --address)")
    parser.add_argument("--address", help=ADDRESS_HELP)
    parser.add_argument("--ray-progress", action="store_true",
                        help="show Ray Data's own progress output (every 10 s) beside the job's line per shard")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    offline_models()
    try:
        config = load_precompute_config(args.config, args.overrides + (["progress=true"] if args.ray_progress else []))
    except ValueError as exc:
        print(f"hart-precompute: config error: {exc}", file=sys.stderr)
        return 2
    connect(args.address, args.num_cpus)
    try:
        summary = run_precompute(config)
    except ValueError as exc:
        print(f"hart-precompute: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a store that stopped answering after the preflight: one line, not a traceback
        line = storage_error_line("hart-precompute", exc, config.output_endpoint_setting(), config.output_endpoint())
        if not line:
            raise
        print(line, file=sys.stderr)
        return 1
    print("\n" + summary.table())
    if summary.shards_failed:
        print(f"hart-precompute: {len(summary.shards_failed)} shard(s) failed: {', '.join(sorted(summary.shards_failed))}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
