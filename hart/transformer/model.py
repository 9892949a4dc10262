"""HART text-to-image transformer (`HARTForT2I`), checkpoint-compatible with the released 0.7B model.

Design (docs/design/transformer.md, "Sequence layout"): the sequence is
`[T text tokens | scale 1 | ... | scale S-1]`.
The text features are projected by `context_embed` and enter as prefix tokens; the same
projected tokens, pooled, drive every block's AdaLN (avg or max per config) and, always
max-pooled, the head's AdaLN. Each token gets the sinusoidal level embedding of its scale
(text = level 0). The 1x1 first scale has no input token: it is predicted from the last
text position, so logits start at position T-1 and line up with the image tokens.
Attention is block-causal over levels (see `hart.layers.attention`; `attention_backend` picks the
training kernel, set from outside by `hart.training.parallelize`); positions are RoPE (text
1-D, image 2-D, `hart.layers.rope`) for `attn_type="llama"`, learned absolute tables for "gpt2".

The module has three entry points, with the same arguments as STAR's (`hart.star.model`; docs/models.md,
"Sampling API") where the inputs are the same:
- `forward(text_BTD, text_mask_BT, teacher_forcing_BLCv, ...)` (training / teacher forcing): logits of
  every (kept) image token, and on request the last-layer hidden states of the kept last-scale tokens
  for the diffusion head. `keep_last_Bk` drops last-scale tokens from the sequence (HART's token
  subsampling, per row; STAR's `keep_last_K` is one set for the batch, as each family trained).
- `start_sampling(text_BTD, text_mask_BT) -> (state, logits)` / `sampling_step(si, next_input_BlCv,
  state) -> (logits, hidden)` (generation with a KV cache): one call per scale.
- `diffusion_condition(h, idx)` = decoder_norm(h + word_embed(E[idx])) for the head.
Weights load/save in the official `llm/` layout through `hart.transformer.checkpoint`.
The dense (L, L) mask buffer of the released code is not kept in memory (see that module).

Shape legend: B batch, T text tokens, D text feature dim, C width, L sequence, l tokens
of one scale, k kept last-scale tokens, V vocab, Cv token dim (tokenizer z_channels), S scales.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hart.layers.attention import KVCache, block_causal_mask
from hart.layers.blocks import AdaLNBeforeHead, AdaLNSelfAttnBlock, RMSNorm, TimestepEmbedder, make_norm, pool_condition
from hart.config import TokenizerConfig, TransformerConfig
from hart.transformer.diffusion_head import DiffLoss
from hart.layers.rope import RopeBuilder, text_positions
from hart.layers.sampling import sample_top_k_top_p
from hart.transformer.checkpoint import load_state_into, read_transformer, save_transformer


@dataclass
class TextCondition:
    """Projected text tokens and everything derived from them once per batch."""

    tokens_BTC: torch.Tensor  # context_embed(context_norm(features)): prefix tokens and AdaLN source
    mask_BT: torch.Tensor
    positions_BT: torch.Tensor  # 1-D RoPE positions of the text tokens
    block_cond_BC: torch.Tensor  # pooled per sep_aln_pooling_mode
    head_cond_BC: torch.Tensor  # max-pooled (always, as released)


@dataclass(frozen=True)
class SamplingState:
    """What `sampling_step` needs between scales: the text condition and one KV cache per block."""

    cond: TextCondition
    caches: list[KVCache]


class HARTForT2I(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        cfg = config
        C, T = cfg.embed_dim, cfg.context_token
        self.grid = cfg.grid
        self.patch_nums = self.grid.patch_nums
        self.num_scales = self.grid.num_scales
        # Training attention kernel, chosen from outside (hart.training.parallelize): "sdpa" = one SDPA call per
        # segment, "flex" = one FlexAttention call with a cached block mask (hart.layers.attention).
        self.attention_backend = "sdpa"

        self.word_embed = nn.Linear(cfg.token_dim, C)
        self.context_embed = nn.Linear(cfg.context_dim, C)
        self.context_norm = (
            RMSNorm(cfg.context_dim, cfg.norm_eps, cfg.context_norm_scale) if cfg.use_context_norm else nn.Identity()
        )
        if cfg.attn_type == "gpt2":
            self.pos_start = nn.Parameter(torch.zeros(1, T, C))
            self.pos_1LC = nn.Parameter(torch.zeros(1, cfg.seq_len(), C))
        else:
            self.pos_start = self.pos_1LC = None
        self.lvl_embed = TimestepEmbedder(C) if cfg.use_timestep_embed else nn.Embedding(self.num_scales, C)
        self.blocks = nn.ModuleList(
            AdaLNSelfAttnBlock(
                C, C, cfg.num_heads, cfg.mlp_ratio, cfg.norm_eps, cfg.attn_type, cfg.mlp_type,
                cfg.attn_l2_norm, cfg.use_cross_attn, cfg.disable_aln,
            )
            for _ in range(cfg.depth)
        )
        # Level of every sequence position (persistent: part of the official state dict).
        self.register_buffer("lvl_1L", self.derived_levels().view(1, -1))
        self.head_nm = AdaLNBeforeHead(C, C, cfg.norm_eps, cfg.attn_type)
        self.head = nn.Linear(C, cfg.vocab_size)
        self.decoder_norm = make_norm(cfg.attn_type, C, cfg.norm_eps, affine=True)
        self.diffloss = DiffLoss(
            cfg.token_dim, C, cfg.diff_width, cfg.diff_depth, cfg.num_sampling_steps, cfg.diffusion_target_scale
        )
        self.rope = RopeBuilder(self.patch_nums, cfg.head_dim(), cfg.rope_theta, cfg.rope_mode, cfg.rope_norm)

    # ------------------------------------------------------------------ init / io
    def derived_levels(self) -> torch.Tensor:
        """(L,) level of every sequence position: 0 for text, si for scale si >= 1."""
        levels = [0] * self.config.context_token + self.grid.levels()[1:]  # the 1x1 token is predicted from text
        return torch.tensor(levels, dtype=torch.int64, device="cpu")

    @torch.no_grad()
    def init_weights(self) -> None:
        """HART's init_weights (docs/design/transformer.md, "init_weights"): call once for a model trained
        from scratch."""
        cfg = self.config
        std = cfg.init_std if cfg.init_std >= 0 else math.sqrt(1 / (3 * cfg.embed_dim))
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                nn.init.trunc_normal_(module.weight, std=std)
            elif isinstance(module, nn.LayerNorm) and module.weight is not None:
                module.weight.fill_(1.0)
                module.bias.zero_()
        for param in (self.pos_start, self.pos_1LC):
            if param is not None:
                nn.init.trunc_normal_(param, std=std)
        if cfg.init_head >= 0:
            self.head.weight.mul_(cfg.init_head)
            self.head.bias.zero_()
        self.head_nm.ada_lin[-1].weight.mul_(cfg.init_adaln)
        self.head_nm.ada_lin[-1].bias.zero_()
        C = cfg.embed_dim
        for block in self.blocks:
            block.attn.proj.weight.div_(math.sqrt(2 * cfg.depth))
            if hasattr(block.ffn, "fc2"):  # as released: the SwiGLU down_proj is not rescaled
                block.ffn.fc2.weight.div_(math.sqrt(2 * cfg.depth))
            if hasattr(block, "ada_lin"):
                block.ada_lin[-1].weight[2 * C :].mul_(cfg.init_adaln)
                block.ada_lin[-1].weight[: 2 * C].mul_(cfg.init_adaln_gamma)
                block.ada_lin[-1].bias.zero_()
            if block.cross_attn is not None:  # starts as a no-op so fine-tuning begins at the base model
                block.cross_attn.proj.weight.zero_()
                block.cross_attn.proj.bias.zero_()
        self.diffloss.initialize_weights()

    @classmethod
    def from_pretrained(cls, llm_dir: str | Path, ema: bool = False, config: TransformerConfig | None = None) -> "HARTForT2I":
        """An official `llm/` folder (weights, or `ema_model.bin` with `ema=True`); strict (hart.transformer.checkpoint)."""
        config, state, what = read_transformer(llm_dir, ema=ema, config=config)
        with torch.device("meta"):
            model = cls(config)
        model = model.to_empty(device="cpu")
        # Non-persistent derived tables (diffusion schedules live in numpy; rope tables are computed) need no fill.
        load_state_into(model, state, what)
        return model

    def save_pretrained(self, llm_dir: str | Path, ema_state: dict[str, torch.Tensor] | None = None,
                        tokenizer: TokenizerConfig | None = None) -> None:
        """Official `llm/` folder; pass the config of the tokenizer saved beside it (the official
        loader builds it from `../tokenizer`) so the compatibility note covers it too."""
        save_transformer(self, llm_dir, ema_state=ema_state, tokenizer=tokenizer)

    # ------------------------------------------------------------------ pieces
    def encode_context(
        self, context_BTD: torch.Tensor, mask_BT: torch.Tensor, positions_BT: torch.Tensor | None = None
    ) -> TextCondition:
        cfg = self.config
        if context_BTD.ndim != 3 or context_BTD.shape[1:] != (cfg.context_token, cfg.context_dim):
            raise ValueError(
                f"text features must be (B, {cfg.context_token}, {cfg.context_dim}), got {tuple(context_BTD.shape)}"
            )
        if mask_BT.shape != context_BTD.shape[:2]:
            raise ValueError(f"text mask must be {tuple(context_BTD.shape[:2])}, got {tuple(mask_BT.shape)}")
        mask_BT = mask_BT.bool()
        tokens = self.context_embed(self.context_norm(context_BTD.float()))
        return TextCondition(
            tokens_BTC=tokens,
            mask_BT=mask_BT,
            positions_BT=text_positions(mask_BT) if positions_BT is None else positions_BT,
            block_cond_BC=pool_condition(tokens, mask_BT, cfg.sep_aln_pooling_mode),
            head_cond_BC=tokens.max(dim=1).values,
        )

    def level_embedding(self, levels: torch.Tensor) -> torch.Tensor:
        """(..., ) int levels -> (..., C); the S level vectors are computed once, then gathered (no host sync)."""
        table_SC = self.lvl_embed(torch.arange(self.num_scales, device=levels.device))
        return table_SC[levels]

    def logits(self, h_BLC: torch.Tensor, cond: TextCondition) -> torch.Tensor:
        return self.head(self.head_nm(h_BLC.float(), cond.head_cond_BC.float())).float()

    def diffusion_condition(self, h_BlC: torch.Tensor, idx_Bl: torch.Tensor, codebook_VCv: torch.Tensor) -> torch.Tensor:
        """Condition of the residual head: decoder_norm(h + word_embed(E[idx]))."""
        return self.decoder_norm(h_BlC + self.word_embed(F.embedding(idx_Bl, codebook_VCv)))

    def _rope(self, parts: list[tuple[torch.Tensor, torch.Tensor]]):
        if self.config.attn_type != "llama":
            return None
        cos = torch.cat([p[0] for p in parts], dim=1)
        sin = torch.cat([p[1] for p in parts], dim=1)
        return cos, sin, self.rope.interleaved

    def run_blocks(self, x_BLC, cond: TextCondition, rope, num_text: int, segment_ends=None, caches=None,
                   block_mask=None):
        for i, block in enumerate(self.blocks):
            cache = caches[i] if caches is not None else None

            def attend(attn, x, cache=cache):
                return attn(x, rope, segment_ends=segment_ends, cache=cache, block_mask=block_mask)

            x_BLC = block(x_BLC, cond.block_cond_BC, attend, num_text, cond.tokens_BTC, cond.mask_BT)
        return x_BLC

    # ------------------------------------------------------------------ training forward
    def forward(
        self,
        text_BTD: torch.Tensor,
        text_mask_BT: torch.Tensor,
        teacher_forcing_BLCv: torch.Tensor,
        *,
        text_positions_BT: torch.Tensor | None = None,
        keep_last_Bk: torch.Tensor | None = None,
        return_hidden: bool = False,
        diffusion_reference: torch.Tensor | None = None,
        codebook: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        fallback_idx_Bk: torch.Tensor | None = None,
    ):
        """Logits (B, L_img', V) for every image token in sequence order (first = the 1x1 scale).

        `text_BTD` / `text_mask_BT` are the text encoder's features (B, context_token, context_dim) and
        mask; `text_positions_BT` overrides the 1-D RoPE positions of the text (default: from the mask).
        `teacher_forcing_BLCv` is the quantizer's (B, L_img - 1, Cv). With `keep_last_Bk` (sorted
        indices into the last scale, same count per row) only those last-scale tokens are
        processed, so L_img' = L_img - pn_last^2 + k. With `return_hidden` also returns
        (logits, h_last_BkC, cond): the last-layer states of the (kept) last-scale tokens.
        With `diffusion_reference` (B, k, Cv) = f_rest_before_last of the kept last-scale tokens
        and the tokenizer `codebook` (V, Cv), returns (logits, diffusion terms) where the terms are
        the head's losses against the model's own sampled tokens (see `diffusion_terms`). Doing
        this inside forward keeps every parameter use in one call, as DDP/FSDP wrappers need.
        """
        cfg = self.config
        cond = self.encode_context(text_BTD, text_mask_BT, text_positions_BT)
        B, T = text_BTD.shape[0], cfg.context_token
        num_img = cfg.num_image_tokens()
        if teacher_forcing_BLCv.shape != (B, num_img - 1, cfg.token_dim):
            raise ValueError(
                f"teacher-forcing input must be (B={B}, {num_img - 1}, {cfg.token_dim}), got {tuple(teacher_forcing_BLCv.shape)}"
            )
        last_l = self.grid.token_counts[-1]
        x_img = self.word_embed(teacher_forcing_BLCv.float())
        levels = self.lvl_1L[0]
        positions = None
        if cfg.attn_type == "llama":
            positions = self.rope.image_positions(list(range(1, self.num_scales)), cond.positions_BT)
        absolute = self.pos_1LC.expand(B, -1, -1) if self.pos_1LC is not None else None
        if keep_last_Bk is not None:
            k = keep_last_Bk.shape[1]
            if keep_last_Bk.shape[0] != B or k < 1 or k > last_l:
                raise ValueError(f"keep_last_Bk must be (B={B}, 1..{last_l}), got {tuple(keep_last_Bk.shape)}")
            x_img = torch.cat([x_img[:, :-last_l], _gather_rows(x_img[:, -last_l:], keep_last_Bk)], dim=1)
            if positions is not None:
                positions = torch.cat([positions[:, :-last_l], _gather_rows(positions[:, -last_l:], keep_last_Bk)], dim=1)
            if absolute is not None:
                absolute = torch.cat([absolute[:, : -last_l], _gather_rows(absolute[:, -last_l:], keep_last_Bk)], dim=1)
            levels = levels[: levels.shape[0] - last_l + k]
        else:
            k = last_l
        sos = cond.tokens_BTC if self.pos_start is None else cond.tokens_BTC + self.pos_start
        x = torch.cat([sos, x_img], dim=1) + self.level_embedding(levels).unsqueeze(0)
        if absolute is not None:
            x = x + absolute
        rope = None
        if positions is not None:
            rope = self._rope([self.rope.text(cond.positions_BT), self.rope.image(positions)])
        # Segment ends in the sequence [text | scale 1 | ... | kept last-scale tokens]; scale si >= 1
        # starts at T + offsets[si] - 1 (the 1x1 scale has no position of its own).
        ends = [T + offset - 1 for offset in self.grid.offsets[1:-1]] + [T + self.grid.offsets[-2] - 1 + k]
        block_mask = None
        if self.attention_backend == "flex":  # built once per layout (text, scales, kept count), then cached
            block_mask = block_causal_mask(tuple(ends), str(x.device))
        h = self.run_blocks(x, cond, rope, T, segment_ends=ends, block_mask=block_mask)
        logits = self.logits(h[:, T - 1 :], cond)
        if diffusion_reference is not None:
            if codebook is None:
                raise ValueError("diffusion_reference needs the tokenizer codebook (V, Cv)")
            terms = self.diffusion_terms(logits[:, -k:], h[:, -k:], diffusion_reference, codebook, generator, fallback_idx_Bk)
            return logits, terms
        if return_hidden:
            return logits, h[:, -k:], cond
        return logits

    def diffusion_terms(
        self,
        logits_BkV: torch.Tensor,
        h_BkC: torch.Tensor,
        reference_BkCv: torch.Tensor,
        codebook_VCv: torch.Tensor,
        generator: torch.Generator | None = None,
        fallback_idx_Bk: torch.Tensor | None = None,
        top_k: int = 600,
        top_p: float = 0.96,
    ) -> dict[str, torch.Tensor]:
        """HART's residual-head training loss (docs/design/transformer.md, "Head training loss").

        The last-scale token is sampled from the model's own logits (no CFG, no gradient; if sampling
        fails on non-finite logits, `fallback_idx_Bk`, the ground truth, is used as released), the
        target is reference - E[idx] and the condition decoder_norm(h + word_embed(E[idx]));
        rows repeat `diffusion_batch_mul` times.
        """
        B, k, _ = h_BkC.shape
        with torch.no_grad():
            try:
                idx_Bk = sample_top_k_top_p(logits_BkV.detach(), top_k, top_p, generator=generator)
            except RuntimeError:
                if fallback_idx_Bk is None:
                    raise
                idx_Bk = fallback_idx_Bk
            target_BkCv = reference_BkCv.float() - F.embedding(idx_Bk, codebook_VCv).float()
        z_BkC = self.diffusion_condition(h_BkC, idx_Bk, codebook_VCv)
        mul = self.config.diffusion_batch_mul
        terms = self.diffloss(
            target_BkCv.reshape(B * k, -1).repeat(mul, 1), z_BkC.reshape(B * k, -1).repeat(mul, 1), generator=generator
        )
        terms["sampled_idx"] = idx_Bk
        return terms

    # ------------------------------------------------------------------ sampling with a KV cache
    def start_sampling(
        self, text_BTD: torch.Tensor, text_mask_BT: torch.Tensor, text_positions_BT: torch.Tensor | None = None,
        static_cache: bool = True,
    ) -> tuple[SamplingState, torch.Tensor]:
        """Run the text step. Returns the state for `sampling_step` and the logits of the 1x1 scale (B, 1, V).

        `static_cache`: KV caches preallocated for the whole sequence (see `hart.layers.attention.KVCache`).
        """
        cond = self.encode_context(text_BTD, text_mask_BT, text_positions_BT)
        caches = [KVCache(self.config.seq_len() if static_cache else None) for _ in self.blocks]
        T = self.config.context_token
        x = cond.tokens_BTC + self.level_embedding(torch.zeros(1, dtype=torch.long, device=text_BTD.device))
        if self.pos_start is not None:
            x = x + self.pos_start + self.pos_1LC[:, :T]
        rope = self._rope([self.rope.text(cond.positions_BT)]) if self.config.attn_type == "llama" else None
        h = self.run_blocks(x, cond, rope, T, caches=caches)
        return SamplingState(cond, caches), self.logits(h[:, -1:], cond)

    def sampling_step(
        self, si: int, next_input_BlCv: torch.Tensor, state: SamplingState
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale si >= 1 from its input code map tokens (B, pn^2, Cv) -> (logits (B, l, V), hidden (B, l, C))."""
        if not 1 <= si < self.num_scales:
            raise ValueError(f"sampling_step takes scales 1..{self.num_scales - 1}, got {si}")
        cond = state.cond
        pn = self.patch_nums[si]
        x = self.word_embed(next_input_BlCv.float()) + self.level_embedding(
            torch.full((1,), si, dtype=torch.long, device=next_input_BlCv.device)
        )
        if self.pos_1LC is not None:
            start = self.config.context_token + self.grid.offsets[si] - 1
            x = x + self.pos_1LC[:, start : start + pn * pn]
        rope = None
        if self.config.attn_type == "llama":
            rope = self._rope([self.rope.image(self.rope.image_positions([si], cond.positions_BT))])
        h = self.run_blocks(x, cond, rope, 0, caches=state.caches)
        return self.logits(h, cond), h


def _gather_rows(x_BlX: torch.Tensor, idx_Bk: torch.Tensor) -> torch.Tensor:
    return torch.gather(x_BlX, 1, idx_Bk.unsqueeze(-1).expand(-1, -1, x_BlX.shape[-1]))
