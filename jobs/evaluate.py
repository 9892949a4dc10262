"""hart-evaluate: judge an export (FID, KID, CLIP score, shapes prompt following) on a pinned protocol,
or compute a reference set's statistics. The work is `trainer.evaluation` (its docstring has the design).

Usage:
    hart-evaluate run --export runs/demo/export --prompts shapes:heldout --protocol shapes --out runs/eval
    hart-evaluate run --export /ckpt/hart-0.7b-1024px --text-encoder /ckpt/Qwen2-VL-1.5B-Instruct \
        --prompts /data/MJHQ-30K/meta_data.json --protocol hart-mjhq-1024 --out s3://bucket/eval/hart-0.7b \
        --inception /weights/weights-inception-2015-12-05-6726825d.pth --clip /weights/clip-vit-large-patch14 \
        --reference /data/mjhq-1024.stats.safetensors --actors 8 --gpus-per-actor 1 --run-id <training run>
    hart-evaluate reference --images /data/MJHQ-30K/mjhq30k_imgs --image-size 1024 \
        --inception /weights/weights-inception-2015-12-05-6726825d.pth --out /data/mjhq-1024.stats.safetensors

Design: parse, build the typed config, run. Each sub-command's flags are the fields of its config
(`EvaluationConfig`, `ReferenceConfig`; a flag's dest is its field's name) and take their defaults
from the config's fields (`config_defaults`), so a default has one owner.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from configuration.cli import HelpFormatter
from pipelines.eval_protocol import METRICS, PROTOCOLS
from pipelines.storage import storage_error_line
from trainer.evaluation import EvalJobSettings, EvaluationConfig, ReferenceConfig, run_evaluation, run_reference
from trainer.ray_session import ADDRESS_HELP, offline_models


def config_defaults(config: type) -> dict:
    """The defaults of a config's fields, as the parser's defaults (`set_defaults`): tuples as lists,
    which argparse's `append` extends."""
    return {f.name: list(f.default) if isinstance(f.default, tuple) else f.default
            for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING}


