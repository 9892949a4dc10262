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


# --------------------------------------------------------------------------------------
# STAR's CLIP text encoder, on a tiny random CLIPTextModel in the SD-2.1 pipeline layout
# --------------------------------------------------------------------------------------

CLIP_LENGTH, CLIP_DIM = 16, 32


def save_tiny_sd_clip(folder):
    """`text_encoder/` + `tokenizer/` as in an SD-2.1 pipeline folder: a byte-level CLIP BPE whose
    vocabulary is the 256 byte symbols (with and without the end-of-word suffix) and no merges,
    so every character is one token; "!" pads, as in SD-2.1; EOS has the largest id."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], pad_token="!", model_max_length=CLIP_LENGTH)
    tokenizer.save_pretrained(folder / "tokenizer")
    config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=CLIP_DIM, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=CLIP_LENGTH, projection_dim=CLIP_DIM,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    CLIPTextModel(config).save_pretrained(folder / "text_encoder")
    return folder


@pytest.fixture(scope="module")
def tiny_sd_dir(tmp_path_factory):
    return save_tiny_sd_clip(tmp_path_factory.mktemp("tiny_sd21"))


def test_clip_features_shapes_mask_and_pooled_eos(tiny_sd_dir):
    from hart.star.model import TextFeatures
    from hart.text_encoder import CLIPTextEncoder, build_clip_text_encoder

    encoder = build_clip_text_encoder(tiny_sd_dir)
    assert isinstance(encoder, CLIPTextEncoder) and encoder.dim == CLIP_DIM and encoder.max_length == CLIP_LENGTH
    assert not encoder.model.training and not any(p.requires_grad for p in encoder.model.parameters())
    prompts = ["a cat", "a red dog!"]  # "!" is also the pad token: the mask must not come from the ids
    features = encoder(prompts)
    assert isinstance(features, TextFeatures)
    assert features.tokens_BTD.shape == (2, CLIP_LENGTH, CLIP_DIM) and features.tokens_BTD.dtype == torch.float32
    assert features.pooled_BD.shape == (2, CLIP_DIM) and features.mask_BT.dtype == torch.bool
    # one token per character (no merges, spaces split words) plus BOS and EOS, right-padded
    counts = [len(p.replace(" ", "")) + 2 for p in prompts]
    assert features.mask_BT.sum(1).tolist() == counts
    for row, n in enumerate(counts):
        assert features.mask_BT[row, :n].all() and not features.mask_BT[row, n:].any()
    ids, _ = encoder.tokenize(prompts)
    eos = encoder.tokenizer.eos_token_id
    for row, n in enumerate(counts):
        assert ids[row, 0] == encoder.tokenizer.bos_token_id and ids[row, n - 1] == eos
        # CLIP's pooled feature is the final hidden state at the EOS position
        torch.testing.assert_close(features.pooled_BD[row], features.tokens_BTD[row, n - 1], rtol=0, atol=0)
    from hart.star.model import pooled_at_eos  # what training rebuilds from cached features and mask

    assert torch.equal(pooled_at_eos(features.tokens_BTD, features.mask_BT), features.pooled_BD)
    again = encoder(prompts)
    assert torch.equal(again.tokens_BTD, features.tokens_BTD) and torch.equal(again.pooled_BD, features.pooled_BD)
    # the release feeds the mask to the text model too; by causality it only changes the pad positions
    with torch.no_grad():
        unmasked = encoder.model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(unmasked[features.mask_BT], features.tokens_BTD[features.mask_BT])


def test_clip_null_condition_is_bos_eos_only(tiny_sd_dir):
    from hart.text_encoder import build_clip_text_encoder

    encoder = build_clip_text_encoder(tiny_sd_dir)
    null = encoder.null_features()
    assert null.tokens_BTD.shape == (1, CLIP_LENGTH, CLIP_DIM)
    assert null.mask_BT[0].tolist() == [True, True] + [False] * (CLIP_LENGTH - 2)
    ids, _ = encoder.tokenize([""])
    assert ids[0, :2].tolist() == [encoder.tokenizer.bos_token_id, encoder.tokenizer.eos_token_id]
    assert (ids[0, 2:] == encoder.tokenizer.pad_token_id).all()
    torch.testing.assert_close(null.pooled_BD[0], null.tokens_BTD[0, 1], rtol=0, atol=0)
    # encoded alone or next to a prompt, "" gives the same features (rows never interact)
    batched = encoder(["a cat", ""])
    torch.testing.assert_close(batched.tokens_BTD[1:], null.tokens_BTD)


def test_clip_plain_folder_truncation_and_errors(tiny_sd_dir, tmp_path):
    import shutil

    from hart.text_encoder import build_clip_text_encoder

    plain = tmp_path / "clip"
    shutil.copytree(tiny_sd_dir / "text_encoder", plain)
    for item in (tiny_sd_dir / "tokenizer").iterdir():
        shutil.copy(item, plain / item.name)
    encoder, pipeline = build_clip_text_encoder(plain), build_clip_text_encoder(str(tiny_sd_dir))
    torch.testing.assert_close(encoder(["a cat"]).tokens_BTD, pipeline(["a cat"]).tokens_BTD, rtol=0, atol=0)
    with pytest.warns(UserWarning, match="truncated"):
        features = encoder(["a" * 40])
    assert features.mask_BT.all()
    with pytest.raises(ValueError, match="not found"):
        build_clip_text_encoder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no CLIP text model"):
        build_clip_text_encoder(tmp_path / "empty")
    for name in ("tokenizer.json", "vocab.json"):
        (plain / name).unlink(missing_ok=True)
    with pytest.raises(ValueError, match="no CLIP tokenizer"):
        build_clip_text_encoder(plain)
    with pytest.raises(ValueError, match="non-empty"):
        encoder([])


def test_a_clip_folder_is_also_a_features_and_mask_encoder(tiny_sd_dir):
    """build_text_encoder on an SD/CLIP folder: CLIP's own features and mask (what precompute stores
    for STAR; the pooled vector comes back from them), and the CLIP length is required."""
    from hart.star.model import pooled_at_eos
    from hart.text_encoder import build_clip_text_encoder, build_star_text_encoder, build_text_encoder

    encoder = build_text_encoder(str(tiny_sd_dir), CLIP_LENGTH)
    assert (encoder.dim, encoder.max_length) == (CLIP_DIM, CLIP_LENGTH)
    features_BTD, mask_BT = encoder(["a cat", "a red dog"])
    clip = build_clip_text_encoder(tiny_sd_dir)(["a cat", "a red dog"])
    assert torch.equal(features_BTD, clip.tokens_BTD) and torch.equal(mask_BT, clip.mask_BT)
    assert torch.equal(pooled_at_eos(features_BTD, mask_BT), clip.pooled_BD)
    assert torch.equal(build_star_text_encoder(str(tiny_sd_dir))(["a cat"]).pooled_BD, clip.pooled_BD[:1])
    with pytest.raises(ValueError, match=f"pads to {CLIP_LENGTH} tokens; max_length is 300"):
        build_text_encoder(str(tiny_sd_dir), 300)
