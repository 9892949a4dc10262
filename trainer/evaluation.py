"""hart-evaluate's work: judge an export (FID, KID, CLIP score, shapes prompt following) on a pinned
protocol (`run_evaluation(EvaluationConfig)`), or compute a reference set's statistics
(`run_reference(ReferenceConfig)`). The command line (`jobs/evaluate.py`) parses its flags into these
configs, one field per flag, and calls the function; the demo builds the config itself.

`run` is a Ray Data job: the prompt list (`pipelines.eval_protocol.read_prompts`) becomes fixed
generation groups, an actor pool of `GenerateImages` (one model per actor: per GPU on a cluster)
makes and writes the images (`<out>/images/<id>.png`, local or S3), an actor pool of `ScoreImages`
extracts features and scores, and the driver folds them (`pipelines.eval_stages.summarize`,
`pipelines.eval_figures`): FID/KID against the reference statistics (torchmetrics), mean CLIP score
and shapes accuracy, overall and per category. Per-category FID/KID compare a generated category
with the reference's statistics of the same category name (`per_category_distances`); generated
categories the reference has no statistics of (all of them for a reference without categories) get
none, are printed as a warning and listed in `no_reference_statistics`. `<out>` then holds
`protocol.json` (the protocol, the fingerprint, the prompt source and the export) and `metrics.json`
(figures, per-category table and, with FID/KID, `no_reference_statistics`). With a tracking URI the
figures go to MLflow: metrics `<name>/<figure>` and `<name>/<category>/<figure>` at `step` (`name`,
default `eval`: `eval/fid`, `eval/people/fid`), the per-category table, a sample grid and the
protocol; `run_id` attaches them to an existing run (the training run that produced the checkpoint).
The figures carry what they were computed on as their MLflow dataset (the prompts, and for FID/KID the
reference statistics file: `prompt_set_identity`), also logged as the run's input with context
"evaluation"; with `run_id`, the overall figures are logged against that run's checkpoint model of `step`
where it has one (trainer/checkpoint_models.py), so the experiment's Models view ranks checkpoints by them.

`reference` computes the statistics of real images (a local folder of PNG/JPEG/WebP, or WebDataset
shards, local or S3) under the same feature pipeline: each image is brought to `image_size` (the
generated images' size) by the precompute pipeline's rule (`pipelines.eval_figures`), then
`ScoreImages` extracts features. Shard samples that are unreadable or rejected are counted and
reported (`left_out`); the file records the fingerprint, and `run` refuses a reference made under
another. Images with a category add per-category statistics to the overall ones (a folder's
category folders, a shard sample's json `category`); the file's info lists the images per category
(`categories`, `uncategorised`).

Weights are never downloaded: the Inception weights file and the CLIP folder are named by the user
(a missing one is an error naming what to put there). Every input, the output's store and the MLflow
run to attach to are checked before Ray starts; a store that stops answering later raises, and the
command line ends with one line (`storage.storage_error_line`) and exit code 1. `images_per_s` is
generation throughput from the first group's start to the last one's end; the actors' start-up
before it is `startup_s`. The configs are never changed: paths are made absolute in a copy
(`with_absolute_paths`), on the driver, since the actors do not start in its working directory.

Length: just over 400 lines; the two evaluation jobs (images and reference statistics) share their
actors, path handling and checks, which a split would pass across modules.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import ray
import torch
from PIL import Image
from ray.data import ActorPoolStrategy

from pipelines import storage
from pipelines.clip_score import CLIP_HELP
from pipelines.config import InputConfig
from pipelines.decode import decode_batch
from pipelines.eval_figures import (distance_figures, folder_category, image_side, load_reference_images,
                                    per_category_distances, reference_preprocess, shard_images)
from pipelines.eval_protocol import PROTOCOLS, EvalProtocol, groups, prompt_set_identity, protocol_with, read_prompts
from pipelines.eval_stages import GenerateImages, ScoreImages, summarize
from pipelines.feature_statistics import FeatureStatistics, fold_order
from pipelines.inception import WEIGHTS_HELP, WEIGHTS_NAME, file_sha256
from pipelines.progress import show_ray_data_progress
from pipelines.shard_source import list_shards, name_shards, read_shards_batch
from trainer.checkpoint_models import model_of_step
from trainer.export import read_export
from trainer.ray_session import connect
from trainer.tracking import (DATASET_DIGEST_CHARS, finish_run, image_grid, log_dataset_input, open_run, probe_server, redact_uri,
                              resolve_tracking_uri)

DEFAULT_PROTOCOL = "hart-mjhq-1024"


@dataclass(frozen=True, kw_only=True)
class EvalJobSettings:
    """What `run` and `reference` share: the output, its store, the protocol, the scoring actors, Ray."""

    out: str  # run: output folder or s3:// URI (images/, protocol.json, metrics.json); reference: the .safetensors
    endpoint_url: str = ""  # S3-compatible endpoint of s3:// paths ("": $AWS_ENDPOINT_URL, else AWS)
    protocol: str = DEFAULT_PROTOCOL  # a name of pipelines.eval_protocol.PROTOCOLS
    limit: int | None = None  # the first N prompts (by id) or reference images (by file name); None: all
    score_actors: int = 1  # scoring actors (feature networks each)
    cpus_per_actor: float = 1.0  # logical CPUs per actor (Ray scheduling)
    score_batch: int = 16  # images per scoring call
    num_cpus: int | None = None  # CPUs of a local Ray instance (None: all of this machine's)
    address: str = ""  # Ray cluster to join (trainer.ray_session.connect; "": $RAY_ADDRESS, else a local one)
    ray_progress: bool = False  # Ray Data's own progress output

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol {self.protocol!r}: expected one of {sorted(PROTOCOLS)}")
        for name in ("score_actors", "score_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.cpus_per_actor < 0:
            raise ValueError(f"cpus_per_actor must be >= 0, got {self.cpus_per_actor}")


@dataclass(frozen=True, kw_only=True)
class EvaluationConfig(EvalJobSettings):
    """hart-evaluate run: the export and prompts to judge, the protocol's overrides, the feature networks
    and reference, the generation actors and where the figures go in MLflow."""

    export: str  # export folder with tokenizer/ and llm/ (+ ema_model.bin), or STAR's star/
    prompts: str  # MJHQ meta_data.json, a .jsonl, a .txt, or shapes:heldout
    text_encoder: str = "minilm"  # 'minilm' or a local causal-LM folder (HART: Qwen2)
    per_category: int | None = None  # the first N prompts of each category; None: all
    overrides: tuple[str, ...] = ()  # FIELD=VALUE protocol overrides, recorded in protocol.json
    metrics: tuple[str, ...] = ()  # a subset of pipelines.eval_protocol.METRICS; (): the protocol's
    inception: str = ""  # FID Inception weights file, needed for fid/kid
    clip: str = ""  # CLIP model folder, needed for clip
    reference: str = ""  # reference statistics file (run_reference), needed for fid/kid
    actors: int = 1  # generation actors (one model each)
    gpus_per_actor: float = 0.0  # GPUs per generation actor (0: CPU actors)
    score_gpus_per_actor: float = 0.0  # GPUs per scoring actor (0: CPU)
    compile: bool = False  # torch.compile each generation actor's transformer blocks
    tracking_uri: str = ""  # MLflow tracking URI ("": no MLflow logging unless run_id is set)
    experiment: str = "hart-eval"  # MLflow experiment of a new run
    run_id: str = ""  # attach the figures to this existing MLflow run ("": a new run with tracking_uri)
    name: str = "eval"  # metric prefix and artifact folder in MLflow
    step: int = 0  # MLflow step of the figures (the checkpoint's step)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.actors < 1:
            raise ValueError(f"actors must be >= 1, got {self.actors}")
        if min(self.gpus_per_actor, self.score_gpus_per_actor) < 0:
            raise ValueError("gpus_per_actor and score_gpus_per_actor must be >= 0")


@dataclass(frozen=True, kw_only=True)
class ReferenceConfig(EvalJobSettings):
    """hart-evaluate reference: real images (a folder or WebDataset shards) -> a statistics file."""

    image_size: int  # side the images are brought to (the generated size)
    inception: str  # FID Inception weights file
    images: str = ""  # a local folder of PNG/JPEG/WebP images (or shards)
    shards: tuple[str, ...] = ()  # WebDataset shards (local or s3://, globs and {000..099} braces)
    gpus_per_actor: float = 0.0  # GPUs per scoring actor (0: CPU actors)

    def __post_init__(self) -> None:
        super().__post_init__()
        if bool(self.images) == bool(self.shards):
            raise ValueError("give one source of reference images: images (a folder) or shards, not both")
        if self.image_size < 1 or self.gpus_per_actor < 0:
            raise ValueError(f"image_size must be >= 1 and gpus_per_actor >= 0, got {self.image_size}, "
                             f"{self.gpus_per_actor}")


Settings = TypeVar("Settings", EvaluationConfig, ReferenceConfig)


def protocol_of(config: EvaluationConfig) -> EvalProtocol:
    """The config's protocol with its overrides and metrics applied (`eval_protocol.protocol_with`)."""
    return protocol_with(config.protocol, config.overrides, config.metrics)


