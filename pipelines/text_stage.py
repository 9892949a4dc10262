"""Optional stage: frozen text-encoder features per caption, stored fp16 next to the tokens.

Design: a callable class for an actor pool, like the tokenizer stage. The encoder comes from
`hart.text_encoder.build_text_encoder(name, max_length)` (contract 2), imported inside the actor
so jobs without a text stage never load transformers. Features are cast to fp16 (half the bytes,
the precision the released text encoders run at) with a boolean mask.

Padded positions keep the encoder's own outputs (`PAD_FEATURES = "encoder_output"`, recorded in
the cache fingerprint), exactly what generation feeds the model: in HART every text position,
pads included, is a prefix token that image tokens attend to, the 1x1 scale is predicted from
the last text position (usually a pad), and the head's AdaLN condition is a max over all
positions (docs/design/transformer.md, "Pad handling"). Zeroing the pads here made training
and generation see different inputs, and generation ignored the prompt. Rows that are not
accepted samples get all-zero features and an all-false mask.

Shape legend: B rows, T text tokens (max_length), D feature width.
"""

from __future__ import annotations

import numpy as np
import torch

from pipelines.config import TextConfig

PAD_FEATURES = "encoder_output"  # what padded text positions hold in the cache (see above)


def load_text_encoder(config: TextConfig):
    from hart.text_encoder import build_text_encoder  # heavy import, only where the stage runs

    encoder = build_text_encoder(config.encoder, config.max_length)
    if hasattr(encoder, "eval"):
        encoder.eval()
    return encoder


class TextFeatureStage:
    """`map_batches(TextFeatureStage, compute=ActorPoolStrategy(...), batch_size=...)` UDF."""

    def __init__(self, config: TextConfig, use_gpu: bool = False):
        if use_gpu and not torch.cuda.is_available():
            raise ValueError("compute.text_gpus > 0 but this text-encoder actor sees no CUDA device")
        self.encoder = load_text_encoder(config)
        self.max_length = config.max_length
        self.dim = int(self.encoder.dim)
        device = torch.device("cuda" if use_gpu else "cpu")
        if hasattr(self.encoder, "to"):
            self.encoder = self.encoder.to(device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        num_rows = len(batch["row_kind"])
        features_BTD = np.zeros((num_rows, self.max_length, self.dim), dtype=np.float16)
        mask_BT = np.zeros((num_rows, self.max_length), dtype=bool)
        accepted = np.flatnonzero((batch["row_kind"] == "sample") & (batch["status"] == "ok"))
        if len(accepted):
            prompts = [str(batch["caption"][i]) for i in accepted]
            with torch.inference_mode():
                features, mask = self.encoder(prompts)
            features = features.float().cpu().numpy()
            mask = mask.cpu().numpy().astype(bool)
            pad = self.max_length - features.shape[1]
            if pad > 0:  # encoders may return only the longest prompt's length
                features = np.pad(features, ((0, 0), (0, pad), (0, 0)))
                mask = np.pad(mask, ((0, 0), (0, pad)))
            if features.shape[1:] != (self.max_length, self.dim) or mask.shape[1:] != (self.max_length,):
                raise ValueError(
                    f"text encoder returned features {features.shape} / mask {mask.shape}; expected (B, {self.max_length}, {self.dim})"
                )
            features_BTD[accepted] = features.astype(np.float16)
            mask_BT[accepted] = mask
        out = dict(batch)
        out["text_features"] = features_BTD
        out["text_mask"] = mask_BT
        return out
