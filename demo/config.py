"""The demo's settings: `DemoConfig` (one field per `hart-demo` flag, its help in the field's metadata),
the `--smoke` sizes, the step names and the settings each step records, and the recipes.

Design: the recipes are the run configs of the training stages and of precompute
(jobs/configs/demo/*.yaml); `demo.chain` adds the run-time values to them (paths, servers, the flags
below). They are read when asked (`recipe`, `demo_tokenizer`, `demo_transformer`), never at import,
so importing the demo reads no file. The sampling defaults are the `demo` evaluation protocol's
(`pipelines.eval_protocol`), so a flag set here is recorded as an override of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from configuration.loader import read_config_file
from pipelines.eval_protocol import PROTOCOLS

DEMO_PROTOCOL = PROTOCOLS["demo"]
STEPS = ("data", "tokenizer", "precompute", "joint", "evaluate")
# `--smoke`: every step at the smallest size that still runs it for real (two shards, the tokenizer
# past its autoencoder warm-up so the codebook is seeded and used, one sample per held-out prompt).
# Measured: 2-3 min on 2 cores.
SMOKE = {"num_train_samples": 64, "num_shards": 2, "num_heldout_images": 36, "tokenizer_full_steps": 20,
         "tokenizer_vq_warmup_steps": 10, "joint_steps": 10, "samples_per_prompt": 1}
# The settings whose values shape each step's outputs; a step records them when it runs
# (<workdir>/steps.json), so a `--from-step` rerun checks the earlier steps' outputs against the
# settings that made them.
STEP_SETTINGS = {
    "data": ("num_train_samples", "num_shards", "seed"),
    "tokenizer": ("tokenizer_full_steps", "tokenizer_hybrid_steps"),
    "joint": ("joint_steps",),
    "evaluate": ("num_heldout_images", "samples_per_prompt"),
}
# The demo's recipes, beside the other run configs (`python -m jobs.train --config` reads them as well).
RECIPES = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "demo"


def option(default, help: str, choices: tuple[str, ...] | None = None):
    """A DemoConfig field and its command-line flag's help (`jobs.demo.parse_args` makes one flag per field)."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class DemoConfig:
    workdir: str = option("runs/demo", "output folder; '' = a temporary one, removed when every output check passes")
    storage: str = option("local", "where shards, cache and checkpoints live: a local folder, or a loopback S3 "
                                   "server with an MLflow server (STORAGE in the environment sets it too)",
                          choices=("local", "s3"))
    seed: int = option(0, "seed of the data, the weights and the sampling")
    num_train_samples: int = option(4000, "training images of the shapes corpus")
    num_shards: int = option(8, "WebDataset shards they are written to")
    num_heldout_images: int = option(240, "held-out images for the tokenizer's reconstruction figures")
    # The step counts fit the whole demo, install included, into 15 minutes on 2 cores. The generator
    # learns shape between 600 and 1200 joint steps (held-out shape at chance at 600, 70-76% at
    # 1500-1800; BENCHMARKS.md), and the tokenizer's reconstructions keep 96-99% colour and 85-93%
    # shape from tokens alone at 1200 steps, so the joint stage gets the larger share.
    tokenizer_full_steps: int = option(1200, "tokenizer steps trained from scratch (VQVAE)")
    tokenizer_vq_warmup_steps: int = option(900, "of those, plain autoencoder steps first (from scratch the VQ "
                                                 "term blurs shapes)")
    tokenizer_hybrid_steps: int = option(0, "HART's hybrid decoder fine-tune after the full run (0 = skip)")
    tokenizer_batch_size: int = option(8, "tokenizer batch size")
    tokenizer_lr: float = option(2e-3, "tokenizer peak learning rate")
    # 2 threads make the tokenizer step slower on 2 cores (0.22-0.33 s vs 0.17 s): the OpenMP pair
    # shares its cores with Ray Data's decode tasks.
    tokenizer_threads: int = option(0, "torch threads of the tokenizer's Ray Train worker (0 = its CPUs)")
    # Smaller batches, more steps and a higher peak lr learn the text conditioning faster at about the
    # same compute (16 x 600 at lr 4e-3 beat 32 x 300 at 2e-3 and matched 8 x 1200 for less time).
    joint_steps: int = option(1800, "joint stage (CE + diffusion) steps")
    joint_batch_size: int = option(16, "joint stage batch size")
    joint_lr: float = option(4e-3, "peak learning rate of the joint stage")
    joint_threads: int = option(2, "torch threads of the joint stage's Ray Train worker (the cache reader is light)")
    transformer: str = option("demo", "a TransformerConfig preset, or 'demo' (the joint recipe's transformer)")
    # Sampling: the `demo` protocol's settings (pipelines/eval_protocol.py), which hart-generate and
    # hart-evaluate --protocol demo use too; a flag set here is recorded as an override of it.
    samples_per_prompt: int = option(DEMO_PROTOCOL.images_per_prompt, "images per held-out prompt (18 prompts: "
                                     "144 images, so one figure is +-4 points)")
    cfg: float = option(DEMO_PROTOCOL.cfg, "classifier-free guidance of the tokens")
    head_cfg: float | None = option(DEMO_PROTOCOL.head_cfg, "guidance of the residual diffusion head (1.0 = unguided)")
    top_k: int = option(DEMO_PROTOCOL.top_k[0], "top-k of the token sampling (every scale)")
    from_step: str = option("data", "rerun from this step, reusing the earlier steps' outputs in --workdir "
                                    "(local storage)", choices=STEPS)

    def __post_init__(self) -> None:
        if self.storage not in ("local", "s3"):
            raise ValueError(f"storage must be 'local' or 's3', got {self.storage!r}")
        if self.from_step not in STEPS:
            raise ValueError(f"from_step must be one of {STEPS}, got {self.from_step!r}")
        if self.num_heldout_images < 2:  # the PSNR gain's interval needs two images
            raise ValueError(f"num_heldout_images must be >= 2, got {self.num_heldout_images}")
        if self.samples_per_prompt < 1 or self.num_shards < 1 or self.num_train_samples < self.num_shards:
            raise ValueError("samples_per_prompt and num_shards must be >= 1, and num_train_samples >= num_shards")


def recipe(name: str) -> dict:
    """One of the demo's recipes as a plain dict (`tokenizer_full`, `tokenizer_hybrid`, `joint`, `precompute`)."""
    return read_config_file(RECIPES / f"{name}.yaml")


def demo_tokenizer() -> dict:
    """The demo tokenizer's architecture (the full tokenizer recipe's `model.tokenizer`)."""
    return recipe("tokenizer_full")["model"]["tokenizer"]


def demo_transformer() -> dict:
    """The demo's transformer (`--transformer demo`: the joint recipe's `model.transformer`)."""
    return recipe("joint")["model"]["transformer"]


__all__ = ["DemoConfig", "DEMO_PROTOCOL", "STEPS", "SMOKE", "STEP_SETTINGS", "RECIPES", "recipe", "demo_tokenizer",
           "demo_transformer"]
