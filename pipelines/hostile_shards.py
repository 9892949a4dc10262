"""Hostile WebDataset shards for bad-input tests, each with the counters a correct run must report.

Design: `HOSTILE_KINDS` maps a kind name to a builder that returns (tar bytes, expectation).
The expectation says exactly what the shard's stats must hold (samples in/written, rejections
by reason, ignored members, notes, unsorted members, truncation, or that the shard fails as a
whole), so one pipeline run over every kind checks that bad input is converted or rejected and
counted, never lost and never fatal. All images are tiny and built in memory (no downloads).
"""

from __future__ import annotations

import io
import struct
import tarfile
import zlib
from typing import Callable

import numpy as np
from PIL import Image

from pipelines import storage
from pipelines.shapes import render, sample_spec, tar_bytes

SIDE = 64


def _image(mode: str = "RGB", size: tuple[int, int] = (SIDE, SIDE), image_format: str = "PNG", index: int = 0) -> bytes:
    base = render(sample_spec(index), image_size=max(size)).resize(size)
    if mode == "RGBA":
        image = base.convert("RGBA")
        alpha = np.full(size[::-1], 255, np.uint8)
        alpha[: size[1] // 2] = 0  # top half transparent
        image.putalpha(Image.fromarray(alpha))
    elif mode == "I;16":
        image = Image.fromarray(np.asarray(base.convert("L"), np.uint16) * 257)  # 16-bit grayscale
    else:
        image = base.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


def _png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid small PNG whose header claims width x height (checked before any pixel is decoded)."""
    data = bytearray(_image("L", (8, 8)))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def _good(key: str, index: int = 0) -> list[tuple[str, bytes]]:
    return [(f"{key}.jpg", _image(image_format="JPEG", index=index)), (f"{key}.txt", f"caption {key}".encode())]


def _expect(samples_in: int, written: int, failed: bool = False, **counters) -> dict:
    return {"samples_in": samples_in, "samples_written": written, "failed": failed,
            "rejected": counters.get("rejected", {}), "members_ignored": counters.get("members_ignored", {}),
            "notes": counters.get("notes", {}), "unsorted_members": counters.get("unsorted_members", 0),
            "truncated": counters.get("truncated", False)}


def truncated_tar():
    data = tar_bytes(_good("a", 1) + _good("b", 2) + _good("c", 3))
    # Cut inside c.jpg's data: a and b survive, c has a caption but its image is gone.
    names = [m.name for m in tarfile.open(fileobj=io.BytesIO(data))]
    offset = tarfile.open(fileobj=io.BytesIO(data)).getmember("c.jpg").offset_data
    assert names[4] == "c.jpg"
    return data[: offset + 100], _expect(3, 2, rejected={"missing_image": 1}, truncated=True)


def truncated_tar_caption_first():
    members = _good("a") + [("b.txt", b"caption b"), ("b.jpg", _image(image_format="JPEG"))]
    data = tar_bytes(members)
    offset = tarfile.open(fileobj=io.BytesIO(data)).getmember("b.jpg").offset_data
    return data[: offset + 10], _expect(2, 1, rejected={"missing_image": 1}, truncated=True)


def _caption_first_cut_at_header(into_header: int) -> tuple[bytes, dict]:
    """a whole, then b's caption; the data stops `into_header` bytes into b.jpg's header."""
    members = _good("a") + [("b.txt", b"caption b"), ("b.jpg", _image(image_format="JPEG"))]
    data = tar_bytes(members)
    offset = tarfile.open(fileobj=io.BytesIO(data)).getmember("b.jpg").offset
    return data[: offset + into_header], _expect(2, 1, rejected={"missing_image": 1}, truncated=True)


def truncated_tar_at_header():
    return _caption_first_cut_at_header(0)  # the cut falls between two members


def truncated_tar_in_header():
    return _caption_first_cut_at_header(100)  # the cut falls inside b.jpg's 512-byte header


def zero_byte_shard():
    return b"", _expect(0, 0, failed=True)


def garbage_shard():
    return np.random.default_rng(0).bytes(5000), _expect(0, 0, failed=True)


def bad_images():
    jpeg = _image(image_format="JPEG")
    members = (_good("ok") + [("empty.jpg", b""), ("empty.txt", b"zero-byte image")]
               + [("noise.jpg", np.random.default_rng(1).bytes(2000)), ("noise.txt", b"random bytes")]
               + [("cut.jpg", jpeg[: len(jpeg) // 2]), ("cut.txt", b"truncated jpeg")]
               + [("bomb.png", _png_bomb()), ("bomb.txt", b"decompression bomb")]
               + [("tiny.png", _image(size=(8, 8))), ("tiny.txt", b"tiny")]
               + [("wide.png", _image(size=(400, 40))), ("wide.txt", b"too wide")]
               + [("nopixels.png", b"\x89PNG\r\n\x1a\n"), ("nopixels.txt", b"header only")])
    return tar_bytes(members), _expect(8, 1, rejected={
        "empty_image": 1, "image_decode_error": 3, "too_many_pixels": 1, "too_small": 1, "aspect_ratio": 1})


def bad_captions():
    members = (_good("ok")
               + [("huge.jpg", _image(image_format="JPEG")), ("huge.txt", b"long " * 200_000)]
               + [("latin1.jpg", _image(image_format="JPEG")), ("latin1.txt", "caf\xe9".encode("latin-1"))]
               + [("nocap.jpg", _image(image_format="JPEG"))]
               + [("blank.jpg", _image(image_format="JPEG")), ("blank.txt", b"   \n")])
    return tar_bytes(members), _expect(5, 2, rejected={"caption_not_utf8": 1, "missing_caption": 1, "empty_caption": 1},
                                       notes={"caption_truncated": 1})


def duplicate_keys():
    members = _good("a") + _good("a") + _good("b")
    return tar_bytes(members), _expect(2, 1, rejected={"duplicate_key": 1})


def unsafe_names():
    members = (_good("a") + [("../escape.jpg", _image()), ("../escape.txt", b"escape"),
                             ("/abs/path.jpg", _image()), ("/abs/path.txt", b"absolute"),
                             ("dir/../../up.txt", b"up")])
    return tar_bytes(members), _expect(1, 1, members_ignored={"unsafe_member_name": 5})


def unsorted_members():
    a, b, c = _good("a", 1), _good("b", 2), _good("c", 3)
    members = [a[0], b[0], c[0], a[1], b[1], c[1]]  # a.jpg b.jpg c.jpg a.txt b.txt c.txt
    return tar_bytes(members), _expect(3, 3, unsorted_members=3)


def odd_members():
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in _good("a") + [("a.pth", b"\x80\x04pickle"), ("b.npy", b"\x93NUMPY"),
                                        ("README", b"no extension"), ("c.txt", b"caption without image")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        directory = tarfile.TarInfo("folder")
        directory.type = tarfile.DIRTYPE
        archive.addfile(directory)
        link = tarfile.TarInfo("link.jpg")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        archive.addfile(link)
    return buffer.getvalue(), _expect(2, 1, rejected={"missing_image": 1},
                                      members_ignored={"unknown_extension": 2, "no_extension": 1, "non_file_member": 2})


def image_modes():
    members = []
    for key, mode, image_format in (("cmyk", "CMYK", "JPEG"), ("gray", "L", "PNG"), ("rgba", "RGBA", "PNG"),
                                    ("palette", "P", "PNG"), ("deep", "I;16", "PNG"), ("webp", "RGB", "WEBP")):
        extension = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[image_format]
        members += [(f"{key}.{extension}", _image(mode, image_format=image_format)), (f"{key}.txt", f"a {key} image".encode())]
    return tar_bytes(members), _expect(6, 6, notes={"converted_cmyk": 1, "converted_grayscale": 1, "converted_alpha": 1,
                                                    "converted_palette": 1, "converted_16bit": 1})


def multiple_images():
    members = [("a.jpg", _image(image_format="JPEG")), ("a.png", _image()), ("a.txt", b"two images")] + _good("b")
    return tar_bytes(members), _expect(2, 1, rejected={"multiple_images": 1})


HOSTILE_KINDS: dict[str, Callable[[], tuple[bytes, dict]]] = {
    "truncated_tar": truncated_tar, "truncated_tar_caption_first": truncated_tar_caption_first,
    "truncated_tar_at_header": truncated_tar_at_header, "truncated_tar_in_header": truncated_tar_in_header,
    "zero_byte_shard": zero_byte_shard, "garbage_shard": garbage_shard, "bad_images": bad_images,
    "bad_captions": bad_captions, "duplicate_keys": duplicate_keys, "unsafe_names": unsafe_names,
    "unsorted_members": unsorted_members, "odd_members": odd_members, "image_modes": image_modes,
    "multiple_images": multiple_images,
}


def write_hostile_shards(output: str, kinds: list[str] | None = None, endpoint_url: str = "") -> dict[str, tuple[str, dict]]:
    """Write `<kind>.tar` for each kind under `output`; returns kind -> (uri, expectation)."""
    fs, base = storage.resolve(output, endpoint_url)
    result = {}
    for kind in kinds or list(HOSTILE_KINDS):
        data, expectation = HOSTILE_KINDS[kind]()
        storage.write_bytes_atomic(fs, f"{base}/{kind}.tar", data)
        result[kind] = (storage.join(output, f"{kind}.tar"), expectation)
    return result
