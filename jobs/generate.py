"""hart-generate: trained (or released) checkpoints + prompts -> PNG files (`trainer.generation`).

Usage:
    hart-generate --export runs/train/tiny-joint/export --protocol shapes --prompt "a red circle" --output out/
    hart-generate --export runs/demo/export --protocol demo --prompts shapes:heldout --output out/  # the demo's images
    hart-generate --llm /ckpt/hart-0.7b-1024px/llm --tokenizer /ckpt/hart-0.7b-1024px/tokenizer \
        --text-encoder /ckpt/Qwen2-VL-1.5B-Instruct --prompts prompts.txt --output out/   # released settings
    hart-generate --star runs/export/star/ema_model.pth --tokenizer runs/export/tokenizer \
        --text-encoder /ckpt/stable-diffusion-2-1 --prompt "a cat" --output out/     # STAR

The design (protocols, prompt groups, model files): `trainer.generation`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from configuration.cli import HelpFormatter
from pipelines.eval_protocol import PROTOCOLS
from trainer.generation import GenerationConfig, run_generation
from trainer.ray_session import offline_models


def parse_args(argv: list[str] | None = None) -> GenerationConfig:
    defaults = {f.name: f.default for f in dataclasses.fields(GenerationConfig)}
    parser = argparse.ArgumentParser(prog="hart-generate", description="generate images with a HART or STAR checkpoint",
                                     formatter_class=HelpFormatter, epilog=__doc__.split("\n\n")[1])
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--export", help="an export folder (hart-train's <storage>/<run>/export): tokenizer/ + llm/ "
                                        "or star/")
    model.add_argument("--llm", help="HART transformer folder (official llm/ layout); needs --tokenizer")
    model.add_argument("--star", help="STAR transformer: a .pth in STAR's released layout; needs --tokenizer")
    parser.add_argument("--tokenizer", help="tokenizer folder (official tokenizer/ layout) or VAR .pth (default: the "
                                            "export's tokenizer/)")
    parser.add_argument("--text-encoder", default=defaults["text_encoder"],
                        help="'minilm', a local causal-LM folder (HART: Qwen2), or an SD-2.1 / CLIP folder (STAR)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts", help="a prompt source as hart-evaluate reads it: a .txt (one per line), a .jsonl, "
                                          "MJHQ's meta_data.json or shapes:heldout (default: only --prompt)")
    parser.add_argument("--output", required=True, help="folder for the PNG files")
    parser.add_argument("--protocol", default=defaults["protocol"], choices=sorted(PROTOCOLS),
                        help="named sampling settings (pipelines/eval_protocol.py): hart-mjhq-1024 is HART's released "
                             "sampler (cfg 4.5, top-k 600/300, EMA weights); shapes and demo suit the shapes models")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a protocol field, e.g. --set cfg=3.0 --set seed=1 --set ema=false "
                             "--set use_diffusion=false --set more_smooth=true")
    parser.add_argument("--device", default=defaults["device"], help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each transformer block: one compiled step per scale, built during the first "
                             "batch (pays off over many batches; on the CPU it needs a C++ compiler)")
    args = parser.parse_args(argv)
    if not args.export and not args.tokenizer:
        parser.error("--llm and --star need --tokenizer")
    return GenerationConfig(output=args.output, export=args.export or "", llm=args.llm or "", star=args.star or "",
                            tokenizer=args.tokenizer or "", text_encoder=args.text_encoder, prompts=tuple(args.prompt),
                            prompt_source=args.prompts or "", protocol=args.protocol, overrides=tuple(args.set),
                            device=args.device, compile=args.compile)


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    offline_models()
    try:
        written = run_generation(config)
    except ValueError as exc:
        print(f"hart-generate: {exc}", file=sys.stderr)
        return 2
    print(f"[generate] wrote {len(written)} images to {config.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


