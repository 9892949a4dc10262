"""jobs/generate.py (hart-generate): an export folder + prompts -> one PNG per prompt, seeded."""

from __future__ import annotations

import torch
from PIL import Image

from hart.config import tokenizer_config, transformer_config
from hart.tokenizer.model import HybridTokenizer
from hart.transformer.model import HARTForT2I
from jobs.generate import main, slug


def test_prompts_become_named_pngs_the_same_for_a_seed(tmp_path, capsys):
    torch.manual_seed(0)
    tokenizer = HybridTokenizer(tokenizer_config("tiny"))
    tokenizer.save_pretrained(tmp_path / "export" / "tokenizer")
    model = HARTForT2I(transformer_config("tiny"))
    model.init_weights()
    model.save_pretrained(tmp_path / "export" / "llm", ema_state=model.state_dict(), tokenizer=tokenizer.config)
    (tmp_path / "prompts.txt").write_text("a blue square\n\n")
    args = ["--llm", str(tmp_path / "export" / "llm"), "--tokenizer", str(tmp_path / "export" / "tokenizer"),
            "--prompt", "A red circle!", "--prompts-file", str(tmp_path / "prompts.txt"), "--top-k", "16", "16",
            "--seed", "3", "--device", "cpu"]
    assert main([*args, "--output", str(tmp_path / "a")]) == 0
    assert main([*args, "--output", str(tmp_path / "b"), "--ema"]) == 0
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["0000-a-red-circle.png", "0001-a-blue-square.png"] and "wrote 2 images" in capsys.readouterr().out
    for name in names:
        image = Image.open(tmp_path / "a" / name)
        assert image.size == (64, 64) and image.mode == "RGB"
        assert image.tobytes() == Image.open(tmp_path / "b" / name).tobytes()  # EMA == weights here, same seed


def test_bad_input_is_a_clear_exit_code(tmp_path, capsys):
    assert main(["--llm", str(tmp_path), "--tokenizer", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    assert "at least one --prompt" in capsys.readouterr().err
    assert main(["--llm", str(tmp_path / "none"), "--tokenizer", str(tmp_path), "--prompt", "x", "--output",
                 str(tmp_path / "o"), "--device", "cpu"]) == 2
    assert "hart-generate:" in capsys.readouterr().err
    assert slug("  Über CAFÉ: 2 cats?!") == "ber-caf-2-cats" and slug("!!!") == "prompt"
