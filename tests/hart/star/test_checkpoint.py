"""STAR checkpoints: a tiny file in the released trainer-dict layout loads strictly and round-trips
bit-exactly; missing, unexpected and non-plain contents are refused; the config is read off shapes.

The test writes its checkpoint from a key list of its own, restated from the STAR-T2I code (not
from our model): `models/var_drop.py` (word_embed, class_emb, pos_start, lvl_embed, encoder_proj,
head_logits; logit_norm has no parameters) and `models/basic_var.py` (per block: attn.mat_qkv,
q_bias, v_bias, zero_k_bias buffer, scale_mul_1H11, proj; cross_attn.mat_kv, mat_q, the same
biases, scale_mul_1H11, proj; ffn.fc1, fc2; ln_wo_grad has no parameters), and the layout of
`train.py` / `trainer.py` (`{"epoch", "iter", "trainer": {"config", "var_wo_ddp", "var_opt"}}`).

Run: PYTHONPATH=. python -m pytest tests/hart/star/test_checkpoint.py -q
"""

from __future__ import annotations

import pytest
import torch

from hart.star.checkpoint import config_from_state_dict, read_star_checkpoint, save_star
from hart.star.config import STAR_PRESETS
from hart.star.model import STARForT2I

CFG = STAR_PRESETS["tiny"]


