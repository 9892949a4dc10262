"""`python -m jobs.demo` flags map onto DemoConfig (no pipeline run: `make demo` is the end-to-end check)."""

from jobs.demo import DemoConfig, parse_args


def test_defaults_are_the_config_defaults():
    assert parse_args([]) == DemoConfig(storage=parse_args([]).storage)


def test_flags_set_their_fields():
    config = parse_args(["--workdir", "runs/x", "--tokenizer-full-steps", "30", "--tokenizer-vq-warmup-steps", "20",
                         "--tokenizer-threads", "2", "--joint-threads", "1", "--joint-steps", "5", "--from-step", "joint",
                         "--head-cfg", "2.5", "--joint-batch-size", "8", "--joint-lr", "0.001"])
    assert (config.workdir, config.tokenizer_full_steps, config.tokenizer_vq_warmup_steps) == ("runs/x", 30, 20)
    assert (config.tokenizer_threads, config.joint_threads, config.joint_steps, config.from_step) == (2, 1, 5, "joint")
    assert (config.head_cfg, config.joint_batch_size, config.joint_lr) == (2.5, 8, 0.001)
