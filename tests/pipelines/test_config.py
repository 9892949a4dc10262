"""The precompute config: the shipped YAML loads, overrides apply, bad values name the field."""

import pytest

from pipelines.config import load_precompute_config

CONFIG = "jobs/configs/precompute.yaml"


def test_default_config_and_overrides():
    config = load_precompute_config(CONFIG)
    assert config.tokenizer.config == "tiny" and config.compute.tokenizer_gpus == 0 and config.input.shards
    config = load_precompute_config(CONFIG, ["input.shards=s3://b/raw/shard-{00000..00009}.tar", "compute.tokenizer_gpus=1",
                                             "compute.tokenizer_actors=8", "output=s3://b/tokens"])
    assert config.input.shards == ("s3://b/raw/shard-{00000..00009}.tar",)
    assert (config.compute.tokenizer_gpus, config.compute.tokenizer_actors, config.output) == (1.0, 8, "s3://b/tokens")


def test_shipped_laptop_sizing_fits_two_cpus():
    """The shipped config is the 2-core laptop sizing the benchmark measures: with its text stage, its
    pools, one read and one decode task, the writer and its route actor fit 2 CPUs (the job refuses a
    plan that does not, and Ray Data would wait forever), one torch thread per actor."""
    from pipelines.writer_pool import ROUTE_CPUS

    config = load_precompute_config(CONFIG)
    compute = config.compute
    reserved = (compute.tokenizer_actors * compute.tokenizer_cpus + compute.read_cpus + compute.decode_cpus
                + compute.text_actors * compute.text_cpus + compute.writer_actors * (compute.writer_cpus + ROUTE_CPUS))
    assert config.text.encoder == "minilm" and reserved <= 2.0, reserved
    assert compute.tokenizer_actors == 2 and compute.torch_threads == 0 and int(compute.tokenizer_cpus) == 0


@pytest.mark.parametrize("override, message", [
    ("compute.tokenizer_gpu=1", "unknown field"),
    ("compute.decode_tasks=0", "decode_tasks must be >= 1"),
    ("preprocess.max_aspect_ratio=0.5", "max_aspect_ratio"),
    ("input.shards=[s3://b/shard-{0..9}.tar]", "quote values"),
    ("tokenizer.seed=abc", "tokenizer.seed"),
])
def test_bad_overrides_raise_value_error(override, message):
    with pytest.raises(ValueError, match=message):
        load_precompute_config(CONFIG, [override])
