"""Generation job: trained (or released) checkpoints + prompts -> PNG files.

Usage:
    hart-generate --export runs/train/tiny-joint/export --protocol shapes --prompt "a red circle" --output out/
    hart-generate --export runs/demo/export --protocol demo --prompts shapes:heldout --output out/  # the demo's images
    hart-generate --llm /ckpt/hart-0.7b-1024px/llm --tokenizer /ckpt/hart-0.7b-1024px/tokenizer \
        --text-encoder /ckpt/Qwen2-VL-1.5B-Instruct --prompts prompts.txt --output out/   # released settings
    hart-generate --star runs/export/star/ema_model.pth --tokenizer runs/export/tokenizer \
        --text-encoder /ckpt/stable-diffusion-2-1 --prompt "a cat" --output out/     # STAR

Design: single-process and Ray-free (generation of a batch fits one device). The sampling settings
are a named protocol of `pipelines.eval_protocol` (`--protocol`, default `hart-mjhq-1024`: HART's
released sampler with EMA weights; `shapes` / `demo` for the shapes corpus's models), changed field
by field with `--set` and printed before generation. Prompts become the protocol's seeded groups
and each group is one `generate` call through the same code as `hart-evaluate`
(`pipelines.eval_stages.generate_group`), so the same export, prompts and protocol give the same
images in both jobs. The text encoder is `minilm` (the embedded offline default), a local folder of
a causal LM (HART uses Qwen2), or for STAR an SD-2.1 folder (its CLIP text model); nothing is
downloaded, and every model path is a local file or folder (an `s3://` one is refused with the
copy command). Files are named `<image id>-<slug>.png`, so a prompt list maps to files one to one.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import torch

from configuration.cli import HelpFormatter
from pipelines.eval_protocol import PROTOCOLS, EvalPrompt, groups, protocol_with, read_prompts
from pipelines.eval_stages import generate_group, load_generator
from trainer.export import read_export
from trainer.ray_session import offline_models


def slug(text: str, limit: int = 48) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "prompt"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hart-generate", description="generate images with a HART or STAR checkpoint",
                                     formatter_class=HelpFormatter, epilog=__doc__.split("\n\n")[1])
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--export", help="an export folder (hart-train's <storage>/<run>/export): tokenizer/ + llm/ "
                                        "or star/")
    model.add_argument("--llm", help="HART transformer folder (official llm/ layout); needs --tokenizer")
    model.add_argument("--star", help="STAR transformer: a .pth in STAR's released layout; needs --tokenizer")
    parser.add_argument("--tokenizer", help="tokenizer folder (official tokenizer/ layout) or VAR .pth (default: the "
                                            "export's tokenizer/)")
    parser.add_argument("--text-encoder", default="minilm",
                        help="'minilm', a local causal-LM folder (HART: Qwen2), or an SD-2.1 / CLIP folder (STAR)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts", help="a prompt source as hart-evaluate reads it: a .txt (one per line), a .jsonl, "
                                          "MJHQ's meta_data.json or shapes:heldout (default: only --prompt)")
    parser.add_argument("--output", required=True, help="folder for the PNG files")
    parser.add_argument("--protocol", default="hart-mjhq-1024", choices=sorted(PROTOCOLS),
                        help="named sampling settings (pipelines/eval_protocol.py): hart-mjhq-1024 is HART's released "
                             "sampler (cfg 4.5, top-k 600/300, EMA weights); shapes and demo suit the shapes models")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a protocol field, e.g. --set cfg=3.0 --set seed=1 --set ema=false "
                             "--set use_diffusion=false --set more_smooth=true")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each transformer block: one compiled step per scale, built during the first "
                             "batch (pays off over many batches; on the CPU it needs a C++ compiler)")
    args = parser.parse_args(argv)
    if not args.export and not args.tokenizer:
        parser.error("--llm and --star need --tokenizer")
    return args


def read_prompt_list(args: argparse.Namespace):
    """`--prompt`s (ids 000000, 000001... in the order given), then the `--prompts` source's, as EvalPrompts."""
    given = [EvalPrompt(f"{n:06d}", text) for n, text in enumerate(args.prompt)]
    listed = read_prompts(args.prompts) if args.prompts else []
    if given and any(p.id in {g.id for g in given} for p in listed):
        raise ValueError("--prompt and --prompts give the same ids (000000...): use one of them")
    if not given and not listed:
        raise ValueError("give at least one --prompt or a --prompts source")
    return given + listed


def model_files(args: argparse.Namespace, ema: bool) -> dict[str, str]:
    """The generator's files (`llm`, `star`, `tokenizer`), each a local path that exists."""
    files = read_export(args.export, ema) if args.export else {"llm": args.llm or "", "star": args.star or ""}
    if args.tokenizer:
        files["tokenizer"] = args.tokenizer
    for flag, path in (("--llm", files.get("llm")), ("--star", files.get("star")), ("--tokenizer", files["tokenizer"])):
        if path and "://" in path:
            raise ValueError(f"{flag} {path}: generation reads local files; copy it first (e.g. aws s3 cp --recursive "
                             f"{path} ./{Path(path).name})")
        if path and not os.path.exists(path):
            raise ValueError(f"{flag} {path}: not found")
    return files


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    offline_models()
    try:
        protocol = protocol_with(args.protocol, args.set)
        prompts = read_prompt_list(args)
        files = model_files(args, protocol.ema)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        print(f"[generate] protocol {args.protocol}{' with ' + ', '.join(args.set) if args.set else ''}: "
              f"{protocol.describe()}", flush=True)
        model, tokenizer, encoder = load_generator(files.get("llm", ""), files["tokenizer"], args.text_encoder, protocol,
                                                   device, star=files.get("star", ""), compile=args.compile)
        output = Path(args.output)
        output.mkdir(parents=True, exist_ok=True)
        written = 0
        with torch.no_grad():
            for group in groups(prompts, protocol):
                for row in generate_group(model, tokenizer, encoder, group, protocol, device):
                    (output / f"{row['id']}-{slug(row['prompt'])}.png").write_bytes(row["png"])
                    written += 1
    except ValueError as exc:
        print(f"hart-generate: {exc}", file=sys.stderr)
        return 2
    print(f"[generate] wrote {written} images to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
