"""hart-evaluate: judge an export (FID, KID, CLIP score, shapes prompt following) on a pinned protocol.

Usage:
    hart-evaluate run --export runs/demo/export --prompts shapes:heldout --protocol shapes --out runs/eval
    hart-evaluate run --export /ckpt/hart-0.7b-1024px --text-encoder /ckpt/Qwen2-VL-1.5B-Instruct \
        --prompts /data/MJHQ-30K/meta_data.json --protocol hart-mjhq-1024 --out s3://bucket/eval/hart-0.7b \
        --inception /weights/weights-inception-2015-12-05-6726825d.pth --clip /weights/clip-vit-large-patch14 \
        --reference /data/mjhq-1024.stats.safetensors --actors 8 --gpus-per-actor 1 --run-id <training run>
    hart-evaluate reference --images /data/MJHQ-30K/mjhq30k_imgs --image-size 1024 \
        --inception /weights/weights-inception-2015-12-05-6726825d.pth --out /data/mjhq-1024.stats.safetensors

`run` is a Ray Data job: the prompt list (`pipelines.eval_protocol.read_prompts`) becomes fixed
generation groups, an actor pool of `GenerateImages` (one model per actor: per GPU on a cluster)
makes and writes the images (`<out>/images/<id>.png`, local or S3), an actor pool of `ScoreImages`
extracts features and scores, and the driver folds them: FID/KID against the reference statistics
(torchmetrics), mean CLIP score and shapes accuracy, overall and per category. Per-category FID/KID
compare a generated category with the reference's statistics of the same category name
(`per_category_distances`); generated categories the reference has no statistics of (all of them
for a reference without categories) get none, are printed as a warning and listed in
`no_reference_statistics`. `<out>` then holds `protocol.json` (the protocol, the fingerprint, the
prompt source and the export) and `metrics.json` (figures, per-category table and, with FID/KID,
`no_reference_statistics`). With a tracking URI the figures go to MLflow: metrics `<name>/<figure>`
and `<name>/<category>/<figure>` at `--step` (`--name`, default `eval`: `eval/fid`, `eval/people/fid`),
the per-category table, a sample grid and the protocol; `--run-id` attaches them to an existing run
(the training run that produced the checkpoint).

`reference` computes the statistics of real images (a local folder of PNG/JPEG/WebP, or WebDataset
shards, local or S3) under the same feature pipeline: each image's shorter side is resized to
`--image-size` (the generated images' size; bicubic) and the centre square kept, as the precompute
pipeline crops, then `ScoreImages` extracts features. Shard samples that are unreadable or rejected
are counted and reported (`left_out`); the file records the fingerprint, and `run` refuses a
reference made under another. Images with a category add per-category statistics to the overall
ones: in a folder, the name of the folder holding the image (MJHQ-30K's `<category>/<id>.jpg`;
images directly in the folder have none), in shards the string under `category` in a sample's json.
The file's info lists the images per category (`categories`, `uncategorised`).

Weights are never downloaded: the Inception weights file and the CLIP folder are named by the user
(a missing one is an error naming what to put there). Every input, the output's store and the MLflow
run to attach to are checked before Ray starts; a store that stops answering later ends the job with
one line (`storage.storage_error_line`) and exit code 1. `images_per_s` is generation throughput from the
first group's start to the last one's end; the actors' start-up before it is `startup_s`.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def protocol_from_args(args):
    """The named protocol with --set / --metrics overrides applied; values are parsed as YAML and checked
    against the field types (`configuration.loader.config_from_dict`): a bad field or value is a ValueError here,
    not an actor failure later."""
    import yaml

    from configuration.loader import config_from_dict
    from pipelines.eval_protocol import PROTOCOLS, EvalProtocol

    data = PROTOCOLS[args.protocol].to_dict()
    for item in getattr(args, "set", []):
        name, sep, value = item.partition("=")
        if not sep or name not in data:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {sorted(data)}")
        parsed = yaml.safe_load(value)
        data[name] = value.split(",") if name == "metrics" and isinstance(parsed, str) else parsed
    if getattr(args, "metrics", None):
        data["metrics"] = [m.strip() for m in args.metrics.split(",") if m.strip()]
    return config_from_dict(EvalProtocol, data, where="protocol")


def _init_ray(args) -> None:
    from trainer.ray_session import connect
    from pipelines.progress import show_ray_data_progress

    connect(args.address, args.num_cpus)
    show_ray_data_progress(args.ray_progress)


def _actor_options(args, concurrency: int, gpus: float) -> dict:
    return {"concurrency": concurrency, "num_cpus": args.cpus_per_actor, "num_gpus": gpus or None}


def feature_network_id(inception: str) -> str:
    """The feature network as the protocol names it: the weights file's identity (SHA-256)."""
    from pipelines.inception import WEIGHTS_HELP, WEIGHTS_NAME, file_sha256

    if not Path(inception).is_file():
        raise ValueError(f"Inception weights not found at {inception}: put {WEIGHTS_HELP} there")

    return f"{WEIGHTS_NAME.split('-6726')[0]}:sha256:{file_sha256(inception)}"


