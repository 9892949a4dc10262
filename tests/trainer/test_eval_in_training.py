"""trainer/eval_in_training.py, the evaluation inside training, around its model: which steps it skips (a step
whose figures the run already holds, as after a resume; a rank that does not log). Generation and
scoring inside a real run are tested in tests/jobs/test_train.py."""

from __future__ import annotations

from trainer import tracking
from trainer.config import load_train_config
from trainer.eval_in_training import already_logged, evaluate_in_training


def test_a_step_is_logged_once_its_images_figure_is_in_the_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id, _ = tracking.open_run(uri, "hart", "run", {}, artifact_location=str(tmp_path / "artifacts"))
    logger = tracking.RunLogger(uri, run_id, enabled=True)
    logger.log_metrics({"eval/images": 4.0, "eval/colour_accuracy": 0.5}, step=2)
    logger.log_metrics({"holdout/colour_accuracy": 0.5}, step=3)  # another name, and not its images figure
    logger.flush()
    assert already_logged(logger, "eval", 2)
    assert not already_logged(logger, "eval", 3) and not already_logged(logger, "holdout", 3)

    config = load_train_config(None, "joint", ["eval.every_steps=2", "eval.prompts=shapes:heldout", "eval.limit=2"])
    # nothing runs (no model is touched) for a step already logged, nor on a rank that does not log
    assert evaluate_in_training(config, None, None, logger, 2, None) is None
    silent = tracking.RunLogger(uri, run_id, enabled=False)
    assert evaluate_in_training(config, None, None, silent, 4, None) is None
    history = logger.client.get_metric_history(run_id, "eval/images")
    assert [(m.step, m.value) for m in history] == [(2, 4.0)]  # no second value for the replayed step
