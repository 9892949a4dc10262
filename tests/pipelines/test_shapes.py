"""The procedural shapes corpus: determinism, labels, held-out split, layout, speed."""

import io
import json
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

from pipelines import shapes


def _members(path):
    with tarfile.open(path) as archive:
        return {m.name: archive.extractfile(m).read() for m in archive}


def test_shards_are_deterministic_and_in_img2dataset_layout(tmp_path):
    first = shapes.write_shapes_shards(str(tmp_path / "a"), num_samples=30, num_shards=3, seed=7)
    second = shapes.write_shapes_shards(str(tmp_path / "b"), num_samples=30, num_shards=3, seed=7)
    other = shapes.write_shapes_shards(str(tmp_path / "c"), num_samples=30, num_shards=3, seed=8)
    assert [p.rsplit("/", 1)[-1] for p in first] == ["shard-00000.tar", "shard-00001.tar", "shard-00002.tar"]
    assert all(open(a, "rb").read() == open(b, "rb").read() for a, b in zip(first, second))
    assert open(first[0], "rb").read() != open(other[0], "rb").read()
    members = _members(first[0])
    names = list(members)
    assert len(names) == 30 and names[:3] == ["000000000.jpg", "000000000.json", "000000000.txt"]
    assert names == sorted(names)  # contiguous per key, like img2dataset
    label = json.loads(members["000000000.json"])
    caption = members["000000000.txt"].decode()
    assert label["colour"] in caption and label["shape"] in caption and label["background"] in caption
    assert shapes.LABELS[label["label"]] == (label["colour"], label["shape"])
    image = Image.open(io.BytesIO(members["000000000.jpg"]))
    assert image.size == (64, 64) and image.mode == "RGB"


def test_rendered_colour_matches_label():
    for index in range(20):
        spec = shapes.sample_spec(index, seed=3)
        pixels = np.asarray(shapes.render(spec)).reshape(-1, 3).astype(int)
        target = np.array(shapes.COLOURS[spec.colour])
        assert (np.abs(pixels - target).sum(1) < 10).sum() > 50, spec  # the shape is drawn in its colour


def test_heldout_split_is_disjoint_from_train():
    train = {(s.colour, s.shape, s.background) for s in (shapes.sample_spec(i, 0, "train") for i in range(800))}
    heldout = {(s.colour, s.shape, s.background) for s in (shapes.sample_spec(i, 0, "heldout") for i in range(300))}
    assert heldout == set(shapes.HELD_OUT_SCENES) and not train & heldout
    assert len(train) == len(shapes.LABELS) * len(shapes.BACKGROUNDS) - len(shapes.HELD_OUT_SCENES)
    # every pair of factors is still seen in training: only the triple is new
    for first, second in ((0, 1), (0, 2), (1, 2)):
        seen = {(scene[first], scene[second]) for scene in train}
        assert {(scene[first], scene[second]) for scene in heldout} <= seen, (first, second)
    assert {(s, b) for _, s, b in train} == {(s, b) for s in shapes.SHAPES for b in shapes.BACKGROUNDS}
    prompts = shapes.prompts("heldout")
    assert len(prompts) == len(shapes.HELD_OUT_SCENES) == len(shapes.LABELS)
    assert "a red triangle on a gray background" in prompts and "a red triangle on a white background" not in prompts
    assert "a red circle on a white background" in prompts and "a green circle on a white background" not in prompts
    captions = {shapes.sample_spec(i).caption for i in range(300)}
    assert len(captions) > 100  # paraphrases, not one template
    with pytest.raises(ValueError, match="split"):
        shapes.sample_spec(0, split="test")


def test_thousands_of_samples_generate_quickly(tmp_path):
    started = time.perf_counter()
    shapes.write_shapes_shards(str(tmp_path), num_samples=3000, num_shards=4)
    assert time.perf_counter() - started < 20.0


def test_jittered_shapes_stay_inside_the_border_are_large_and_distinct():
    # The classifier reads the 2-pixel border as the background, so no shape may reach it; the
    # jitter exists so that the corpus is not a few hundred images repeated (see the module docstring).
    specs = [shapes.sample_spec(index, seed=0) for index in range(400)]
    digests = set()
    for spec in specs:
        pixels = np.asarray(shapes.render(spec)).astype(int)
        background = np.array(shapes.BACKGROUNDS[spec.background])
        border = np.concatenate([pixels[:3].reshape(-1, 3), pixels[-3:].reshape(-1, 3),
                                 pixels[:, :3].reshape(-1, 3), pixels[:, -3:].reshape(-1, 3)])
        assert (border == background).all(), spec
        # ... and none is small: at least 25 px across (the module docstring says why the sizes grew)
        columns = np.flatnonzero((pixels != background).any(axis=2).any(axis=0))
        assert columns[-1] - columns[0] + 1 >= 25, spec
        assert abs(spec.dx) <= shapes.JITTER and abs(spec.dy) <= shapes.JITTER, spec
        assert shapes.SCALE_RANGE[0] <= spec.scale <= shapes.SCALE_RANGE[1], spec
        digests.add(pixels.tobytes())
    # 400 draws of 36 scenes x 5 positions x 2 sizes: without jitter 239 distinct images. PIL
    # draws on the integer pixel grid, so two draws can still coincide now and then.
    assert len(digests) >= 0.98 * len(specs)
    # the jitter is part of the stored label, so any sample can be redrawn from its KEY.json
    assert {"dx", "dy", "scale"} <= set(specs[0].metadata())
