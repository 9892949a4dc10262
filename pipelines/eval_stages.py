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

import numpy as np
import torch
from PIL import Image

from pipelines import storage
from pipelines.eval_protocol import EvalProtocol


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class GenerateImages:
    def __init__(self, llm: str, tokenizer: str, text_encoder: str, protocol: dict, images_uri: str,
                 endpoint_url: str = "", device: str | None = None):
        from transformers.utils import logging as transformers_logging

        from hart.generate import load_models

        transformers_logging.disable_progress_bar()  # one bar per weight load and actor otherwise
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.protocol = EvalProtocol(**{**protocol, "top_k": tuple(protocol["top_k"]), "metrics": tuple(protocol["metrics"])})
        self.model, self.tokenizer, self.encoder = load_models(llm, tokenizer, text_encoder, self.protocol.ema, self.device)
        self.fs, self.images_dir = storage.resolve(images_uri, endpoint_url)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from hart.generate import generate

        out: dict[str, list] = {"id": [], "prompt": [], "category": [], "png": []}
        autocast = torch.bfloat16 if self.device.type == "cuda" else None
        for ids, prompts, categories, seed in zip(batch["ids"], batch["prompts"], batch["categories"], batch["seed"]):
            prompts = [str(p) for p in prompts]
            images = generate(self.model, self.tokenizer, self.encoder, prompts, seed=int(seed),
                              autocast_dtype=autocast, **self.protocol.sampling())
            for image_id, prompt, category, image in zip(ids, prompts, categories, images):
                png = encode_png(image)
                storage.write_bytes_atomic(self.fs, storage.join(self.images_dir, f"{image_id}.png"), png)
                out["id"].append(str(image_id))
                out["prompt"].append(prompt)
                out["category"].append(str(category))
                out["png"].append(png)
        return {k: np.array(v, dtype=object) for k, v in out.items()}


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