def _init_ray(config: EvalJobSettings) -> None:
    connect(config.address or None, config.num_cpus)
    show_ray_data_progress(config.ray_progress)


def _actor_options(config: EvalJobSettings, actors: int, gpus: float) -> dict:
    return {"compute": ActorPoolStrategy(size=actors), "num_cpus": config.cpus_per_actor, "num_gpus": gpus or None}


def feature_network_id(inception: str) -> str:
    """The feature network as the protocol names it: the weights file's identity (SHA-256)."""
    if not Path(inception).is_file():
        raise ValueError(f"Inception weights not found at {inception}: put {WEIGHTS_HELP} there")
    return f"{WEIGHTS_NAME.split('-6726')[0]}:sha256:{file_sha256(inception)}"


def with_absolute_paths(config: Settings) -> Settings:
    """A copy of `config` with every local path absolute (`storage.absolute`), made on the driver: the actors
    do not start in its working directory, and protocol.json records where the export and prompts were."""
    changes = {name: storage.absolute(getattr(config, name))
               for name in ("export", "out", "inception", "clip", "reference", "images") if getattr(config, name, "")}
    if isinstance(config, ReferenceConfig):
        changes["shards"] = tuple(storage.absolute(shard) for shard in config.shards)
    else:
        if not config.prompts.startswith("shapes:"):
            changes["prompts"] = storage.absolute(config.prompts)
        if os.path.exists(config.text_encoder):  # a folder; else a built-in name such as `minilm`
            changes["text_encoder"] = storage.absolute(config.text_encoder)
    return dataclasses.replace(config, **changes)