def metric_list(text: str) -> tuple[str, ...]:
    return tuple(m.strip() for m in text.split(",") if m.strip())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hart-evaluate", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter, epilog=__doc__.split("\n\n")[1])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="generate and score an export's images", formatter_class=HelpFormatter)
    run.set_defaults(**config_defaults(EvaluationConfig))
    run.add_argument("--export", required=True, help="export folder with tokenizer/ and llm/ (+ ema_model.bin), or STAR's star/ (hart-train model.family star)")
    run.add_argument("--text-encoder", help="'minilm' or a local causal-LM folder (HART: Qwen2)")
    run.add_argument("--prompts", required=True,
                     help="MJHQ meta_data.json, a .jsonl ({'prompt', 'id'?, 'category'?}), a .txt, or shapes:heldout")
    run.add_argument("--limit", type=int, help="the first N prompts (by id) (default: all)")
    run.add_argument("--per-category", type=int, help="the first N prompts of each category (default: all)")
    run.add_argument("--protocol", choices=sorted(PROTOCOLS),
                     help="named sampling and scoring settings (pipelines/eval_protocol.py)")
    run.add_argument("--set", dest="overrides", action="append", metavar="FIELD=VALUE",
                     help="override a protocol field (e.g. cfg=3.0, images_per_prompt=4, metrics=fid,clip); "
                          "the override is recorded in protocol.json")
    run.add_argument("--metrics", type=metric_list, help=f"comma-separated subset of {','.join(METRICS)} (default: the protocol's)")
    run.add_argument("--out", required=True, help="output folder or s3:// URI (images/, protocol.json, metrics.json)")
    run.add_argument("--endpoint-url", help="S3-compatible endpoint for an s3:// --out (default: $AWS_ENDPOINT_URL, "
                                            "else AWS)")
    run.add_argument("--inception", help="FID Inception weights file (weights-inception-2015-12-05-6726825d.pth); "
                                         "needed for fid/kid (default: none)")
    run.add_argument("--clip", help="CLIP model folder (Hugging Face CLIPModel + processor); needed for clip "
                                    "(default: none)")
    run.add_argument("--reference", help="reference statistics file (hart-evaluate reference); needed for fid/kid "
                                         "(default: none)")
    run.add_argument("--actors", type=int, help="generation actors (one model each)")
    run.add_argument("--score-actors", type=int, help="scoring actors (feature networks each)")
    run.add_argument("--gpus-per-actor", type=float, help="GPUs per generation actor (0: CPU actors)")
    run.add_argument("--score-gpus-per-actor", type=float,
                     help="GPUs per scoring actor (e.g. 0.25 to share a GPU with generation; 0: CPU)")
    run.add_argument("--cpus-per-actor", type=float, help="logical CPUs per actor (Ray scheduling)")
    run.add_argument("--compile", action="store_true",
                     help="torch.compile each generation actor's transformer blocks (one compiled step per scale, "
                          "built on the actor's first group: pays off over many groups)")
    run.add_argument("--score-batch", type=int, help="images per scoring call")
    run.add_argument("--tracking-uri", help="MLflow tracking URI (default: none, no MLflow logging)")
    run.add_argument("--experiment", help="MLflow experiment of a new run")
    run.add_argument("--run-id", help="attach the figures to this existing MLflow run (default: a new run in "
                                      "--experiment when --tracking-uri is set)")
    run.add_argument("--name", help="metric prefix and artifact folder in MLflow (<name>/<figure>, <name>/step-N/...)")
    run.add_argument("--step", type=int, help="MLflow step of the figures (the checkpoint's step)")
    ref = sub.add_parser("reference", help="reference statistics of real images", formatter_class=HelpFormatter)
    ref.set_defaults(**config_defaults(ReferenceConfig))
    source = ref.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="a local folder of PNG/JPEG/WebP images")
    source.add_argument("--shards", nargs="+", help="WebDataset shards (img2dataset layout; local or s3://, globs "
                                                    "and {000..099} braces), e.g. MJHQ-30K packed as tars")
    ref.add_argument("--endpoint-url", help="S3-compatible endpoint for s3:// shards (default: $AWS_ENDPOINT_URL, "
                                            "else AWS)")
    ref.add_argument("--image-size", type=int, required=True, help="side the images are brought to (the generated size)")
    ref.add_argument("--inception", required=True, help="FID Inception weights file")
    ref.add_argument("--out", required=True, help="statistics file (.safetensors)")
    ref.add_argument("--protocol", choices=sorted(PROTOCOLS),
                     help="the protocol whose feature pipeline the statistics follow")
    ref.add_argument("--limit", type=int, help="the first N images (by file name; --images only) (default: all)")
    ref.add_argument("--score-actors", type=int, help="scoring actors (one Inception each)")
    ref.add_argument("--gpus-per-actor", type=float, help="GPUs per scoring actor (0: CPU actors)")
    ref.add_argument("--cpus-per-actor", type=float, help="logical CPUs per actor (Ray scheduling)")
    ref.add_argument("--score-batch", type=int, help="images per scoring call")
    for command in (run, ref):
        command.add_argument("--num-cpus", type=int, help="CPUs of a local Ray instance (default: all of this "
                                                          "machine's; unused with --address)")
        command.add_argument("--address", help=ADDRESS_HELP)
        command.add_argument("--ray-progress", action="store_true", help="show Ray Data's own progress output")
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> EvalJobSettings:
    """The sub-command's config from its parsed flags (lists become the config's tuples); bad values are a
    ValueError of the config's own checks."""
    config = EvaluationConfig if args.command == "run" else ReferenceConfig
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config)}
    return config(**{name: tuple(v) if isinstance(v, list) else v for name, v in values.items()})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    offline_models()
    try:
        config = build_config(args)
        result = run_evaluation(config) if isinstance(config, EvaluationConfig) else run_reference(config)
    except ValueError as exc:
        print(f"hart-evaluate: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a store that stopped answering after the checks: one line, not a traceback
        line = storage_error_line("hart-evaluate", exc, "--endpoint-url", args.endpoint_url)
        if not line:
            raise
        print(line, file=sys.stderr)
        return 1
    print(json.dumps(result.get("figures", result), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
