"""End-to-end pre-tokenization on a local 2-CPU Ray: cache contents, round trip, resume, refusal, bad input.

One module-scoped cache (3 shapes shards) serves the read-side tests; resume, hostile-input and
refusal tests make their own small outputs. Shards are tiny (a few samples) to keep Ray runs short.
"""

import json
import os
import uuid

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from configuration.loader import config_to_dict
from jobs.precompute import main as precompute_main
from pipelines import shapes
from pipelines.cache import batch_to_tensors, read_cache_table, read_manifest, table_to_numpy
from pipelines.config import InputConfig, PreprocessConfig, PrecomputeConfig, TokenizerSource, load_precompute_config
from pipelines.decode import prepare_image
from pipelines.hostile_shards import write_hostile_shards
from pipelines.plan import run_precompute
from pipelines.shard_source import read_shard_rows
from pipelines.tokenize_stage import encode_images, load_tokenizer, weights_hash
from pipelines.writer import InjectedCrash

NUM_SHARDS, NUM_SAMPLES = 3, 24


def make_config(shards, output, **overrides) -> PrecomputeConfig:
    items = [f"input.shards={json.dumps(list(shards))}", f"output={output}", "progress=false",
             "compute.tokenizer_batch_size=16", "compute.decode_batch_size=16"]
    return load_precompute_config(None, items + [f"{k}={v}" for k, v in overrides.items()])


def expected_keys(uris):
    keys = set()
    for uri in uris:
        for table in read_shard_rows("x", uri, InputConfig()):
            keys |= {k for k, kind in zip(table.column("key").to_pylist(), table.column("row_kind").to_pylist()) if kind == "sample"}
    return keys