def check_files(config: EvaluationConfig, metrics: tuple[str, ...]) -> None:
    """The weight and statistics files the metrics need exist, and the output's store answers (one short
    request, `storage.check_store`), before Ray starts."""
    wants_fid = bool(set(metrics) & {"fid", "kid"})
    for flag, path, needed in (("--inception", config.inception, wants_fid),
                               ("--reference", config.reference, wants_fid), ("--clip", config.clip, "clip" in metrics)):
        if needed and not os.path.exists(path):
            raise ValueError(f"{flag} {path}: not found")
    storage.check_store(config.out, config.endpoint_url, "--out", "--endpoint-url")


def check_tracking(config: EvaluationConfig) -> None:
    """With MLflow logging: the server answers and the run to attach to exists, before any image is made."""
    if not (config.tracking_uri or config.run_id):
        return
    from mlflow.tracking import MlflowClient  # MLflow only with tracking: its import costs seconds otherwise

    uri = resolve_tracking_uri(config.tracking_uri)
    probe_server(uri)
    if config.run_id:
        try:
            MlflowClient(tracking_uri=uri).get_run(config.run_id)
        except Exception as exc:  # noqa: BLE001 - an unknown id, a store error: either way, not usable
            raise ValueError(f"--run-id {config.run_id}: not a run of {redact_uri(uri)} ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:200]})") from None


