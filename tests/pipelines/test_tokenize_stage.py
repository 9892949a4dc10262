"""pipelines/tokenize_stage.py without Ray: the frozen tokenizer from a preset or a checkpoint, its
weights hash, and the Ray Data stage called directly on a batch of accepted, rejected and header rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.config import TokenizerSource
from pipelines.shapes import render, sample_spec
from pipelines.tokenize_stage import TokenizerStage, encode_images, load_tokenizer, weights_hash


def test_weights_hash_is_the_byte_copy_digest():
    """`weights_hash` feeds zero-copy views; the digest must equal the documented per-tensor
    formula over copied bytes, so manifests written before that change stay compatible."""
    import hashlib

    model = load_tokenizer(TokenizerSource())
    for dtype in (torch.float32, torch.bfloat16):
        model = model.to(dtype)
        digest = hashlib.sha256()
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        assert weights_hash(model) == digest.hexdigest()


def test_seeded_preset_and_its_saved_checkpoint_are_the_same_frozen_tokenizer(tmp_path):
    preset = load_tokenizer(TokenizerSource(seed=3))
    assert not preset.training and not any(p.requires_grad for p in preset.parameters())
    assert weights_hash(preset) == weights_hash(load_tokenizer(TokenizerSource(seed=3)))  # the seed fixes the weights
    assert weights_hash(preset) != weights_hash(load_tokenizer(TokenizerSource(seed=4)))
    preset.save_pretrained(tmp_path / "tokenizer")
    loaded = load_tokenizer(TokenizerSource(checkpoint=str(tmp_path / "tokenizer")))
    assert weights_hash(loaded) == weights_hash(preset) and not loaded.training
    # another scale list over the same weights: the parameters stay, the state (a per-scale codebook
    # usage buffer) and so the hash change, so a cache records which scale list made it
    lower = {"preset": "tiny", "patch_nums": [1, 2, 4, 8]}
    rescaled = load_tokenizer(TokenizerSource(config=lower, checkpoint=str(tmp_path / "tokenizer")))
    assert rescaled.config.patch_nums == (1, 2, 4, 8) and weights_hash(rescaled) != weights_hash(preset)
    parameters = dict(preset.named_parameters())
    assert all(torch.equal(p, parameters[name]) for name, p in rescaled.named_parameters())
    assert load_tokenizer(TokenizerSource(config=lower, seed=3)).config.patch_nums == (1, 2, 4, 8)


def test_a_config_that_does_not_describe_the_checkpoint_is_refused(tmp_path):
    """The config's scale list is applied to the checkpoint's weights, so a config left at another
    tokenizer's (the default tiny one beside a released checkpoint) must fail, naming the field."""
    load_tokenizer(TokenizerSource(config={"preset": "tiny", "vocab_size": 64}, seed=0)).save_pretrained(tmp_path / "tok")
    with pytest.raises(ValueError, match=r"tokenizer.config 'tiny' does not describe .*: vocab_size 256 \(checkpoint 64\)"):
        load_tokenizer(TokenizerSource(checkpoint=str(tmp_path / "tok")))
    with pytest.raises(ValueError, match=r"^model.tokenizer 'tiny'"):
        load_tokenizer(TokenizerSource(checkpoint=str(tmp_path / "tok")), where="model.tokenizer")


def stage_batch() -> dict[str, np.ndarray]:
    """Four rows as decode leaves them: two accepted samples, a rejected one, and a shard header."""
    images = np.stack([np.asarray(render(sample_spec(i))) for i in range(4)])
    images[2] = 0  # the header row carries no pixels
    return {"row_kind": np.array(["sample", "sample", "shard", "sample"], dtype=object),
            "status": np.array(["ok", "too_small", "shard", "ok"], dtype=object),
            "key": np.array(["k0", "k1", "", "k3"], dtype=object), "image": images}


def test_stage_encodes_accepted_rows_only_and_drops_the_pixels():
    source = TokenizerSource(seed=1)
    model = load_tokenizer(source)
    stage = TokenizerStage(source, "", weights_hash(model))
    batch = stage_batch()
    out = stage(batch)
    assert "image" not in out and list(out["key"]) == ["k0", "k1", "", "k3"]
    grid = model.config.grid
    assert out["tokens"].shape == (4, grid.num_tokens) and out["tokens"].dtype == np.int16
    assert out["residual"].shape == (4, *grid.residual_shape(model.config.z_channels))
    assert out["residual"].dtype == np.float16
    tokens, residual = encode_images(model, batch["image"][[0, 3]], torch.device("cpu"))
    assert np.array_equal(out["tokens"][[0, 3]], tokens) and np.array_equal(out["residual"][[0, 3]], residual)
    assert not out["tokens"][[1, 2]].any() and not out["residual"][[1, 2]].any()  # never reached the model
    assert out["residual"][[0, 3]].any()


def test_a_batch_without_accepted_rows_gets_zeros():
    source = TokenizerSource(seed=1)
    stage = TokenizerStage(source, "", weights_hash(load_tokenizer(source)))
    batch = {name: column[[1, 2]] for name, column in stage_batch().items()}
    out = stage(batch)
    assert out["tokens"].shape[0] == 2 and not out["tokens"].any() and not out["residual"].any()


def test_other_weights_than_the_manifests_are_refused():
    with pytest.raises(ValueError, match="tokenizer weights changed during the job"):
        TokenizerStage(TokenizerSource(seed=1), "", weights_hash(load_tokenizer(TokenizerSource(seed=2))))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_a_gpu_stage_without_cuda_is_refused():
    with pytest.raises(ValueError, match="sees no CUDA device"):
        TokenizerStage(TokenizerSource(), "", "0" * 64, use_gpu=True)