def absolute_paths(args) -> None:
    """Every local path argument made absolute, on the driver: the actors do not start in its working
    directory, and protocol.json records where the export and prompts were."""
    from pipelines.storage import absolute

    for name in ("export", "out", "inception", "clip", "reference", "images"):
        if getattr(args, name, None):
            setattr(args, name, absolute(getattr(args, name)))
    if getattr(args, "shards", None):
        args.shards = [absolute(shard) for shard in args.shards]
    if getattr(args, "prompts", "") and not args.prompts.startswith("shapes:"):
        args.prompts = absolute(args.prompts)
    if getattr(args, "text_encoder", "") and os.path.exists(args.text_encoder):
        args.text_encoder = absolute(args.text_encoder)


def check_files(args, metrics: tuple[str, ...]) -> None:
    """The weight and statistics files the metrics need exist, and the output's store answers (one short
    request, `storage.check_store`), before Ray starts."""
    from pipelines import storage

    wants_fid = bool(set(metrics) & {"fid", "kid"})
    for flag, path, needed in (("--inception", args.inception, wants_fid), ("--reference", args.reference, wants_fid),
                               ("--clip", args.clip, "clip" in metrics)):
        if needed and not os.path.exists(path):
            raise ValueError(f"{flag} {path}: not found")
    storage.check_store(args.out, args.endpoint_url, "--out", "--endpoint-url")


def check_tracking(args) -> None:
    """With MLflow logging: the server answers and the run to attach to exists, before any image is made."""
    if not (args.tracking_uri or args.run_id):
        return
    from mlflow.tracking import MlflowClient

    from trainer.tracking import probe_server, redact_uri, resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    probe_server(uri)
    if args.run_id:
        try:
            MlflowClient(tracking_uri=uri).get_run(args.run_id)
        except Exception as exc:  # noqa: BLE001 - an unknown id, a store error: either way, not usable
            raise ValueError(f"--run-id {args.run_id}: not a run of {redact_uri(uri)} ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:200]})") from None