def run_evaluation(config: EvaluationConfig) -> dict:
    """Generate, score and fold (module doc); returns {"figures", "per_category"} (+ no_reference_statistics
    with FID/KID), also written to `<out>/metrics.json`. Bad input is a ValueError before Ray starts."""
    config = with_absolute_paths(config)
    protocol = protocol_of(config)
    models = read_export(config.export, protocol.ema)
    wants_fid = bool(set(protocol.metrics) & {"fid", "kid"})
    if wants_fid and not config.reference:
        raise ValueError("FID/KID need reference statistics (--reference FILE; make them with hart-evaluate reference)")
    if wants_fid and not config.inception:
        raise ValueError(f"FID/KID need {WEIGHTS_HELP} (--inception PATH)")
    if "clip" in protocol.metrics and not config.clip:
        raise ValueError(f"the CLIP score needs {CLIP_HELP} (--clip FOLDER)")
    check_files(config, protocol.metrics)
    network = feature_network_id(config.inception) if wants_fid else None
    if wants_fid:  # before any image is generated: all of the reference's protocol but the image size
        saved = FeatureStatistics.read_protocol(config.reference)
        wanted = protocol.fingerprint(network, saved.get("image_size"))
        FeatureStatistics.check_protocol(config.reference, saved, wanted)
    prompts = read_prompts(config.prompts, config.limit, config.per_category)
    check_tracking(config)
    rows = groups(prompts, protocol)
    order = [image_id for row in rows for image_id in row["ids"]]
    print(f"[evaluate] {len(prompts)} prompts, {len(order)} images in {len(rows)} groups; protocol {config.protocol} "
          f"({', '.join(protocol.metrics)}): {protocol.describe()}", flush=True)

    fs, out_dir = storage.resolve(config.out, config.endpoint_url)
    images_uri = storage.join(config.out, "images")
    started = time.time()
    _init_ray(config)
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    ds = ds.map_batches(
        GenerateImages, batch_size=1,
        fn_constructor_kwargs=dict(**models, text_encoder=config.text_encoder, protocol=protocol.to_dict(),
                                   images_uri=images_uri, endpoint_url=config.endpoint_url, compile=config.compile),
        **_actor_options(config, config.actors, config.gpus_per_actor))
    ds = ds.map_batches(ScoreImages, batch_size=config.score_batch,
                        fn_constructor_kwargs=dict(metrics=list(protocol.metrics), inception=config.inception or None,
                                                   clip=config.clip or None),
                        **_actor_options(config, config.score_actors, config.score_gpus_per_actor))
    scored = list(ds.iter_rows())
    folded = summarize(scored, order, protocol.kid_sample_cap)
    figures, per_category = folded["figures"], folded["per_category"]
    fingerprint, unmatched = None, []
    if wants_fid:
        side = image_side(fs, storage.join(out_dir, "images", f"{order[0]}.png"))
        fingerprint = protocol.fingerprint(network, side)
        real = FeatureStatistics.load(config.reference, fingerprint)
        figures.update(distance_figures(real, folded["fake"], protocol, protocol.metrics))
        unmatched = per_category_distances(real, folded["fake"], per_category, protocol)
        if unmatched:
            print(f"[evaluate] warning: no reference statistics for generated categor"
                  f"{'y' if len(unmatched) == 1 else 'ies'} {', '.join(unmatched)} in {config.reference}"
                  f"{' (it has no categories)' if not real.by_category else ''}: no FID/KID for "
                  f"{'it' if len(unmatched) == 1 else 'them'}", file=sys.stderr, flush=True)
    # Throughput of generation alone: from the first group's start to the last one's end (the actors'
    # start-up, Ray's included, is reported apart).
    first, last = min(float(r["started"]) for r in scored), max(float(r["finished"]) for r in scored)
    figures["images_per_s"] = len(order) / max(last - first, 1e-9)
    figures["startup_s"] = first - started
    record = {"protocol_name": config.protocol, "protocol": protocol.to_dict(), "fingerprint": fingerprint,
              "prompts": config.prompts, "limit": config.limit, "per_category": config.per_category,
              "export": config.export, "text_encoder": config.text_encoder}
    storage.write_bytes_atomic(fs, storage.join(out_dir, "protocol.json"), json.dumps(record, indent=1).encode())
    result = {"figures": figures, "per_category": per_category}
    if wants_fid:
        result["no_reference_statistics"] = unmatched
    storage.write_bytes_atomic(fs, storage.join(out_dir, "metrics.json"), json.dumps(result, indent=1).encode())
    print(f"[evaluate] {len(order)} images in {last - first:.1f}s ({figures['images_per_s']:.3g} images/s) after "
          f"{figures['startup_s']:.1f}s of start-up; wrote {storage.join(config.out, 'metrics.json')}", flush=True)
    if config.tracking_uri or config.run_id:
        grid = [storage.read_bytes(fs, storage.join(out_dir, "images", f"{i}.png")) for i in order[:16]]
        dataset = prompt_set_identity(config.prompts, prompts, file_sha256(config.reference) if wants_fid else "")
        log_to_mlflow(config, record, result, grid, dataset)
    return result


