"""S3 faults: precompute and checkpoint uploads through a fault-injecting proxy in front of moto.

At a 5% fault rate (503 SlowDown, connection resets, truncated GET bodies) the production
storage layer (`pipelines.storage.s3_filesystem`: AWS standard retries with backoff, bounded
attempts) must finish with exactly-once output; at 100% it must fail with the SDK's error
naming the operation and key, within bounded time (no hang). Faults are counted by the proxy,
so a trial that injected nothing fails instead of passing vacuously.

Run: .venv/bin/pytest tests/faults/test_s3_faults.py -q  (slow trials: add -m slow)
"""

from __future__ import annotations

import json
import os
import time

import pyarrow.fs as pafs
import pytest

from pipelines import shapes, storage
from pipelines.config import load_precompute_config
from pipelines.plan import run_precompute
from tests.faults.accounting import assert_exactly_once, visible_junk
from tests.faults.s3_fault_proxy import FaultProxy, assert_storage_error_line


def precompute_config(shards, output, endpoint, **overrides):
    items = [f"input.shards={json.dumps(list(shards))}", f"output={output}", f"input.endpoint_url={endpoint}",
             "progress=false", "compute.tokenizer_batch_size=8", "compute.decode_batch_size=8"]
    return load_precompute_config(None, items + [f"{k}={v}" for k, v in overrides.items()])


def run_through_proxy(s3_endpoint, bucket, rate, seed, num_samples, num_shards):
    uris = shapes.write_shapes_shards(f"{bucket}/raw", num_samples, num_shards, seed=seed, endpoint_url=s3_endpoint)
    output = f"{bucket}/tokens/faulty"
    with FaultProxy(s3_endpoint, rate=rate, seed=seed) as proxy:
        summary = run_precompute(precompute_config(uris, output, proxy.url), log=lambda *a: None)
        # a shard whose read/write exhausted its retries is failed, not lost: the rerun finishes it
        reruns = 0
        while summary.shards_failed and reruns < 3:
            reruns += 1
            summary = run_precompute(precompute_config(uris, output, proxy.url), log=lambda *a: None)
        counts = dict(proxy.counts)
    assert not summary.shards_failed, summary.shards_failed
    assert proxy.faults() > 0, f"no fault was injected ({counts}): the trial proves nothing"
    seen = assert_exactly_once(output, uris, s3_endpoint)  # checked on the real server, not through the proxy
    assert not visible_junk(output, s3_endpoint)
    return counts, reruns, len(seen["keys"])


def test_precompute_survives_5_percent_s3_faults(ray_local, s3_bucket, s3_endpoint):
    counts, reruns, num_keys = run_through_proxy(s3_endpoint, s3_bucket, 0.05, seed=11, num_samples=12, num_shards=3)
    assert num_keys == 12
    print(f"S3 faults 5%: {counts}, reruns {reruns}")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [21, 22, 23])
def test_precompute_survives_5_percent_s3_faults_more_seeds(ray_local, s3_bucket, s3_endpoint, seed):
    counts, reruns, num_keys = run_through_proxy(s3_endpoint, s3_bucket, 0.05, seed=seed, num_samples=40, num_shards=8)
    assert num_keys == 40
    print(f"S3 faults 5% seed {seed}: {counts}, reruns {reruns}")


