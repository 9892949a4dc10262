"""Decode/filter/crop rules on hand-made images (pure functions, no Ray)."""

import io

import numpy as np
import pytest
from PIL import Image

from pipelines.config import PreprocessConfig
from pipelines.decode import Rejected, prepare_caption, prepare_image


def encode(image, image_format="PNG", **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **kwargs)
    return buffer.getvalue()


def test_resize_shorter_side_then_center_crop():
    # 200 x 100: left quarter red, middle half green, right quarter blue -> the crop keeps only green.
    array = np.zeros((100, 200, 3), np.uint8)
    array[:, :50] = (255, 0, 0)
    array[:, 50:150] = (0, 255, 0)
    array[:, 150:] = (0, 0, 255)
    out, width, height, notes = prepare_image(encode(Image.fromarray(array)), PreprocessConfig(), 32)
    assert out.shape == (32, 32, 3) and (width, height) == (200, 100) and notes == []
    assert (out[:, 2:-2, 1] > 200).all() and (out[:, 2:-2, 0] < 40).all() and (out[:, 2:-2, 2] < 40).all()


def test_alpha_is_composited_onto_the_background():
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[32:, :, 3] = 255  # bottom half opaque red, top half fully transparent
    out, _, _, notes = prepare_image(encode(Image.fromarray(rgba, "RGBA")), PreprocessConfig(alpha_background=(0, 0, 255)), 64)
    assert notes == ["converted_alpha"]
    assert (out[:30] == (0, 0, 255)).all() and (out[34:] == (255, 0, 0)).all()


def test_cmyk_and_grayscale_become_rgb():
    cmyk = Image.new("CMYK", (64, 64), (0, 255, 255, 0))  # red in CMYK
    out, _, _, notes = prepare_image(encode(cmyk, "JPEG", quality=95), PreprocessConfig(), 64)
    assert notes == ["converted_cmyk"] and out[..., 0].mean() > 200 and out[..., 1].mean() < 60
    gray = Image.new("L", (64, 64), 77)
    out, _, _, notes = prepare_image(encode(gray), PreprocessConfig(), 64)
    assert notes == ["converted_grayscale"] and (out == 77).all()


def test_large_jpeg_uses_draft_and_matches_full_decode_closely():
    image = Image.radial_gradient("L").resize((1024, 1024)).convert("RGB")
    data = encode(image, "JPEG", quality=95)
    fast = prepare_image(data, PreprocessConfig(jpeg_draft=True), 64)[0].astype(int)
    full = prepare_image(data, PreprocessConfig(jpeg_draft=False), 64)[0].astype(int)
    assert np.abs(fast - full).mean() < 3.0


@pytest.mark.parametrize("size, reason", [((20, 64), "too_small"), ((64, 300), "aspect_ratio")])
def test_size_filters(size, reason):
    with pytest.raises(Rejected) as info:
        prepare_image(encode(Image.new("RGB", size)), PreprocessConfig(), 64)
    assert info.value.reason == reason


def test_pixel_limit_rejects_before_decoding():
    data = encode(Image.new("RGB", (2000, 2000)))
    with pytest.raises(Rejected) as info:
        prepare_image(data, PreprocessConfig(max_pixels=1_000_000), 64)
    assert info.value.reason == "too_many_pixels"


def test_captions():
    config = PreprocessConfig(max_caption_chars=10)
    assert prepare_caption(b"short", config) == ("short", [])
    assert prepare_caption(b"0123456789abc", config) == ("0123456789", ["caption_truncated"])
    for raw, reason in ((None, "missing_caption"), (b"\xff\xfe", "caption_not_utf8"), (b"  ", "empty_caption"),
                        (b"a\x00b", "caption_has_nul")):
        with pytest.raises(Rejected) as info:
            prepare_caption(raw, config)
        assert info.value.reason == reason


def test_bad_config_values_raise():
    with pytest.raises(ValueError, match="max_aspect_ratio"):
        PreprocessConfig(max_aspect_ratio=0.5)
    with pytest.raises(ValueError, match="resample"):
        PreprocessConfig(resample="nearest")


def test_only_expected_formats_are_parsed():
    with pytest.raises(Rejected) as info:
        prepare_image(encode(Image.new("RGB", (64, 64)), "BMP"), PreprocessConfig(), 64)
    assert info.value.reason == "image_decode_error"
    gif = encode(Image.new("P", (64, 64)), "GIF")
    with pytest.raises(Rejected):
        prepare_image(gif, PreprocessConfig(), 64)
