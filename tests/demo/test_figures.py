"""demo/figures.py without a trained model: per-image PSNR, the figure list, the PSNR verdict,
the held-out images and labels, and the hart-evaluate config the demo's generation runs with.
(The evaluation itself runs in the demo smoke test, tests/jobs/test_demo_smoke.py.)"""

from __future__ import annotations

import dataclasses

import math
from types import SimpleNamespace

import pytest
import torch

from demo.config import DemoConfig
from demo.figures import SAMPLE_TAGS, evaluation_config, figure_names, heldout_images, psnr, psnr_verdict


def test_psnr_is_per_image_on_the_minus_one_to_one_range():
    a = torch.zeros(3, 3, 4, 4)
    b = a.clone()
    b[1] += 0.2  # every pixel off by 0.1 of the [0, 1] range: mse 0.01 -> 20 dB
    b[2, :, :2] = 2.0  # half the pixels off by the whole range: mse 0.5 -> 3.01 dB
    values = psnr(b, a)
    assert values.shape == (3,)
    assert values[0] == 100.0  # identical images: the mse floor of 1e-10, not infinity
    assert math.isclose(values[1].item(), 20.0, rel_tol=1e-4)
    assert math.isclose(values[2].item(), 10 * math.log10(2), rel_tol=1e-4)


def test_figure_names_add_generation_only_for_a_valid_classifier():
    without, with_generation = figure_names(False), figure_names(True)
    assert not any(name.startswith("generation_") for name in without)
    assert "tokenizer_psnr_gain_se" in without and "reconstruction_shape_accuracy_discrete" in without
    added = [name for name in with_generation if name not in without]
    assert sorted(added) == sorted(f"generation_{what}_accuracy_{tag}" for tag in SAMPLE_TAGS
                                   for what in ("colour", "shape", "joint"))
    assert len(set(with_generation)) == len(with_generation)


@pytest.mark.parametrize(("hybrid", "discrete", "se", "verdict"), [
    (24.87, 23.22, 0.10, "hybrid higher, as HART claims"),
    (10.86, 10.78, 0.01, "no meaningful difference"),  # significant, but far below 0.5 dB
    (25.00, 24.00, 0.60, "no meaningful difference"),  # 1 dB, but within the 95% interval
    (23.00, 24.00, 0.10, "hybrid LOWER"),
])
def test_psnr_verdict_needs_a_large_and_clear_gain(hybrid, discrete, se, verdict):
    text = psnr_verdict({"tokenizer_psnr_hybrid": hybrid, "tokenizer_psnr_discrete": discrete,
                         "tokenizer_psnr_gain_se": se})
    assert text.startswith(verdict), text


def test_heldout_images_are_the_heldout_split_with_their_labels(tmp_path):
    from pipelines.shapes import label_of, prompts

    images, pil, labels, prompt_list = heldout_images(tmp_path, SimpleNamespace(num_heldout_images=6, seed=0))
    assert images.shape == (6, 3, 64, 64) and images.min() >= -1.0 and images.max() <= 1.0
    assert len(pil) == len(labels) == len(prompt_list) == 6
    heldout = set(prompts("heldout"))
    for label, prompt in zip(labels, prompt_list):
        assert prompt in heldout and label_of(prompt) == label
    again, _, labels_again, _ = heldout_images(tmp_path, SimpleNamespace(num_heldout_images=6, seed=0))
    assert torch.equal(images, again) and labels == labels_again  # seeded: the same split every time
    _, _, other_labels, _ = heldout_images(tmp_path, SimpleNamespace(num_heldout_images=6, seed=1))
    assert other_labels != labels


@pytest.mark.parametrize("tag", SAMPLE_TAGS)
def test_evaluation_config_is_a_hart_evaluate_run_of_the_demo_settings(tmp_path, tag):
    """The demo calls hart-evaluate's function with a typed config (no command line): the demo protocol, a
    demo setting that departs from it as an override, and the joint run to log to."""
    from pipelines.eval_protocol import PROTOCOLS
    from trainer.evaluation import EvaluationConfig, protocol_of

    config = DemoConfig(samples_per_prompt=3, cfg=2.5, top_k=7, head_cfg=None, seed=5)
    evaluation = evaluation_config(tmp_path / "export", config, tmp_path, tag)
    assert isinstance(evaluation, EvaluationConfig)
    assert (evaluation.export, evaluation.prompts, evaluation.protocol, evaluation.out) == (
        str(tmp_path / "export"), "shapes:heldout", "demo", str(tmp_path / "samples" / tag))
    assert (evaluation.num_cpus, evaluation.cpus_per_actor, evaluation.tracking_uri, evaluation.run_id) == (2, 1.0, "", "")
    protocol = protocol_of(evaluation)
    # every held-out prompt's samples in one seeded group, so the images do not depend on the actors
    assert protocol.batch_size is None and protocol.chunk_size == 32 and protocol.images_per_prompt == 3
    assert (protocol.cfg, protocol.top_k, protocol.head_cfg, protocol.seed) == (2.5, (7, 7), None, 5)
    assert protocol.use_diffusion == (tag == "with_head") and protocol.metrics == ("shapes",)
    # the demo's defaults are the demo protocol: nothing to override but the head switch
    evaluation = evaluation_config(tmp_path, DemoConfig(), tmp_path, tag)
    assert protocol_of(evaluation) == dataclasses.replace(PROTOCOLS["demo"], use_diffusion=tag == "with_head")
    assert evaluation.overrides == (() if tag == "with_head" else ("use_diffusion=false",))
    logged = evaluation_config(tmp_path, DemoConfig(), tmp_path, tag, "sqlite:///m.db", "run", 10)
    assert (logged.tracking_uri, logged.run_id, logged.name, logged.step) == ("sqlite:///m.db", "run", f"eval/{tag}", 10)