def upload_tree(local_dir: str, uri: str, endpoint: str) -> None:
    """What Ray Train does with a checkpoint directory and a storage_filesystem: pyarrow copy_files."""
    fs, path = storage.resolve(uri, endpoint)
    pafs.copy_files(local_dir, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def test_checkpoint_upload_and_download_survive_5_percent_faults(s3_bucket, s3_endpoint, tmp_path):
    import torch

    from hart.training.checkpoint import load_training_state, save_training_state

    source = tmp_path / "ckpt"
    model = {f"layer{i}.weight": torch.randn(64, 64) for i in range(6)}
    save_training_state(source, meta={"step": 7, "data_epoch": 1}, model=model, ema=model,
                        optimizer={"state": {}, "param_groups": []}, scheduler={"last_epoch": 7})
    with FaultProxy(s3_endpoint, rate=0.05, seed=3) as proxy:
        for round_index in range(4):
            uri = f"{s3_bucket}/train/run/checkpoint_{round_index}"
            upload_tree(str(source), uri, proxy.url)
            back = tmp_path / f"back{round_index}"
            back.mkdir()
            fs, path = storage.resolve(uri, proxy.url)
            pafs.copy_files(path, str(back), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            state = load_training_state(back)
            assert state.step == 7 and all(torch.equal(state.model[k], v) for k, v in model.items())
            assert sorted(os.listdir(back)) == sorted(os.listdir(source))
    assert proxy.faults() > 0, dict(proxy.counts)


def test_dead_store_fails_fast_with_a_clear_error(s3_bucket, s3_endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("HART_S3_MAX_ATTEMPTS", "3")  # the knob works, and the fast trial stays fast
    uris = shapes.write_shapes_shards(f"{s3_bucket}/raw", 4, 1, seed=4, endpoint_url=s3_endpoint)
    with FaultProxy(s3_endpoint, rate=1.0, kinds=("slowdown",), seed=5) as proxy:
        # precompute's preflight asks once, before it writes anything, and names the setting to check
        started = time.perf_counter()
        with pytest.raises(ValueError, match=r"input.shards\[0\]=s3://.*HTTP status 503.*check input.endpoint_url"):
            run_precompute(precompute_config(uris, f"{s3_bucket}/tokens/dead", proxy.url), log=lambda *a: None)
        assert proxy.counts["requests"] == 1 and time.perf_counter() - started < 30
        assert storage.list_files(storage.s3_filesystem(s3_endpoint), f"{s3_bucket[5:]}/tokens/dead") == []
        # past the preflight, every storage call is bounded: a handful of tries with backoff, then the
        # SDK's error naming the operation (pyarrow's default would be 3 tries)
        started, before = time.perf_counter(), proxy.counts["requests"]
        with pytest.raises(OSError, match=r"manifest.json' in bucket .*AWS Error .*(SLOW_DOWN|HTTP status 503)"):
            storage.write_bytes_atomic(storage.s3_filesystem(proxy.url), f"{s3_bucket[5:]}/tokens/dead/manifest.json", b"{}")
        seconds, attempts = time.perf_counter() - started, proxy.counts["requests"] - before
    assert attempts == storage.s3_max_attempts() == 3 and seconds < 60, (attempts, seconds)
    with FaultProxy(s3_endpoint, rate=1.0, kinds=("reset",), seed=6) as proxy:
        source = tmp_path / "ckpt"
        source.mkdir()
        (source / "model.safetensors").write_bytes(b"x" * 1000)
        with pytest.raises(OSError, match=r"AWS Error NETWORK_CONNECTION .*(reset|Recv failure)"):
            upload_tree(str(source), f"{s3_bucket}/train/dead", proxy.url)
        assert proxy.counts["requests"] <= 3 * storage.s3_max_attempts()


def test_store_dead_after_the_preflight_ends_hart_precompute_with_one_line(ray_local, s3_bucket, s3_endpoint, monkeypatch,
                                                                          capsys):
    from jobs.precompute import main as precompute_main
    from pipelines.preflight import preflight

    monkeypatch.setenv("HART_S3_MAX_ATTEMPTS", "3")
    uris = shapes.write_shapes_shards(f"{s3_bucket}/raw", 4, 1, seed=4, endpoint_url=s3_endpoint)
    output = f"{s3_bucket}/tokens/dead-after-preflight"
    with FaultProxy(s3_endpoint) as counting:  # the requests of the job's preflight, which the store still answers
        preflight(precompute_config(uris, output, counting.url), num_nodes=1)
    with FaultProxy(s3_endpoint, rate=1.0, kinds=("slowdown",), forward_first=counting.counts["requests"]) as proxy:
        code = precompute_main(["--set", f"input.shards={json.dumps(uris)}", "--set", f"output={output}",
                                "--set", f"input.endpoint_url={proxy.url}"])
    assert code == 1 and proxy.faults() > 0
    assert_storage_error_line(capsys.readouterr().err, "hart-precompute", proxy.url, "input.endpoint_url")


def test_storage_failure_is_found_in_ray_task_and_stage_errors(ray_local):
    """Where a dead store's OSError reaches a driver: itself, a Ray task's error, a Ray Data stage's
    error (only the remote traceback's text holds it), a cause; any other error is not one."""
    import ray
    from ray.train import WorkerGroupError

    message = "When writing key 'a.png' in bucket 'b': AWS Error SLOW_DOWN during PutObject operation: Please reduce"

    def failed_write(batch):
        raise OSError(message)

    def handled_then_another(batch):
        try:
            raise OSError(message)
        except OSError:
            raise RuntimeError("not a storage error")  # noqa: B904 - the OSError is context, not cause

    @ray.remote
    def task():
        failed_write(None)

    caught = {}
    for name, run in (("task", lambda: ray.get(task.remote())),
                      ("stage", lambda: ray.data.range(2).map_batches(failed_write).take_all()),
                      ("stage, handled", lambda: ray.data.range(2).map_batches(handled_then_another).take_all())):
        with pytest.raises(Exception) as info:
            run()
        caught[name] = info.value
    assert storage.storage_failure(caught["task"]) == storage.storage_failure(caught["stage"]) == message
    assert storage.storage_failure(caught["stage, handled"]) == ""
    wrapped = RuntimeError("upload failed")
    wrapped.__cause__ = OSError(message)
    assert storage.storage_failure(wrapped) == message and storage.storage_failure(ValueError("x")) == ""
    # Ray Train's error of a failed worker group keeps each worker's own error
    assert storage.storage_failure(WorkerGroupError("[Rank 1] ...", {0: RuntimeError("x"), 1: OSError(message)})) == message
    assert storage.storage_failure(WorkerGroupError("[Rank 0] ...", {0: RuntimeError("x")})) == ""
    assert storage.storage_error_line("hart-x", caught["stage"], "--endpoint-url", "http://127.0.0.1:1") == (
        f"hart-x: storage error after retries: {message} (S3 endpoint http://127.0.0.1:1, from --endpoint-url)")
    assert storage.storage_error_line("hart-x", FileNotFoundError(2, "No such file", "/x")) == (
        "hart-x: storage error: [Errno 2] No such file: '/x'")
    assert storage.storage_error_line("hart-x", KeyError("x")) == ""


@pytest.mark.slow  # `make chaos`: a training job's start-up (precompute's and evaluate's run in make test)
def test_store_dead_after_the_preflight_ends_hart_train_with_one_line(train_assets, s3_bucket, s3_endpoint, tmp_path,
                                                                      monkeypatch, capsys):
    """The cache and the checkpoints on S3 behind the proxy; it answers the training job's preflight and
    then nothing: the workers' first read fails inside Ray Train, and hart-train prints one line."""
    from jobs.train import main as train_main
    from trainer.driver import preflight
    from tests.training_fixtures import REPO, tiny_config

    monkeypatch.setenv("HART_S3_MAX_ATTEMPTS", "2")
    storage.copy_tree(train_assets["cache"], f"{s3_bucket}/cache", s3_endpoint)
    settings = [f"data.cache={s3_bucket}/cache", f"run.storage_path={s3_bucket}/train", "run.max_steps=2",
                "run.export=false", "tracking.sample_every=0", "run.name=dead-store"]
    with FaultProxy(s3_endpoint) as counting:  # the requests of the job's preflight, which the store still answers
        preflight(tiny_config(train_assets, "ar", tmp_path / "count", *settings, f"run.endpoint_url={counting.url}"))
    with FaultProxy(s3_endpoint, rate=1.0, kinds=("slowdown",), forward_first=counting.counts["requests"]) as proxy:
        config = tiny_config(train_assets, "ar", tmp_path, *settings, f"run.endpoint_url={proxy.url}")
        argv = ["--stage", "ar", "--config", str(REPO / "jobs/configs/train_tiny.yaml"), "--address", "auto"]
        for name in ("run.storage_path", "run.endpoint_url", "run.max_steps", "run.export", "run.name",
                     "model.tokenizer_checkpoint", "data.cache", "tracking.sample_every"):
            section, key = name.split(".")
            argv += ["--set", f"{name}={json.dumps(getattr(getattr(config, section), key))}"]
        argv += ["--set", f"tracking.tracking_uri={config.tracking.tracking_uri}"]
        code = train_main(argv)
    assert code == 1 and proxy.faults() > 0
    assert_storage_error_line(capsys.readouterr().err, "hart-train", proxy.url, "run.endpoint_url")