def log_to_mlflow(config: EvaluationConfig, record: dict, result: dict, grid_pngs: list[bytes],
                  dataset: tuple[str, str] | None = None) -> None:
    """The figures as `<name>/...` metrics at `step`, the protocol, the per-category table and a grid, in
    run `run_id` (or a new run of `experiment`, which this finishes). `dataset`: (name, digest) of what the
    figures were computed on, their dataset and the run's input; the overall figures are logged against
    the run's checkpoint model of `step` where there is one."""
    from mlflow.entities import Metric  # MLflow only with tracking (check_tracking)
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(config.tracking_uri)
    client = MlflowClient(tracking_uri=uri)
    run_id, created = config.run_id, not config.run_id
    if created:
        run_id, _ = open_run(uri, config.experiment, f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}", {})
    stamp, name, step = int(time.time() * 1000), config.name, config.step
    model = None if created else model_of_step(client, run_id, step)
    model_id = model.model_id if model is not None else None
    on = {"dataset_name": dataset[0], "dataset_digest": dataset[1][:DATASET_DIGEST_CHARS]} if dataset else {}
    if dataset:
        log_dataset_input(uri, run_id, dataset[0], dataset[1], config.prompts, context="evaluation")
    metrics = [Metric(f"{name}/{k}", float(v), stamp, step, model_id=model_id, **on)
               for k, v in result["figures"].items()]
    for category, values in result["per_category"].items():
        metrics += [Metric(f"{name}/{category}/{k}", float(v), stamp, step, **on) for k, v in values.items()
                    if k != "images"]
    client.log_batch(run_id, metrics=metrics)
    client.log_text(run_id, json.dumps(record, indent=1), f"{name}/step-{step}/protocol.json")
    table = {"category": list(result["per_category"]),
             **{k: [v.get(k) for v in result["per_category"].values()]
                for k in sorted({k for v in result["per_category"].values() for k in v})}}
    client.log_table(run_id, data=table, artifact_file=f"{name}/step-{step}/per_category.json")
    first = [np.asarray(Image.open(io.BytesIO(png)).convert("RGB")) for png in grid_pngs]
    client.log_image(run_id, image_grid(np.stack(first)), artifact_file=f"{name}/step-{step}/grid.png")
    if created:  # a run this job made is finished by it; an attached run belongs to its owner
        finish_run(uri, run_id, "FINISHED")
    against = f", the figures against checkpoint model {model.name} ({model_id})" if model is not None else ""
    print(f"[evaluate] MLflow run {run_id}: {len(metrics)} metrics at step {step}{against}", flush=True)


