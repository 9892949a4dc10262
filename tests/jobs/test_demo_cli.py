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


def test_summary_reports_generation_only_with_a_valid_classifier(capsys):
    from jobs.demo import print_summary

    results = {"tokenizer_psnr_hybrid": 27.0, "tokenizer_psnr_discrete": 25.0, "classifier_accuracy_on_real": 0.95,
               "seconds_total": 1.0}
    for kind in ("hybrid", "discrete"):
        results[f"reconstruction_colour_accuracy_{kind}"] = results[f"reconstruction_shape_accuracy_{kind}"] = 0.9
    summary = {"results": results, "timings_s": {"data": 1.0}, "where": {"export": "runs/x"}}
    print_summary(summary)  # no generation_* keys: evaluate() leaves them out below the classifier's bar
    out = capsys.readouterr().out
    assert out.count("not scored, the classifier is below 98% on real images") == 2
    for tag in ("with_head", "without_head"):
        for key in ("colour", "shape", "joint"):
            results[f"generation_{key}_accuracy_{tag}"] = 0.5
    results["classifier_accuracy_on_real"] = 1.0
    print_summary(summary)
    out = capsys.readouterr().out
    assert "not scored" not in out and "generation (with head): colour 50.0%, shape 50.0%" in out