def run_evaluation(args) -> dict:
    import ray

    from trainer.export import read_export
    from pipelines import storage
    from pipelines.eval_protocol import groups, read_prompts
    from pipelines.eval_stages import GenerateImages, ScoreImages, summarize
    from pipelines.feature_statistics import FeatureStatistics

    absolute_paths(args)
    protocol = protocol_from_args(args)
    models = read_export(args.export, protocol.ema)
    wants_fid = bool(set(protocol.metrics) & {"fid", "kid"})
    if wants_fid and not args.reference:
        raise ValueError("FID/KID need reference statistics (--reference FILE; make them with hart-evaluate reference)")
    if wants_fid and not args.inception:
        from pipelines.inception import WEIGHTS_HELP

        raise ValueError(f"FID/KID need {WEIGHTS_HELP} (--inception PATH)")
    if "clip" in protocol.metrics and not args.clip:
        from pipelines.clip_score import CLIP_HELP

        raise ValueError(f"the CLIP score needs {CLIP_HELP} (--clip FOLDER)")
    check_files(args, protocol.metrics)
    network = feature_network_id(args.inception) if wants_fid else None
    if wants_fid:  # before any image is generated: all of the reference's protocol but the image size
        saved = FeatureStatistics.read_protocol(args.reference)
        wanted = protocol.fingerprint(network, saved.get("image_size"))
        FeatureStatistics.check_protocol(args.reference, saved, wanted)
    prompts = read_prompts(args.prompts, args.limit, args.per_category)
    check_tracking(args)
    rows = groups(prompts, protocol)
    order = [image_id for row in rows for image_id in row["ids"]]
    print(f"[evaluate] {len(prompts)} prompts, {len(order)} images in {len(rows)} groups; protocol {args.protocol} "
          f"({', '.join(protocol.metrics)}): {protocol.describe()}", flush=True)

    fs, out_dir = storage.resolve(args.out, args.endpoint_url)
    images_uri = storage.join(args.out, "images")
    started = time.time()
    _init_ray(args)
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    ds = ds.map_batches(
        GenerateImages, batch_size=1,
        fn_constructor_kwargs=dict(**models, text_encoder=args.text_encoder, protocol=protocol.to_dict(), images_uri=images_uri,
                                   endpoint_url=args.endpoint_url, compile=args.compile),
        **_actor_options(args, args.actors, args.gpus_per_actor))
    ds = ds.map_batches(ScoreImages, batch_size=args.score_batch,
                        fn_constructor_kwargs=dict(metrics=list(protocol.metrics), inception=args.inception,
                                                   clip=args.clip),
                        **_actor_options(args, args.score_actors, args.score_gpus_per_actor))
    scored = list(ds.iter_rows())
    folded = summarize(scored, order, protocol.kid_sample_cap)
    figures, per_category = folded["figures"], folded["per_category"]
    fingerprint, unmatched = None, []
    if wants_fid:
        side = image_side(fs, storage.join(out_dir, "images", f"{order[0]}.png"))
        fingerprint = protocol.fingerprint(network, side)
        real = FeatureStatistics.load(args.reference, fingerprint)
        figures.update(distance_figures(real, folded["fake"], protocol, protocol.metrics))
        unmatched = per_category_distances(real, folded["fake"], per_category, protocol)
        if unmatched:
            print(f"[evaluate] warning: no reference statistics for generated categor"
                  f"{'y' if len(unmatched) == 1 else 'ies'} {', '.join(unmatched)} in {args.reference}"
                  f"{' (it has no categories)' if not real.by_category else ''}: no FID/KID for "
                  f"{'it' if len(unmatched) == 1 else 'them'}", file=sys.stderr, flush=True)
    # Throughput of generation alone: from the first group's start to the last one's end (the actors'
    # start-up, Ray's included, is reported apart).
    first, last = min(float(r["started"]) for r in scored), max(float(r["finished"]) for r in scored)
    figures["images_per_s"] = len(order) / max(last - first, 1e-9)
    figures["startup_s"] = first - started
    record = {"protocol_name": args.protocol, "protocol": protocol.to_dict(), "fingerprint": fingerprint,
              "prompts": args.prompts, "limit": args.limit, "per_category": args.per_category,
              "export": args.export, "text_encoder": args.text_encoder}
    storage.write_bytes_atomic(fs, storage.join(out_dir, "protocol.json"), json.dumps(record, indent=1).encode())
    result = {"figures": figures, "per_category": per_category}
    if wants_fid:
        result["no_reference_statistics"] = unmatched
    storage.write_bytes_atomic(fs, storage.join(out_dir, "metrics.json"), json.dumps(result, indent=1).encode())
    print(f"[evaluate] {len(order)} images in {last - first:.1f}s ({figures['images_per_s']:.3g} images/s) after "
          f"{figures['startup_s']:.1f}s of start-up; wrote {storage.join(args.out, 'metrics.json')}", flush=True)
    if args.tracking_uri or args.run_id:
        grid = [storage.read_bytes(fs, storage.join(out_dir, "images", f"{i}.png")) for i in order[:16]]
        log_to_mlflow(args, record, result, grid)
    return result


def distance_figures(real, fake, protocol, metrics) -> dict:
    """FID and/or KID (those of `metrics`) of a generated set against a reference set, KID with the
    protocol's subsets and seed."""
    from pipelines.feature_statistics import frechet_distance, kernel_distance

    figures = {}
    if "fid" in metrics:
        figures["fid"] = frechet_distance(real, fake)
    if "kid" in metrics:
        figures["kid_mean"], figures["kid_std"], figures["kid_subset_size"] = kernel_distance(
            real, fake, protocol.kid_subsets, protocol.kid_subset_size, seed=protocol.seed)
    return figures