def reference_rows(config: ReferenceConfig):
    """(Ray dataset of {id, category, png}, the number of samples the source holds, a description of the
    source). Categories: `folder_category` for a folder, `sample_category` for shards."""
    if config.images:
        folder = Path(config.images)
        if not folder.is_dir():
            raise ValueError(f"--images: {folder} is not a folder")
        paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
        paths = paths[: config.limit] if config.limit else paths
        ds = ray.data.from_items([{"id": f"{i:08d}", "category": folder_category(p, folder), "path": str(p)}
                                  for i, p in enumerate(paths)])
        ds = ds.map_batches(load_reference_images, batch_size=config.score_batch,
                            fn_kwargs={"image_size": config.image_size})
        return ds, {"samples": len(paths)}, str(folder.resolve())
    source = InputConfig(shards=config.shards, endpoint_url=config.endpoint_url)
    names = name_shards(list_shards(source))
    if not names:
        raise ValueError(f"--shards {list(config.shards)}: no shards found")

    def raw():
        items = [{"name": n, "uri": u} for n, u in sorted(names.items())]
        return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            read_shards_batch, fn_kwargs={"config": source}, batch_format="pyarrow", batch_size=1)

    # First pass, no decoding: what the shards hold (headers). The images are read again below rather
    # than kept: a reference set's encoded images do not fit the object store.
    headers = raw().filter(lambda row: row["row_kind"] == "shard").take_all()
    counts = {"shards": len(headers), "failed_shards": sum(h["status"] == "shard_failed" for h in headers),
              "samples": sum(int(h["shard_num_samples"]) for h in headers)}
    ds = raw().map_batches(decode_batch, fn_kwargs={"config": reference_preprocess(), "resolution": config.image_size},
                           batch_format="numpy", batch_size=config.score_batch)
    return ds.map_batches(shard_images, batch_format="numpy"), counts, ",".join(config.shards)


def run_reference(config: ReferenceConfig) -> dict:
    """Reference statistics of real images (module doc), saved to `out`; returns the file's info."""
    config = with_absolute_paths(config)
    protocol = PROTOCOLS[config.protocol]
    fingerprint = protocol.fingerprint(feature_network_id(config.inception), config.image_size)
    for index, shard in enumerate(config.shards):
        storage.check_store(shard, config.endpoint_url, f"--shards[{index}]", "--endpoint-url")
    _init_ray(config)
    ds, counts, source = reference_rows(config)
    ds = ds.map_batches(ScoreImages, batch_size=config.score_batch,
                        fn_constructor_kwargs=dict(metrics=["fid"], inception=config.inception),
                        **_actor_options(config, config.score_actors, config.gpus_per_actor))
    by_id = {row["id"]: (row["features"], str(row["category"])) for row in ds.iter_rows()}
    if len(by_id) < 2:
        raise ValueError(f"{source}: {len(by_id)} usable images (need at least 2)")
    counts["left_out"] = counts["samples"] - len(by_id)  # bad tar members, undecodable or rejected images
    stats = FeatureStatistics(len(next(iter(by_id.values()))[0]), kid_cap=protocol.kid_sample_cap)
    ordered = [by_id[i] for i in fold_order(list(by_id))]
    for start in range(0, len(ordered), 256):
        chunk = ordered[start : start + 256]
        stats.update(torch.from_numpy(np.stack([f for f, _ in chunk])), [c for _, c in chunk])
    if stats.by_category:  # images per category, and those without one (in the overall statistics only)
        counts["categories"] = {name: part.count for name, part in sorted(stats.by_category.items())}
        counts["uncategorised"] = sum(not c for _, c in ordered)
    stats.save(config.out, fingerprint, info={"source": source, "images": len(ordered), **counts})
    if counts["left_out"]:
        print(f"[evaluate] reference: {counts['left_out']} of {counts['samples']} samples left out (unreadable or "
              f"rejected), {counts.get('failed_shards', 0)} shards failed", flush=True)
    return {"images": len(ordered), **counts, "out": config.out, "fingerprint": fingerprint}


__all__ = ["EvalJobSettings", "EvaluationConfig", "ReferenceConfig", "DEFAULT_PROTOCOL", "run_evaluation",
           "run_reference", "protocol_of", "with_absolute_paths", "feature_network_id", "log_to_mlflow"]
