"""CLIP score of an image and its prompt, from a CLIP model folder the user names.

The score is the one torchmetrics' `CLIPScore` (and clean-fid, and the papers HART compares with)
defines: 100 * max(cosine(image embedding, text embedding), 0), with the model's own processor
(resize, crop, normalisation; text truncated to the model's 77 tokens). It is computed here, per
image, with transformers' `CLIPModel`: an evaluation reports it per category as well as overall
(torchmetrics' metric keeps a running sum only), and torchmetrics 1.9's CLIPScore fails with
transformers 5 (it takes `get_image_features`' output object for a tensor).
`tests/pipelines/test_clip_score.py` checks the scores against the model's own forward pass.

The model is a Hugging Face `CLIPModel` folder (`config.json`, weights, tokenizer and processor
files), e.g. `openai/clip-vit-large-patch14` saved with `save_pretrained`; it is read with
`local_files_only`: nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

CLIP_HELP = ("a CLIP model folder (a Hugging Face CLIPModel saved with save_pretrained: config.json, "
             "model.safetensors, the tokenizer and preprocessor files; e.g. openai/clip-vit-large-patch14)")


class ClipScorer:
    """Loads the model once (per actor); `__call__(images, prompts)` -> per-image scores (N,)."""

    def __init__(self, folder: str | Path, device: torch.device | str = "cpu"):
        from transformers import CLIPModel, CLIPProcessor

        folder = Path(folder) if folder else None
        if folder is None:
            raise ValueError(f"the CLIP score needs {CLIP_HELP}; pass its path (--clip FOLDER)")
        if not (folder / "config.json").is_file():
            raise ValueError(f"no CLIP model at {folder} (config.json missing): put {CLIP_HELP} there")
        try:
            self.model = CLIPModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
            self.processor = CLIPProcessor.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{folder} does not hold a loadable CLIP model ({exc}): expected {CLIP_HELP}") from None
        self.device = torch.device(device)
        self.model.to(self.device).eval().requires_grad_(False)
        self.max_length = self.model.config.text_config.max_position_embeddings

    @torch.no_grad()
    def __call__(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        text = self.processor(text=prompts, return_tensors="pt", padding=True, truncation=True,
                              max_length=self.max_length)
        image_emb = self.model.get_image_features(pixel_values=pixels)
        text_emb = self.model.get_text_features(input_ids=text["input_ids"].to(self.device),
                                                attention_mask=text["attention_mask"].to(self.device))
        image_emb = getattr(image_emb, "pooler_output", image_emb)  # transformers returns tensors or outputs
        text_emb = getattr(text_emb, "pooler_output", text_emb)
        cosine = torch.nn.functional.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1)
        return (100 * cosine).clamp(min=0).cpu()


def save_tiny_clip(folder: str | Path, seed: int = 0) -> Path:
    """A random tiny CLIP model folder in the real layout (config, safetensors weights, a byte-level BPE
    tokenizer with no merges, an image processor), built offline: the stand-in tests load."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 byte symbols, alone and word-final
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"])}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(str(folder), safe_serialization=True)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(folder))
    return folder