def per_category_distances(real, fake, per_category: dict[str, dict], protocol) -> list[str]:
    """FID/KID of each generated category against the reference's statistics of the same category,
    added to its row of `per_category`; returns the generated categories the reference has no
    statistics of (all of them for a reference without categories).

    A category's sets are its images alone (`FeatureStatistics.category`): FID from its sums, KID
    from its rows of each set's KID sample (about its share of the protocol's `kid_sample_cap`).
    The KID subset size is `min(kid_subset_size, reference rows, generated rows)` of that category
    (recorded as its `kid_subset_size`; KID is unbiased, so a smaller subset widens `kid_std`, not
    the mean). A category with fewer than 2 images (FID) or 2 KID sample rows (KID) on either side
    gets no such figure."""
    unmatched = []
    for category, row in per_category.items():
        if category not in real.by_category or category not in fake.by_category:
            unmatched.append(category)
            continue
        real_c, fake_c = real.category(category), fake.category(category)
        enough = {"fid": min(real_c.count, fake_c.count) >= 2, "kid": min(real_c.sampled, fake_c.sampled) >= 2}
        row.update(distance_figures(real_c, fake_c, protocol, [m for m in protocol.metrics if enough.get(m)]))
    return sorted(unmatched)


def image_side(fs, path: str) -> int:
    from PIL import Image

    from pipelines import storage

    with Image.open(io.BytesIO(storage.read_bytes(fs, path))) as image:
        return image.size[0]


def log_to_mlflow(args, record: dict, result: dict, grid_pngs: list[bytes]) -> None:
    from mlflow.tracking import MlflowClient
    from PIL import Image

    from trainer.tracking import finish_run, image_grid, open_run, resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    client = MlflowClient(tracking_uri=uri)
    run_id, created = args.run_id, args.run_id is None
    if created:
        run_id, _ = open_run(uri, args.experiment, f"{args.name}-{time.strftime('%Y%m%d-%H%M%S')}", {})
    stamp = int(time.time() * 1000)
    from mlflow.entities import Metric

    metrics = [Metric(f"{args.name}/{k}", float(v), stamp, args.step) for k, v in result["figures"].items()]
    for category, values in result["per_category"].items():
        metrics += [Metric(f"{args.name}/{category}/{k}", float(v), stamp, args.step) for k, v in values.items()
                    if k != "images"]
    client.log_batch(run_id, metrics=metrics)
    client.log_text(run_id, json.dumps(record, indent=1), f"{args.name}/step-{args.step}/protocol.json")
    table = {"category": list(result["per_category"]),
             **{k: [v.get(k) for v in result["per_category"].values()]
                for k in sorted({k for v in result["per_category"].values() for k in v})}}
    client.log_table(run_id, data=table, artifact_file=f"{args.name}/step-{args.step}/per_category.json")
    first = [np.asarray(Image.open(io.BytesIO(png)).convert("RGB")) for png in grid_pngs]
    client.log_image(run_id, image_grid(np.stack(first)), artifact_file=f"{args.name}/step-{args.step}/grid.png")
    if created:  # a run this job made is finished by it; an attached run belongs to its owner
        finish_run(uri, run_id, "FINISHED")
    print(f"[evaluate] MLflow run {run_id}: {len(metrics)} metrics at step {args.step}", flush=True)


# How reference images become the generated size: the precompute pipeline's rule (pipelines.decode:
# shorter side resized to the size, bicubic, then the centre square), with full JPEG decoding.
def reference_preprocess():
    from pipelines.config import PreprocessConfig

    return PreprocessConfig(jpeg_draft=False)


def load_reference_images(batch: dict[str, np.ndarray], image_size: int) -> dict[str, np.ndarray]:
    """Image files -> PNG bytes at image_size (`reference_preprocess`); a file that does not decode or is
    rejected (too small, too long) is an error naming it."""
    from PIL import Image

    from pipelines.decode import Rejected, prepare_image
    from pipelines.eval_stages import encode_png

    pngs = []
    for path in batch["path"]:
        try:
            array_RR3, *_ = prepare_image(Path(str(path)).read_bytes(), reference_preprocess(), image_size)
        except Rejected as rejection:
            raise ValueError(f"reference image {path} rejected: {rejection.reason}") from None
        pngs.append(encode_png(Image.fromarray(array_RR3)))
    return {"id": batch["id"], "category": batch["category"], "png": np.array(pngs, dtype=object)}


