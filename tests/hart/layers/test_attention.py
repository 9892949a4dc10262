"""The FlexAttention training path (hart/layers/attention.py) computes what the per-segment SDPA path computes.

FlexAttention runs forward on CPU (torch 2.13) but has no CPU backward, so on CPU the two paths are
compared in forward, on the tiny preset and a small 256px-scale model, with padded text and a kept
subset of the last scale; the gradient comparison is the `gpu`-marked test at the end.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hart.layers.attention import block_causal_mask, flex_segmented_attention, segmented_attention
from configuration.loader import replace
from hart.config import PATCH_NUMS_256, TRANSFORMER_PRESETS
from hart.training.parallelize import ParallelConfig, apply_attention, resolve_attention
from hart.transformer.model import HARTForT2I

TINY = TRANSFORMER_PRESETS["tiny"]
# The released 256px scale list (10 scales, 680 tokens) at a width a CPU test can afford.
SMALL_256 = replace(TINY, patch_nums=PATCH_NUMS_256, context_token=32, depth=2, embed_dim=64, num_heads=4)


def test_flex_equals_the_segment_path_and_the_dense_mask():
    ends = (16, 17, 21, 30, 46, 82, 105)  # text, then scales; the last segment is a kept subset
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, ends[-1], 16, generator=g) for _ in range(3))
    flex = flex_segmented_attention(q, k, v, block_causal_mask(ends, "cpu"), scale=0.3)
    torch.testing.assert_close(flex, segmented_attention(q, k, v, list(ends), 0.3), atol=1e-5, rtol=1e-5)
    levels = torch.repeat_interleave(torch.arange(len(ends)), torch.tensor([ends[0], *torch.tensor(ends).diff()]))
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=levels[:, None] >= levels[None, :], scale=0.3)
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)


def test_masks_are_built_once_per_layout():
    block_causal_mask.cache_clear()
    first = block_causal_mask((16, 17, 21, 60), "cpu")
    assert block_causal_mask((16, 17, 21, 60), "cpu") is first
    assert block_causal_mask((16, 17, 21, 50), "cpu") is not first  # another kept count, another mask
    assert block_causal_mask.cache_info().misses == 2


def model_and_batch(config, seed=0):
    torch.manual_seed(seed)
    model = HARTForT2I(config)
    model.init_weights()
    with torch.no_grad():  # non-trivial gammas so attention reaches the logits
        for block in model.blocks:
            block.ada_lin[-1].bias.normal_(0, 0.3)
    g = torch.Generator().manual_seed(seed + 1)
    B = 3
    ctx = torch.randn(B, config.context_token, config.context_dim, generator=g)
    mask = torch.ones(B, config.context_token, dtype=torch.bool)
    mask[1, 5:] = False  # right padding
    mask[2, 9:] = False
    tf = torch.randn(B, config.num_image_tokens() - 1, config.token_dim, generator=g)
    last = config.patch_nums[-1] ** 2
    keep = torch.stack([torch.randperm(last, generator=g)[: last // 2].sort().values for _ in range(B)])
    return model.eval(), ctx, mask, tf, keep


@pytest.mark.parametrize("config", [TINY, SMALL_256], ids=["tiny", "small-256px"])
@pytest.mark.parametrize("kept", [False, True], ids=["all-tokens", "kept-subset"])
def test_model_logits_equal_on_both_paths(config, kept):
    model, ctx, mask, tf, keep = model_and_batch(config)
    outputs = {}
    with torch.no_grad():
        for backend in ("sdpa", "flex"):
            model.attention_backend = backend
            outputs[backend] = model(ctx, mask, tf, keep_last_Bk=keep if kept else None)
    torch.testing.assert_close(outputs["flex"], outputs["sdpa"], atol=1e-5, rtol=1e-5)


def test_compiled_blocks_on_the_flex_path_match_in_forward():
    """parallel.compile traces flex inside each block; on CPU its kernel once read strided q/k/v wrongly."""
    from hart.training.parallelize import apply_compile

    model, ctx, mask, tf, keep = model_and_batch(TINY)
    with torch.no_grad():
        reference = model(ctx, mask, tf, keep_last_Bk=keep)
        apply_compile(model)
        model.attention_backend = "flex"
        compiled = model(ctx, mask, tf, keep_last_Bk=keep)
    torch.testing.assert_close(compiled, reference, atol=1e-5, rtol=1e-5)


def test_attention_choice_is_applied_from_outside():
    model, *_ = model_and_batch(TINY)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert (resolve_attention("auto", cpu), resolve_attention("auto", cuda)) == ("sdpa", "flex")
    with pytest.raises(ValueError, match="flex trains on CUDA only"):
        apply_attention(model, "flex", cpu)
    assert apply_attention(model, "sdpa", cpu) == "sdpa" and model.attention_backend == "sdpa"
    assert apply_attention(torch.nn.Conv2d(3, 3, 1), "flex", cpu) is None  # no attention: nothing to set
    with pytest.raises(ValueError, match="parallel.attention must be one of"):
        ParallelConfig(attention="fused")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (FlexAttention has no CPU backward)")
@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-4), ("bf16", 3e-2)])
def test_flex_gradients_equal_the_segment_path_on_cuda(precision, tolerance):
    """The check `python -m benchmarks.gpu` runs first (its `check_gradients`: padded text, a kept subset)."""
    from benchmarks.gpu import check_gradients, gradients_match

    cuda = torch.device("cuda")
    passed, summary = gradients_match(check_gradients(cuda, "flex", precision)[0],
                                      check_gradients(cuda, "sdpa", precision)[0], tolerance)
    assert passed, summary
