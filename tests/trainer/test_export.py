"""trainer/export.py: a training checkpoint of tiny models becomes the official folder layout (tokenizer/,
and llm/ with ema_model.bin for the transformer stages) that loads back strictly with the checkpoint's
weights; a checkpoint whose keys do not fit the run's model is refused; the folder is copied out."""

from __future__ import annotations

import pytest
import torch

from hart.training.checkpoint import save_training_state
from hart.config import tokenizer_config, transformer_config
from hart.tokenizer.model import HybridTokenizer, load_discriminator
from hart.transformer.model import HARTForT2I
from trainer.export import export_checkpoint, upload_folder
from trainer.config import load_train_config
from trainer.plan import RunPlan


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k].to(a[k].dtype)) for k in a)


def test_tokenizer_stage_exports_the_trained_tokenizer_and_its_discriminator(tmp_path):
    from hart.tokenizer.discriminator import NLayerDiscriminator

    config = load_train_config(None, "tokenizer", ["objective.disc_channels=8", "model.tokenizer_checkpoint=''"])
    torch.manual_seed(1)
    tokenizer, discriminator = HybridTokenizer(tokenizer_config("tiny")), NLayerDiscriminator(ndf=8)
    save_training_state(tmp_path / "ckpt", meta={"step": 3}, model=tokenizer.state_dict(),
                        extra={"discriminator": discriminator.state_dict()})
    out = export_checkpoint(tmp_path / "ckpt", RunPlan.of(config), tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer"]
    assert same(HybridTokenizer.from_pretrained(out / "tokenizer").state_dict(), tokenizer.state_dict())
    assert same(load_discriminator(out / "tokenizer").state_dict(), discriminator.state_dict())


def test_transformer_stage_exports_weights_ema_and_the_frozen_tokenizer(tmp_path):
    torch.manual_seed(2)
    frozen = HybridTokenizer(tokenizer_config("tiny"))
    frozen.save_pretrained(tmp_path / "frozen")
    config = load_train_config(None, "joint", [f"model.tokenizer_checkpoint={tmp_path / 'frozen'}"])
    model = HARTForT2I(transformer_config("tiny"))
    model.init_weights()
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_training_state(tmp_path / "ckpt", meta={"step": 4}, model=model.state_dict(), ema=ema)
    out = export_checkpoint(tmp_path / "ckpt", RunPlan.of(config), tmp_path / "export")
    assert {"llm", "tokenizer"} <= {p.name for p in out.iterdir()}
    assert (out / "llm" / "ema_model.bin").is_file()
    assert same(HARTForT2I.from_pretrained(out / "llm").state_dict(), model.state_dict())
    assert same(HARTForT2I.from_pretrained(out / "llm", ema=True).state_dict(), ema)
    assert same(HybridTokenizer.from_pretrained(out / "tokenizer").state_dict(), frozen.state_dict())


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    config = load_train_config(None, "tokenizer", ["model.tokenizer_checkpoint=''"])
    state = HybridTokenizer(tokenizer_config("tiny")).state_dict()
    state.pop(next(iter(state)))
    save_training_state(tmp_path / "ckpt", meta={"step": 1}, model=state)
    with pytest.raises(RuntimeError, match="Missing key"):
        export_checkpoint(tmp_path / "ckpt", RunPlan.of(config), tmp_path / "export")
    with pytest.raises(ValueError, match="not a training checkpoint"):
        export_checkpoint(tmp_path / "nowhere", RunPlan.of(config), tmp_path / "export")


def test_upload_copies_the_folder_tree(tmp_path):
    (tmp_path / "local" / "llm").mkdir(parents=True)
    (tmp_path / "local" / "llm" / "config.json").write_text("{}")
    (tmp_path / "local" / "train_config.json").write_text("{\"stage\": \"joint\"}")
    upload_folder(tmp_path / "local", str(tmp_path / "remote" / "export"))
    assert (tmp_path / "remote" / "export" / "llm" / "config.json").read_text() == "{}"
    assert (tmp_path / "remote" / "export" / "train_config.json").read_text() == "{\"stage\": \"joint\"}"


def test_read_export_finds_hart_or_star_in_an_export(tmp_path):
    from trainer.export import read_export

    (tmp_path / "tokenizer").mkdir()
    with pytest.raises(ValueError, match="expected tokenizer/ and llm/, or star/ema_model.pth"):
        read_export(tmp_path, ema=True)
    (tmp_path / "llm").mkdir()
    assert read_export(tmp_path, ema=True) == {"llm": str(tmp_path / "llm"), "tokenizer": str(tmp_path / "tokenizer")}
    (tmp_path / "star").mkdir()
    (tmp_path / "star" / "model.pth").write_bytes(b"")
    assert read_export(tmp_path, ema=False)["star"] == str(tmp_path / "star" / "model.pth")
    assert "star" not in read_export(tmp_path, ema=True)  # no ema_model.pth: the HART folder it also holds
    with pytest.raises(ValueError, match="reads a local folder; copy it first"):
        read_export("s3://bucket/export")
