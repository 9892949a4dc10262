"""The official `llm/` layout (config.json + weights + ema_model.bin) of `HARTForT2I`, read and written.

This module imports no model code: `read_transformer` returns (config, state) and
`HARTForT2I.from_pretrained` builds the model and loads it with `load_state_into`, so the model
file depends on this adapter and never the other way round.

Design: every weight file goes through `hart.weights` (safetensors or weights_only
torch.load). The config is rebuilt in two layers: first everything that can be read off
the weights (depth, widths, vocabulary, scales, variants), then the values in
`config.json`, which win; a checkpoint that then disagrees with the model fails
`match_state_dict` with every bad key listed. Official HF-only fields are ignored by name;
any other unknown field is reported in a warning, never dropped silently.

Persistent buffers of the released state dict:
- `lvl_1L` and `blocks.N.attn.zero_k_bias` are real buffers of our model and load strictly
  (lvl_1L must equal the levels our patch_nums give, else ValueError).
- `attn_bias_for_masking` (1, 1, L, L) is derived from `lvl_1L` (0 where level_q >= level_k,
  -inf elsewhere). Rule: it is optional on load; when present it is verified in row chunks
  against the derived mask (ValueError on any difference) and then dropped. Save always
  writes it, so the official code can load our files with its strict `load_state_dict`.

The official `HARTForT2I` fixes a few values in code (`REFERENCE_FIXED`) and reads its vocabulary
and token width from the tokenizer folder beside `llm/`; `save_transformer` writes a note into
`llm/` when the config, or the tokenizer it is saved with, departs from them (hart.reference_compat).
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from pathlib import Path

import torch

from hart.layers.blocks import llama_hidden_dim
from configuration.loader import config_from_dict, config_to_dict
from hart.config import TokenizerConfig, TransformerConfig
from hart.reference_compat import Difference, differences, record
from hart.tokenizer.model import reference_differences as tokenizer_differences
from hart.weights import load_weight_file, load_weight_folder, match_state_dict, save_weight_file

MODEL_TYPE = "hart_transformer_t2i"
MASK_KEY = "attn_bias_for_masking"
EMA_FILE = "ema_model.bin"
WEIGHTS_FILE = "model.safetensors"
# Fields of the official HARTForT2IConfig / PretrainedConfig that have no effect on our math.
IGNORED_OFFICIAL_FIELDS = {
    "vae_path", "drop_rate", "attn_drop_rate", "drop_path_rate", "flash_if_available", "fused_if_available",
    "diffusion_head_repeats", "latent_condition_weight", "model_type", "architectures", "torch_dtype",
    "transformers_version", "_name_or_path", "auto_map", "sampler", "shared_aln",
}

# What the official HARTForT2I fixes in code: the residual scale of its diffusion head (DiffLoss.vae_scale)
# and, for llama attention (the only kind with RoPE, there and here), RoPE base and mode: its blocks
# pass rope_theta=10000 and only know the released 2-D RoPE.
REFERENCE_FIXED = {"diffusion_target_scale": 0.6}
REFERENCE_FIXED_ROPE = {"rope_theta": 10000.0, "rope_mode": "hart"}


def reference_differences(config: TransformerConfig, tokenizer: TokenizerConfig | None = None) -> list[Difference]:
    """Fields the reference would build differently; with `tokenizer`, also those of the tokenizer
    folder it loads beside `llm/` and the sizes it reads from there (vocabulary, token width)."""
    fixed = {**REFERENCE_FIXED, **(REFERENCE_FIXED_ROPE if config.attn_type == "llama" else {})}
    found = differences(config_to_dict(config), fixed)
    if tokenizer is not None:
        read_from_tokenizer = {"vocab_size": tokenizer.vocab_size, "token_dim": tokenizer.z_channels}
        found += differences(config_to_dict(config), read_from_tokenizer)
        found += tokenizer_differences(tokenizer, prefix="tokenizer.")
    return found


def infer_config_fields(state: dict[str, torch.Tensor]) -> dict:
    """TransformerConfig fields that the weights determine."""
    fields: dict = {}
    if "word_embed.weight" in state:
        fields["embed_dim"], fields["token_dim"] = state["word_embed.weight"].shape
    if "context_embed.weight" in state:
        fields["context_dim"] = state["context_embed.weight"].shape[1]
    if "head.weight" in state:
        fields["vocab_size"] = state["head.weight"].shape[0]
    block_ids = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if block_ids:
        fields["depth"] = max(block_ids) + 1
    if "lvl_1L" in state:
        levels = state["lvl_1L"].flatten().tolist()
        fields["context_token"] = levels.count(0)
        counts = [levels.count(i) for i in range(1, max(levels) + 1)]
        sides = [int(round(c**0.5)) for c in counts]
        if any(s * s != c for s, c in zip(sides, counts)):
            raise ValueError(f"lvl_1L does not describe square scales: tokens per level {counts}")
        fields["patch_nums"] = (1, *sides)
    fields["attn_l2_norm"] = "blocks.0.attn.scale_mul_1H11" in state
    if fields["attn_l2_norm"]:
        fields["num_heads"] = state["blocks.0.attn.scale_mul_1H11"].shape[1]
    fields["attn_type"] = "gpt2" if "blocks.0.attn.mat_qkv.weight" in state else "llama"
    if "blocks.0.ffn.gate_proj.weight" in state:
        fields["mlp_type"] = "llama"
        hidden = state["blocks.0.ffn.gate_proj.weight"].shape[0]
        if "embed_dim" in fields and llama_hidden_dim(fields["embed_dim"], 4.0) != hidden:
            raise ValueError(f"SwiGLU hidden width {hidden} does not come from mlp_ratio 4; set mlp_ratio in config.json")
    elif "blocks.0.ffn.fc1.weight" in state:
        fields["mlp_type"] = "gpt2"
        fields["mlp_ratio"] = state["blocks.0.ffn.fc1.weight"].shape[0] / fields["embed_dim"]
    fields["use_timestep_embed"] = "lvl_embed.mlp.0.weight" in state
    fields["use_context_norm"] = "context_norm.weight" in state
    fields["use_cross_attn"] = "blocks.0.cross_attn.q_linear.weight" in state
    fields["disable_aln"] = bool(block_ids) and "blocks.0.ada_lin.1.weight" not in state
    if "diffloss.net.input_proj.weight" in state:
        fields["diff_width"] = state["diffloss.net.input_proj.weight"].shape[0]
        fields["diff_depth"] = len({int(m.group(1)) for k in state if (m := re.match(r"diffloss\.net\.res_blocks\.(\d+)\.", k))})
    return fields


def config_from_official(config_json: dict, state: dict[str, torch.Tensor]) -> TransformerConfig:
    fields = infer_config_fields(state)
    known = {f.name for f in dataclasses.fields(TransformerConfig)}
    if config_json.get("shared_aln"):
        raise ValueError("config.json sets shared_aln=true, which HARTForT2I here does not implement")
    if config_json.get("sampler", "iddpm") != "iddpm":
        raise ValueError(f"config.json sampler {config_json['sampler']!r} is not supported (only 'iddpm')")
    unknown = sorted(k for k in config_json if k not in known and k not in IGNORED_OFFICIAL_FIELDS)
    if unknown:
        warnings.warn(f"config.json fields not used by HARTForT2I: {unknown}", stacklevel=3)
    for key, value in config_json.items():
        if key in known and value is not None:
            fields[key] = value
    if "num_heads" not in fields:
        fields["num_heads"] = fields["embed_dim"] // 64
        warnings.warn(
            f"num_heads not in config.json nor in the weights; assuming head_dim 64 -> {fields['num_heads']}", stacklevel=3
        )
    if isinstance(fields.get("num_sampling_steps"), int):
        fields["num_sampling_steps"] = str(fields["num_sampling_steps"])
    if "mlp_ratio" in fields:
        fields["mlp_ratio"] = float(fields["mlp_ratio"])
    return config_from_dict(TransformerConfig, fields, where=f"{MODEL_TYPE} config")


def derived_mask_chunks(levels_L: torch.Tensor, rows: int = 1024):
    """Yield (start, expected additive mask rows) of the official block-causal mask."""
    for start in range(0, levels_L.shape[0], rows):
        q = levels_L[start : start + rows, None]
        yield start, torch.where(q >= levels_L[None, :], 0.0, -torch.inf)


def check_mask(mask: torch.Tensor, levels_L: torch.Tensor) -> None:
    L = levels_L.shape[0]
    if tuple(mask.shape) != (1, 1, L, L):
        raise ValueError(f"{MASK_KEY} has shape {tuple(mask.shape)}, expected (1, 1, {L}, {L})")
    for start, expected in derived_mask_chunks(levels_L):
        got = mask[0, 0, start : start + expected.shape[0]].float()
        if not torch.equal(got, expected):
            raise ValueError(f"{MASK_KEY} differs from the block-causal mask of lvl_1L (rows {start}..)")


def full_mask(levels_L: torch.Tensor) -> torch.Tensor:
    L = levels_L.shape[0]
    mask = torch.empty(1, 1, L, L)
    for start, rows in derived_mask_chunks(levels_L):
        mask[0, 0, start : start + rows.shape[0]] = rows
    return mask


def load_state_into(model, state: dict[str, torch.Tensor], what: str) -> None:
    """Strict load with the documented rule for the derived mask buffer."""
    state = dict(state)
    levels = model.derived_levels().cpu()
    if MASK_KEY in state:
        check_mask(state.pop(MASK_KEY), levels)
    expected = model.state_dict()
    match_state_dict(expected, state, what)
    if not torch.equal(state["lvl_1L"].cpu().long().flatten(), levels):
        raise ValueError(f"cannot load {what}: lvl_1L does not match patch_nums {model.patch_nums}")
    model.load_state_dict(state, strict=True)


def export_state(state: dict[str, torch.Tensor], levels_L: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {k: v.detach().cpu() for k, v in state.items()}
    out[MASK_KEY] = full_mask(levels_L.cpu())
    return out


def read_transformer(llm_dir, ema: bool = False,
                     config: TransformerConfig | None = None) -> tuple[TransformerConfig, dict[str, torch.Tensor], str]:
    """(config, state dict, a name for error messages) of an official `llm/` folder: what
    `HARTForT2I.from_pretrained` builds its model from and loads with `load_state_into`."""
    llm_dir = Path(llm_dir)
    if not llm_dir.is_dir():
        raise ValueError(f"transformer folder not found: {llm_dir}")
    config_path = llm_dir / "config.json"
    config_json = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if config_json.get("model_type", MODEL_TYPE) != MODEL_TYPE:
        raise ValueError(f"{config_path}: model_type {config_json['model_type']!r} is not {MODEL_TYPE!r}")
    state = load_weight_file(llm_dir / EMA_FILE) if ema else load_weight_folder(llm_dir)
    if config is None:
        config = config_from_official(config_json, state)
    return config, state, f"{llm_dir / (EMA_FILE if ema else 'weights')}"


def official_config_json(config: TransformerConfig) -> dict:
    data = config_to_dict(config)
    data.update(model_type=MODEL_TYPE, architectures=["HARTForT2I"], shared_aln=False, sampler="iddpm")
    return data


def save_transformer(model, llm_dir, ema_state: dict[str, torch.Tensor] | None = None,
                     tokenizer: TokenizerConfig | None = None) -> None:
    """Write `llm/`; `tokenizer` is the config of the tokenizer folder saved beside it, if known."""
    llm_dir = Path(llm_dir)
    llm_dir.mkdir(parents=True, exist_ok=True)
    levels = model.derived_levels()
    save_weight_file(export_state(model.state_dict(), levels), llm_dir / WEIGHTS_FILE)
    if ema_state is not None:
        match_state_dict(model.state_dict(), ema_state, "EMA state")
        save_weight_file(export_state(ema_state, levels), llm_dir / EMA_FILE)
    (llm_dir / "config.json").write_text(json.dumps(official_config_json(model.config), indent=2) + "\n")
    record(llm_dir, "transformer", reference_differences(model.config, tokenizer),
           "hart.transformer.model.HARTForT2I.from_pretrained",
           "" if tokenizer is None else "The reference builds the transformer together with the tokenizer/ folder beside\n"
           "llm/ and reads vocab_size and token_dim from it; tokenizer.* rows are that folder's fields.")
