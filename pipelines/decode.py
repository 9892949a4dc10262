"""CPU stage: validate captions, decode images, filter, convert to RGB, resize + center-crop.

Design: `prepare_image` and `prepare_caption` are pure functions on bytes, used both by the Ray
stage (`decode_batch`) and by the single-process benchmark loop, so both paths produce the same
pixels. Rows are never dropped here: a rejected sample keeps flowing with `status` set to its
reason and an all-zero image, so the writer can account for every sample of a shard. Header rows
(`row_kind="shard"`) pass through untouched.

Safety: the pixel-count limit is checked on the header PIL reads lazily, before any pixel is
decoded, so decompression bombs cost nothing; PIL's own bomb guard is tightened to the same limit
as a second line of defence. Conversions that change the image (CMYK, grayscale, palette, alpha,
16-bit) are applied and counted in `notes`, never silently.

Shape legend: B rows in a batch, R output side (resolution), 3 RGB channels.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

from pipelines.config import PreprocessConfig
from pipelines.shard_source import RAW_SCHEMA

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
             "bilinear": Image.Resampling.BILINEAR}
_MODE_NOTES = {"L": "converted_grayscale", "I;16": "converted_16bit", "I": "converted_16bit",
               "F": "converted_float", "1": "converted_bilevel", "CMYK": "converted_cmyk",
               "YCbCr": "converted_ycbcr", "LAB": "converted_lab", "HSV": "converted_hsv"}


ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP")  # JPEG also covers multi-picture (MPO) camera files
Image.init()  # register every plugin up front: `Image.open(formats=...)` looks them up by name


class Rejected(Exception):
    """A sample is rejected; `reason` is the short counter name used in stats."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def prepare_caption(raw: bytes | None, config: PreprocessConfig) -> tuple[str, list[str]]:
    """Caption bytes -> (text, notes). Missing, empty or non-UTF-8 captions are rejected."""
    if raw is None:
        raise Rejected("missing_caption")
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise Rejected("caption_not_utf8") from None
    if not text:
        raise Rejected("empty_caption")
    if "\x00" in text:
        raise Rejected("caption_has_nul")
    notes = []
    if len(text) > config.max_caption_chars:
        text = text[: config.max_caption_chars]
        notes.append("caption_truncated")
    return text, notes


def _to_rgb(image: Image.Image, config: PreprocessConfig, notes: list[str]) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        notes.append("converted_palette")
        mode = image.mode
        if mode == "RGB":
            return image
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, tuple(config.alpha_background) + (255,))
        notes.append("converted_alpha")
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit integer: scale to 8 bits explicitly (PIL's convert would clip at 255).
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array * (255.0 / peak), 0, 255).astype(np.uint8), "L")
        notes.append("converted_16bit")
        return image.convert("RGB")
    notes.append(_MODE_NOTES.get(mode, f"converted_{mode.lower()}"))
    try:
        return image.convert("RGB")
    except (ValueError, OSError):
        raise Rejected("unsupported_mode") from None


def prepare_image(data: bytes | None, config: PreprocessConfig, resolution: int) -> tuple[np.ndarray, int, int, list[str]]:
    """Image bytes -> (uint8 R x R x 3 array, original width, original height, notes)."""
    if not data:
        raise Rejected("empty_image")
    notes: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # Header only; and only formats we expect, so no other PIL plugin (e.g. EPS via
            # Ghostscript) ever parses untrusted bytes.
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            width, height = image.size
            if width * height > config.max_pixels:
                raise Rejected("too_many_pixels")
            if min(width, height) < config.min_side:
                raise Rejected("too_small")
            if max(width, height) / min(width, height) > config.max_aspect_ratio:
                raise Rejected("aspect_ratio")
            if config.jpeg_draft and image.format == "JPEG":
                # libjpeg can decode at 1/2..1/8 scale; keep the shorter side >= 2x the target.
                scale = min(width, height) / (2 * resolution)
                if scale >= 2:
                    image.draft(image.mode, (max(1, int(width / scale)), max(1, int(height / scale))))
            image = ImageOps.exif_transpose(image)  # also forces the decode
            image.load()
    except Rejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise Rejected("too_many_pixels") from None
    except Exception:  # noqa: BLE001 - PIL raises many types on corrupt or truncated data
        raise Rejected("image_decode_error") from None
    image = _to_rgb(image, config, notes)
    # Resize the shorter side to R, then center-crop to R x R (the reference T2I recipe).
    w, h = image.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    image = image.resize((new_w, new_h), _RESAMPLE[config.resample], reducing_gap=None)
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array_RR3 = np.asarray(image, dtype=np.uint8)
    assert array_RR3.shape == (resolution, resolution, 3), array_RR3.shape
    return array_RR3, width, height, notes


def decode_batch(batch: dict[str, np.ndarray], config: PreprocessConfig, resolution: int) -> dict[str, np.ndarray]:
    """`map_batches` UDF (numpy format): raw rows -> rows with `image` (B, R, R, 3) uint8."""
    num_rows = len(batch["row_kind"])
    image_BRR3 = np.zeros((num_rows, resolution, resolution, 3), dtype=np.uint8)
    captions, metadata, notes_column = [""] * num_rows, [""] * num_rows, [""] * num_rows
    width, height = np.zeros(num_rows, np.int32), np.zeros(num_rows, np.int32)
    status = list(batch["status"])
    for i in range(num_rows):
        if batch["row_kind"][i] != "sample" or status[i] != "ok":
            continue
        try:
            captions[i], notes = prepare_caption(batch["caption_bytes"][i], config)
            image_BRR3[i], width[i], height[i], image_notes = prepare_image(batch["image_bytes"][i], config, resolution)
            notes_column[i] = ",".join(notes + image_notes)
        except Rejected as rejection:
            status[i] = rejection.reason
            captions[i] = ""
            continue
        raw_metadata = batch["metadata_bytes"][i]
        if raw_metadata is not None:
            # Kept as text for auditing (e.g. the shapes corpus labels); never executed or unpickled.
            metadata[i] = raw_metadata[:65536].decode("utf-8", errors="replace")
    return {
        "row_kind": batch["row_kind"], "source_shard": batch["source_shard"],
        "sample_index": batch["sample_index"], "shard_num_samples": batch["shard_num_samples"],
        "key": batch["key"], "status": np.array(status, dtype=object), "shard_info": batch["shard_info"],
        "caption": np.array(captions, dtype=object), "metadata": np.array(metadata, dtype=object),
        "notes": np.array(notes_column, dtype=object), "width": width, "height": height, "image": image_BRR3,
        **{name: column for name, column in batch.items() if name not in RAW_SCHEMA.names},  # e.g. online's `visit`
    }
