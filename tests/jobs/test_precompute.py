"""jobs/precompute.py (hart-precompute) as a command: its arguments, and config errors that exit 2 with
one line naming the problem before Ray starts. The job's runs are tested with the plan
(tests/pipelines/test_precompute.py: a run over hostile shards exits 1 naming the failed shards)."""

from __future__ import annotations

import pytest

from jobs.precompute import main, parse_args


def test_arguments_collect_every_override_in_order():
    args = parse_args(["--config", "jobs/configs/precompute.yaml", "--set", "output=s3://b/c",
                       "--set", "compute.tokenizer_actors=8", "--num-cpus", "4"])
    assert args.config == "jobs/configs/precompute.yaml" and args.num_cpus == 4
    assert args.overrides == ["output=s3://b/c", "compute.tokenizer_actors=8"]
    defaults = parse_args([])
    assert (defaults.config, defaults.overrides, defaults.num_cpus) == (None, [], None)


def test_a_bad_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--num-cpus", "two"])
    assert exit_info.value.code == 2 and "invalid int value: 'two'" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["--config", "/no/such/precompute.yaml"], "config file not found: /no/such/precompute.yaml"),
    (["--set", "compute.tokenizer_actorz=2"], "PrecomputeConfig.compute.tokenizer_actorz: unknown field; valid fields: "),
    (["--set", "compute.tokenizer_actors=0"], "compute.tokenizer_actors must be >= 1, got 0"),
    (["--set", "input.shards=[a, b"], "cannot parse an override value"),
    (["--set", "noequals"], "override 'noequals' must look like key.subkey=value"),
])
def test_config_errors_exit_2_naming_the_problem_before_ray_starts(argv, message, capsys):
    import ray

    was_running = ray.is_initialized()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("hart-precompute: config error: ") and message in err and err.count("\n") == 1
    assert ray.is_initialized() == was_running  # refused before connecting to any cluster