@pytest.fixture(scope="module")
def shapes_cache(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    uris = shapes.write_shapes_shards(str(root / "raw"), NUM_SAMPLES, NUM_SHARDS, seed=1)
    config = make_config([str(root / "raw" / "shard-*.tar")], str(root / "cache"))
    summary = run_precompute(config)
    return {"root": root, "uris": uris, "config": config, "summary": summary, "cache": str(root / "cache")}


def test_summary_manifest_and_files(shapes_cache):
    summary, cache = shapes_cache["summary"], shapes_cache["cache"]
    assert (summary.shards_done, summary.samples_in, summary.samples_written) == (NUM_SHARDS, NUM_SAMPLES, NUM_SAMPLES)
    assert not summary.shards_failed and not summary.rejected and summary.bytes_written > 0
    manifest = read_manifest(cache)
    tokenizer = load_tokenizer(TokenizerSource())
    assert manifest["tokenizer_hash"] == weights_hash(tokenizer)
    assert manifest["tokenizer_config"] == config_to_dict(tokenizer.config)
    assert manifest["patch_nums"] == list(tokenizer.config.patch_nums) and manifest["resolution"] == 64
    assert manifest["residual_shape"] == [16, 8, 8] and manifest["num_rows"] == NUM_SAMPLES
    assert [s["shard"] for s in manifest["committed_shards"]] == ["shard-00000", "shard-00001", "shard-00002"]
    assert sorted(os.listdir(cache)) == ["data", "index", "manifest.json", "stats"]
    assert len(os.listdir(f"{cache}/index")) == 1  # compacted at the end of the run
    assert sorted(os.listdir(f"{cache}/data")) == [f"part-shard-0000{i}.parquet" for i in range(NUM_SHARDS)]
    stats = json.loads(open(f"{cache}/stats/shard-00001.stats.json").read())
    assert stats["samples_in"] == stats["samples_written"] == NUM_SAMPLES // NUM_SHARDS and stats["rejected"] == {}
    assert "summary" not in stats and stats["bytes_written"] == os.path.getsize(f"{cache}/data/part-shard-00001.parquet")
    assert "images/s" in summary.table()
    # The start-up is split into its driver-side phases, in order, adding up to the start-up.
    assert list(summary.startup_phases) == ["listing", "setup", "manifest", "planning", "first_batch"]
    assert abs(sum(summary.startup_phases.values()) - summary.startup_seconds) < 0.05
    assert "first_batch" in summary.table()
    # Ray Data's per-operator seconds, as numbers: every stage of the plan, each with its rows.
    operators = summary.operator_seconds["operators"]
    for stage in ("read_shards_batch", "decode_batch", "TokenizerStage", "RouteStage"):
        assert any(stage in name for name in operators), (stage, list(operators))
    assert all(row["wall_s"] > 0 and row["blocks"] >= 1 for row in operators.values())
    assert any("TokenizerStage" in name and row["rows"] == NUM_SAMPLES + NUM_SHARDS for name, row in operators.items())
    assert summary.operator_seconds["consumer_blocked_s"] >= 0


def test_plain_pyarrow_pandas_duckdb_read_the_cache(shapes_cache):
    cache = shapes_cache["cache"]
    path = f"{cache}/data/part-shard-00000.parquet"
    table = pq.read_table(path)
    assert {"key", "caption", "tokens", "residual", "width", "height", "source_shard"} <= set(table.column_names)
    tokens_type = table.schema.field("tokens").type
    assert pa.types.is_fixed_size_list(tokens_type) and tokens_type.list_size == 130 and tokens_type.value_type == pa.int16()
    frame = pd.read_parquet(path)
    residual = np.frombuffer(frame["residual"].iloc[0], dtype="<f2").reshape(16, 8, 8)
    assert np.isfinite(residual).all()
    rows = duckdb.sql(f"select count(*), min(len(tokens)), max(octet_length(residual)) from '{cache}/data/*.parquet'").fetchall()
    assert rows == [(NUM_SAMPLES, 130, 16 * 8 * 8 * 2)]
    labels = duckdb.sql(f"select json_extract_string(metadata, '$.colour') c, caption from '{path}'").fetchall()
    assert all(colour in caption for colour, caption in labels)


def test_cache_round_trip_equals_direct_encode(shapes_cache):
    cache, uris = shapes_cache["cache"], shapes_cache["uris"]
    manifest = read_manifest(cache)
    batch = batch_to_tensors(table_to_numpy(read_cache_table(cache, shards=["shard-00000"])), manifest)
    tokenizer = load_tokenizer(TokenizerSource())
    images = {}
    for table in read_shard_rows("shard-00000", uris[0], InputConfig()):
        for key, data in zip(table.column("key").to_pylist(), table.column("image_bytes").to_pylist()):
            if data is not None:
                images[key] = prepare_image(data, PreprocessConfig(), 64)[0]
    image_BRR3 = np.stack([images[k] for k in batch["key"]])
    tokens_BL, residual = encode_images(tokenizer, image_BRR3, torch.device("cpu"))
    assert torch.equal(torch.cat(batch["tokens"], 1), torch.from_numpy(tokens_BL).long())
    assert torch.equal(batch["residual"], torch.from_numpy(residual).float())
    # tokens + residual from the cache reproduce the encoder's continuous latent (up to fp16 rounding).
    x = torch.from_numpy(image_BRR3).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        f_direct = tokenizer.encode_latent(x)
        f_cache = tokenizer.tokens_to_latent(batch["tokens"], batch["residual"])
        assert torch.allclose(f_cache, f_direct, atol=2e-3 * f_direct.abs().max().item())
        assert torch.allclose(tokenizer.decode(batch["tokens"], batch["residual"]), tokenizer.decode_latent(f_direct), atol=2e-2)


def test_rerun_skips_and_other_settings_are_refused(shapes_cache):
    uris, cache = shapes_cache["uris"], shapes_cache["cache"]
    before = {p: os.path.getmtime(f"{cache}/data/{p}") for p in os.listdir(f"{cache}/data")}
    summary = run_precompute(shapes_cache["config"])
    assert (summary.shards_skipped, summary.shards_done) == (NUM_SHARDS, 0)
    assert before == {p: os.path.getmtime(f"{cache}/data/{p}") for p in os.listdir(f"{cache}/data")}
    with pytest.raises(ValueError, match="tokenizer_hash"):
        run_precompute(make_config(uris, cache, **{"tokenizer.seed": 1}))
    with pytest.raises(ValueError, match="resolution"):
        run_precompute(make_config(uris, cache, **{"tokenizer.config": "{preset: tiny, patch_nums: [1,2,4,8,16]}"}))
    with pytest.raises(ValueError, match="preprocess"):
        run_precompute(make_config(uris, cache, **{"preprocess.min_side": 8}))
    with pytest.raises(ValueError, match="the stages need 3.96 CPUs"):
        run_precompute(make_config(uris, str(shapes_cache["root"] / "other"), **{"compute.tokenizer_actors": 3}))
    with pytest.raises(ValueError, match="does not match the tokenizer"):
        run_precompute(make_config(uris, cache, **{"preprocess.resolution": 128}))


def test_resume_is_exactly_once_and_removes_interrupted_writes(ray_local, tmp_path):
    uris = shapes.write_shapes_shards(str(tmp_path / "raw"), 20, 4, seed=2)
    cache = str(tmp_path / "cache")
    first = run_precompute(make_config(uris, cache, **{"input.max_shards": 1}))
    assert (first.shards_done, first.shards_left) == (1, 3)
    # Crash after writing the next shard's parquet, before its commit marker.
    with pytest.raises(InjectedCrash):
        run_precompute(make_config(uris, cache, crash_after_commits=0))
    committed = {s["shard"] for s in read_manifest(cache)["committed_shards"]}
    stats = set(os.listdir(f"{cache}/stats"))
    parquet = set(os.listdir(f"{cache}/data"))
    assert len(parquet) > len(stats) >= 1  # an uncommitted parquet exists ...
    assert committed <= {s.removesuffix(".stats.json") for s in stats}
    assert len(read_cache_table(cache)) == 5 * len(committed)  # ... but readers never see it
    # Writes killed before their rename leave their temporary files (named as storage.write_bytes_atomic
    # names them, half written) in every folder of the cache: the next run removes them all.
    left = {"data": "part-shard-00003.parquet", "stats": "shard-00003.stats.json", "index": "20260101T000000-ab.parquet",
            ".": "manifest.json"}
    for folder, name in left.items():
        with open(os.path.join(cache, folder, f".tmp-{uuid.uuid4().hex}-{name}"), "wb") as handle:
            handle.write(b"PAR1 half of a file")
    logged = []
    final = run_precompute(make_config(uris, cache), log=logged.append)
    assert final.shards_skipped == len(stats) and final.shards_done == 4 - len(stats) and not final.shards_failed
    assert [n for folder in left for n in os.listdir(os.path.join(cache, folder)) if n.startswith(".tmp-")] == []
    assert any(f"removed {len(left)} temporary file(s) of writes a killed run left" in line for line in logged)
    table = read_cache_table(cache)
    keys = table.column("key").to_pylist()
    assert len(keys) == len(set(keys)) == 20 and set(keys) == expected_keys(uris)
    assert sorted(set(os.listdir(f"{cache}/data"))) == [f"part-shard-0000{i}.parquet" for i in range(4)]


def test_hostile_input_is_counted_and_failed_shards_named(ray_local, tmp_path, capsys):
    hostile = write_hostile_shards(str(tmp_path / "raw"))
    cache = tmp_path / "out" / "cache"
    code = precompute_main(["--set", f"input.shards=[{tmp_path}/raw/*.tar]", "--set", f"output={cache}"])
    captured = capsys.readouterr()
    assert code == 1
    # a line per committed shard with the run's progress; Ray Data's own progress output is off by default
    progress = [line for line in captured.out.splitlines() if line.startswith("committed ")]
    assert len(progress) == len(hostile) - 2  # each commit once (the writers' final answer repeats them)
    assert all(f"/{len(hostile)} (" in line and " rows/s, ETA " in line and " elapsed, " in line for line in progress)
    assert "Total Progress" not in captured.out + captured.err
    assert "2 shard(s) failed: garbage_shard, zero_byte_shard" in captured.err
    assert "rejected: image_decode_error" in captured.out and "member ignored: unsafe_member_name" in captured.out
    for kind, (uri, expected) in hostile.items():
        path = cache / "stats" / f"{kind}.stats.json"
        if expected["failed"]:
            assert not path.exists() and not (cache / "data" / f"part-{kind}.parquet").exists()
            continue
        stats = json.loads(path.read_text())
        assert stats["samples_in"] == expected["samples_in"], kind
        assert stats["samples_written"] == expected["samples_written"], kind
        assert stats["rejected"] == expected["rejected"], kind
        assert stats["members_ignored"] == expected["members_ignored"], kind
        assert stats["unsorted_members"] == expected["unsorted_members"], kind
        assert bool(stats["truncated"]) == expected["truncated"], kind
        notes = dict(stats["notes"])
        if expected["truncated"]:
            assert notes.pop("truncated_tar") == 1
        assert notes == expected["notes"], kind
        assert len(pq.read_table(cache / "data" / f"part-{kind}.parquet")) == expected["samples_written"]
    # `../` and absolute member names wrote nothing anywhere: only the cache layout exists.
    assert sorted(os.listdir(tmp_path / "out")) == ["cache"]
    assert sorted(os.listdir(cache)) == ["data", "index", "manifest.json", "stats"]
    assert not any("escape" in name or "path" in name for _, _, names in os.walk(tmp_path) for name in names)
    unsorted = read_cache_table(str(cache), shards=["unsorted_members"])
    assert sorted(unsorted.column("key").to_pylist()) == ["a", "b", "c"]
    assert sorted(unsorted.column("caption").to_pylist()) == ["caption a", "caption b", "caption c"]


def test_s3_input_and_output(ray_local, s3_bucket, s3_endpoint):
    uris = shapes.write_shapes_shards(f"{s3_bucket}/raw", 8, 2, seed=3, endpoint_url=s3_endpoint)
    output = f"{s3_bucket}/tokens/run"
    config = make_config([f"{s3_bucket}/raw/shard-{{00000..00001}}.tar"], output, **{"input.endpoint_url": s3_endpoint})
    summary = run_precompute(config)
    assert (summary.shards_done, summary.samples_written) == (2, 8) and not summary.shards_failed
    manifest = read_manifest(output, s3_endpoint)
    assert manifest["num_rows"] == 8
    table = read_cache_table(output, endpoint_url=s3_endpoint)
    assert set(table.column("key").to_pylist()) == expected_keys_s3(uris, s3_endpoint)
    rerun = run_precompute(config)
    assert (rerun.shards_skipped, rerun.shards_done) == (2, 0)
    import boto3

    objects = boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket=s3_bucket[5:], Prefix="tokens/run/")
    names = sorted(o["Key"].split("tokens/run/", 1)[1] for o in objects["Contents"])
    assert [n for n in names if not n.startswith("index/")] == [
        "data/part-shard-00000.parquet", "data/part-shard-00001.parquet", "manifest.json",
        "stats/shard-00000.stats.json", "stats/shard-00001.stats.json"]
    assert len([n for n in names if n.startswith("index/") and n.endswith(".parquet")]) == 1


