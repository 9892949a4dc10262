"""Text encoders: HART's causal-LM recipe on a tiny random Qwen2 built offline, and the embedded MiniLM."""

from __future__ import annotations

import os

import pytest
import torch

from hart.text_encoder import CausalLMTextEncoder, EncoderTextEncoder, build_text_encoder

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_qwen_dir(tmp_path_factory):
    from tests.training_fixtures import save_tiny_qwen

    return save_tiny_qwen(tmp_path_factory.mktemp("tiny_qwen"))


SYSTEM_PROMPT = "Describe the picture in vivid visual detail.\nUser Prompt:\n"


def test_qwen_features_shape_mask_and_system_prompt(tiny_qwen_dir):
    encoder = build_text_encoder(tiny_qwen_dir, max_length=12, system_prompt=SYSTEM_PROMPT)
    assert isinstance(encoder, CausalLMTextEncoder) and encoder.dim == 32
    prompts = ["a red cat", "a blue dog on a cat"]
    features, mask = encoder(prompts)
    assert features.shape == (2, 12, 32) and features.dtype == torch.float32
    assert mask.dtype == torch.bool
    n_valid = mask.sum(1).tolist()
    assert n_valid[0] < n_valid[1] < 12 and mask[:, : n_valid[0]].all() and not mask[0, n_valid[0]:].any()
    # Independent recomputation: system prompt prepended (all ones mask), its positions dropped.
    ids = encoder.tokenize(prompts)
    # as released, the system prompt is truncated to max_length too (a no-op at 300 with Qwen)
    sys_ids = encoder.tokenizer(encoder.system_prompt, return_tensors="pt")["input_ids"][:, :12]
    S = sys_ids.shape[1]
    full = torch.cat([sys_ids.expand(2, -1), ids], 1)
    attention = torch.cat([torch.ones(2, S, dtype=torch.long), (ids != encoder.tokenizer.pad_token_id).long()], 1)
    with torch.no_grad():
        expected = encoder.model(input_ids=full, attention_mask=attention).last_hidden_state[:, S:]
    torch.testing.assert_close(features, expected.float())
    # the system prompt changes the features of the prompt tokens (causal context)
    with pytest.warns(UserWarning, match="system prompt"):
        plain_encoder = build_text_encoder(tiny_qwen_dir, max_length=12)
    plain, _ = plain_encoder(prompts)
    assert not torch.allclose(plain[mask], features[mask])


def test_system_prompt_file_next_to_the_model_is_used(tiny_qwen_dir, tmp_path):
    import shutil

    folder = tmp_path / "qwen"
    shutil.copytree(tiny_qwen_dir, folder)
    (folder / "system_prompt.txt").write_text(SYSTEM_PROMPT)
    from_file = build_text_encoder(str(folder), max_length=12)
    assert from_file.system_prompt == SYSTEM_PROMPT


def test_truncation_warns(tiny_qwen_dir):
    encoder = build_text_encoder(tiny_qwen_dir, max_length=6)
    with pytest.warns(UserWarning, match="truncated"):
        features, mask = encoder(["a red cat on a blue dog on a red cat on a blue dog"])
    assert features.shape == (1, 6, 32) and mask.all()


def test_bad_names_and_inputs(tiny_qwen_dir, tmp_path):
    with pytest.raises(ValueError, match="not found"):
        build_text_encoder(str(tmp_path / "missing" / "model"), 10)
    with pytest.raises(ValueError, match="not available locally"):
        build_text_encoder("nobody-xyz/not-a-cached-model", 10)
    with pytest.raises(ValueError, match="non-empty"):
        build_text_encoder(tiny_qwen_dir, 10)([])


def test_embedded_minilm_offline():
    encoder = build_text_encoder("minilm", max_length=16)
    assert isinstance(encoder, EncoderTextEncoder) and encoder.dim == 384 and encoder.max_length == 16
    features, mask = encoder(["a photo of a cat", "dog"])
    assert features.shape == (2, 16, 384) and features.dtype == torch.float32
    assert mask[0].sum() > mask[1].sum() >= 3  # [CLS] dog [SEP]
    again, _ = encoder(["a photo of a cat", "dog"])
    assert torch.equal(features, again)
    assert not torch.allclose(features[0, 1], features[1, 1])
