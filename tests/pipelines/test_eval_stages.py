"""pipelines/eval_stages.py with its stages called as plain classes (no Ray): generation groups from a
tiny random export written as files and rows, each image a function of its group alone; the shapes
scores of rendered images; and the driver's `summarize` (figures overall and per category, the feature
fold order, missing or duplicated images refused)."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.eval_protocol import PROTOCOLS
from pipelines.eval_stages import GenerateImages, ScoreImages, encode_png, summarize
from pipelines.feature_statistics import fold_order
from pipelines.shapes import canonical_prompt, render, sample_spec


def test_encode_png_round_trips_the_pixels():
    image = render(sample_spec(3), 32)
    data = encode_png(image)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), np.asarray(image))


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    from hart.config import tokenizer_config, transformer_config
    from hart.tokenizer.model import HybridTokenizer
    from hart.transformer.model import HARTForT2I

    root = tmp_path_factory.mktemp("eval_stages")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tokenizer = HybridTokenizer(tokenizer_config("tiny"))
        model = HARTForT2I(transformer_config("tiny"))
        model.init_weights()
    tokenizer.save_pretrained(root / "export" / "tokenizer")
    model.save_pretrained(root / "export" / "llm", ema_state=model.state_dict(), tokenizer=tokenizer.config)
    stage = GenerateImages(str(root / "export" / "llm"), str(root / "export" / "tokenizer"), "minilm",
                           PROTOCOLS["shapes"].to_dict(), str(root / "images"), device="cpu")
    return stage, root / "images"


def groups_batch(*groups: tuple[list[str], list[str], list[str], int]) -> dict[str, np.ndarray]:
    def column(values):
        out = np.empty(len(values), dtype=object)
        out[:] = values
        return out

    ids, prompts, categories, seeds = zip(*groups)
    return {"ids": column([np.array(i, dtype=object) for i in ids]),
            "prompts": column([np.array(p, dtype=object) for p in prompts]),
            "categories": column([np.array(c, dtype=object) for c in categories]), "seed": np.array(seeds)}


def test_generated_images_are_rows_and_files_that_depend_on_their_group_only(generator):
    stage, images = generator
    first = (["0", "1"], ["a red circle", "a blue square"], ["circle", "square"], 7)
    second = (["2"], ["a green star"], ["star"], 8)
    out = stage(groups_batch(first, second))
    assert list(out["id"]) == ["0", "1", "2"] and list(out["category"]) == ["circle", "square", "star"]
    assert list(out["prompt"]) == ["a red circle", "a blue square", "a green star"]
    assert sorted(p.name for p in images.iterdir()) == ["0.png", "1.png", "2.png"]
    for image_id, png in zip(out["id"], out["png"]):
        assert (images / f"{image_id}.png").read_bytes() == png
        assert Image.open(io.BytesIO(png)).size == (64, 64)
    assert out["png"][0] != out["png"][1]
    alone = stage(groups_batch(second))  # another call, another batch: the same image for the same group
    assert alone["png"][0] == out["png"][2]
    reseeded = stage(groups_batch((["2"], ["a green star"], ["star"], 9)))
    assert reseeded["png"][0] != out["png"][2]


def test_a_compiling_actor_writes_the_same_images(generator, tmp_path):
    stage, images = generator
    root = images.parent
    group = (["0", "1"], ["a red circle", "a blue square"], ["circle", "square"], 7)
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(recompile_limit=8):
        compiled = GenerateImages(str(root / "export" / "llm"), str(root / "export" / "tokenizer"), "minilm",
                                  PROTOCOLS["shapes"].to_dict(), str(tmp_path / "images"), device="cpu", compile=True)
        assert all(block._compiled_call_impl is not None for block in compiled.model.blocks)
        assert list(compiled(groups_batch(group))["png"]) == list(stage(groups_batch(group))["png"])
    assert counters["stats"]["unique_graphs"] == len(compiled.model.config.patch_nums)  # one graph per scale
    torch._dynamo.reset()


def test_shapes_scores_read_the_prompt_colour_and_shape():
    samples = [sample_spec(i, split="heldout") for i in range(6)]
    pngs = [encode_png(render(s)) for s in samples]
    right = [canonical_prompt(s.colour, s.shape, s.background) for s in samples]
    # each image paired with the next one's prompt: right exactly where the two samples agree
    shifted = right[1:] + right[:1]
    scorer = ScoreImages(["shapes"], device="cpu")
    batch = {"id": np.array([str(i) for i in range(12)], dtype=object), "png": np.array(pngs + pngs, dtype=object),
             "prompt": np.array(right + shifted, dtype=object)}
    out = scorer(batch)
    assert "png" not in out and "features" not in out and "clip" not in out
    assert out["colour_ok"][:6].all() and out["shape_ok"][:6].all()
    nxt = samples[1:] + samples[:1]
    assert list(out["colour_ok"][6:]) == [a.colour == b.colour for a, b in zip(samples, nxt)]
    assert list(out["shape_ok"][6:]) == [a.shape == b.shape for a, b in zip(samples, nxt)]
    assert not (out["colour_ok"][6:] & out["shape_ok"][6:]).all()  # some shifted prompts are wrong


def scored_rows(n: int, with_features: bool = False) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        row = {"id": f"img-{i}", "category": "even" if i % 2 == 0 else "odd", "clip": float(i),
               "colour_ok": i % 3 != 0, "shape_ok": i % 2 == 0}
        if with_features:
            row["features"] = rng.standard_normal(4).astype(np.float32)
        rows.append(row)
    return rows


def test_summarize_gives_figures_overall_and_per_category():
    rows = scored_rows(6)  # colour_ok: F T T F T T; shape_ok: T F T F T F
    result = summarize(rows, [r["id"] for r in rows])
    figures = result["figures"]
    assert figures["images"] == 6 and figures["clip_score"] == pytest.approx(2.5)
    assert figures["colour_accuracy"] == pytest.approx(4 / 6) and figures["shape_accuracy"] == pytest.approx(0.5)
    assert figures["joint_accuracy"] == pytest.approx(2 / 6)  # images 2 and 4
    even, odd = result["per_category"]["even"], result["per_category"]["odd"]
    assert even == pytest.approx({"images": 3, "clip_score": 2.0, "colour_accuracy": 2 / 3, "shape_accuracy": 1.0})
    assert odd == pytest.approx({"images": 3, "clip_score": 3.0, "colour_accuracy": 2 / 3, "shape_accuracy": 0.0})
    assert result["fake"] is None


def test_summarize_folds_features_in_a_fixed_order_whatever_order_rows_arrive_in():
    rows = scored_rows(10, with_features=True)
    order = [r["id"] for r in rows]
    first = summarize(rows, order, kid_cap=4)["fake"]
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    second = summarize(shuffled, order, kid_cap=4)["fake"]
    by_id = {r["id"]: r["features"] for r in rows}
    expected_sample = np.stack([by_id[i] for i in fold_order(order)[:4]])
    for fake in (first, second):
        assert fake.count == 10 and np.array_equal(fake.kid_sample().numpy(), expected_sample)
        assert fake.category("even").count == 5
        assert torch.allclose(fake.sum_D, torch.from_numpy(np.stack(list(by_id.values()))).double().sum(0))


def test_summarize_refuses_missing_and_duplicated_images():
    rows = scored_rows(4)
    with pytest.raises(RuntimeError, match=r"1 images missing .*img-9"):
        summarize(rows, [r["id"] for r in rows] + ["img-9"])
    with pytest.raises(RuntimeError, match="1 duplicated"):
        summarize(rows + [dict(rows[0])], [r["id"] for r in rows])


def test_a_star_export_generates_through_the_same_actor(tmp_path):
    """GenerateImages with `star=`: STAR's .pth, its conditioning from MiniLM features and its sampler;
    images depend on the group only. chunk_size, which STAR's sampler has no use for, is refused."""
    from configuration.loader import replace
    from hart.config import tokenizer_config
    from hart.star.checkpoint import save_star
    from hart.star.config import STAR_PRESETS
    from hart.star.model import STARForT2I
    from hart.tokenizer.model import HybridTokenizer

    tok = tokenizer_config("tiny")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        HybridTokenizer(tok).save_pretrained(tmp_path / "export" / "tokenizer")
        star = STARForT2I(replace(STAR_PRESETS["tiny"], patch_nums=tok.patch_nums, vocab_size=tok.vocab_size,
                                  token_dim=tok.z_channels, text_dim=384, context_token=16))
    save_star(star, tmp_path / "export" / "star" / "ema_model.pth")
    protocol = PROTOCOLS["shapes"].to_dict()

    def stage(folder):
        return GenerateImages("", str(tmp_path / "export" / "tokenizer"), "minilm", protocol, str(tmp_path / folder),
                              device="cpu", star=str(tmp_path / "export" / "star" / "ema_model.pth"))

    group = (["0", "1"], ["a red circle", "a blue square"], ["circle", "square"], 5)
    first, again = stage("a")(groups_batch(group)), stage("b")(groups_batch(group))
    assert list(first["id"]) == ["0", "1"] and list(first["png"]) == list(again["png"])
    assert all(Image.open(io.BytesIO(png)).size == (64, 64) for png in first["png"])
    with pytest.raises(ValueError, match="chunk_size is not supported for STAR"):
        GenerateImages("", str(tmp_path / "export" / "tokenizer"), "minilm", {**protocol, "chunk_size": 1},
                       str(tmp_path / "c"), device="cpu", star=str(tmp_path / "export" / "star" / "ema_model.pth"))
