"""benchmarks/tokenizer.py: the preset-to-resolution config choice and its errors, the command line,
the timing helper's figures, and one CPU run of the whole script on the tiny preset at 64px."""

from __future__ import annotations

import re
import sys

import pytest
import torch

from benchmarks import tokenizer as bench
from hart.config import PATCH_NUMS_256, PATCH_NUMS_512, PATCH_NUMS_1024, TOKENIZER_PRESETS


def test_config_at_the_presets_own_resolution_is_the_preset():
    for name, preset in TOKENIZER_PRESETS.items():
        assert bench.build_config(name, preset.image_size()) == preset


@pytest.mark.parametrize("preset, resolution, scales", [
    ("tiny", 128, PATCH_NUMS_256),  # tiny downsamples 8x: a 16x16 latent is the 256px scale list
    ("var-d16-f16", 512, PATCH_NUMS_512),
    ("var-d16-f16", 1024, PATCH_NUMS_1024),
    ("hart-1024", 256, PATCH_NUMS_256),
])
def test_other_resolutions_take_the_released_scale_list_of_that_latent_size(preset, resolution, scales):
    config = bench.build_config(preset, resolution)
    assert config.patch_nums == scales
    assert config.image_size() == resolution
    assert config.z_channels == TOKENIZER_PRESETS[preset].z_channels  # only the scale list changes


def test_resolution_not_divisible_by_the_downsampling_is_refused():
    with pytest.raises(ValueError, match="not divisible by the downsampling factor 16"):
        bench.build_config("var-d16-f16", 250)


def test_latent_size_without_a_released_scale_list_is_refused():
    with pytest.raises(ValueError, match=r"latent size 12; known: \[16, 32, 64\]"):
        bench.build_config("tiny", 96)


def test_command_line_defaults_and_choices(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["tokenizer"])
    args = bench.parse_args()
    assert (args.preset, args.resolution, args.batch_size, args.iters, args.warmup, args.device) == \
        ("var-d16-f16", 256, 4, 3, 1, "auto")
    monkeypatch.setattr(sys, "argv", ["tokenizer", "--preset", "no-such-preset"])
    with pytest.raises(SystemExit):
        bench.parse_args()


@pytest.mark.parametrize("flags", [["--iters", "0"], ["--batch-size", "0"]])
def test_zero_iterations_or_batch_are_refused(monkeypatch, flags):
    monkeypatch.setattr(sys, "argv", ["tokenizer", *flags])
    with pytest.raises(ValueError, match="must be >= 1"):
        bench.main()


def test_timed_runs_warmup_then_iterations_and_derives_its_figures(capsys):
    calls = []
    result = bench.timed("encode", lambda: calls.append(1), iters=3, warmup=2, device=torch.device("cpu"), batch_size=5)
    assert len(calls) == 5  # two untimed, three timed
    iteration_seconds = [float(s) for s in re.findall(r"encode iter \d/3: ([\d.]+) s", capsys.readouterr().out)]
    assert len(iteration_seconds) == 3
    # images/s is the batch over the mean time per batch
    assert result["images_per_s"] * result["s_per_batch"] == pytest.approx(5)
    assert result["peak_mib"] == pytest.approx(bench.peak_memory_mib(torch.device("cpu")), rel=0.01)


def test_cpu_peak_memory_is_the_process_peak_rss_in_mib():
    import resource

    peak = bench.peak_memory_mib(torch.device("cpu"))
    assert peak == pytest.approx(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, rel=0.01)
    assert peak > 50  # this process holds torch: tens of MiB at least, not bytes or KiB


@pytest.fixture
def keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the script sets them for the whole process


def test_tiny_run_on_cpu_reports_encode_and_decode(monkeypatch, capsys, keep_torch_threads):
    monkeypatch.setattr(sys, "argv", ["tokenizer", "--preset", "tiny", "--resolution", "64", "--batch-size", "2",
                                      "--iters", "2", "--warmup", "0", "--device", "cpu", "--threads", "1"])
    bench.main()
    out = capsys.readouterr().out
    assert "tokenizer tiny" in out and "64px, 6 scales, batch 2" in out and "fp32" in out
    for phase in ("encode", "decode"):
        iters = [float(s) for s in re.findall(rf"{phase} iter \d/2: ([\d.]+) s", out)]
        assert len(iters) == 2
        rate, per_batch = map(float, re.search(rf"^{phase}: ([\d.]+) images/s \(([\d.]+) s/batch\)", out, re.M).groups())
        # the summary is the printed iterations' figures: batch 2 over their mean (3-decimal rounding)
        assert per_batch == pytest.approx(sum(iters) / 2, abs=2e-3)
        # images/s is 2 / s per batch, within the printed rounding of both (half a unit of the last digit)
        assert 2 / (per_batch + 5e-4) - 5e-4 <= rate <= 2 / max(per_batch - 5e-4, 1e-9) + 5e-4
