"""pipelines/plan.py without running the plan: the summary's accounting and table, the driver-side
setup (`prepare`: fingerprint, schema, header, refusals) and the resource check against the session's
2-CPU Ray. The plan end to end is tested in tests/pipelines/test_precompute.py."""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pytest

from pipelines.config import load_precompute_config
from pipelines.plan import check_resources, prepare
from pipelines.precompute_summary import PrecomputeSummary
from pipelines.tokenize_stage import load_tokenizer, weights_hash


def stats(shard: str, samples_in: int, written: int, rejected=None, notes=None, ignored=None, truncated="") -> dict:
    return {"shard": shard, "samples_in": samples_in, "samples_written": written, "rejected": rejected or {},
            "notes": notes or {}, "members_ignored": ignored or {}, "unsorted_members": 1, "truncated": truncated,
            "bytes_read": 100, "bytes_written": 40}


def test_summary_adds_up_the_commit_records():
    summary = PrecomputeSummary(shards_total=3)
    summary.add_stats(stats("a", 5, 4, rejected={"too_small": 1}, notes={"converted_cmyk": 2}))
    summary.add_stats(stats("b", 3, 1, rejected={"too_small": 1, "empty_caption": 1},
                            ignored={"no_extension": 1}, truncated="cut at byte 900"))
    assert (summary.shards_done, summary.samples_in, summary.samples_written) == (2, 8, 5)
    assert summary.rejected == Counter({"too_small": 2, "empty_caption": 1})
    assert summary.notes == Counter({"converted_cmyk": 2}) and summary.members_ignored == Counter({"no_extension": 1})
    assert (summary.unsorted_members, summary.truncated_shards) == (2, 1)
    assert (summary.bytes_read, summary.bytes_written) == (200, 80)


def test_rates_count_the_start_up_apart_and_never_divide_by_zero():
    summary = PrecomputeSummary(samples_in=100, seconds=10.0, startup_seconds=6.0, startup_samples=20)
    assert summary.images_per_second == 10.0 and summary.steady_images_per_second == 20.0
    empty = PrecomputeSummary()
    assert empty.images_per_second == 0.0 and empty.steady_images_per_second == 0.0
    assert PrecomputeSummary(samples_in=5, seconds=2.0, startup_seconds=2.0).steady_images_per_second == 0.0


def test_table_lists_reasons_phases_and_failed_shards():
    summary = PrecomputeSummary(shards_total=4, shards_skipped=1, shards_left=1, seconds=4.0, startup_seconds=1.5,
                                startup_phases={"listing": 0.25, "setup": 1.25})
    summary.add_stats(stats("a", 5, 3, rejected={"too_small": 1, "aspect_ratio": 1}, notes={"caption_truncated": 1}))
    summary.shards_failed = {"z": "not a tar", "y": "not found"}
    lines = summary.table().splitlines()
    rows = {line[:line.rindex("  ")].strip(): line.rsplit(None, 1)[-1] for line in lines if not line.startswith("FAILED")}
    assert rows["shards total"] == "4" and rows["shards failed"] == "2" and rows["shards left (max_shards)"] == "1"
    assert rows["samples rejected"] == "2" and rows["rejected: aspect_ratio"] == "1" and rows["rejected: too_small"] == "1"
    assert rows["note: caption_truncated"] == "1"
    assert rows["listing"] == "0.25" and rows["setup"] == "1.25" and rows["of which start-up"] == "1.5"
    assert rows["images/s"] == "1.2" and rows["images/s after start-up"] == "2.0"  # 5 in 4 s; 5 in the 2.5 s after
    reasons = [line.split(":")[1].split()[0] for line in lines if "rejected:" in line]
    assert reasons == ["aspect_ratio", "too_small"]  # sorted, whatever the order they were counted in
    assert lines[-2:] == ["FAILED shard y: not found", "FAILED shard z: not a tar"]
    assert len({line.rindex(" ") for line in lines if not line.startswith("FAILED")}) == 1  # one column of values


def test_prepare_fingerprints_the_tokenizer_and_sizes_the_rows():
    config = load_precompute_config(None, ["tokenizer.seed=5"])
    setup = prepare(config)
    assert setup["tokenizer_hash"] == weights_hash(load_tokenizer(config.tokenizer))
    assert setup["resolution"] == 64 and setup["fingerprint"]["resolution"] == 64
    assert setup["fingerprint"]["text"] is None and setup["header"]["text_features_shape"] is None
    assert setup["header"]["tokenizer_hash"] == setup["tokenizer_hash"] and setup["header"]["num_tokens"] == 130
    schema = setup["schema"]
    assert schema.field("tokens").type == pa.list_(pa.int16(), 130)
    assert schema.field("residual").type == pa.binary(16 * 8 * 8 * 2) and "text_features" not in schema.names
    other = prepare(load_precompute_config(None, ["tokenizer.seed=6"]))
    assert other["header"]["fingerprint_hash"] != setup["header"]["fingerprint_hash"]


def test_prepare_refuses_a_resolution_the_tokenizer_cannot_take():
    with pytest.raises(ValueError, match=r"preprocess.resolution=128 does not match the tokenizer.*need 64px images"):
        prepare(load_precompute_config(None, ["preprocess.resolution=128"]))


@pytest.mark.parametrize(("overrides", "message"), [
    (["compute.tokenizer_actors=3"], r"need 3.96 CPUs and 0 GPUs .* writers and one route actor per writer"),
    (["compute.tokenizer_gpus=1"], r"need 1.96 CPUs and 1 GPUs"),
    (["text.encoder=minilm"], r"need 2.46 CPUs"),  # the text actor pool counts only when it exists
])
def test_resource_check_refuses_pools_that_do_not_fit(ray_local, overrides, message):
    with pytest.raises(ValueError, match=message):
        check_resources(load_precompute_config(None, overrides))


def test_resource_check_counts_the_plans_own_consumers(ray_local):
    check_resources(load_precompute_config(None, []))  # 1 + 0.25 + 0.5 + 0.2 + 0.01 CPUs fit 2
    online = load_precompute_config(None, ["compute.writer_actors=4"])
    check_resources(online, writers=False, others=(0.2, 0.0))  # no writers: one row-conversion task instead
    with pytest.raises(ValueError, match=r"one row-conversion task, the Ray Train workers\)"):
        check_resources(online, writers=False, others=(0.5, 0.0), others_name="the Ray Train workers")
