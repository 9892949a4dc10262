"""jobs/generate.py (hart-generate): an export folder + prompts -> one PNG per image, seeded, under a named
protocol whose settings it prints (EMA weights by default); model paths that are not local files are
refused with the fix. That it makes hart-evaluate's images is tested in tests/jobs/test_evaluate.py."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from hart.config import tokenizer_config, transformer_config
from hart.tokenizer.model import HybridTokenizer
from hart.transformer.model import HARTForT2I
from jobs.generate import main
from trainer.generation import slug


def tiny_export(root, ema_differs: bool = False):
    torch.manual_seed(0)
    tokenizer = HybridTokenizer(tokenizer_config("tiny"))
    tokenizer.save_pretrained(root / "tokenizer")
    model = HARTForT2I(transformer_config("tiny"))
    model.init_weights()
    parameters = {name for name, _ in model.named_parameters()}  # buffers (masks, RoPE tables) stay as derived
    ema = {k: v + 0.05 * torch.randn_like(v) if ema_differs and k in parameters else v
           for k, v in model.state_dict().items()}
    model.save_pretrained(root / "llm", ema_state=ema, tokenizer=tokenizer.config)
    return root


def test_prompts_become_named_pngs_the_same_for_a_seed_with_ema_weights_by_default(tmp_path, capsys):
    export = tiny_export(tmp_path / "export", ema_differs=True)
    (tmp_path / "prompts.txt").write_text("a blue square\n\n")
    args = ["--export", str(export), "--prompt", "A red circle!", "--protocol", "shapes", "--set", "seed=3",
            "--device", "cpu"]
    assert main([*args, "--output", str(tmp_path / "a")]) == 0
    printed = capsys.readouterr().out
    assert "protocol shapes with seed=3: cfg 3.0, top-k (16, 16)" in printed and "EMA weights" in printed
    assert main([*args, "--output", str(tmp_path / "b")]) == 0
    assert main([*args, "--output", str(tmp_path / "raw"), "--set", "ema=false"]) == 0
    assert "raw weights" in capsys.readouterr().out
    assert main(["--llm", str(export / "llm"), "--tokenizer", str(export / "tokenizer"), "--prompts",
                 str(tmp_path / "prompts.txt"), "--protocol", "shapes", "--device", "cpu", "--output", str(tmp_path / "c")]) == 0
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["000000-a-blue-square.png"]
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["000000-a-red-circle.png"] and "wrote 1 images" in capsys.readouterr().out
    image = Image.open(tmp_path / "a" / names[0])
    assert image.size == (64, 64) and image.mode == "RGB"
    assert image.tobytes() == Image.open(tmp_path / "b" / names[0]).tobytes()  # same seed, same image
    assert image.tobytes() != Image.open(tmp_path / "raw" / names[0]).tobytes()  # the EMA weights were used


def test_model_paths_that_are_not_local_files_are_refused_with_the_fix(tmp_path, capsys):
    export = tiny_export(tmp_path / "export")
    assert main(["--llm", str(export / "llm"), "--tokenizer", "s3://my-bucket/tok", "--prompt", "x",
                 "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--tokenizer s3://my-bucket/tok: generation reads local files; copy it first" in err and "s3:/my" not in err
    assert main(["--export", "s3://my-bucket/export", "--prompt", "x", "--output", str(tmp_path / "o")]) == 2
    assert "copy it first" in capsys.readouterr().err
    assert main(["--llm", str(export / "llm"), "--tokenizer", str(tmp_path / "none"), "--prompt", "x",
                 "--output", str(tmp_path / "o")]) == 2
    assert f"--tokenizer {tmp_path / 'none'}: not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before any output


def test_compile_generates_the_same_images(tmp_path, capsys):
    """--compile (inductor, one compiled step per scale) draws the same pixels as eager for a seed."""
    torch.manual_seed(0)
    tokenizer = HybridTokenizer(tokenizer_config("tiny"))
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    model = HARTForT2I(transformer_config("tiny"))
    model.init_weights()
    model.save_pretrained(tmp_path / "llm", tokenizer=tokenizer.config)
    args = ["--llm", str(tmp_path / "llm"), "--tokenizer", str(tmp_path / "tokenizer"), "--prompt", "a red circle",
            "--prompt", "a blue square", "--protocol", "shapes", "--set", "seed=5", "--set", "ema=false",
            "--device", "cpu"]
    from torch._dynamo.utils import counters

    with torch._dynamo.config.patch(recompile_limit=8):  # the default; --compile raises it for this process
        assert main([*args, "--output", str(tmp_path / "eager")]) == 0
        torch._dynamo.reset()
        counters.clear()
        assert main([*args, "--output", str(tmp_path / "compiled"), "--compile"]) == 0
        assert torch._dynamo.config.recompile_limit == 2 * len(model.config.patch_nums) + 4
    # the blocks ran compiled: one graph per scale (each scale's cache length is its own guard)
    assert counters["stats"]["unique_graphs"] == len(model.config.patch_nums)
    torch._dynamo.reset()
    capsys.readouterr()
    for path in sorted((tmp_path / "eager").iterdir()):
        assert Image.open(path).tobytes() == Image.open(tmp_path / "compiled" / path.name).tobytes(), path.name


def test_bad_input_is_a_clear_exit_code(tmp_path, capsys):
    assert main(["--llm", str(tmp_path), "--tokenizer", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    assert "at least one --prompt" in capsys.readouterr().err
    assert main(["--llm", str(tmp_path / "none"), "--tokenizer", str(tmp_path), "--prompt", "x", "--output",
                 str(tmp_path / "o"), "--device", "cpu"]) == 2
    assert "hart-generate:" in capsys.readouterr().err
    assert main(["--export", str(tmp_path), "--prompt", "x", "--output", str(tmp_path / "o"), "--set", "cfgg=2"]) == 2
    assert "--set 'cfgg=2': expected FIELD=VALUE" in capsys.readouterr().err
    assert slug("  Über CAFÉ: 2 cats?!") == "ber-caf-2-cats" and slug("!!!") == "prompt"


def test_a_star_checkpoint_generates_named_pngs(tmp_path, capsys):
    """--star: a STAR .pth in the released layout + the tokenizer folder + MiniLM features -> PNGs, seeded."""
    from configuration.loader import replace
    from hart.star.checkpoint import save_star
    from hart.star.config import STAR_PRESETS
    from hart.star.model import STARForT2I

    torch.manual_seed(0)
    tokenizer_cfg = tokenizer_config("tiny")
    HybridTokenizer(tokenizer_cfg).save_pretrained(tmp_path / "tokenizer")
    star = STARForT2I(replace(STAR_PRESETS["tiny"], patch_nums=tokenizer_cfg.patch_nums, vocab_size=tokenizer_cfg.vocab_size,
                              token_dim=tokenizer_cfg.z_channels, text_dim=384, context_token=16))
    save_star(star, tmp_path / "star.pth")
    args = ["--star", str(tmp_path / "star.pth"), "--tokenizer", str(tmp_path / "tokenizer"), "--prompt", "a red circle",
            "--prompt", "a blue square", "--prompt", "a green star", "--set", "batch_size=2", "--set", "seed=4",
            "--set", "ema=false", "--device", "cpu"]
    assert main([*args, "--output", str(tmp_path / "a")]) == 0 and main([*args, "--output", str(tmp_path / "b")]) == 0
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["000000-a-red-circle.png", "000001-a-blue-square.png", "000002-a-green-star.png"]
    for name in names:
        image = Image.open(tmp_path / "a" / name)
        assert image.size == (64, 64) and image.tobytes() == Image.open(tmp_path / "b" / name).tobytes()
    with pytest.raises(SystemExit) as exit_info:  # one transformer: --llm or --star
        main(["--star", "x.pth", "--llm", "y", "--tokenizer", "t", "--prompt", "p", "--output", "o"])
    assert exit_info.value.code == 2 and "not allowed with" in capsys.readouterr().err
