"""benchmarks/colour_probe.py runs on a tokenizer folder and its confusion counts add up."""

from __future__ import annotations

import re

import torch

from benchmarks import colour_probe as probe
from hart.config import tokenizer_config
from hart.tokenizer.model import HybridTokenizer
from pipelines.shapes import BACKGROUNDS, COLOURS


def test_colour_probe_reports_every_colour_and_background(tmp_path, capsys):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        HybridTokenizer(tokenizer_config("tiny")).save_pretrained(tmp_path / "tokenizer")
    probe.main([str(tmp_path / "tokenizer"), "--num-images", "12"])
    out = capsys.readouterr().out
    rows = re.findall(r"^   (\w+) +on (\w+) +\(", out, flags=re.M)
    assert sorted(rows) == sorted((c, b) for c in COLOURS for b in BACKGROUNDS)
    assert out.count("2. latent distances") == len(BACKGROUNDS)
    right = float(re.search(r"12 training images: ([\d.]+)% right", out).group(1))
    mistakes = sum(int(n) for n in re.findall(r"^   \w+ -> \S+: (\d+)$", out, flags=re.M))
    assert round(right * 12 / 100) + mistakes == 12
