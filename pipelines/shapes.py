"""Procedural "shapes" corpus: WebDataset shards in the img2dataset layout, for tests and the demo.

Design: each sample is a coloured circle, square or triangle at one of a few positions and sizes
on a plain background, drawn with PIL at 64px (any size works). Everything about sample `i` is
drawn from `numpy.random.default_rng([seed, i])`, so a corpus is a pure function of
(seed, num_samples, split) and any sample can be regenerated alone. Captions are paraphrases
("a red circle on a white background", "red circle, white backdrop" ...). Each sample's label
(colour, shape, background, position, size, class index, jitter) is stored in `KEY.json`, so
tests and the demo can check generated images against their prompts.

Geometry: the named position and size are jittered per sample (centre +-3% of the side, extent
x0.9-1.1), shapes are 45% or 60% of the side (at least 25 px
across) and the four off-centre positions sit 9% of the side from the centre. Without the
jitter the corpus held only 360 distinct images and the demo's generator memorised them. The
sizes were 35% / 50% before: at 45% / 60% a shape covers more latent
tokens of the 8x-downsampling tokenizer, and the demo's held-out colour accuracy rose from
74-81% to 92% (two demo seeds, BENCHMARKS.md); the larger shapes leave less room, so the
positions moved towards the centre (they were 14% from it). Every shape stays at least 3 px
inside the border, which `shapes_classifier` reads as the background.

Held-out split: every (colour, shape) pair is held out on one background, so 18 (colour, shape,
background) scenes never appear in the "train" split and the "heldout" split draws only from
them. The background is a Latin square, (colour index + shape index) mod 3, so every *pair* of
factors is still seen in training: each (colour, shape) on two backgrounds, each (shape,
background) with four colours, each (colour, background) with two shapes. Evaluation prompts
therefore describe scenes the model never saw, composed only of pairs it did see (a tiny CPU
model is not asked for zero-shot composition of pairs it never saw). An earlier rule, pair
index mod 3, tied the background to the shape (every circle held out on white, every square
on black), so training never showed a circle on white at all. `prompts(split)` lists the
canonical prompt of every scene of a split.

Shards are written whole through `pipelines.storage` (local path, file:// or s3://), with
members sorted by key (`KEY.jpg`, `KEY.json`, `KEY.txt`), like img2dataset. A few thousand
samples take about a second.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

from pipelines import storage

COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220),
    "yellow": (240, 210, 30), "purple": (140, 50, 170), "orange": (245, 140, 20),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
# The largest shape (0.6 x 1.1 of the side) at the largest jitter keeps 3 px from the border here.
POSITIONS = {"center": (0.5, 0.5), "top left": (0.41, 0.41), "top right": (0.59, 0.41),
             "bottom left": (0.41, 0.59), "bottom right": (0.59, 0.59)}
SIZES = {"small": 0.45, "large": 0.6}  # shape extent as a fraction of the image side
JITTER = 0.03  # largest centre offset per axis, as a fraction of the side
SCALE_RANGE = (0.9, 1.1)  # extent multiplier drawn per sample
TEMPLATES = (
    "a {colour} {shape} on a {background} background",
    "a {size} {colour} {shape} on a {background} background",
    "{colour} {shape}, {background} backdrop",
    "a picture of a {colour} {shape} against {background}",
    "a {colour} {shape} in the {position} of a {background} image",
    "simple drawing: one {colour} {shape} on {background}",
)
LABELS = tuple((colour, shape) for colour in COLOURS for shape in SHAPES)  # class index = position here
# (colour, shape, background) scenes of the held-out split: a Latin square over (colour, shape) -> background.
HELD_OUT_SCENES = frozenset(
    (colour, shape, list(BACKGROUNDS)[(c + s) % len(BACKGROUNDS)])
    for c, colour in enumerate(COLOURS) for s, shape in enumerate(SHAPES)
)


@dataclass(frozen=True)
class ShapeSample:
    key: str
    colour: str
    shape: str
    background: str
    position: str
    size: str
    caption: str
    label: int  # index into LABELS
    dx: float = 0.0  # centre offset from POSITIONS[position], fraction of the side
    dy: float = 0.0
    scale: float = 1.0  # multiplies SIZES[size]

    def metadata(self) -> dict:
        return asdict(self)


def _scenes(split: str) -> list[tuple[str, str, str]]:
    scenes = [(c, s, b) for c, s in LABELS for b in BACKGROUNDS]
    if split == "train":
        return [scene for scene in scenes if scene not in HELD_OUT_SCENES]
    if split == "heldout":
        return [scene for scene in scenes if scene in HELD_OUT_SCENES]
    raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")


def canonical_prompt(colour: str, shape: str, background: str) -> str:
    return TEMPLATES[0].format(colour=colour, shape=shape, background=background)


def label_of(prompt: str) -> tuple[str, str]:
    """(colour, shape) named in a prompt of this corpus."""
    words = prompt.replace(",", " ").split()
    try:
        return next(w for w in words if w in COLOURS), next(w for w in words if w in SHAPES)
    except StopIteration:
        raise ValueError(f"not a shapes prompt (no colour and shape word): {prompt!r}") from None


def prompts(split: str = "heldout") -> list[str]:
    """Canonical prompts of every (colour, shape, background) of a split, for evaluation."""
    return [canonical_prompt(c, s, b) for c, s, b in _scenes(split)]


def sample_spec(index: int, seed: int = 0, split: str = "train", key: str | None = None) -> ShapeSample:
    """The (deterministic) description of sample `index`."""
    rng = np.random.default_rng([seed, index, 0 if split == "train" else 1])
    scenes = _scenes(split)
    colour, shape, background = scenes[int(rng.integers(len(scenes)))]
    position = list(POSITIONS)[int(rng.integers(len(POSITIONS)))]
    size = list(SIZES)[int(rng.integers(len(SIZES)))]
    template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    caption = template.format(colour=colour, shape=shape, background=background, position=position, size=size)
    # Drawn after every earlier field, so scene, position, size and caption of sample i are the
    # same as before the jitter existed.
    dx, dy = (float(v) for v in rng.uniform(-JITTER, JITTER, 2))
    scale = float(rng.uniform(*SCALE_RANGE))
    return ShapeSample(key=key or f"{index:09d}", colour=colour, shape=shape, background=background,
                       position=position, size=size, caption=caption, label=LABELS.index((colour, shape)),
                       dx=dx, dy=dy, scale=scale)


def render(sample: ShapeSample, image_size: int = 64) -> Image.Image:
    image = Image.new("RGB", (image_size, image_size), BACKGROUNDS[sample.background])
    draw = ImageDraw.Draw(image)
    px, py = POSITIONS[sample.position]
    cx, cy = (px + sample.dx) * image_size, (py + sample.dy) * image_size
    half = SIZES[sample.size] * sample.scale * image_size / 2
    box = (cx - half, cy - half, cx + half, cy + half)
    fill = COLOURS[sample.colour]
    if sample.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif sample.shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fill)
    return image


def encode_image(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    if image_format in ("jpg", "jpeg"):
        image.save(buffer, format="JPEG", quality=95)
    elif image_format in ("png", "webp"):
        image.save(buffer, format=image_format.upper())
    else:
        raise ValueError(f"image_format must be jpg, png or webp, got {image_format!r}")
    return buffer.getvalue()


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """An uncompressed tar holding `members` (name, data) in the given order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0  # deterministic bytes
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def write_shapes_shards(output: str, num_samples: int, num_shards: int, seed: int = 0, split: str = "train",
                        image_size: int = 64, image_format: str = "jpg", prefix: str = "shard",
                        endpoint_url: str = "") -> list[str]:
    """Write `num_samples` samples into `num_shards` tars `<prefix>-00000.tar` ...; returns their URIs."""
    if num_shards < 1 or num_samples < 0:
        raise ValueError("num_shards must be >= 1 and num_samples >= 0")
    fs, base = storage.resolve(output, endpoint_url)
    uris = []
    bounds = np.linspace(0, num_samples, num_shards + 1).round().astype(int)
    for shard in range(num_shards):
        members = []
        for index in range(bounds[shard], bounds[shard + 1]):
            sample = sample_spec(index, seed, split, key=f"{shard:05d}{index - bounds[shard]:04d}")
            members += [
                (f"{sample.key}.{image_format}", encode_image(render(sample, image_size), image_format)),
                (f"{sample.key}.json", json.dumps(sample.metadata()).encode()),
                (f"{sample.key}.txt", sample.caption.encode()),
            ]
        name = f"{prefix}-{shard:05d}.tar"
        storage.write_bytes_atomic(fs, f"{base}/{name}", tar_bytes(members))
        uris.append(storage.join(output, name))
    return uris


def parse_args(argv: list[str] | None = None):
    import argparse

    from configuration.cli import HelpFormatter

    parser = argparse.ArgumentParser(prog="python -m pipelines.shapes", formatter_class=HelpFormatter,
                                     description="write a procedural shapes corpus as WebDataset shards")
    parser.add_argument("--output", required=True, help="folder, file:// or s3:// prefix")
    parser.add_argument("--num-samples", type=int, default=2000, help="samples in all")
    parser.add_argument("--num-shards", type=int, default=4, help="tar files they are spread over")
    parser.add_argument("--seed", type=int, default=0, help="seed of the samples")
    parser.add_argument("--split", default="train", choices=("train", "heldout"),
                        help="train: captions of the training prompts; heldout: the held-out prompts")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--image-format", default="jpg", choices=("jpg", "png", "webp"), help="image file format")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    uris = write_shapes_shards(args.output, args.num_samples, args.num_shards, args.seed, args.split,
                               args.image_size, args.image_format)
    print(f"wrote {args.num_samples} samples into {len(uris)} shards under {args.output}")


if __name__ == "__main__":
    main()
