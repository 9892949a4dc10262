"""Typed configuration of the pre-tokenization job (`jobs/configs/precompute.yaml`).

Design: small frozen dataclasses loaded through `configuration.loader.config_from_dict`, so unknown keys
and wrong types fail with a `ValueError` naming the field, and `--set a.b=c` overrides go through
`configuration.loader.apply_overrides`. The sections follow the pipeline: `input` (which shards),
`preprocess` (decode/filter/crop rules: they change the cache content, so they are part of the
manifest fingerprint), `tokenizer` and `text` (the frozen models; also fingerprinted), `compute`
(how much of the cluster each stage uses: changing it never changes the output, so a 2-core
laptop and a GPU cluster run the same config with only this section overridden), and `output`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from configuration.loader import apply_overrides, config_from_dict, config_to_dict, read_config_file

# Image extensions read from shards (img2dataset writes jpg by default; png/webp with options).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class InputConfig:
    shards: tuple[str, ...] = ()  # local paths, file:// or s3:// URIs; globs and {000..099} braces allowed
    list_file: str = ""  # optional text file (local or URI) with one shard per line
    endpoint_url: str = ""  # S3-compatible endpoint; empty = AWS_ENDPOINT_URL env or AWS
    max_shards: int = 0  # process at most this many pending shards in this run (0 = all)
    max_member_bytes: int = 64 * 1024 * 1024  # larger tar members are skipped and counted

    def __post_init__(self) -> None:
        if self.max_shards < 0 or self.max_member_bytes <= 0:
            raise ValueError("input.max_shards must be >= 0 and input.max_member_bytes > 0")


@dataclass(frozen=True)
class PreprocessConfig:
    resolution: int = 0  # square output side; 0 = the tokenizer's native size (patch_nums[-1] * 16)
    min_side: int = 32  # reject images whose shorter side is smaller
    max_aspect_ratio: float = 3.0  # reject long/short side ratios above this
    max_pixels: int = 50_000_000  # reject before decoding (decompression bombs)
    max_caption_chars: int = 2000  # longer captions are truncated (counted as a note)
    alpha_background: tuple[int, ...] = (255, 255, 255)  # RGBA/LA/P images are composited onto this
    resample: str = "bicubic"  # PIL filter for the shorter-side resize: bicubic | lanczos | bilinear
    jpeg_draft: bool = True  # let libjpeg decode at a reduced size when the image is much larger

    def __post_init__(self) -> None:
        if self.resolution < 0 or self.min_side < 1 or self.max_pixels < 1:
            raise ValueError("preprocess.resolution must be >= 0, min_side and max_pixels >= 1")
        if self.max_aspect_ratio < 1.0:
            raise ValueError(f"preprocess.max_aspect_ratio must be >= 1, got {self.max_aspect_ratio}")
        if self.resample not in ("bicubic", "lanczos", "bilinear"):
            raise ValueError(f"preprocess.resample must be bicubic, lanczos or bilinear, got {self.resample!r}")
        if len(self.alpha_background) != 3 or any(not 0 <= c <= 255 for c in self.alpha_background):
            raise ValueError(f"preprocess.alpha_background must be 3 values in 0..255, got {self.alpha_background}")


@dataclass(frozen=True)
class TokenizerSource:
    """The frozen tokenizer, described as training describes its own (`model.tokenizer` is `config`,
    `model.tokenizer_checkpoint` is `checkpoint`) and loaded by the same function
    (`pipelines.tokenize_stage.load_tokenizer`): its config owns the scale list, and the checkpoint's
    weights are used with that list (the conv nets do not depend on it)."""

    # TokenizerConfig preset name or {preset: ..., field: value}; e.g. {preset: hart-1024, patch_nums: [...]}
    # runs the released weights at another resolution (progressive training's lower-resolution stages)
    config: Any = "tiny"
    checkpoint: str = ""  # HART tokenizer/ folder or VAR .pth; "" = random weights of `config` ...
    seed: int = 0  # ... initialised under torch.manual_seed(seed) (tests and demo only)
    # Store HART's continuous residual column. False for token-only models (VAR, STAR): a cache
    # without it trains the ar stage (HART or STAR), not the diffusion or joint stages.
    residual: bool = True


@dataclass(frozen=True)
class TextConfig:
    encoder: str = ""  # "" = no text-feature stage; else a build_text_encoder name, e.g. "minilm"
    max_length: int = 16  # text tokens kept per caption (T of text_features)


@dataclass(frozen=True)
class ComputeConfig:
    read_tasks: int = 1  # concurrent shard-reading tasks
    read_cpus: float = 0.25  # CPUs reserved per read task (mostly I/O and tar parsing)
    decode_tasks: int = 1  # concurrent decode/filter/crop tasks
    decode_cpus: float = 0.5  # CPUs reserved per decode task
    decode_batch_size: int = 64
    tokenizer_actors: int = 1  # tokenizer actor pool size (= GPUs on a GPU cluster)
    tokenizer_cpus: float = 1.0  # CPUs per tokenizer actor (0 is fine on GPU nodes)
    tokenizer_gpus: float = 0.0  # GPUs per tokenizer actor; > 0 runs on CUDA with bf16 autocast
    tokenizer_batch_size: int = 32
    torch_threads: int = 0  # intra-op threads in tokenizer actors; 0 = max(1, tokenizer_cpus)
    text_actors: int = 1
    text_cpus: float = 0.5  # CPUs per text-encoder actor (0 is fine on GPU nodes)
    text_gpus: float = 0.0
    text_batch_size: int = 64
    writer_actors: int = 1  # shard-writer actors (pipelines.writer_pool); each shard has one owner
    writer_cpus: float = 0.2  # CPUs reserved per writer actor (parquet encoding + upload)
    writer_threads: int = 2  # threads per writer actor that serialize and upload finished shards
    writer_max_pending: int = 4  # shard writes in flight per writer actor before it stops accepting rows
    # Custom resources every task and actor of the pipeline asks for (e.g. {"worker": 0.001} to
    # keep work off a head node that has CPUs); {} = none.
    resources: dict[str, float] = field(default_factory=dict)
    # Refuse to start when the actor pools plus one read and one decode task do not fit the
    # cluster's current CPUs/GPUs (Ray Data would wait forever). Turn off on autoscaling clusters.
    check_resources: bool = True

    def __post_init__(self) -> None:
        for name in ("read_tasks", "decode_tasks", "decode_batch_size", "tokenizer_actors",
                     "tokenizer_batch_size", "text_actors", "text_batch_size", "writer_actors", "writer_threads",
                     "writer_max_pending"):
            if getattr(self, name) < 1:
                raise ValueError(f"compute.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("read_cpus", "decode_cpus", "tokenizer_cpus", "tokenizer_gpus", "text_cpus", "text_gpus", "writer_cpus"):
            if getattr(self, name) < 0:
                raise ValueError(f"compute.{name} must be >= 0, got {getattr(self, name)}")
        for name, amount in self.resources.items():
            if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount <= 0:
                raise ValueError(f"compute.resources[{name!r}] must be a number > 0, got {amount!r}")


@dataclass(frozen=True)
class PrecomputeConfig:
    input: InputConfig = field(default_factory=InputConfig)
    output: str = "runs/cache/shapes"  # cache root: local path, file:// or s3://bucket/prefix
    output_endpoint_url: str = ""  # S3-compatible endpoint of the output (default: input.endpoint_url)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    tokenizer: TokenizerSource = field(default_factory=TokenizerSource)
    text: TextConfig = field(default_factory=TextConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    progress: bool = False  # Ray Data's own progress output (hart-precompute --ray-progress); the job prints a line per shard
    # Local paths (input, output, tokenizer) are on a filesystem every node mounts at the same
    # place. Off: on a cluster of several nodes only s3:// paths are accepted.
    shared_filesystem: bool = False
    # Test hook: after this many shard commits, write the next shard's parquet and then raise
    # before its stats marker, as if the job were killed mid-commit. -1 = off.
    crash_after_commits: int = -1
    # Test hook: each writer commits this many shards, then holds every later write for
    # `writer.PAUSE_HOOK_SECONDS` before it starts, so a kill trial can stop the job between commits
    # by construction instead of by timing (commits can arrive in a burst). -1 = off.
    pause_after_commits: int = -1

    def output_endpoint(self) -> str:
        return self.output_endpoint_url or self.input.endpoint_url

    def output_endpoint_setting(self) -> str:
        """The setting `output_endpoint()` comes from, for messages that name what to fix."""
        return "output_endpoint_url" if self.output_endpoint_url else "input.endpoint_url"


def load_precompute_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> PrecomputeConfig:
    """Config file (optional) + `key=value` overrides -> validated PrecomputeConfig."""
    data: dict[str, Any] = read_config_file(path) if path else {}
    try:
        data = apply_overrides(data, list(overrides))
    except yaml.YAMLError as exc:
        raise ValueError(f"cannot parse an override value ({exc.__class__.__name__}); quote values that hold "
                         f"braces or commas inside lists, e.g. input.shards='[\"s3://b/shard-{{000..009}}.tar\"]'") from None
    section = data.get("input")
    if isinstance(section, dict) and isinstance(section.get("shards"), str):
        section["shards"] = [section["shards"]]  # one pattern given as a plain string
    return config_from_dict(PrecomputeConfig, data)


def with_absolute_paths(config: PrecomputeConfig) -> PrecomputeConfig:
    """Every local path setting absolute (`pipelines.storage.absolute`), on the driver: Ray's workers
    and actors do not start in its working directory. `text.encoder` only when it names a folder that
    exists here (else it is a built-in name such as `minilm`)."""
    import os

    from pipelines.storage import absolute

    data = config_to_dict(config)
    data["input"]["shards"] = [absolute(shard) for shard in data["input"]["shards"]]
    data["input"]["list_file"] = absolute(data["input"]["list_file"])
    data["output"] = absolute(data["output"])
    data["tokenizer"]["checkpoint"] = absolute(data["tokenizer"]["checkpoint"])
    if os.path.exists(data["text"]["encoder"]):
        data["text"]["encoder"] = absolute(data["text"]["encoder"])
    return config_from_dict(PrecomputeConfig, data)


def preprocess_fingerprint(config: PreprocessConfig, resolution: int) -> dict[str, Any]:
    """The preprocessing parameters that change cache content (recorded in the manifest)."""
    data = config_to_dict(config)
    data["resolution"] = resolution
    return data
