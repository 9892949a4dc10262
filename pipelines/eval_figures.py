"""The evaluation's folding and its reference images: what turns scored rows into figures, and real
images into the rows a reference set is scored from.

Design: plain functions of data, no Ray and no files but the images they are given, so the Ray Data
stages (`eval_stages`) and the statistics (`feature_statistics`) stay the only stateful parts.
`distance_figures` is FID/KID of a generated set against a reference set under the protocol's KID
settings; `per_category_distances` repeats it per category, comparing a generated category with the
reference's statistics of the same category name, and lists the generated categories the reference
has no statistics of (all of them for a reference without categories).

Reference images are brought to the generated size by the precompute pipeline's rule
(`reference_preprocess`: shorter side resized, bicubic, centre square; JPEGs fully decoded) and
passed on as PNG bytes, as generated images are. Their categories: in a folder, the name of the
folder holding the image (`folder_category`: MJHQ-30K's `<category>/<id>.jpg`), in shards the
string under `category` in a sample's json (`sample_category`). `load_reference_images` and
`shard_images` are Ray Data batch functions (`map_batches`) of `trainer.evaluation.run_reference`.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines import storage
from pipelines.config import PreprocessConfig
from pipelines.decode import Rejected, prepare_image
from pipelines.eval_protocol import EvalProtocol
from pipelines.eval_stages import encode_png
from pipelines.feature_statistics import FeatureStatistics, frechet_distance, kernel_distance


def distance_figures(real: FeatureStatistics, fake: FeatureStatistics, protocol: EvalProtocol, metrics) -> dict:
    """FID and/or KID (those of `metrics`) of a generated set against a reference set, KID with the
    protocol's subsets and seed."""
    figures = {}
    if "fid" in metrics:
        figures["fid"] = frechet_distance(real, fake)
    if "kid" in metrics:
        figures["kid_mean"], figures["kid_std"], figures["kid_subset_size"] = kernel_distance(
            real, fake, protocol.kid_subsets, protocol.kid_subset_size, seed=protocol.seed)
    return figures


def per_category_distances(real: FeatureStatistics, fake: FeatureStatistics, per_category: dict[str, dict],
                           protocol: EvalProtocol) -> list[str]:
    """FID/KID of each generated category against the reference's statistics of the same category,
    added to its row of `per_category`; returns the generated categories the reference has no
    statistics of (all of them for a reference without categories).

    A category's sets are its images alone (`FeatureStatistics.category`): FID from its sums, KID
    from its rows of each set's KID sample (about its share of the protocol's `kid_sample_cap`).
    The KID subset size is `min(kid_subset_size, reference rows, generated rows)` of that category
    (recorded as its `kid_subset_size`; KID is unbiased, so a smaller subset widens `kid_std`, not
    the mean). A category with fewer than 2 images (FID) or 2 KID sample rows (KID) on either side
    gets no such figure."""
    unmatched = []
    for category, row in per_category.items():
        if category not in real.by_category or category not in fake.by_category:
            unmatched.append(category)
            continue
        real_c, fake_c = real.category(category), fake.category(category)
        enough = {"fid": min(real_c.count, fake_c.count) >= 2, "kid": min(real_c.sampled, fake_c.sampled) >= 2}
        row.update(distance_figures(real_c, fake_c, protocol, [m for m in protocol.metrics if enough.get(m)]))
    return sorted(unmatched)


def image_side(fs, path: str) -> int:
    """The width of the image file at `path` of filesystem `fs` (generated images are square)."""
    with Image.open(io.BytesIO(storage.read_bytes(fs, path))) as image:
        return image.size[0]


def reference_preprocess() -> PreprocessConfig:
    """How reference images become the generated size: the precompute pipeline's rule (`pipelines.decode`:
    shorter side resized to the size, bicubic, then the centre square), with full JPEG decoding."""
    return PreprocessConfig(jpeg_draft=False)


def load_reference_images(batch: dict[str, np.ndarray], image_size: int) -> dict[str, np.ndarray]:
    """Image files -> PNG bytes at image_size (`reference_preprocess`); a file that does not decode or is
    rejected (too small, too long) is an error naming it."""
    pngs = []
    for path in batch["path"]:
        try:
            array_RR3, *_ = prepare_image(Path(str(path)).read_bytes(), reference_preprocess(), image_size)
        except Rejected as rejection:
            raise ValueError(f"reference image {path} rejected: {rejection.reason}") from None
        pngs.append(encode_png(Image.fromarray(array_RR3)))
    return {"id": batch["id"], "category": batch["category"], "png": np.array(pngs, dtype=object)}


def shard_images(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Decoded shard rows (`pipelines.decode.decode_batch`) -> the usable samples as {id, category, png};
    the id (shard/key) orders them, the category is `sample_category`. Rows left out are counted by the
    caller from the shards' headers."""
    keep = [i for i in range(len(batch["row_kind"])) if batch["row_kind"][i] == "sample" and batch["status"][i] == "ok"]
    return {"id": np.array([f"{batch['source_shard'][i]}/{batch['key'][i]}" for i in keep], dtype=object),
            "category": np.array([sample_category(batch["metadata"][i]) for i in keep], dtype=object),
            "png": np.array([encode_png(Image.fromarray(batch["image"][i])) for i in keep], dtype=object)}


def sample_category(metadata: str) -> str:
    """A shard sample's category: the non-empty string under "category" in its json member (MJHQ-30K's
    meta_data.json field, e.g. img2dataset's --save_additional_columns), else "" (none): no json, json
    that does not parse or is not an object, or another type."""
    try:
        value = json.loads(metadata) if metadata else None
    except json.JSONDecodeError:
        return ""
    category = value.get("category") if isinstance(value, dict) else None
    return category if isinstance(category, str) else ""


def folder_category(path: Path, folder: Path) -> str:
    """A reference image's category in a folder: the name of the folder holding it, "" for an image
    directly in `folder`. MJHQ-30K's images (`mjhq30k_imgs/<category>/<id>.jpg`) get their category
    whether `folder` is `mjhq30k_imgs` or the folder above it."""
    return path.parent.name if path.parent != folder else ""


__all__ = ["distance_figures", "per_category_distances", "image_side", "reference_preprocess",
           "load_reference_images", "shard_images", "sample_category", "folder_category"]
