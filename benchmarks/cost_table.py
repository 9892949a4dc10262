"""Cache size, S3 storage and GPU-hour table for HART token caches at 1M / 100M / 1B images.

Design: the only exact numbers here are the cache bytes per sample, computed from the cache
schema (pipelines/ contract 4) and the released scale lists in `hart.config`:

    tokens    int16  x sum(pn^2)                (all scales concatenated)
    residual  fp16   x z_channels x pn_last^2   (the continuous residual at the last scale)
    text      fp16   x text_tokens x text_dim   + bool mask x text_tokens   (only if stored)
    metadata  key, caption, width, height, source_shard (an assumed average, --metadata-bytes)

The online columns price `online.enabled` training (pipelines/online.py): no cache is stored, and
the tokenizer (and a text encoder, when its features would have been stored) encode every epoch.

Everything else is arithmetic on throughput and price ASSUMPTIONS passed as flags (GPU throughput:
not measured). The defaults are estimates, derived in
infra/README.md ("Cost and size"), and must be replaced by `benchmarks/` measurements:

* precompute images/s per A100 (tokenizer encode): 400 / 100 / 25 at 256 / 512 / 1024 px.
  FLOP estimate of VAR's ch160 conv encoder (~0.2 TFLOP per 256px image) at ~40 % of the
  A100 bf16 peak, then /4 per doubling of the side.
* training images/s per A100: 22 / 8.4 / 2.2. Anchor: VAR-d16 (310M params) trained 200
  ImageNet epochs at 256px in 2.5 days on 16 A100 = 74 img/s/GPU
  (docs/design/training-recipe.md, "Published cost figures"); scaled by params (310M / 732M)
  and sequence length ((1 + 680) / (300 + L)) for HART-0.7B.
* $3.00 per A100-hour (1-year reserved p4de, docs/design/ray.md, "A100 price"); $0.023 per GB-month (S3 Standard).

Run `python -m benchmarks.cost_table --help` for the flags; infra/README.md prints the exact command.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

from hart.config import RELEASED_SCALE_LISTS, TokenizerConfig
from hart.scale_grid import ScaleGrid

SECONDS_PER_HOUR = 3600.0
BYTES_PER_GB = 1e9  # decimal units everywhere in the table

DEFAULT_PRECOMPUTE_IMAGES_PER_S = "256=400,512=100,1024=25"
DEFAULT_TRAIN_IMAGES_PER_S = "256=22,512=8.4,1024=2.2"


def cache_bytes_per_sample(
    patch_nums: tuple[int, ...],
    z_channels: int,
    text_tokens: int = 0,
    text_dim: int = 0,
    metadata_bytes: int = 0,
) -> int:
    """Uncompressed bytes of one cache row (before parquet encoding)."""
    grid = ScaleGrid(tuple(patch_nums))  # ValueError for a list that is not a scale list
    if z_channels <= 0:
        raise ValueError(f"z_channels must be positive, got {z_channels}")
    if text_tokens < 0 or text_dim < 0 or metadata_bytes < 0:
        raise ValueError("text_tokens, text_dim and metadata_bytes must be >= 0")
    if (text_tokens == 0) != (text_dim == 0):
        raise ValueError(f"text_tokens and text_dim must both be 0 or both > 0, got {text_tokens}, {text_dim}")
    token_bytes = 2 * grid.num_tokens  # int16
    residual_bytes = 2 * math.prod(grid.residual_shape(z_channels))  # fp16 (z, h, w)
    text_bytes = 2 * text_tokens * text_dim + text_tokens  # fp16 features + bool mask
    return token_bytes + residual_bytes + text_bytes + metadata_bytes


def resolution_bytes_per_sample(resolution: int, text_tokens: int = 0, text_dim: int = 0, metadata_bytes: int = 0) -> int:
    if resolution not in RELEASED_SCALE_LISTS:
        raise ValueError(f"resolution must be one of {sorted(RELEASED_SCALE_LISTS)}, got {resolution}")
    config = TokenizerConfig(patch_nums=RELEASED_SCALE_LISTS[resolution])  # the released net (the defaults)
    return cache_bytes_per_sample(config.patch_nums, config.z_channels, text_tokens, text_dim, metadata_bytes)


@dataclass(frozen=True)
class CostAssumptions:
    """Throughput and price inputs; every one is an estimate until benchmarks/ replaces it."""

    precompute_images_per_s: dict[int, float]  # per GPU, tokenizer encode, by resolution
    train_images_per_s: dict[int, float]  # per GPU, one training stage, by resolution
    text_encode_samples_per_s: float = 0.0  # per GPU; only used when text features are stored
    raw_bytes_per_image: float = 100e3  # source JPEG + caption in the raw shards
    epochs: float = 1.0
    num_gpus: int = 64
    usd_per_gpu_hour: float = 3.00
    usd_per_gb_month: float = 0.023

    def __post_init__(self) -> None:
        for name in ("precompute_images_per_s", "train_images_per_s"):
            for resolution, rate in getattr(self, name).items():
                if rate <= 0:
                    raise ValueError(f"{name}[{resolution}] must be > 0, got {rate}")
        for name in ("raw_bytes_per_image", "epochs", "num_gpus", "usd_per_gpu_hour", "usd_per_gb_month"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.text_encode_samples_per_s < 0:
            raise ValueError(f"text_encode_samples_per_s must be >= 0, got {self.text_encode_samples_per_s}")


@dataclass(frozen=True)
class CostRow:
    num_images: int
    resolution: int
    bytes_per_sample: int
    cache_bytes: float
    raw_bytes: float
    s3_usd_per_month: float
    precompute_gpu_hours: float
    train_gpu_hours: float
    wall_days: float  # precompute + training on `num_gpus` GPUs at perfect scaling
    gpu_usd: float
    # Online mode (no cache): the tokenizer (and text encoder) run again in every epoch, and only the
    # raw shards are stored.
    online_gpu_hours: float = 0.0
    online_s3_usd_per_month: float = 0.0
    online_gpu_usd: float = 0.0


def cost_row(num_images: int, resolution: int, bytes_per_sample: int, assumptions: CostAssumptions, stores_text: bool = False) -> CostRow:
    if num_images <= 0:
        raise ValueError(f"num_images must be > 0, got {num_images}")
    for name in ("precompute_images_per_s", "train_images_per_s"):
        if resolution not in getattr(assumptions, name):
            raise ValueError(f"no {name} given for resolution {resolution}")
    if stores_text and assumptions.text_encode_samples_per_s <= 0:
        raise ValueError("text features are stored: give --text-encode-samples-per-s > 0")
    cache_bytes = float(num_images) * bytes_per_sample
    raw_bytes = float(num_images) * assumptions.raw_bytes_per_image
    precompute_seconds = num_images / assumptions.precompute_images_per_s[resolution]
    if stores_text:
        precompute_seconds += num_images / assumptions.text_encode_samples_per_s
    precompute_gpu_hours = precompute_seconds / SECONDS_PER_HOUR
    train_gpu_hours = assumptions.epochs * num_images / assumptions.train_images_per_s[resolution] / SECONDS_PER_HOUR
    total_gpu_hours = precompute_gpu_hours + train_gpu_hours
    online_gpu_hours = assumptions.epochs * precompute_gpu_hours + train_gpu_hours
    return CostRow(
        num_images=num_images,
        resolution=resolution,
        bytes_per_sample=bytes_per_sample,
        cache_bytes=cache_bytes,
        raw_bytes=raw_bytes,
        s3_usd_per_month=(cache_bytes + raw_bytes) / BYTES_PER_GB * assumptions.usd_per_gb_month,
        precompute_gpu_hours=precompute_gpu_hours,
        train_gpu_hours=train_gpu_hours,
        wall_days=total_gpu_hours / assumptions.num_gpus / 24.0,
        gpu_usd=total_gpu_hours * assumptions.usd_per_gpu_hour,
        online_gpu_hours=online_gpu_hours,
        online_s3_usd_per_month=raw_bytes / BYTES_PER_GB * assumptions.usd_per_gb_month,
        online_gpu_usd=online_gpu_hours * assumptions.usd_per_gpu_hour,
    )


def format_bytes(num_bytes: float) -> str:
    for unit, scale in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{num_bytes / 1e3:.2f} kB"


def format_count(count: int) -> str:
    for suffix, scale in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if count >= scale and count % scale == 0:
            return f"{count // scale}{suffix}"
    return str(count)


def format_table(rows: list[CostRow], num_gpus: int) -> str:
    header = (
        "| images | px | cache B/sample | cache | raw shards | S3 $/month | precompute GPU-h "
        f"| train GPU-h | days on {num_gpus} GPUs | GPU $ | online: GPU-h | online: S3 $/month | online: GPU $ |"
    )
    lines = [header, "|" + "---|" * 13]
    for row in rows:
        lines.append(
            f"| {format_count(row.num_images)} | {row.resolution} | {row.bytes_per_sample:,} | {format_bytes(row.cache_bytes)} "
            f"| {format_bytes(row.raw_bytes)} | {row.s3_usd_per_month:,.0f} | {row.precompute_gpu_hours:,.0f} "
            f"| {row.train_gpu_hours:,.0f} | {row.wall_days:,.2f} | {row.gpu_usd:,.0f} "
            f"| {row.online_gpu_hours:,.0f} | {row.online_s3_usd_per_month:,.0f} | {row.online_gpu_usd:,.0f} |"
        )
    return "\n".join(lines)


def parse_count(text: str) -> int:
    """'1M' -> 10**6, '1B' -> 10**9, '2.5e6' -> 2500000."""
    text = text.strip()
    multipliers = {"k": 10**3, "M": 10**6, "B": 10**9}
    try:
        if text and text[-1] in multipliers:
            value = float(text[:-1]) * multipliers[text[-1]]
        else:
            value = float(text)
    except ValueError:
        raise ValueError(f"not a count: {text!r} (use e.g. 1M, 100M, 1B or 1e6)") from None
    if value <= 0 or value != int(value):
        raise ValueError(f"count must be a positive integer, got {text!r}")
    return int(value)


def parse_rate_map(text: str, flag: str) -> dict[int, float]:
    """'256=400,512=100' -> {256: 400.0, 512: 100.0}."""
    rates: dict[int, float] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{flag}: expected RES=RATE items, got {item!r}")
        try:
            rates[int(key)] = float(value)
        except ValueError:
            raise ValueError(f"{flag}: expected RES=RATE items, got {item!r}") from None
    return rates


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--num-images", default="1M,100M,1B", help="comma list of dataset sizes")
    parser.add_argument("--resolutions", default="256,512,1024", help="comma list of image sides (released scale lists)")
    parser.add_argument("--text-tokens", type=int, default=0, help="stored text-feature tokens per sample (HART/Qwen2: 300)")
    parser.add_argument("--text-dim", type=int, default=0, help="stored text-feature width (Qwen2-1.5B: 1536, MiniLM: 384)")
    parser.add_argument("--metadata-bytes", type=int, default=200, help="assumed key + caption + sizes per row")
    parser.add_argument("--raw-kb-per-image", type=float, default=100.0, help="assumed raw shard bytes per image, in kB")
    parser.add_argument("--precompute-images-per-s", default=DEFAULT_PRECOMPUTE_IMAGES_PER_S, help="tokenizer encode images/s per GPU, RES=RATE list (ESTIMATE)")
    parser.add_argument("--train-images-per-s", default=DEFAULT_TRAIN_IMAGES_PER_S, help="training images/s per GPU, RES=RATE list (ESTIMATE)")
    parser.add_argument("--text-encode-samples-per-s", type=float, default=0.0, help="text-encoder samples/s per GPU, needed with --text-tokens (ESTIMATE)")
    parser.add_argument("--epochs", type=float, default=1.0, help="training passes over the dataset")
    parser.add_argument("--gpus", type=int, default=64, help="GPUs for the wall-clock column")
    parser.add_argument("--usd-per-gpu-hour", type=float, default=3.00)
    parser.add_argument("--usd-per-gb-month", type=float, default=0.023)
    return parser


def main(argv: list[str] | None = None) -> str:
    args = build_parser().parse_args(argv)
    assumptions = CostAssumptions(
        precompute_images_per_s=parse_rate_map(args.precompute_images_per_s, "--precompute-images-per-s"),
        train_images_per_s=parse_rate_map(args.train_images_per_s, "--train-images-per-s"),
        text_encode_samples_per_s=args.text_encode_samples_per_s,
        raw_bytes_per_image=args.raw_kb_per_image * 1e3,
        epochs=args.epochs,
        num_gpus=args.gpus,
        usd_per_gpu_hour=args.usd_per_gpu_hour,
        usd_per_gb_month=args.usd_per_gb_month,
    )
    stores_text = args.text_tokens > 0
    rows = []
    for count_text in args.num_images.split(","):
        for resolution_text in args.resolutions.split(","):
            resolution = int(resolution_text)
            per_sample = resolution_bytes_per_sample(resolution, args.text_tokens, args.text_dim, args.metadata_bytes)
            rows.append(cost_row(parse_count(count_text), resolution, per_sample, assumptions, stores_text))
    table = format_table(rows, args.gpus)
    print(table)
    return table


if __name__ == "__main__":
    try:
        main()
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
