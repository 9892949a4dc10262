"""The demo's evaluation: held-out reconstructions (PSNR, hybrid vs discrete), the shapes classifier
on real and reconstructed images, and generation scored through hart-evaluate's function
(`trainer.evaluation.run_evaluation`, with the `EvaluationConfig` of `evaluation_config`), logged to
the joint run.

Design: `evaluate` returns every figure `figure_names` lists and nothing else (asserted), so the
summary, the MLflow metrics and the outputs check (`demo.outputs`) agree on one list. Generated
images are scored only by a classifier that reads the real held-out images (>= CLASSIFIER_MIN_ACCURACY);
the PSNR verdict needs a gain that is both large and clear of the paired per-image noise.

Shape legend: B images, 3 RGB, H/W sides.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import torch
from PIL import Image

from demo.config import DEMO_PROTOCOL, DemoConfig
from hart.pixels import to_model, to_pil
from hart.tokenizer.model import HybridTokenizer
from pipelines import shapes_classifier
from pipelines.shapes import canonical_prompt, encode_image, render, sample_spec
from trainer import tracking
from trainer.evaluation import EvaluationConfig, run_evaluation

SAMPLE_TAGS = ("with_head", "without_head")  # generation with and without the residual head
CLASSIFIER_MIN_ACCURACY = 0.98  # on real held-out images, before it may score generated ones
# The tokenizer's PSNR verdict (hybrid vs discrete-only) needs a gain of at least this much that is
# also larger than the 95% interval of the paired per-image gain. Demo runs measure 1.1-2.5 dB;
# after a few steps the two are within ~0.1 dB, which is no evidence either way.
PSNR_MEANINGFUL_DB = 0.5


def heldout_images(root: Path, config):
    """(images in [-1,1] tensor, PIL images, labels, prompts) of the held-out split."""
    pil, labels, prompts = [], [], []
    for index in range(config.num_heldout_images):
        sample = sample_spec(index, config.seed, "heldout")
        image = Image.open(io.BytesIO(encode_image(render(sample), "jpg"))).convert("RGB")
        pil.append(image)
        labels.append((sample.colour, sample.shape))
        prompts.append(canonical_prompt(sample.colour, sample.shape, sample.background))
    return to_model(np.stack([np.asarray(im) for im in pil])), pil, labels, prompts


def psnr(a_B3HW: torch.Tensor, b_B3HW: torch.Tensor) -> torch.Tensor:
    """PSNR (dB) of each image pair, images in [-1, 1]: shape (B,)."""
    mse = ((a_B3HW - b_B3HW) / 2).square().flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1 / mse)


def figure_names(classifier_valid: bool) -> list[str]:
    """The figures `evaluate` reports; generation is scored only by a classifier that reads real images."""
    names = ["tokenizer_psnr_hybrid", "tokenizer_psnr_discrete", "tokenizer_psnr_gain_se", "classifier_accuracy_on_real"]
    names += [f"reconstruction_{what}_accuracy_{kind}" for kind in ("hybrid", "discrete") for what in ("colour", "shape")]
    if classifier_valid:
        names += [f"generation_{what}_accuracy_{tag}" for tag in SAMPLE_TAGS for what in ("colour", "shape", "joint")]
    return names


def evaluation_config(export: Path, config: DemoConfig, out: Path, tag: str, tracking_uri: str = "", run_id: str = "",
                      step: int = 0) -> EvaluationConfig:
    """hart-evaluate's run for the held-out prompts under the `demo` protocol, generated with (`with_head`)
    or without the residual head; a demo setting that departs from the protocol is an override (recorded
    in protocol.json). With `run_id` its figures, per-category table, grid and protocol go to that MLflow
    run (the joint run) as `eval/<tag>/...` at `step` (the joint run's last step)."""
    wanted = {"cfg": config.cfg, "top_k": (config.top_k, config.top_k), "head_cfg": config.head_cfg,
              "seed": config.seed, "images_per_prompt": config.samples_per_prompt, "use_diffusion": tag == "with_head"}
    overrides = tuple(f"{name}={json.dumps(list(value) if isinstance(value, tuple) else value)}"
                      for name, value in wanted.items() if value != getattr(DEMO_PROTOCOL, name))
    logged = {"tracking_uri": tracking_uri, "run_id": run_id, "name": f"eval/{tag}", "step": step} if run_id else {}
    return EvaluationConfig(export=str(export), prompts="shapes:heldout", protocol="demo", overrides=overrides,
                            out=str(out / "samples" / tag), num_cpus=2, cpus_per_actor=1.0, **logged)


def evaluate(export: Path, config, out: Path, tracking_uri: str = "", run_id: str = "",
             step: int = 0) -> dict:
    results: dict = {}
    tok = HybridTokenizer.from_pretrained(export / "tokenizer").eval()
    images, pil, labels, _ = heldout_images(out, config)
    with torch.no_grad():
        tokens, residual = tok.encode(images)
        decoded = {"hybrid": tok.decode(tokens, residual), "discrete": tok.decode(tokens)}
    per_image = {kind: psnr(reconstruction, images) for kind, reconstruction in decoded.items()}
    for kind, values in per_image.items():
        results[f"tokenizer_psnr_{kind}"] = float(values.mean())
    # standard error of the mean paired gain: the same images decoded both ways
    gain = (per_image["hybrid"] - per_image["discrete"]).double()
    results["tokenizer_psnr_gain_se"] = float(gain.std() / len(gain) ** 0.5)
    real = shapes_classifier.accuracy(pil, labels)
    results["classifier_accuracy_on_real"] = real["joint_accuracy"]
    # A classifier that misreads real images cannot score generated ones: then no accuracy is reported.
    classifier_valid = real["joint_accuracy"] >= CLASSIFIER_MIN_ACCURACY
    # The classifier on the tokenizer's own reconstructions: the ceiling for generated images,
    # which can only look like what tokens decode to.
    for kind, reconstruction in decoded.items():
        scores = shapes_classifier.accuracy(to_pil(reconstruction), labels)
        results[f"reconstruction_colour_accuracy_{kind}"] = scores["colour_accuracy"]
        results[f"reconstruction_shape_accuracy_{kind}"] = scores["shape_accuracy"]

    # Generation and prompt following through hart-evaluate's function (the job users run), logged to the
    # joint run.
    for tag in SAMPLE_TAGS:
        shutil.rmtree(out / "samples" / tag, ignore_errors=True)  # a rerun from this step leaves no stale images
        figures = run_evaluation(evaluation_config(export, config, out, tag, tracking_uri, run_id, step))["figures"]
        if classifier_valid:
            for key in ("colour_accuracy", "shape_accuracy", "joint_accuracy"):
                results[f"generation_{key}_{tag}"] = figures[key]
    assert sorted(results) == sorted(figure_names(classifier_valid)), sorted(results)
    return results


def log_figures(tracking_uri: str, run_id: str, results: dict, samples_dir: Path, grid: str) -> None:
    """The figures as `demo/<name>` metrics of the joint run, and `grid`: its held-out samples (with the head)."""
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({f"demo/{k}": float(v) for k, v in results.items()})
    files = sorted((samples_dir / "with_head" / "images").glob("*.png"))
    if files:  # none: the outputs check reports the missing images and grid
        images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
        tracking.RunLogger(tracking_uri, run_id, enabled=True).log_image(tracking.image_grid(images, columns=8), grid)


def psnr_verdict(r: dict) -> str:
    """Hybrid vs discrete-only PSNR, with a verdict only when the gain is large and clear of noise."""
    gain, interval = r["tokenizer_psnr_hybrid"] - r["tokenizer_psnr_discrete"], 2 * r["tokenizer_psnr_gain_se"]
    figures = f"{gain:+.2f} dB, 95% interval +-{interval:.2f}"
    if abs(gain) >= PSNR_MEANINGFUL_DB and abs(gain) > interval:
        return f"hybrid {'higher, as HART claims' if gain > 0 else 'LOWER, against HART claim'} ({figures})"
    return (f"no meaningful difference ({figures}; a verdict needs a gain of >= {PSNR_MEANINGFUL_DB} dB that is "
            f"also larger than the interval)")


__all__ = [
    "SAMPLE_TAGS", "CLASSIFIER_MIN_ACCURACY", "PSNR_MEANINGFUL_DB", "heldout_images", "psnr", "figure_names",
    "evaluation_config", "evaluate", "log_figures", "psnr_verdict",
]
