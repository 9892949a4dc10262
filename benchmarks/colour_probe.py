"""Where a shapes tokenizer loses colour: the autoencoder path, the discrete path, and its latent.

The demo's generation can only draw the colours its tokenizer reproduces, so this probe asks a
trained tokenizer folder (e.g. `runs/demo/export/tokenizer`) three questions:
1. For a large centred square of each palette colour on each background, what colour comes back
   at its centre through the plain autoencoder (encode_latent -> decode_latent, no quantization)
   and through the discrete tokens (decode of the VQ tokens only)? A colour lost on the first path
   is lost by the encoder/decoder themselves, not by the codebook.
2. How far apart are the colours in the encoder's latent at the square's centre (L2, per
   background)? Colours at ~0 distance cannot be told apart by any decoder.
3. The demo classifier's colour confusion on hybrid reconstructions of `--num-images` training-split
   images (the images the tokenizer was trained on).

Usage: python -m benchmarks.colour_probe TOKENIZER_DIR [--num-images 360] [--seed 0]
"""

from __future__ import annotations

import argparse
import io
from collections import Counter

import numpy as np
import torch
from PIL import Image

from hart.pixels import to_pil
from hart.tokenizer.model import HybridTokenizer
from trainer.data import images_collate
from pipelines import shapes_classifier
from pipelines.shapes import BACKGROUNDS, COLOURS, ShapeSample, encode_image, render, sample_spec


def as_batch(images: list[Image.Image]) -> torch.Tensor:
    """PIL RGB images -> (B, 3, H, W) in [-1, 1], by the tokenizer stage's own collate."""
    batch = {"image": np.stack([np.asarray(im) for im in images]), "caption": np.array([""] * len(images), dtype=object)}
    return images_collate(batch)["images"]


def centre_rgb(images_B3HW: torch.Tensor) -> list[tuple[int, ...]]:
    """Mean colour (0-255) of the central 8x8 pixels, inside the probe's large square."""
    h, w = images_B3HW.shape[-2:]
    centre = images_B3HW[:, :, h // 2 - 4:h // 2 + 4, w // 2 - 4:w // 2 + 4].mean((2, 3))
    return [tuple(int(v) for v in row) for row in ((centre.clamp(-1, 1) + 1) * 127.5).round()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tokenizer", help="a HART tokenizer/ folder")
    parser.add_argument("--num-images", type=int, default=360)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    tok = HybridTokenizer.from_pretrained(args.tokenizer).eval()
    size = tok.config.image_size()

    names = list(COLOURS)
    for background in BACKGROUNDS:
        print(f"1. centre colour of a large square on {background}: truth -> autoencoder path | discrete tokens")
        probes = [render(ShapeSample("k", c, "square", background, "center", "large", "", 0), size) for c in names]
        x = as_batch(probes)
        with torch.no_grad():
            latent = tok.encode_latent(x)
            autoencoder = centre_rgb(tok.decode_latent(latent))
            discrete = centre_rgb(tok.decode(tok.encode(x)[0]))
        for colour, ae, dq in zip(names, autoencoder, discrete):
            print(f"   {colour:7s} on {background:5s} {str(COLOURS[colour]):16s} -> {str(ae):16s} | {dq}")
        h, w = latent.shape[-2:]
        centre_BC = latent[:, :, h // 2 - 1:h // 2 + 1, w // 2 - 1:w // 2 + 1].mean((2, 3))
        distances = torch.cdist(centre_BC, centre_BC)
        print(f"2. latent distances between colours on {background} (rows/cols: {', '.join(names)}):")
        for colour, row in zip(names, distances):
            print(f"   {colour:7s} " + " ".join(f"{v:5.2f}" for v in row.tolist()))

    images, labels = [], []
    for index in range(args.num_images):
        sample = sample_spec(index, args.seed, "train")
        images.append(Image.open(io.BytesIO(encode_image(render(sample, size), "jpg"))).convert("RGB"))
        labels.append(sample.colour)
    with torch.no_grad():
        tokens, residual = tok.encode(as_batch(images))
        reconstructions = to_pil(tok.decode(tokens, residual))
    confusion = Counter((truth, shapes_classifier.classify(im)[0]) for truth, im in zip(labels, reconstructions))
    correct = sum(n for (truth, got), n in confusion.items() if truth == got)
    print(f"3. colour of hybrid reconstructions of {args.num_images} training images: {correct / args.num_images:.1%} right;"
          " mistakes (truth -> classified as: count):")
    for (truth, got), n in sorted(confusion.items(), key=lambda item: -item[1]):
        if truth != got:
            print(f"   {truth} -> {got}: {n}")


if __name__ == "__main__":
    main()