def expected_keys_s3(uris, endpoint):
    keys = set()
    for uri in uris:
        for table in read_shard_rows("x", uri, InputConfig(endpoint_url=endpoint)):
            keys |= {k for k in table.column("key").to_pylist() if k}
    return keys


def test_text_feature_stage_stores_fp16_features(ray_local, tmp_path):
    from hart.text_encoder import build_text_encoder

    uris = shapes.write_shapes_shards(str(tmp_path / "raw"), 6, 1, seed=4)
    cache = str(tmp_path / "cache")
    summary = run_precompute(make_config(uris, cache, **{"text.encoder": "minilm", "text.max_length": 12,
                                                       "compute.tokenizer_cpus": 0.5, "compute.text_cpus": 0.5}))
    assert summary.samples_written == 6
    manifest = read_manifest(cache)
    assert manifest["text_features_shape"] == [12, 384] and manifest["fingerprint"]["text"]["encoder"] == "minilm"
    assert manifest["text"]["pad_features"] == "encoder_output"
    batch = batch_to_tensors(table_to_numpy(read_cache_table(cache)), manifest)
    assert batch["text_features"].shape == (6, 12, 384) and batch["text_mask"].dtype == torch.bool
    features, mask = build_text_encoder("minilm", 12)(batch["caption"])
    features = torch.nn.functional.pad(features.float(), (0, 0, 0, 12 - features.shape[1]))
    mask = torch.nn.functional.pad(mask.bool(), (0, 12 - mask.shape[1]))
    assert torch.equal(batch["text_mask"], mask) and not mask.all()
    # Padded positions hold the encoder's outputs, the very input generation gives the model.
    assert torch.allclose(batch["text_features"], features.half().float(), atol=1e-3, rtol=1e-3)  # fp16 storage
    assert batch["text_features"][~mask].abs().amax() > 0.1
    assert duckdb.sql(f"select octet_length(text_features) from '{cache}/data/*.parquet' limit 1").fetchall() == [(12 * 384 * 2,)]


