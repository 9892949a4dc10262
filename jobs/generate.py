"""Generation job: trained (or released) checkpoints + prompts -> PNG files.

Usage:
    python -m jobs.generate --llm runs/export/llm --tokenizer runs/export/tokenizer \
        --prompt "a red circle on a white background" --output runs/samples [--ema] [--cfg 4.5]
    hart-generate --llm /ckpt/hart-0.7b-1024px/llm --tokenizer /ckpt/hart-0.7b-1024px/tokenizer \
        --text-encoder /ckpt/Qwen2-VL-1.5B-Instruct --prompts-file prompts.txt --output out/
    hart-generate --star runs/export/star/ema_model.pth --tokenizer runs/export/tokenizer \
        --text-encoder /ckpt/stable-diffusion-2-1 --prompt "a cat" --output out/     # STAR

Design: single-process and Ray-free (generation of a batch fits one device); the library
call is `hart.transformer.generate.generate`, or `hart.star.generate.generate` for a STAR `.pth`
(`--star`: one top-k for every scale, the first `--top-k` value, and top-p 0.8 unless given, as
STAR's `sample.py`). The text encoder is `minilm` (the embedded offline default), a local folder of a
causal LM (HART uses Qwen2), or for STAR an SD-2.1 folder (its CLIP text model); nothing is downloaded.
Files are named `<index>-<slug>.png` so a prompt list maps to files one to one.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def slug(text: str, limit: int = 48) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "prompt"


def write_images(images, prompts: list[str], output: Path) -> list[Path]:
    output.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, (image, prompt) in enumerate(zip(images, prompts)):
        path = output / f"{index:04d}-{slug(prompt)}.png"
        image.save(path)
        paths.append(path)
    return paths


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hart-generate", description="generate images with a HART checkpoint")
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--llm", help="HART transformer folder (official llm/ layout)")
    model.add_argument("--star", help="STAR transformer: a .pth in STAR's released layout (trainer dict or state dict)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer folder (official tokenizer/ layout) or VAR .pth")
    parser.add_argument("--text-encoder", default="minilm",
                        help="'minilm', a local causal-LM folder (HART: Qwen2), or an SD-2.1 / CLIP folder (STAR)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts-file", help="a text file with one prompt per line")
    parser.add_argument("--output", required=True, help="folder for the PNG files")
    parser.add_argument("--ema", action="store_true", help="use ema_model.bin weights (the released default)")
    parser.add_argument("--cfg", type=float, default=4.5, help="classifier-free guidance scale")
    parser.add_argument("--top-k", type=int, nargs=2, default=(600, 300), metavar=("EARLY", "LATE"),
                        help="top-k for scales < 7 and for later scales")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-diffusion", action="store_true", help="discrete tokens only (skip the residual head)")
    parser.add_argument("--head-cfg", type=float, default=None,
                        help="guidance of the residual diffusion head (default: the released schedule, the last "
                             "scale's token guidance; 1.0 = unguided)")
    parser.add_argument("--more-smooth", action="store_true", help="Gumbel-softmax smoothing (not for FID)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each transformer block: one compiled step per scale, built during the first "
                             "batch (pays off over many batches; on the CPU it needs a C++ compiler)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    if not prompts:
        print("hart-generate: give at least one --prompt or a --prompts-file", file=sys.stderr)
        return 2
    from hart.training.parallelize import compile_for_generation
    from hart.transformer.generate import generate, load_models

    try:
        if args.star:
            images = star_images(args, prompts)
            return _written(images, prompts, args.output)
        model, tok, encoder = load_models(args.llm, args.tokenizer, args.text_encoder, args.ema, args.device)
        if args.compile:
            compile_for_generation(model, len(model.config.patch_nums), torch.device(args.device))
        autocast = torch.bfloat16 if args.device.startswith("cuda") else None
        images = generate(model, tok, encoder, prompts, cfg=args.cfg, top_k=tuple(args.top_k), top_p=args.top_p,
                          more_smooth=args.more_smooth, seed=args.seed, use_diffusion=not args.no_diffusion,
                          batch_size=args.batch_size, autocast_dtype=autocast, head_cfg=args.head_cfg)
    except ValueError as exc:
        print(f"hart-generate: {exc}", file=sys.stderr)
        return 2
    return _written(images, prompts, args.output)


def _written(images, prompts: list[str], output: str) -> int:
    paths = write_images(images, prompts, Path(output))
    print(f"wrote {len(paths)} images to {output}")
    return 0


def star_images(args: argparse.Namespace, prompts: list[str]) -> list:
    """STAR's sampler over the prompts in batches of `--batch-size` (seed + batch index per batch)."""
    from PIL import Image

    from hart.star.checkpoint import load_star
    from hart.training.parallelize import compile_for_generation
    from hart.star.generate import generate
    from hart.text_encoder import build_star_text_encoder
    from hart.tokenizer.model import HybridTokenizer

    device = torch.device(args.device)
    model = load_star(args.star).to(device).eval()
    if args.compile:
        compile_for_generation(model, len(model.config.patch_nums), device)
    tokenizer = HybridTokenizer.from_pretrained(args.tokenizer).to(device).eval()
    features = build_star_text_encoder(args.text_encoder, model.config.context_token).to(device)
    autocast = torch.float16 if device.type == "cuda" else None  # STAR's sample.py runs fp16
    top_p = 0.8 if args.top_p is None else args.top_p
    with torch.no_grad():
        null = features([""])
        images = []
        for index in range(0, len(prompts), args.batch_size):
            batch = prompts[index : index + args.batch_size]
            images += list(generate(model, tokenizer, features(batch), null, cfg=args.cfg, top_k=args.top_k[0],
                                    top_p=top_p, seed=args.seed + index // args.batch_size,
                                    more_smooth=args.more_smooth, autocast_dtype=autocast))
    return [Image.fromarray(image) for image in images]


if __name__ == "__main__":
    sys.exit(main())