def shard_images(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Decoded shard rows (`pipelines.decode.decode_batch`) -> the usable samples as {id, category, png};
    the id (shard/key) orders them, the category is `sample_category`. Rows left out are counted by the
    caller from the shards' headers."""
    from PIL import Image

    from pipelines.eval_stages import encode_png

    keep = [i for i in range(len(batch["row_kind"])) if batch["row_kind"][i] == "sample" and batch["status"][i] == "ok"]
    return {"id": np.array([f"{batch['source_shard'][i]}/{batch['key'][i]}" for i in keep], dtype=object),
            "category": np.array([sample_category(batch["metadata"][i]) for i in keep], dtype=object),
            "png": np.array([encode_png(Image.fromarray(batch["image"][i])) for i in keep], dtype=object)}


def sample_category(metadata: str) -> str:
    """A shard sample's category: the non-empty string under "category" in its json member (MJHQ-30K's
    meta_data.json field, e.g. img2dataset's --save_additional_columns), else "" (none): no json, json
    that does not parse or is not an object, or another type."""
    try:
        value = json.loads(metadata) if metadata else None
    except json.JSONDecodeError:
        return ""
    category = value.get("category") if isinstance(value, dict) else None
    return category if isinstance(category, str) else ""


def folder_category(path: Path, folder: Path) -> str:
    """A reference image's category in a folder: the name of the folder holding it, "" for an image
    directly in `folder`. MJHQ-30K's images (`mjhq30k_imgs/<category>/<id>.jpg`) get their category
    whether `folder` is `mjhq30k_imgs` or the folder above it."""
    return path.parent.name if path.parent != folder else ""


def reference_rows(args):
    """(Ray dataset of {id, category, png}, the number of samples the source holds, a description of the
    source). Categories: `folder_category` for a folder, `sample_category` for shards."""
    import ray

    if args.images:
        folder = Path(args.images)
        if not folder.is_dir():
            raise ValueError(f"--images: {folder} is not a folder")
        paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
        paths = paths[: args.limit] if args.limit else paths
        ds = ray.data.from_items([{"id": f"{i:08d}", "category": folder_category(p, folder), "path": str(p)}
                                  for i, p in enumerate(paths)])
        ds = ds.map_batches(load_reference_images, batch_size=args.score_batch, fn_kwargs={"image_size": args.image_size})
        return ds, {"samples": len(paths)}, str(folder.resolve())
    from pipelines.config import InputConfig
    from pipelines.decode import decode_batch
    from pipelines.shard_source import list_shards, name_shards, read_shards_batch

    config = InputConfig(shards=tuple(args.shards), endpoint_url=args.endpoint_url)
    names = name_shards(list_shards(config))
    if not names:
        raise ValueError(f"--shards {args.shards}: no shards found")

    def raw():
        items = [{"name": n, "uri": u} for n, u in sorted(names.items())]
        return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            read_shards_batch, fn_kwargs={"config": config}, batch_format="pyarrow", batch_size=1)

    # First pass, no decoding: what the shards hold (headers). The images are read again below rather
    # than kept: a reference set's encoded images do not fit the object store.
    headers = raw().filter(lambda row: row["row_kind"] == "shard").take_all()
    counts = {"shards": len(headers), "failed_shards": sum(h["status"] == "shard_failed" for h in headers),
              "samples": sum(int(h["shard_num_samples"]) for h in headers)}
    ds = raw().map_batches(decode_batch, fn_kwargs={"config": reference_preprocess(), "resolution": args.image_size},
                           batch_format="numpy", batch_size=args.score_batch)
    return ds.map_batches(shard_images, batch_format="numpy"), counts, ",".join(args.shards)


def run_reference(args) -> dict:
    import torch

    from pipelines import storage
    from pipelines.eval_protocol import PROTOCOLS
    from pipelines.eval_stages import ScoreImages
    from pipelines.feature_statistics import FeatureStatistics, fold_order

    absolute_paths(args)
    protocol = PROTOCOLS[args.protocol]
    fingerprint = protocol.fingerprint(feature_network_id(args.inception), args.image_size)
    for index, shard in enumerate(args.shards or ()):
        storage.check_store(shard, args.endpoint_url, f"--shards[{index}]", "--endpoint-url")
    _init_ray(args)
    ds, counts, source = reference_rows(args)
    ds = ds.map_batches(ScoreImages, batch_size=args.score_batch,
                        fn_constructor_kwargs=dict(metrics=["fid"], inception=args.inception),
                        **_actor_options(args, args.score_actors, args.gpus_per_actor))
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
    stats.save(args.out, fingerprint, info={"source": source, "images": len(ordered), **counts})
    if counts["left_out"]:
        print(f"[evaluate] reference: {counts['left_out']} of {counts['samples']} samples left out (unreadable or "
              f"rejected), {counts.get('failed_shards', 0)} shards failed", flush=True)
    return {"images": len(ordered), **counts, "out": args.out, "fingerprint": fingerprint}
