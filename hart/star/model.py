"""STAR text-to-image transformer (`STARForT2I`), checkpoint-compatible with the released STAR-T2I models.

Design (docs/design/star.md, "Architecture"; STAR-T2I `models/var_drop.py`, `models/basic_var.py`).
Where HART puts the text into the sequence, STAR keeps it out:
- The sequence is the image scales only, `[start | scale 2 | ... | scale S]`, L = sum pn^2. The
  start token is `encoder_proj(pooled text) + pos_start`; every token then gets `lvl_embed` of its
  scale (level 0 for the start token). There is no absolute position table: self-attention
  rotates q and k with STAR's normalized 2-D RoPE (each scale's grid spans [0, rope_norm]^2,
  x frequencies then y, interleaved pairs; `hart.layers.rope`).
- Blocks are GPT-2 style, pre-LN with non-affine LayerNorms and no AdaLN (STAR's `shared_aln` is
  off in every release): self-attention, block-causal over scales -> cross-attention whose query
  is the LayerNorm of x and whose keys/values are the raw text features (`TextCrossAttention`) ->
  GELU-tanh FFN. Stochastic depth applies to the self-attention and FFN branches only, as released.
- Head: a non-affine LayerNorm (`logit_norm`) and `head_logits`, in float32.
- `class_emb` (num_classes + 1 rows) is VAR's class embedding. STAR never reads it; it exists so
  the released checkpoints load strictly.
The released block adds batch row 0's cross-attention output to every row; `cross_attn_batch0_quirk`
reproduces that, per-row cross-attention is the default (see `hart.star.config`). The blocks read it
from `model.config` at every forward, so `model.config = replace(model.config, cross_attn_batch0_quirk=True)`
on a built model takes effect.

Entry points (the same arguments as HART's `hart.transformer.model` where the inputs are the same;
STAR adds the pooled text feature its start token reads):
- `forward(text_BTD, text_mask_BT, pooled_BD, teacher_forcing_BLCv)`: training logits of every
  token. With `null_condition` (the text encoder's output for the empty prompt) a training-mode
  forward replaces each row's text by it with probability `cond_drop_rate` (CFG dropout;
  `drop_condition`). STAR's own data loader does this on the prompt instead (it swaps captions
  longer than 20 characters for ""), which a caller can keep doing by passing no null condition.
- `start_sampling(text_BTD, text_mask_BT, pooled_BD) -> (state, logits)` / `sampling_step(si,
  next_input_BlCv, state) -> (logits, hidden)`: the same function one scale at a time with a KV cache.
- `from_pretrained(path)` / `save_pretrained(path)`: STAR's released `.pth` layout (`hart.star.checkpoint`).
Differences from the reference: RoPE is applied after the q/k L2 norm (`hart.layers.attention`),
which is the same function (the rotation keeps norms and commutes with the per-head scale);
a text row that is entirely padding keeps its first key instead of producing NaN.

Shape legend: B batch, T text tokens, D text feature width, C width, L tokens of all scales,
l tokens of one scale, V vocabulary, Cv token width (tokenizer code width), H heads, hd head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from hart.layers.attention import KVCache, SelfAttention, TextCrossAttention, text_key_mask
from hart.layers.blocks import GeluMLP, drop_path
from hart.layers.rope import image_rope, star_scale_coords
from hart.star.checkpoint import config_from_state_dict, load_state_into, read_star_checkpoint, save_star
from hart.star.config import StarConfig


@dataclass(frozen=True)
class TextFeatures:
    """One batch from the text encoder: token features, their padding mask and the pooled (EOS) feature."""

    tokens_BTD: torch.Tensor
    mask_BT: torch.Tensor
    pooled_BD: torch.Tensor

    def to(self, device: torch.device | str) -> TextFeatures:
        return TextFeatures(self.tokens_BTD.to(device), self.mask_BT.to(device), self.pooled_BD.to(device))


def pooled_at_eos(tokens_BTD: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """(B, D) feature at each row's last unmasked position. CLIP's pooled output is its final hidden
    state at the end-of-text token, which is the last position its attention mask keeps, so features
    cached without the pooled vector (a token cache's text column) give it back exactly."""
    last_B = mask_BT.long().sum(dim=1).clamp(min=1) - 1
    return tokens_BTD[torch.arange(tokens_BTD.shape[0], device=tokens_BTD.device), last_B]


def drop_condition(
    text: TextFeatures, null: TextFeatures, p: float, generator: torch.Generator | None = None
) -> tuple[TextFeatures, torch.Tensor]:
    """Replace each row's text with the null condition (batch 1, broadcast) with probability p.

    Returns the new batch and the (B,) boolean of dropped rows. Tokens, mask and pooled feature are
    swapped together: STAR's null condition is a real encoding of "" (BOS, EOS, pads), not zeros.
    """
    B, device = text.tokens_BTD.shape[0], text.tokens_BTD.device
    drop_B = torch.rand(B, generator=generator, device=device) < p

    def pick(value, null_value):
        shape = (B,) + (1,) * (value.ndim - 1)
        return torch.where(drop_B.view(shape), null_value.to(value.dtype).expand_as(value), value)

    return TextFeatures(
        pick(text.tokens_BTD, null.tokens_BTD), pick(text.mask_BT, null.mask_BT), pick(text.pooled_BD, null.pooled_BD)
    ), drop_B


@dataclass(frozen=True)
class SamplingState:
    """What `sampling_step` needs between scales: the text, its key mask and one KV cache per block."""

    text_BTD: torch.Tensor
    keep_B11T: torch.Tensor
    caches: list[KVCache]


class StarBlock(nn.Module):
    """Self-attention -> cross-attention to the text -> FFN, each pre-LN (non-affine) and residual."""

    def __init__(self, config: StarConfig, drop_path_rate: float):
        super().__init__()
        C = config.embed_dim
        self.attn = SelfAttention(C, config.num_heads, config.attn_l2_norm, qkv_name="mat_qkv")
        self.cross_attn = TextCrossAttention(C, config.text_dim, config.num_heads, config.attn_l2_norm)
        self.ffn = GeluMLP(C, config.ffn_hidden())
        # One parameter-free norm serves all three branches, as in the reference.
        self.ln_wo_grad = nn.LayerNorm(C, eps=config.norm_eps, elementwise_affine=False)
        self.drop_path_rate = drop_path_rate

    def forward(
        self,
        x_BLC: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor, bool],
        text_BTD: torch.Tensor,
        keep_B11T: torch.Tensor,
        segment_ends: list[int] | None = None,
        cache: KVCache | None = None,
        batch0_quirk: bool = False,
    ) -> torch.Tensor:
        attended = self.attn(self.ln_wo_grad(x_BLC), rope, segment_ends=segment_ends, cache=cache)
        x_BLC = x_BLC + drop_path(attended, self.drop_path_rate, self.training)
        cross_BLC = self.cross_attn(self.ln_wo_grad(x_BLC), text_BTD, keep_B11T)
        if batch0_quirk:  # the released `cross_attn(...)[0] + x`: row 0's output broadcast to all rows
            cross_BLC = cross_BLC[:1].expand_as(cross_BLC)
        x_BLC = x_BLC + cross_BLC
        return x_BLC + drop_path(self.ffn(self.ln_wo_grad(x_BLC)), self.drop_path_rate, self.training)


