"""Typed run configuration of hart-train (`jobs/configs/train_*.yaml`).

Design: small frozen dataclasses loaded through `configuration.loader.config_from_dict`, so unknown
keys and wrong types raise a `ValueError` naming the field, and `--set a.b=c` goes through
`configuration.loader.apply_overrides`. The sections: `run` (identity, storage, step counts),
`model` (presets / checkpoints), `data`, `optim` (hart.training.step.OptimizerConfig),
`parallel` (hart.training.parallelize.ParallelConfig), `scaling` (Ray workers), `objective`
(per-stage loss knobs), `tracking` (MLflow), `eval` (evaluation inside training) and
`online` (stream shards through the tokenizer instead of reading a cache). Going from 2 CPU
workers to N GPUs only touches `scaling` (and `precision`/`parallel`, and `online.compute`);
nothing else branches on the hardware.

Model configs stay `TokenizerConfig` / `TransformerConfig`; here they are named by a
preset or a `{preset: ..., field: value}` mapping, resolved by `model_configs()` once per run into the run plan
(`trainer.plan.RunPlan`, which the driver, the workers and the export read).

Length: just over 400 lines; one dataclass per section of a training config with its validation, kept
together so a config file reads against one module.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from configuration.loader import apply_overrides, config_from_dict, config_to_dict, read_config_file
from hart.config import TokenizerConfig, TransformerConfig, tokenizer_config, transformer_config
from hart.star.config import StarConfig, star_config
from hart.star.objective import check_drop_scale_length
from hart.training.parallelize import ParallelConfig
from hart.training.step import PRECISIONS, OptimizerConfig
from pipelines.config import ComputeConfig, PreprocessConfig, TokenizerSource
from pipelines.eval_protocol import PROTOCOLS
from pipelines.storage import absolute

STAGES = ("tokenizer", "ar", "diffusion", "joint")
FAMILIES = ("hart", "star")  # the transformer of the transformer stages: HARTForT2I or STARForT2I
CHECKPOINT_MODELS = ("reference", "copy", "off")  # run.checkpoint_models


@dataclass(frozen=True)
class RunSection:
    name: str = "hart-run"  # run name: resubmitting the same name resumes (checkpoints + MLflow run)
    storage_path: str = "runs/train"  # checkpoint root: local path, file:// or s3://bucket/prefix
    endpoint_url: str = ""  # S3-compatible endpoint for storage_path; empty = AWS_ENDPOINT_URL
    seed: int = 0
    max_steps: int = 100  # optimizer steps in total (a resumed run stops at the same count)
    checkpoint_every: int = 50  # steps between checkpoints (a final one is always written)
    num_to_keep: int = 2  # checkpoints kept in storage
    log_every: int = 1  # steps between MLflow metric rows (each the mean over those steps; 1 = every step)
    max_failures: int = 0  # Ray Train worker-group restarts before the run fails
    export: bool = True  # write the official folder layout after the last step
    fail_at_step: int = 0  # testing only: raise in the worker at this step (simulated crash); 0 = off
    # testing only: a restored run takes the weights but starts its data stream over (the negative
    # control of the exactly-once trials: their ledger check must then fail)
    ignore_data_position: bool = False
    # Local paths (storage, cache, weights, MLflow sqlite/file store) are on a filesystem every node
    # mounts at the same place. Off: on a cluster of several nodes they are refused; use s3:// / http(s).
    shared_filesystem: bool = False
    # Checkpoints as MLflow logged models (trainer/checkpoint_models.py): "reference" (a model per
    # checkpoint that records the checkpoint's URI, no copy), "copy" (its weights also uploaded into the
    # model's artifacts), "off"; every checkpoint_models_every-th checkpoint, and the final one.
    checkpoint_models: str = "reference"
    checkpoint_models_every: int = 1

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"run.name must be a non-empty name without '/', got {self.name!r}")
        for name in ("max_steps", "checkpoint_every", "num_to_keep", "log_every", "checkpoint_models_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"run.{name} must be >= 1, got {getattr(self, name)}")
        if self.checkpoint_models not in CHECKPOINT_MODELS:
            raise ValueError(f"run.checkpoint_models must be one of {CHECKPOINT_MODELS}, got {self.checkpoint_models!r}")


@dataclass(frozen=True)
class ModelSection:
    family: str = "hart"  # "hart" (HARTForT2I) or "star" (STARForT2I: the ar stage, STAR's objective)
    # TokenizerConfig preset name or {preset: ..., field: value}: the owner of the run's scale list
    tokenizer: Any = "tiny"
    transformer: Any = "tiny"  # TransformerConfig (family hart) or StarConfig (family star) preset name or mapping
    tokenizer_checkpoint: str = ""  # HART tokenizer/ folder or VAR .pth; required by ar/diffusion/joint
    init_from: str = ""  # start weights: a training checkpoint dir or an llm/ (tokenizer/) folder;
    # a lower-resolution one is fine (progressive training: buffers that depend on the scale list are rebuilt)
    init_seed: int = 0  # seed of fresh weights (identical on every rank)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"model.family must be one of {FAMILIES}, got {self.family!r}")

    def tokenizer_source(self) -> TokenizerSource:
        """The frozen tokenizer as precompute describes it (`tokenizer` and `tokenizer_checkpoint` are its
        `config` and `checkpoint`), for `pipelines.tokenize_stage.load_tokenizer`."""
        return TokenizerSource(config=self.tokenizer, checkpoint=self.tokenizer_checkpoint)


@dataclass(frozen=True)
class DataSection:
    cache: str = ""  # token-cache root (ar/diffusion/joint), manifest.json inside
    shards: tuple[str, ...] = ()  # WebDataset shards (tokenizer stage): paths, globs, s3:// URIs
    batch_size: int = 8  # per worker and micro-batch
    grad_accumulation: int = 1  # micro-batches per optimizer step
    text_encoder: str = "minilm"  # used when the cache has no text_features
    text_max_length: int = 0  # 0 = the transformer's context_token
    read_parallelism: int = 1  # Ray Data read tasks (tokenizer stage)
    resolution: int = 0  # tokenizer stage image side; 0 = tokenizer native (last pn * 16)
    # Tokenizer stage and online mode (Ray Data): keep the block order fixed, so a seeded run sees the same
    # batches every time (exactly reproducible with 1 worker). Off by default: in-order output can stall on
    # one slow block. Transformer stages from a cache always read in the run's fixed order.
    preserve_order: bool = False
    # Testing and audits of short runs: every checkpoint carries the keys of every optimizer step its
    # weights were trained on (trainer/batches.py, `ledger.jsonl`); transformer stages.
    ledger: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.grad_accumulation < 1:
            raise ValueError("data.batch_size and data.grad_accumulation must be >= 1")


@dataclass(frozen=True)
class OnlineSection:
    """Online mode of the transformer stages (pipelines/online.py): `data.shards` are streamed
    through the precompute stages (read -> decode -> tokenizer actors) straight into the workers,
    with no cache (`data.cache` is not read); `model.tokenizer_checkpoint` encodes them. The rows are
    those a cache built with the same tokenizer and preprocessing holds. Resumes skip the shards the
    checkpoint consumed whole."""
    enabled: bool = False
    epochs: int = 1  # passes over data.shards in the stream (each in its own seeded order); the run
    # fails with a clear error if they end before run.max_steps
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)  # as precompute's `preprocess`
    # Stage sizes, as precompute's `compute` (the writer_* and text_* fields are unused: no writers, and
    # the workers encode captions). Ray Train's workers hold scaling.* beside these.
    compute: ComputeConfig = field(default_factory=ComputeConfig)

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"online.epochs must be >= 1, got {self.epochs}")


@dataclass(frozen=True)
class ScalingSection:
    # Ray Train workers: a count, or [min, max] for elastic training (Ray Train V2 runs with as many as
    # fit, at least min; after a node loss it goes on with fewer, and grows back when capacity returns).
    num_workers: int | tuple[int, int] = 1
    use_gpu: bool = False
    # fractional on small machines: Ray Data needs CPUs too (docs/design/ray.md, "Fractional CPUs")
    cpus_per_worker: float = 0.5
    gpus_per_worker: float = 1.0  # used when use_gpu
    torch_threads: int = 0  # intra-op threads per worker; 0 = Ray's default (OMP_NUM_THREADS = the worker's whole CPUs, min 1)
    # Ray's placement of the workers: PACK (fill a node first), SPREAD, STRICT_PACK or STRICT_SPREAD
    # (one worker per node).
    placement_strategy: str = "PACK"
    # Elastic runs: seconds between Ray Train's checks for capacity to grow the worker group (each resize
    # restarts the group from the last checkpoint).
    resize_check_s: float = 60.0

    def __post_init__(self) -> None:
        if isinstance(self.num_workers, int):
            if self.num_workers < 1:
                raise ValueError(f"scaling.num_workers must be >= 1, got {self.num_workers}")
        elif not 1 <= self.num_workers[0] <= self.num_workers[1]:
            raise ValueError(f"scaling.num_workers [min, max] needs 1 <= min <= max, got {list(self.num_workers)}")
        if self.resize_check_s <= 0:
            raise ValueError(f"scaling.resize_check_s must be > 0, got {self.resize_check_s}")
        if self.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ValueError(f"scaling.placement_strategy must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD, "
                             f"got {self.placement_strategy!r}")

    @property
    def min_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]

    @property
    def max_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]

    @property
    def elastic(self) -> bool:
        return self.min_workers < self.max_workers


@dataclass(frozen=True)
class ObjectiveSection:
    ce_weight: float = 1.0  # ar / joint
    diffusion_weight: float = 1.0  # diffusion / joint
    # Transformer stages: round the kept last-scale count to {32, multiples of this, all} (same mean;
    # hart.transformer.objective) so a compiled model sees a few sequence lengths; 0 = HART's exact counts.
    kept_bucket: int = 0
    tokenizer_mode: str = "hybrid"  # "hybrid": decoder fine-tune (encoder+codebook frozen) | "full": VQVAE
    continuous_prob: float = 0.5  # hybrid: share of steps decoding the continuous latent
    l1_weight: float = 1.0  # tokenizer reconstruction: l1 * |x - x'| + l2 * (x - x')^2
    l2_weight: float = 0.0  # (HART's released loss is MSE; VQGAN's is L1)
    gan_weight: float = 0.0  # > 0 trains a PatchGAN discriminator beside the tokenizer
    gan_start_step: int = 0  # discriminator/adversarial loss switched on from this step
    disc_lr: float = 1e-4
    disc_channels: int = 64  # PatchGAN base width (HART's released discriminator: 64)
    perceptual_weight: float = 0.0  # LPIPS term (tokenizer stage); > 0 needs perceptual_weights
    # Local weight files of the LPIPS metric (hart.tokenizer.perceptual): torchvision VGG16 trunk keys
    # `features.*` + LPIPS heads `lin{0..4}.model.1.weight`, in one file or two (.safetensors/.pth/.bin).
    # Nothing is downloaded; the trunk widths are read from the heads.
    perceptual_weights: tuple[str, ...] = ()
    # Codebook upkeep, tokenizer stage in "full" mode (hart.tokenizer.quantizer.restart_codes): a codebook
    # trained from scratch collapses to a few codes without these.
    codebook_init: bool = False  # when the VQ part starts (step vq_warmup_steps): every code re-seeded from that batch's latents
    codebook_restart_every: int = 0  # every N steps: re-seed dead codes; 0 = never
    codebook_restart_threshold: float = 0.03  # "dead": hit-count EMA below this x the mean
    codebook_restart_until: float = 0.8  # no restarts after this fraction of max_steps (let codes settle)
    # "full" mode: the first N steps train a plain autoencoder (continuous decode, no VQ term);
    # codebook_init then seeds the codes from the warmed-up latents at step N, and restarts count from N.
    vq_warmup_steps: int = 0
    # model.family star: tokens kept per training sequence; the rest of the last scale is dropped, a random
    # set per step (STAR's 1024px recipe: 8800 of 9451; hart.star.objective). 0 = every token.
    drop_scale_length: int = 0

    def __post_init__(self) -> None:
        if self.tokenizer_mode not in ("hybrid", "full"):
            raise ValueError(f"objective.tokenizer_mode must be 'hybrid' or 'full', got {self.tokenizer_mode!r}")
        if not 0.0 <= self.continuous_prob <= 1.0:
            raise ValueError(f"objective.continuous_prob must be in [0, 1], got {self.continuous_prob}")
        if self.l1_weight < 0 or self.l2_weight < 0 or self.l1_weight + self.l2_weight == 0:
            raise ValueError(f"objective.l1_weight and l2_weight must be >= 0 and not both 0, "
                             f"got {self.l1_weight} and {self.l2_weight}")
        if self.codebook_restart_every < 0 or self.codebook_restart_threshold < 0:
            raise ValueError("objective.codebook_restart_every and codebook_restart_threshold must be >= 0")
        if self.kept_bucket < 0:
            raise ValueError(f"objective.kept_bucket must be >= 0, got {self.kept_bucket}")
        if self.drop_scale_length < 0:
            raise ValueError(f"objective.drop_scale_length must be >= 0 (0 = keep every token), got {self.drop_scale_length}")
        if self.vq_warmup_steps < 0:
            raise ValueError(f"objective.vq_warmup_steps must be >= 0, got {self.vq_warmup_steps}")
        if self.vq_warmup_steps and self.tokenizer_mode != "full":
            raise ValueError("objective.vq_warmup_steps needs tokenizer_mode 'full' (the hybrid decoder fine-tune "
                             "freezes the codebook)")
        if not 0.0 <= self.codebook_restart_until <= 1.0:
            raise ValueError(f"objective.codebook_restart_until must be in [0, 1], got {self.codebook_restart_until}")
        if (self.codebook_init or self.codebook_restart_every) and self.tokenizer_mode != "full":
            raise ValueError("objective.codebook_init / codebook_restart_every need tokenizer_mode 'full' "
                             "(the hybrid decoder fine-tune freezes the codebook)")
        if self.perceptual_weight < 0:
            raise ValueError(f"objective.perceptual_weight must be >= 0, got {self.perceptual_weight}")
        if self.perceptual_weight > 0 and not self.perceptual_weights:
            raise ValueError(
                "objective.perceptual_weight > 0 needs objective.perceptual_weights: local LPIPS weight files "
                "(VGG16 trunk + LPIPS heads, e.g. ['vgg16.pth', 'lpips_vgg.safetensors']); nothing is downloaded"
            )


@dataclass(frozen=True)
class TrackingSection:
    tracking_uri: str = ""  # empty: $MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db
    experiment: str = "hart"
    # Artifact root given to the experiment when this run creates it (empty: the store's default,
    # which for a sqlite file without a server is ./mlruns under the working directory). An
    # experiment that exists keeps the root it was created with.
    artifact_location: str = ""
    registered_model: str = ""  # Model Registry name; empty = "hart-<stage>"
    # The sampling protocol (pipelines/eval_protocol.py) the registered pyfunc model serves with by
    # default (trainer/served_model.py); a deployment may change it at load
    served_protocol: str = "hart-mjhq-1024"
    sample_every: int = 0  # steps between sample/reconstruction grids (0 = only at the end)
    sample_prompts: tuple[str, ...] = ("a red circle", "a blue square", "a green triangle", "a yellow star")
    sample_seed: int = 0
    # Seconds between samples of each node's CPU, memory, disk, network and GPU figures, logged into the run
    # as system/<node>/<metric> by the node's first worker (trainer/system_metrics.py); 0 = off.
    system_metrics_interval_s: float = 10.0

    def __post_init__(self) -> None:
        # each sample is a store write per node: a second is the finest that stays cheap for the store
        if self.system_metrics_interval_s != 0 and self.system_metrics_interval_s < 1:
            raise ValueError(f"tracking.system_metrics_interval_s must be 0 (off) or >= 1 second, "
                             f"got {self.system_metrics_interval_s}")
        if self.served_protocol not in PROTOCOLS or PROTOCOLS[self.served_protocol].images_per_prompt != 1:
            served = sorted(name for name, protocol in PROTOCOLS.items() if protocol.images_per_prompt == 1)
            raise ValueError(f"tracking.served_protocol must be one of {served} (one image per prompt), got "
                             f"{self.served_protocol!r}")


@dataclass(frozen=True)
class EvalSection:
    """Evaluation inside training (rank 0, EMA weights): a fixed prompt subset generated and scored
    every `every_steps` steps and at the end, logged as `<name>/<figure>` metrics at that step and a
    grid. The same protocol, prompt sources and scorers as `hart-evaluate` (pipelines/eval_*)."""
    every_steps: int = 0  # 0 = off
    prompts: str = ""  # a prompt source of hart-evaluate: shapes:heldout, a .txt, a .jsonl, meta_data.json
    limit: int = 16  # the first N prompts (by id): keep it small, the other ranks wait at the next collective
    protocol: str = "shapes"  # sampling settings (pipelines.eval_protocol.PROTOCOLS)
    metrics: tuple[str, ...] = ("shapes",)  # "shapes" (shapes prompts) and/or "clip"
    clip: str = ""  # CLIP model folder for "clip"
    name: str = "eval"  # metric prefix

    def __post_init__(self) -> None:
        if self.every_steps < 0 or self.limit < 1:
            raise ValueError(f"eval.every_steps must be >= 0 and eval.limit >= 1, got {self.every_steps}, {self.limit}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"eval.protocol must be one of {sorted(PROTOCOLS)}, got {self.protocol!r}")
        unknown = set(self.metrics) - {"shapes", "clip"}
        if unknown:
            raise ValueError(f"eval.metrics inside training are 'shapes' and 'clip' (FID/KID: hart-evaluate), got "
                             f"{sorted(unknown)}")
        if self.every_steps and not self.prompts:
            raise ValueError("eval.every_steps needs eval.prompts (e.g. shapes:heldout or a prompt file)")
        if self.every_steps and "clip" in self.metrics and not self.clip:
            raise ValueError("eval.metrics 'clip' needs eval.clip: a local CLIP model folder")


@dataclass(frozen=True)
class TrainRunConfig:
    stage: str = "joint"
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    ema_decay: float = 0.9999
    precision: str = "bf16"  # "bf16" | "fp32" | "fp16" autocast
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    eval: EvalSection = field(default_factory=EvalSection)
    online: OnlineSection = field(default_factory=OnlineSection)

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.online.enabled and self.stage == "tokenizer":
            raise ValueError("online.enabled streams tokens to a transformer stage; the tokenizer stage reads "
                             "images from data.shards already")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.parallel.mixed_precision == "bf16" and self.precision != "bf16":
            # bf16 weights meet the transformer's deliberate fp32 casts (norm and head inputs) only under
            # autocast: without it the next matmul mixes dtypes and raises (hart/training/parallelize.py)
            raise ValueError(f"parallel.mixed_precision=bf16 needs precision: bf16, got {self.precision!r}")
        if self.stage == "tokenizer" and self.objective.vq_warmup_steps >= self.run.max_steps:
            raise ValueError(f"objective.vq_warmup_steps ({self.objective.vq_warmup_steps}) must be below "
                             f"run.max_steps ({self.run.max_steps}): the VQ part would never train")
        if self.eval.every_steps and self.stage == "tokenizer":
            raise ValueError("eval.every_steps evaluates generated images: it needs a transformer stage, not tokenizer")
        if self.eval.every_steps and self.parallel.strategy == "fsdp":
            raise ValueError("eval.every_steps runs on rank 0, which cannot generate from FSDP shards: evaluate the "
                             "exports with hart-evaluate instead (or train with parallel.strategy ddp)")
        if self.model.family == "star":
            if self.stage != "ar":
                raise ValueError(f"model.family star trains with the ar stage (STAR has no residual head), got "
                                 f"stage {self.stage!r}")
            if self.eval.every_steps or self.online.enabled:
                raise ValueError("model.family star: eval.every_steps and online.enabled are not built for STAR yet "
                                 "(train from a cache; evaluate the export)")
        elif self.objective.drop_scale_length:
            raise ValueError("objective.drop_scale_length is STAR's token dropping (model.family star); HART's "
                             "stages subsample the last scale by their own rule (objective.kept_bucket)")
        if self.data.ledger and self.stage == "tokenizer":
            raise ValueError("data.ledger records the cache keys of each step: a transformer stage, not tokenizer")
        if self.scaling.elastic and (self.stage == "tokenizer" or self.online.enabled):
            # Ray Data's split hands out whole micro-batches: the global batch must split evenly at every size
            # (from a cache, each rank reads its exact slice and any size works: trainer/batches.py)
            micro = self.data.batch_size * self.data.grad_accumulation * self.scaling.max_workers
            uneven = [w for w in range(self.scaling.min_workers, self.scaling.max_workers + 1)
                      if micro % (self.data.batch_size * w)]
            if uneven:
                raise ValueError(
                    f"the global batch data.batch_size x data.grad_accumulation x {self.scaling.max_workers} workers = "
                    f"{micro} must split into micro-batches of {self.data.batch_size} on every world size of "
                    f"scaling.num_workers {list(self.scaling.num_workers)} in the tokenizer stage and online mode; it "
                    f"does not for {uneven}: raise data.grad_accumulation (a multiple of every size from min to max works)")
        _, transformer = model_configs(self)  # resolve presets now: a typo fails at load time
        if self.objective.drop_scale_length:
            try:
                check_drop_scale_length(transformer.grid, self.objective.drop_scale_length)
            except ValueError as exc:
                raise ValueError(f"objective.{exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)


def model_configs(config: TrainRunConfig) -> tuple[TokenizerConfig, TransformerConfig | StarConfig]:
    """The run's tokenizer and transformer configs (a `StarConfig` for `model.family` star). The scale
    list is the tokenizer's (`model.tokenizer`, e.g. `{preset: hart-1024, patch_nums: [...]}` for a
    lower-resolution stage of progressive training): the transformer's resolver takes it from there,
    and refuses one set on `model.transformer` (`hart.config.with_tokenizer_scales`)."""
    tokenizer = tokenizer_config(config.model.tokenizer)
    if config.model.family == "star":
        return tokenizer, star_config(config.model.transformer, tokenizer)
    return tokenizer, transformer_config(config.model.transformer, tokenizer)


def with_absolute_paths(config: TrainRunConfig) -> TrainRunConfig:
    """The config with every local path setting absolute (`pipelines.storage.absolute`), on the driver:
    Ray Train's workers do not start in its working directory. `data.text_encoder` only when it names a
    folder that exists here (else it is a built-in name such as `minilm`); the shapes prompt set is a name."""
    data = config.to_dict()
    for section, name in (("run", "storage_path"), ("model", "tokenizer_checkpoint"), ("model", "init_from"),
                          ("data", "cache"), ("eval", "clip"), ("tracking", "artifact_location")):
        data[section][name] = absolute(data[section][name])
    data["data"]["shards"] = [absolute(shard) for shard in data["data"]["shards"]]
    data["objective"]["perceptual_weights"] = [absolute(path) for path in data["objective"]["perceptual_weights"]]
    if os.path.exists(data["data"]["text_encoder"]):
        data["data"]["text_encoder"] = absolute(data["data"]["text_encoder"])
    if not data["eval"]["prompts"].startswith("shapes:"):
        data["eval"]["prompts"] = absolute(data["eval"]["prompts"])
    return config_from_dict(TrainRunConfig, data)


def load_train_config(path: str | None, stage: str | None = None, overrides: list[str] = ()) -> TrainRunConfig:
    """Config file (optional) + `--stage` + `--set key=value` overrides -> TrainRunConfig."""
    data = read_config_file(path) if path else {}
    if stage is not None:
        data["stage"] = stage
    data = apply_overrides(data, list(overrides))
    return config_from_dict(TrainRunConfig, data)


__all__ = ["TrainRunConfig", "STAGES", "FAMILIES", "load_train_config", "model_configs", "with_absolute_paths"]
