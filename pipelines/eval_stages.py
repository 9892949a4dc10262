"""The evaluation's two Ray Data actor stages: generate images, then score them.

`GenerateImages` holds one model (per GPU on a cluster; a CPU actor locally). Each input row is a
generation group from `eval_protocol.groups` (up to batch_size prompts and its own seed), so an image
depends on its group only, never on which actor ran it or in what order: a rerun makes the same
images. Each image is written to storage as `<images>/<id>.png` from the worker (an atomic write, so a
retried task leaves one whole file) and passed on as PNG bytes, one row per image.

`ScoreImages` turns one image row into its scores: the FID Inception's 2048-d features (for FID and
KID, folded on the driver), the CLIP score against its prompt, and for shapes prompts whether the
shapes classifier reads the prompt's colour and shape. The feature networks load once per actor from
the files the user named. The reference-statistics job feeds it real images the same way (PNG or
JPEG bytes, no prompt).
"""

from __future__ import annotations

import io
import time

import numpy as np
import torch
from PIL import Image

from pipelines import storage
from pipelines.eval_protocol import EvalProtocol
from pipelines.feature_statistics import KID_SAMPLE_CAP, FeatureStatistics, fold_order


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def load_generator(llm: str, tokenizer: str, text_encoder: str, protocol: EvalProtocol, device: torch.device,
                   star: str = "", compile: bool = False):
    """(model, tokenizer, text encoder) in eval mode on `device`: HART from an `llm/` folder (EMA weights if
    the protocol says so), or STAR from a `.pth` (`star`; then `llm` is unused) with STAR's text
    conditioning (`build_star_text_encoder`). `compile`: torch.compile the transformer's blocks, one
    compiled step per scale (`compile_for_generation`). What `GenerateImages` and hart-generate hold."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one bar per weight load otherwise
    if star:
        from hart.star.generate import load_models as load_star_models

        if protocol.chunk_size is not None:
            raise ValueError("chunk_size is not supported for STAR: a group is one generate call")
        models = load_star_models(star, tokenizer, text_encoder, device)
    else:
        from hart.transformer.generate import load_models

        models = load_models(llm, tokenizer, text_encoder, protocol.ema, device)
    if compile:
        from hart.training.parallelize import compile_for_generation

        compile_for_generation(models[0], len(models[0].config.patch_nums), device)
    return models


class GenerateImages:
    """One generator (`load_generator`) per actor; each input row is a generation group. Each image row
    carries its group's wall-clock `started` / `finished` times, so the driver measures generation
    throughput without the actors' start-up."""

    def __init__(self, llm: str, tokenizer: str, text_encoder: str, protocol: dict, images_uri: str,
                 endpoint_url: str = "", device: str | None = None, star: str = "", compile: bool = False):
        from configuration.loader import config_from_dict

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.protocol = config_from_dict(EvalProtocol, protocol)  # the driver's protocol, as a plain dict
        self.model, self.tokenizer, self.encoder = load_generator(llm, tokenizer, text_encoder, self.protocol,
                                                                  self.device, star, compile)
        self.fs, self.images_dir = storage.resolve(images_uri, endpoint_url)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = {"id": [], "prompt": [], "category": [], "png": [], "started": [], "finished": []}
        for ids, prompts, categories, seed in zip(batch["ids"], batch["prompts"], batch["categories"], batch["seed"]):
            group = {"ids": ids, "prompts": prompts, "categories": categories, "seed": seed}
            started = time.time()
            rows = generate_group(self.model, self.tokenizer, self.encoder, group, self.protocol, self.device)
            for row in rows:
                storage.write_bytes_atomic(self.fs, storage.join(self.images_dir, f"{row['id']}.png"), row["png"])
            finished = time.time()
            for row in rows:
                for key in ("id", "prompt", "category", "png"):
                    out[key].append(row[key])
                out["started"].append(started)
                out["finished"].append(finished)
        return {k: np.array(v, dtype=object if k not in ("started", "finished") else np.float64) for k, v in out.items()}