def reference_state(depth=CFG.depth, C=CFG.embed_dim, H=CFG.num_heads, D=CFG.text_dim, V=CFG.vocab_size,
                    Cvae=CFG.token_dim, num_classes=CFG.num_classes, num_scales=len(CFG.patch_nums), seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "word_embed.weight": (C, Cvae), "word_embed.bias": (C,),
        "class_emb.weight": (num_classes + 1, C),
        "pos_start": (1, 1, C),
        "lvl_embed.weight": (num_scales, C),
        "head_logits.weight": (V, C), "head_logits.bias": (V,),
        "encoder_proj.weight": (C, D), "encoder_proj.bias": (C,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes |= {
            b + "attn.mat_qkv.weight": (3 * C, C), b + "attn.q_bias": (C,), b + "attn.v_bias": (C,),
            b + "attn.zero_k_bias": (C,), b + "attn.scale_mul_1H11": (1, H, 1, 1),
            b + "attn.proj.weight": (C, C), b + "attn.proj.bias": (C,),
            b + "cross_attn.mat_kv.weight": (2 * C, D), b + "cross_attn.mat_q.weight": (C, C),
            b + "cross_attn.q_bias": (C,), b + "cross_attn.v_bias": (C,), b + "cross_attn.zero_k_bias": (C,),
            b + "cross_attn.scale_mul_1H11": (1, H, 1, 1),
            b + "cross_attn.proj.weight": (C, C), b + "cross_attn.proj.bias": (C,),
            b + "ffn.fc1.weight": (4 * C, C), b + "ffn.fc1.bias": (4 * C,),
            b + "ffn.fc2.weight": (C, 4 * C), b + "ffn.fc2.bias": (C,),
        }
    return {k: (torch.zeros(s) if k.endswith("zero_k_bias") else torch.randn(s, generator=g)) for k, s in shapes.items()}


def trainer_file(path, state, patch_nums=CFG.patch_nums):
    torch.save({
        "epoch": 3, "iter": 0,
        "trainer": {
            "config": {"patch_nums": tuple(patch_nums), "resos": tuple(16 * p for p in patch_nums), "label_smooth": 0.0,
                       "prog_it": 0, "last_prog_si": -1, "first_prog": True},
            "var_wo_ddp": state,
            "var_opt": {"optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]}},
        },
    }, path)
    return path


def test_trainer_dict_loads_strictly_and_round_trips_bit_exactly(tmp_path):
    state = reference_state()
    model = STARForT2I.from_pretrained(trainer_file(tmp_path / "ar-ckpt.pth", state))
    assert model.config == CFG
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    # Built on the meta device, the loaded model recomputes its RoPE and level tables: same function.
    fresh = STARForT2I(CFG).eval()
    fresh.load_state_dict(state)
    text, pooled = torch.randn(2, 5, CFG.text_dim), torch.randn(2, CFG.text_dim)
    mask, tf = torch.ones(2, 5, dtype=torch.bool), torch.randn(2, CFG.num_tokens() - 1, CFG.token_dim)
    with torch.no_grad():
        assert torch.equal(model.eval()(text, mask, pooled, tf), fresh(text, mask, pooled, tf))

    save_star(model, tmp_path / "again.pth")
    raw = torch.load(tmp_path / "again.pth", weights_only=True)
    assert set(raw) == {"epoch", "iter", "trainer"} and set(raw["trainer"]) == {"config", "var_wo_ddp"}
    assert tuple(raw["trainer"]["config"]["patch_nums"]) == CFG.patch_nums
    again, _ = read_star_checkpoint(tmp_path / "again.pth")
    assert set(again) == set(state)
    assert all(torch.equal(again[k], state[k]) and again[k].dtype == state[k].dtype for k in state)


def test_bare_state_dict_loads(tmp_path):
    state = reference_state(seed=1)
    torch.save(state, tmp_path / "bare.pth")
    model = STARForT2I.from_pretrained(tmp_path / "bare.pth")  # no trainer config: the tiny preset matches the shapes
    assert torch.equal(model.head_logits.weight, state["head_logits.weight"])


def test_a_file_without_a_scale_list_of_no_released_shape_takes_patch_nums(tmp_path):
    torch.save(reference_state(depth=3), tmp_path / "deeper.pth")  # no preset has depth 3, no trainer dict
    with pytest.raises(ValueError, match="pass patch_nums"):
        STARForT2I.from_pretrained(tmp_path / "deeper.pth")
    model = STARForT2I.from_pretrained(tmp_path / "deeper.pth", patch_nums=CFG.patch_nums)
    assert model.config.depth == 3 and model.config.patch_nums == CFG.patch_nums


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("blocks.1.cross_attn.mat_q.weight"), "missing keys.*blocks.1.cross_attn.mat_q.weight"),
    (lambda s: s.update({"head_logits2.weight": torch.zeros(4, 4)}), "unexpected keys.*head_logits2.weight"),
    (lambda s: s.update({"pos_start": torch.zeros(1, 2, CFG.embed_dim)}), "wrong shapes.*pos_start"),
])
def test_key_mismatches_are_refused_with_every_key_named(tmp_path, edit, message):
    state = reference_state()
    edit(state)
    with pytest.raises(ValueError, match=message):
        STARForT2I.from_pretrained(trainer_file(tmp_path / "bad.pth", state), config=CFG)


class NotPlainData:  # a pickled custom object: weights_only loading must refuse it
    pass


def test_non_plain_pickles_are_refused(tmp_path):
    torch.save({"trainer": {"var_wo_ddp": reference_state(), "extra": NotPlainData()}}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="refusing to load"):
        read_star_checkpoint(tmp_path / "evil.pth")


def test_config_from_state_dict_reads_the_shapes():
    state = reference_state(depth=3, C=32, H=2, D=24, V=50, Cvae=6, num_classes=7, num_scales=5)
    cfg = config_from_state_dict(state, patch_nums=(1, 2, 3, 4, 5))
    assert (cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.text_dim, cfg.vocab_size, cfg.token_dim, cfg.num_classes) == (
        3, 32, 2, 24, 50, 6, 7)
    assert cfg.mlp_ratio == 4.0 and cfg.attn_l2_norm
    with pytest.raises(ValueError, match="pass patch_nums"):
        config_from_state_dict(state)  # 5 scales at this shape: no released preset, so the list must be given
    with pytest.raises(ValueError, match="level embeddings"):
        config_from_state_dict(state, patch_nums=(1, 2, 3))