def test_a_token_only_cache_stores_no_residual(ray_local, tmp_path):
    """tokenizer.residual false (VAR, STAR): the same tokens, no residual column, a manifest that says
    so and a fingerprint of its own; a cache with the residual keeps its old fingerprint (no new key)."""
    uris = shapes.write_shapes_shards(str(tmp_path / "raw"), 6, 1, seed=4)
    full, tokens_only = str(tmp_path / "full"), str(tmp_path / "tokens")
    run_precompute(make_config(uris, full))
    summary = run_precompute(make_config(uris, tokens_only, **{"tokenizer.residual": False}))
    assert summary.samples_written == 6
    manifest, reference = read_manifest(tokens_only), read_manifest(full)
    assert manifest["residual_shape"] is None and reference["residual_shape"] == [16, 8, 8]
    assert manifest["fingerprint"]["residual"] is False and "residual" not in reference["fingerprint"]
    assert manifest["fingerprint_hash"] != reference["fingerprint_hash"]
    table, full_table = read_cache_table(tokens_only), read_cache_table(full)
    assert "residual" not in table.column_names and "residual" in full_table.column_names
    order = np.argsort(table.column("key").to_pylist())
    assert np.array_equal(np.stack(table.column("tokens").to_numpy(zero_copy_only=False))[order],
                          np.stack(full_table.column("tokens").to_numpy(zero_copy_only=False))[
                              np.argsort(full_table.column("key").to_pylist())])
    batch = batch_to_tensors(table_to_numpy(table), manifest)
    assert "residual" not in batch and len(batch["tokens"]) == len(manifest["patch_nums"])