def generate_group(model, tokenizer, encoder, group: dict, protocol: EvalProtocol, device: torch.device) -> list[dict]:
    """One generation group (`eval_protocol.groups`) -> image rows {id, prompt, category, png}: one
    `generate` call with the group's seed and the protocol's sampling settings (on a GPU: bf16 for HART,
    fp16 for STAR, as each family's release samples)."""
    from hart.star.model import STARForT2I

    prompts = [str(p) for p in group["prompts"]]
    if isinstance(model, STARForT2I):
        from hart.star.generate import generate

        autocast, options = torch.float16, protocol.star_sampling()
    else:
        from hart.transformer.generate import generate

        autocast, options = torch.bfloat16, protocol.sampling()
    samples = generate(model, tokenizer, encoder, prompts, seed=int(group["seed"]),
                       autocast_dtype=autocast if device.type == "cuda" else None, **options)
    images = [Image.fromarray(image) for image in samples.images_BRR3]
    return [{"id": str(i), "prompt": p, "category": str(c), "png": encode_png(image)}
            for i, p, c, image in zip(group["ids"], prompts, group["categories"], images)]


class ScoreImages:
    def __init__(self, metrics: list[str], inception: str | None = None, clip: str | None = None,
                 device: str | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.metrics = set(metrics)
        self.inception = self.clip = None
        if self.metrics & {"fid", "kid"}:
            from pipelines.inception import load_inception

            self.inception = load_inception(inception, self.device)
        if "clip" in self.metrics:
            from transformers.utils import logging as transformers_logging

            from pipelines.clip_score import ClipScorer

            transformers_logging.disable_progress_bar()
            self.clip = ClipScorer(clip, self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = [Image.open(io.BytesIO(data)).convert("RGB") for data in batch["png"]]
        out = {k: batch[k] for k in batch if k != "png"}
        if self.inception is not None:
            sizes = {image.size for image in images}
            if len(sizes) != 1:
                raise ValueError(f"images of one batch differ in size ({sorted(sizes)}): resize them first")
            pixels_B3HW = torch.from_numpy(np.stack([np.asarray(image) for image in images])).permute(0, 3, 1, 2)
            features_ND = self.inception(pixels_B3HW.to(self.device)).cpu().numpy()
            out["features"] = np.array(list(features_ND), dtype=object)
        if self.clip is not None:
            out["clip"] = self.clip(images, [str(p) for p in batch["prompt"]]).numpy().astype(np.float64)
        if "shapes" in self.metrics:
            from pipelines.shapes import label_of
            from pipelines.shapes_classifier import classify

            read = [classify(image) for image in images]
            wanted = [label_of(str(p)) for p in batch["prompt"]]
            out["colour_ok"] = np.array([r[0] == w[0] for r, w in zip(read, wanted)])
            out["shape_ok"] = np.array([r[1] == w[1] for r, w in zip(read, wanted)])
        return out


def summarize(rows: list[dict], order: list[str], kid_cap: int = KID_SAMPLE_CAP) -> dict:
    """The driver's side: scored image rows -> figures overall and per category, and the generated
    set's FeatureStatistics ('fake', None without features; with each image's category, so
    `fake.category(name)` is that category's set), folded in `fold_order` of the ids.
    A missing or duplicated image is an error, never a smaller denominator."""
    by_id = {row["id"]: row for row in rows}
    missing = [i for i in order if i not in by_id]
    if missing or len(by_id) != len(rows):
        raise RuntimeError(f"{len(missing)} images missing from the scored rows (e.g. {missing[:3]}), "
                           f"{len(rows) - len(by_id)} duplicated")
    ordered = [by_id[i] for i in fold_order(order)]
    figures: dict = {"images": len(ordered)}
    per_category: dict[str, dict] = {}
    for row in ordered:
        per_category.setdefault(row["category"], {"images": 0})["images"] += 1
    fake = None
    if "features" in ordered[0]:
        fake = FeatureStatistics(len(ordered[0]["features"]), kid_cap=kid_cap)
        for start in range(0, len(ordered), 256):
            chunk = ordered[start : start + 256]
            fake.update(torch.from_numpy(np.stack([r["features"] for r in chunk])), [r["category"] for r in chunk])
    for key, name in (("clip", "clip_score"), ("colour_ok", "colour_accuracy"), ("shape_ok", "shape_accuracy")):
        if key in ordered[0]:
            values = np.array([float(r[key]) for r in ordered])
            figures[name] = float(values.mean())
            for category in per_category:
                mask = np.array([r["category"] == category for r in ordered])
                per_category[category][name] = float(values[mask].mean())
    if "colour_ok" in ordered[0]:
        joint = np.array([bool(r["colour_ok"]) and bool(r["shape_ok"]) for r in ordered])
        figures["joint_accuracy"] = float(joint.mean())
    return {"figures": figures, "per_category": per_category, "fake": fake}