class STARForT2I(nn.Module):
    def __init__(self, config: StarConfig):
        super().__init__()
        self.config = cfg = config
        C = cfg.embed_dim
        self.grid = cfg.grid
        self.patch_nums = self.grid.patch_nums

        self.word_embed = nn.Linear(cfg.token_dim, C)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)
        self.pos_start = nn.Parameter(torch.zeros(1, 1, C))
        self.lvl_embed = nn.Embedding(self.grid.num_scales, C)
        self.encoder_proj = nn.Linear(cfg.text_dim, C)
        # Stochastic depth ramps linearly from 0 at the first block to drop_path_rate at the last.
        rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(StarBlock(cfg, rate) for rate in rates)
        self.logit_norm = nn.LayerNorm(C, eps=cfg.norm_eps, elementwise_affine=False) if cfg.logit_norm else nn.Identity()
        self.head_logits = nn.Linear(C, cfg.vocab_size)

        # Derived tables, not in the checkpoint (the reference keeps them as plain attributes).
        for name, value in self.derived_tables().items():
            self.register_buffer(name, value, persistent=False)
        self.init_weights()

    def derived_tables(self) -> dict[str, torch.Tensor]:
        """Scale level of every token and the RoPE (cos, sin) tables, all computed from the config.

        A model built on the meta device (`from_pretrained`) refills them from here.
        """
        cfg = self.config
        coords_L2 = star_scale_coords(self.patch_nums, cfg.rope_norm, device="cpu")
        cos_1Ld, sin_1Ld = image_rope(coords_L2.unsqueeze(0), cfg.head_dim(), cfg.rope_theta, interleaved=True)
        levels_L = torch.tensor(self.grid.levels(), dtype=torch.long, device="cpu")
        return {"levels_L": levels_L, "rope_cos_1Ld": cos_1Ld, "rope_sin_1Ld": sin_1Ld}

    @torch.no_grad()
    def init_weights(self, init_head: float = 0.02) -> None:
        """STAR's initialisation (its `init_weights` as `build_vae_var` calls it, automatic std).

        Linear and embedding weights ~ truncated normal with std sqrt(1 / 3C), biases zero; the
        head's weight scaled by `init_head`; each block's self-attention output projection and FFN
        output divided by sqrt(2 * depth) (GPT-2's residual scaling). q/v biases stay zero and the
        per-head attention scale starts at log 4, as constructed.
        """
        std = math.sqrt(1 / (3 * self.config.embed_dim))
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
        nn.init.trunc_normal_(self.pos_start, std=std)
        self.head_logits.weight.mul_(init_head)
        for block in self.blocks:
            block.attn.proj.weight.div_(math.sqrt(2 * self.config.depth))
            block.ffn.fc2.weight.div_(math.sqrt(2 * self.config.depth))

    # ------------------------------------------------------------------ io
    @classmethod
    def from_pretrained(cls, path: str | Path, config: StarConfig | None = None,
                        patch_nums: tuple[int, ...] | None = None) -> STARForT2I:
        """A model from a released-format `.pth` (or a bare state dict), strict (`hart.star.checkpoint`).

        The config is read off the weights and the trainer dict's scale list; `patch_nums` gives the
        scale list where the file lacks it (or overrides it), `config` replaces the whole config."""
        state, trainer_config = read_star_checkpoint(path)
        if config is None:
            if patch_nums is None and isinstance(trainer_config, Mapping):
                patch_nums = trainer_config.get("patch_nums")
            config = config_from_state_dict(state, patch_nums)
        with torch.device("meta"):  # no random init of weights that the checkpoint overwrites (1.7B at d30)
            model = cls(config)
        model = model.to_empty(device="cpu")
        for name, value in model.derived_tables().items():
            setattr(model, name, value)
        load_state_into(model, state, f"STAR checkpoint {path}")
        return model

    def save_pretrained(self, path: str | Path, epoch: int = 0, iteration: int = 0) -> None:
        """The trainer-dict `.pth` STAR's `sample.py` and trainer read (model weights only)."""
        save_star(self, path, epoch=epoch, iteration=iteration)

    # ------------------------------------------------------------------ pieces
    def start_token(self, pooled_BD: torch.Tensor) -> torch.Tensor:
        """(B, 1, C): the 1x1 scale's input, from the pooled text feature, before its level embedding."""
        return self.encoder_proj(pooled_BD.float()).unsqueeze(1) + self.pos_start

    def rope(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        return self.rope_cos_1Ld[:, start:end], self.rope_sin_1Ld[:, start:end], True

    def logits(self, h_BLC: torch.Tensor) -> torch.Tensor:
        return self.head_logits(self.logit_norm(h_BLC.float())).float()

    def _check_text(self, text_BTD, text_mask_BT, pooled_BD) -> None:
        cfg = self.config
        B = text_BTD.shape[0]
        if text_BTD.ndim != 3 or text_BTD.shape[2] != cfg.text_dim:
            raise ValueError(f"text features must be (B, T, {cfg.text_dim}), got {tuple(text_BTD.shape)}")
        if text_mask_BT.shape != text_BTD.shape[:2]:
            raise ValueError(f"text mask must be {tuple(text_BTD.shape[:2])}, got {tuple(text_mask_BT.shape)}")
        if pooled_BD.shape != (B, cfg.text_dim):
            raise ValueError(f"pooled text feature must be ({B}, {cfg.text_dim}), got {tuple(pooled_BD.shape)}")

    # ------------------------------------------------------------------ training forward
    def forward(
        self,
        text_BTD: torch.Tensor,
        text_mask_BT: torch.Tensor,
        pooled_BD: torch.Tensor,
        teacher_forcing_BLCv: torch.Tensor,
        *,
        null_condition: TextFeatures | None = None,
        generator: torch.Generator | None = None,
        keep_last_K: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, L, V) of every token, coarse to fine (position 0: the 1x1 scale).

        `teacher_forcing_BLCv` is the quantizer's (B, L - 1, Cv): the upsampled code maps of
        scales 2..S (`MultiScaleQuantizer.tokens_to_teacher_forcing_input`). `null_condition`
        (batch 1) enables CFG dropout in training mode (`drop_condition`, rate `cond_drop_rate`).
        `keep_last_K` (sorted, distinct indices into the last scale, one set for the batch) is STAR's
        token dropping (`drop_scale_length`): the other last-scale tokens leave the sequence (as
        queries, keys and RoPE positions), and the logits are (B, L - l_last + K, V), the kept ones last.
        Earlier scales never attend to the last, so their logits do not change.
        """
        cfg = self.config
        self._check_text(text_BTD, text_mask_BT, pooled_BD)
        B, L = text_BTD.shape[0], cfg.num_tokens()
        if teacher_forcing_BLCv.shape != (B, L - 1, cfg.token_dim):
            raise ValueError(f"teacher-forcing input must be ({B}, {L - 1}, {cfg.token_dim}), "
                             f"got {tuple(teacher_forcing_BLCv.shape)}")
        if null_condition is not None and self.training and cfg.cond_drop_rate > 0:
            text, _ = drop_condition(TextFeatures(text_BTD, text_mask_BT, pooled_BD), null_condition,
                                     cfg.cond_drop_rate, generator)
            text_BTD, text_mask_BT, pooled_BD = text.tokens_BTD, text.mask_BT, text.pooled_BD
        x_BLC = torch.cat([self.start_token(pooled_BD), self.word_embed(teacher_forcing_BLCv.float())], dim=1)
        x_BLC = x_BLC + self.lvl_embed(self.levels_L).unsqueeze(0)
        rope = self.rope(0, L)
        segment_ends = list(self.grid.offsets[1:])  # scale si's queries see keys of scales 0..si
        if keep_last_K is not None:
            positions_L = self.kept_positions(keep_last_K)
            x_BLC = x_BLC.index_select(1, positions_L)
            rope = (rope[0].index_select(1, positions_L), rope[1].index_select(1, positions_L), rope[2])
            segment_ends[-1] = positions_L.numel()
        keep_B11T = text_key_mask(text_mask_BT)
        quirk = self.config.cross_attn_batch0_quirk
        for block in self.blocks:
            x_BLC = block(x_BLC, rope, text_BTD, keep_B11T, segment_ends=segment_ends, batch0_quirk=quirk)
        return self.logits(x_BLC)

    def kept_positions(self, keep_last_K: torch.Tensor) -> torch.Tensor:
        """Sequence positions of every token of scales 1..S-1 and of the kept last-scale tokens.

        Only the shape is checked: order and range would cost a device sync every step, and the
        caller (`star_losses`) draws sorted, distinct indices."""
        last_start, last_l = self.grid.offsets[-2], self.grid.token_counts[-1]
        if keep_last_K.ndim != 1 or not 0 < keep_last_K.numel() <= last_l:
            raise ValueError(f"keep_last_K must be 1-D with 1..{last_l} indices, got shape {tuple(keep_last_K.shape)}")
        if keep_last_K.dtype == torch.bool or keep_last_K.is_floating_point() or keep_last_K.is_complex():
            raise ValueError(f"keep_last_K must hold integer indices, got {keep_last_K.dtype}")
        earlier_L = torch.arange(last_start, device=keep_last_K.device)
        return torch.cat([earlier_L, last_start + keep_last_K.long()]).to(self.levels_L.device)

    # ------------------------------------------------------------------ sampling with a KV cache
    def start_sampling(
        self, text_BTD: torch.Tensor, text_mask_BT: torch.Tensor, pooled_BD: torch.Tensor, static_cache: bool = True
    ) -> tuple[SamplingState, torch.Tensor]:
        """Run the 1x1 scale. Returns the state for `sampling_step` and its logits (B, 1, V).

        For CFG the caller stacks the conditional and the null rows into one batch, as the
        reference sampler does (the batch0 quirk then acts on that stacked batch, as released).
        """
        self._check_text(text_BTD, text_mask_BT, pooled_BD)
        capacity = self.config.num_tokens() if static_cache else None
        state = SamplingState(text_BTD, text_key_mask(text_mask_BT), [KVCache(capacity) for _ in self.blocks])
        x_B1C = self.start_token(pooled_BD) + self.lvl_embed.weight[0]
        return state, self._run_cached(x_B1C, 0, state)[0]

    def sampling_step(
        self, si: int, next_input_BlCv: torch.Tensor, state: SamplingState
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale si >= 1 from its input (B, pn^2, Cv) (the upsampled running code map) -> (logits (B, pn^2, V),
        hidden (B, pn^2, C)), as HART's; STAR's sampler reads the logits only."""
        if not 1 <= si < self.grid.num_scales:
            raise ValueError(f"sampling_step takes scales 1..{self.grid.num_scales - 1}, got {si}")
        x_BlC = self.word_embed(next_input_BlCv.float()) + self.lvl_embed.weight[si]
        return self._run_cached(x_BlC, si, state)

    def _run_cached(self, x_BlC: torch.Tensor, si: int, state: SamplingState) -> tuple[torch.Tensor, torch.Tensor]:
        rope = self.rope(self.grid.offsets[si], self.grid.offsets[si + 1])
        quirk = self.config.cross_attn_batch0_quirk
        for block, cache in zip(self.blocks, state.caches):
            x_BlC = block(x_BlC, rope, state.text_BTD, state.keep_B11T, cache=cache, batch0_quirk=quirk)
        return self.logits(x_BlC), x_BlC


__all__ = ["STARForT2I", "StarBlock", "TextFeatures", "SamplingState", "drop_condition"]