def test_s3_stores_that_do_not_answer_or_refuse_fail_before_the_manifest(ray_local, tmp_path, s3_strict_endpoint,
                                                                          monkeypatch, capsys):
    """One short request per store before anything is written: a store that does not answer or refuses the
    credentials is one line naming the setting and the variables to fix, in seconds (the job's own requests
    retry for about 15 s per shard), and the cache root stays empty."""
    import socket
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    shards, output = ["s3://my-bucket/raw/shard-{00000..00003}.tar"], tmp_path / "cache"
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    started = time.time()
    # no endpoint anywhere: AWS itself, which this machine cannot reach (or, online, refuses the fake key)
    with pytest.raises(ValueError, match=r"^input.shards\[0\]=s3://my-bucket/raw/shard-\{00000..00003\}.tar: .*"
                                         r"(set input.endpoint_url or AWS_ENDPOINT_URL|AWS_ACCESS_KEY_ID)"):
        run_precompute(make_config(shards, output))
    with pytest.raises(ValueError, match=r"the S3 endpoint 127.0.0.1:\d+ does not answer .*check input.endpoint_url"):
        run_precompute(make_config(shards, output, **{"input.endpoint_url": f"http://127.0.0.1:{closed}"}))
    with pytest.raises(ValueError, match="refused access to bucket 'my-bucket'.*set AWS_ACCESS_KEY_ID and "
                                         "AWS_SECRET_ACCESS_KEY"):
        run_precompute(make_config(shards, output, **{"input.endpoint_url": s3_strict_endpoint}))
    # the output's store too, through the command: exit 2, one line
    local = shapes.write_shapes_shards(str(tmp_path / "raw"), 4, 1)
    assert precompute_main(["--set", f"input.shards={json.dumps(local)}", "--set", "output=s3://my-bucket/cache",
                            "--set", f"output_endpoint_url={s3_strict_endpoint}", "--set", "tokenizer.checkpoint=''",
                            "--set", "text.encoder=''"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("hart-precompute: output=s3://my-bucket/cache: the S3 server")
    assert time.time() - started < 30 and not output.exists()
