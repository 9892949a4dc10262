"""What an evaluation measures and how: the sampling settings, the prompt set, the feature pipeline.

A quality figure is only comparable with another made the same way: HART's MJHQ-30K FID moves by
several points with `more_smooth`, CFG, resolution, resize rule and reference statistics
(docs/design/evaluation-protocol.md, "Why published FIDs are hard to reproduce"). `EvalProtocol`
pins every one of those choices, `PROTOCOLS` names the pinned sets, and `fingerprint()` is what
reference statistics and result files carry: statistics made under another fingerprint are refused.

`hart-mjhq-1024` follows the released sampler's defaults (`sample.py`): CFG 4.5 on the per-scale
schedule, top-k 600 for scales before the 8th and 300 after, no top-p, EMA weights, and
`more_smooth=False` (the released default is True, which the authors say is not for FID), one image
per prompt at the model's resolution (1024 px for hart-0.7b-1024px). Features: the FID Inception
(`pipelines.inception`) on the generated PNGs as written (RGB, uint8), resized to 299 by
TensorFlow 1.x's bilinear rule; reference images go through the same path at their stored size.
The paper does not publish its FID pipeline beyond the prompt set and resolution, so figures under
this protocol are this project's, reproducible with the named weights files. `shapes` and `demo`
sample the shapes corpus's small models with their own settings (`SHAPES_SAMPLING`); `demo` is
exactly how `make demo` makes its figures, so `hart-generate --protocol demo` on a demo export makes
the demo's images.

Prompt sources (`read_prompts`): an MJHQ-30K `meta_data.json` (`{id: {"category", "prompt"}}`), a
JSONL file (`{"prompt", "id"?, "category"?}` per line), a text file (one prompt per line), or
`shapes:heldout` (the demo corpus's held-out prompts). Prompts are ordered by id, so the same source
gives the same list, and `limit` / `per_category` take a fixed prefix.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from configuration.loader import config_from_dict
from pipelines.feature_statistics import KID_SAMPLE_CAP

METRICS = ("fid", "kid", "clip", "shapes")


@dataclass(frozen=True)
class EvalProtocol:
    cfg: float = 4.5
    top_k: tuple[int, int] = (600, 300)
    top_p: float | None = None
    more_smooth: bool = False
    ema: bool = True
    use_diffusion: bool = True
    head_cfg: float | None = None  # None: the released schedule (the last scale's token guidance)
    seed: int = 0  # group g of prompts is sampled with seed + g: a rerun gives the same images
    images_per_prompt: int = 1
    # images per generation call (a group; None: all images in one group); fixed, so images do not depend on
    # the actors
    batch_size: int | None = 8
    # images per forward pass inside a group (None: the whole group at once). The chunks of a group
    # continue one generator, so the chunk size changes the images: it is part of the protocol.
    chunk_size: int | None = None
    feature_resize: str = "tf1-bilinear-299"
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    kid_sample_cap: int = KID_SAMPLE_CAP
    metrics: tuple[str, ...] = ("fid", "kid", "clip")

    def __post_init__(self) -> None:
        unknown = set(self.metrics) - set(METRICS)
        if unknown:
            raise ValueError(f"unknown metric(s) {sorted(unknown)}; choose from {METRICS}")
        if self.images_per_prompt < 1 or any(n is not None and n < 1 for n in (self.batch_size, self.chunk_size)):
            raise ValueError("images_per_prompt, batch_size and chunk_size must be >= 1")
        if len(self.top_k) != 2:
            raise ValueError(f"top_k is (early scales, late scales), got {self.top_k}")

    def sampling(self) -> dict:
        """The keyword arguments of `hart.transformer.generate.generate` this protocol fixes (seed aside)."""
        return dict(cfg=self.cfg, top_k=tuple(self.top_k), top_p=self.top_p, more_smooth=self.more_smooth,
                    use_diffusion=self.use_diffusion, head_cfg=self.head_cfg, batch_size=self.chunk_size)

    def star_sampling(self) -> dict:
        """The keyword arguments of `hart.star.generate.generate` (seed aside): STAR samples every scale
        with one top-k (the early-scales value) and, unset, STAR's top-p 0.8. The residual-head
        settings (use_diffusion, head_cfg) do not apply to STAR; chunk_size is refused by the caller."""
        return dict(cfg=self.cfg, top_k=int(self.top_k[0]), top_p=0.8 if self.top_p is None else self.top_p,
                    more_smooth=self.more_smooth)

    def describe(self) -> str:
        """The sampling settings in one line, as the jobs that generate print them."""
        return (f"cfg {self.cfg}, top-k {tuple(self.top_k)}, top-p {self.top_p}, head cfg "
                f"{'released schedule' if self.head_cfg is None else self.head_cfg}, "
                f"{'residual head' if self.use_diffusion else 'no residual head'}, "
                f"{'EMA' if self.ema else 'raw'} weights, more_smooth {self.more_smooth}, seed {self.seed}, "
                f"{self.images_per_prompt} image(s) per prompt, groups of {self.batch_size or 'all'}"
                f"{f' in chunks of {self.chunk_size}' if self.chunk_size else ''}")

    def fingerprint(self, feature_network: str, image_size: int) -> dict:
        """What reference statistics must share with a run for FID/KID against them to mean anything."""
        return {"feature_network": feature_network, "image_size": image_size, "feature_resize": self.feature_resize}

    def to_dict(self) -> dict:
        return asdict(self)


# Small models of the shapes corpus sample best with a mild guidance and a small top-k: a 256-code
# tokenizer has no long tail to cut at 600, and the released head schedule (the tokens' guidance) made
# the demo's sampled residual 3-5x larger than the real one, so the head runs unguided (BENCHMARKS.md).
SHAPES_SAMPLING = dict(cfg=3.0, top_k=(16, 16), head_cfg=1.0, metrics=("shapes",))
PROTOCOLS = {
    "hart-mjhq-1024": EvalProtocol(),
    # Shapes prompts (e.g. shapes:heldout), one image each: prompt following by the shapes classifier
    # (and CLIP if given); what evaluation inside training uses by default.
    "shapes": EvalProtocol(**SHAPES_SAMPLING),
    # `make demo`'s figures: every held-out prompt 8 times, all in one seeded group sampled 32 images at
    # a time (one generator); hart-generate and hart-evaluate under it make the demo's images.
    "demo": EvalProtocol(**SHAPES_SAMPLING, images_per_prompt=8, batch_size=None, chunk_size=32),
}


def protocol_with(name: str, overrides: Sequence[str] = (), metrics: Sequence[str] = ()) -> EvalProtocol:
    """Protocol `name` with `FIELD=VALUE` overrides (hart-evaluate's and hart-generate's `--set`), then
    `metrics` (if any) as its metrics. Values are parsed as YAML and checked against the field types
    (`configuration.loader.config_from_dict`): a bad field or value is a ValueError here, not an actor
    failure later."""
    if name not in PROTOCOLS:
        raise ValueError(f"protocol {name!r}: expected one of {sorted(PROTOCOLS)}")
    data = PROTOCOLS[name].to_dict()
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in data:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {sorted(data)}")
        parsed = yaml.safe_load(value)
        data[key] = value.split(",") if key == "metrics" and isinstance(parsed, str) else parsed
    if metrics:
        data["metrics"] = list(metrics)
    return config_from_dict(EvalProtocol, data, where="protocol")


@dataclass(frozen=True)
class EvalPrompt:
    id: str
    prompt: str
    category: str = field(default="all")


def read_prompts(source: str, limit: int | None = None, per_category: int | None = None) -> list[EvalPrompt]:
    if source.startswith("shapes:"):
        from pipelines.shapes import prompts

        split = source.split(":", 1)[1]
        items = [EvalPrompt(f"{split}-{i:04d}", p, "shapes") for i, p in enumerate(prompts(split))]
    else:
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"prompt file not found: {source} (an MJHQ meta_data.json, a .jsonl, a .txt, "
                             f"or shapes:heldout)")
        if path.suffix == ".json":
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or not all(isinstance(v, dict) and "prompt" in v for v in data.values()):
                raise ValueError(f"{source}: expected MJHQ's meta_data.json layout {{id: {{'category', 'prompt'}}}}")
            items = [EvalPrompt(str(k), v["prompt"], v.get("category", "all")) for k, v in data.items()]
        elif path.suffix == ".jsonl":
            items = []
            for n, line in enumerate(path.read_text().splitlines()):
                if line.strip():
                    row = json.loads(line)
                    if "prompt" not in row:
                        raise ValueError(f"{source} line {n + 1}: no 'prompt' field")
                    items.append(EvalPrompt(str(row.get("id", f"{n:06d}")), row["prompt"], row.get("category", "all")))
        else:
            lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
            items = [EvalPrompt(f"{n:06d}", p) for n, p in enumerate(lines)]
    items.sort(key=lambda item: item.id)
    if len({item.id for item in items}) != len(items):
        raise ValueError(f"{source}: prompt ids are not unique")
    if per_category is not None:
        seen: dict[str, int] = {}
        kept = []
        for item in items:
            if seen.get(item.category, 0) < per_category:
                kept.append(item)
                seen[item.category] = seen.get(item.category, 0) + 1
        items = kept
    if limit is not None:
        items = items[:limit]
    if not items:
        raise ValueError(f"{source}: no prompts")
    return items


def prompt_set_identity(source: str, prompts: Sequence[EvalPrompt], reference_digest: str = "") -> tuple[str, str]:
    """(name, digest) of what an evaluation's figures were computed on: the prompts as read (ids, texts and
    categories, in order, so a `limit` or another file is another digest) and, for FID/KID, the reference
    statistics (`reference_digest`: the file's SHA-256). The name is the source's: `shapes:heldout` or the
    prompt file's name, with `+reference` when a reference is part of it."""
    listed = json.dumps([[p.id, p.prompt, p.category] for p in prompts] + [reference_digest], separators=(",", ":"))
    name = source if source.startswith("shapes:") else Path(source).name
    return name + ("+reference" if reference_digest else ""), hashlib.sha256(listed.encode()).hexdigest()


def groups(prompts: list[EvalPrompt], protocol: EvalProtocol) -> list[dict]:
    """Generation groups in a fixed order: each row is one `generate` call of up to batch_size images
    (every prompt repeated images_per_prompt times), seeded with protocol.seed + group index."""
    images = [(f"{p.id}-{k}" if protocol.images_per_prompt > 1 else p.id, p) for p in prompts
              for k in range(protocol.images_per_prompt)]
    rows, size = [], protocol.batch_size or max(len(images), 1)
    for g, start in enumerate(range(0, len(images), size)):
        chunk = images[start : start + size]
        rows.append({"group": g, "seed": protocol.seed + g, "ids": [i for i, _ in chunk],
                     "prompts": [p.prompt for _, p in chunk], "categories": [p.category for _, p in chunk]})
    return rows
