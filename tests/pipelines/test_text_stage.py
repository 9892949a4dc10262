"""pipelines/text_stage.py: frozen text features per accepted caption, fp16, pads as the encoder gave them."""

from __future__ import annotations

import numpy as np
import torch

from pipelines.config import TextConfig
from pipelines.text_stage import PAD_FEATURES, TextFeatureStage


def test_features_for_accepted_rows_only_with_the_encoders_own_pads():
    stage = TextFeatureStage(TextConfig(encoder="minilm", max_length=16))
    batch = {"row_kind": np.array(["sample", "sample", "shard", "sample"], dtype=object),
             "status": np.array(["ok", "too_small", "shard", "ok"], dtype=object),
             "caption": np.array(["a red circle", "", "", "a blue square on a black background"], dtype=object),
             "key": np.array(["a", "b", "", "d"], dtype=object)}
    out = stage(batch)
    assert out["key"] is batch["key"]  # the other columns pass through
    features, mask = out["text_features"], out["text_mask"]
    assert features.shape == (4, 16, stage.dim) and features.dtype == np.float16 and mask.dtype == bool
    assert not features[[1, 2]].any() and not mask[[1, 2]].any()  # rejections and headers: zeros, no text
    assert mask[0].sum() < mask[3].sum() <= 16 and mask[0, 0] and mask[3, 0]
    with torch.inference_mode():
        reference, _ = stage.encoder(["a red circle"])
    np.testing.assert_array_equal(features[0], reference[0].float().numpy().astype(np.float16))
    assert PAD_FEATURES == "encoder_output" and features[0, ~mask[0]].any()  # pads hold encoder outputs, not zeros
