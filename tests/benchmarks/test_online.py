"""benchmarks/online.py: the stage sizes it gives precompute and online training are accepted by both
config loaders and come out equal (the comparison is fair only if they are), the shipped tiny
training config has the set-up its docstring states, and bad command lines stop before Ray starts.
Both of its measured runs are Ray Train jobs with an MLflow store, so running them is left to the
benchmark itself."""

from __future__ import annotations

import pytest

from benchmarks import online as bench
from trainer.config import load_train_config
from pipelines.config import load_precompute_config

TRAIN_TINY = str(bench.REPO / "jobs/configs/train_tiny.yaml")


def test_stage_sizes_are_the_same_for_the_cache_and_for_online_training():
    precompute = load_precompute_config(None, bench.STAGE_SIZES).compute
    online = load_train_config(TRAIN_TINY, "joint", ["online.enabled=true", "data.shards=['/data/*.tar']",
                                                     *[f"online.{s}" for s in bench.STAGE_SIZES]]).online.compute
    assert (precompute.tokenizer_cpus, precompute.decode_cpus) == (0.5, 0.25)
    assert (online.tokenizer_cpus, online.decode_cpus) == (precompute.tokenizer_cpus, precompute.decode_cpus)


def test_the_tiny_training_config_is_the_stated_set_up():
    config = load_train_config(TRAIN_TINY, "joint")
    assert (config.scaling.num_workers, config.scaling.cpus_per_worker) == (1, 0.5)  # one worker with 0.5 CPU
    assert config.model.tokenizer == "tiny" and config.model.transformer == "tiny"


@pytest.mark.parametrize("argv", [["--steps", "forty"], ["--no-such-flag"]])
def test_bad_command_lines_are_refused_before_ray_starts(argv):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
