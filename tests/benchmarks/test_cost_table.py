"""Arithmetic of benchmarks/cost_table.py and the reproducibility of the infra/README.md tables.

Design: the expected bytes per sample are written out from the cache schema by hand (int16 tokens
x sum(pn^2) + fp16 residual x 32 x h x w) with the released scale lists typed in literally, so the
test does not share the script's formulas or `hart.config`'s lists. The README check runs every
`python -m benchmarks.cost_table ...` command printed in infra/README.md and asserts that its output
appears verbatim there, so the published table cannot drift from the script.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from benchmarks import cost_table

REPO = Path(__file__).resolve().parents[2]
README = REPO / "infra" / "README.md"


RELEASED_SCALES = {
    256: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    512: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
    1024: (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64),
}


def test_bytes_per_sample_from_the_schema():
    assert cost_table.resolution_bytes_per_sample(256) == 680 * 2 + 32 * 16 * 16 * 2 == 17_744
    assert cost_table.resolution_bytes_per_sample(512) == 2240 * 2 + 32 * 32 * 32 * 2 == 70_016
    assert cost_table.resolution_bytes_per_sample(1024) == 9451 * 2 + 32 * 64 * 64 * 2 == 281_046
    for resolution, scales in RELEASED_SCALES.items():
        assert cost_table.cache_bytes_per_sample(scales, 32) == cost_table.resolution_bytes_per_sample(resolution)


def test_text_features_and_metadata_add_their_bytes():
    base = cost_table.resolution_bytes_per_sample(256)
    with_text = cost_table.resolution_bytes_per_sample(256, text_tokens=300, text_dim=1536, metadata_bytes=200)
    assert with_text - base == 300 * 1536 * 2 + 300 + 200


def test_cost_row_arithmetic():
    assumptions = cost_table.CostAssumptions(
        precompute_images_per_s={256: 400.0},
        train_images_per_s={256: 20.0},
        raw_bytes_per_image=100e3,
        epochs=2.0,
        num_gpus=64,
        usd_per_gpu_hour=3.0,
        usd_per_gb_month=0.023,
    )
    row = cost_table.cost_row(10**6, 256, 17_744, assumptions)
    assert row.cache_bytes == pytest.approx(17.744e9)
    assert row.raw_bytes == pytest.approx(100e9)
    assert row.s3_usd_per_month == pytest.approx((17.744 + 100) * 0.023)
    assert row.precompute_gpu_hours == pytest.approx(1e6 / 400 / 3600)
    assert row.train_gpu_hours == pytest.approx(2 * 1e6 / 20 / 3600)
    total_hours = 1e6 / 400 / 3600 + 2 * 1e6 / 20 / 3600
    assert row.wall_days == pytest.approx(total_hours / 64 / 24)
    assert row.gpu_usd == pytest.approx(total_hours * 3.0)
    # online: the encoder runs in both epochs, only the raw shards are stored
    online_hours = 2 * 1e6 / 400 / 3600 + 2 * 1e6 / 20 / 3600
    assert row.online_gpu_hours == pytest.approx(online_hours)
    assert row.online_gpu_usd == pytest.approx(online_hours * 3.0)
    assert row.online_s3_usd_per_month == pytest.approx(100 * 0.023)


def test_stored_text_features_add_text_encoder_time():
    assumptions = cost_table.CostAssumptions({256: 400.0}, {256: 20.0}, text_encode_samples_per_s=100.0)
    plain = cost_table.cost_row(10**6, 256, 1, assumptions)
    with_text = cost_table.cost_row(10**6, 256, 1, assumptions, stores_text=True)
    assert with_text.precompute_gpu_hours - plain.precompute_gpu_hours == pytest.approx(1e6 / 100 / 3600)


@pytest.mark.parametrize("text,count", [("1M", 10**6), ("100M", 10**8), ("1B", 10**9), ("2.5e6", 2_500_000), ("5k", 5000)])
def test_parse_count(text, count):
    assert cost_table.parse_count(text) == count


@pytest.mark.parametrize(
    "call",
    [
        lambda: cost_table.resolution_bytes_per_sample(768),
        lambda: cost_table.cache_bytes_per_sample((1, 2), 32, text_tokens=300, text_dim=0),
        lambda: cost_table.cache_bytes_per_sample((1, 0), 32),
        lambda: cost_table.CostAssumptions({256: 0.0}, {256: 1.0}),
        lambda: cost_table.CostAssumptions({256: 1.0}, {256: 1.0}, num_gpus=0),
        lambda: cost_table.cost_row(10, 512, 1, cost_table.CostAssumptions({256: 1.0}, {256: 1.0})),
        lambda: cost_table.cost_row(10, 256, 1, cost_table.CostAssumptions({256: 1.0}, {256: 1.0}), stores_text=True),
        lambda: cost_table.parse_count("1X"),
        lambda: cost_table.parse_count("0"),
        lambda: cost_table.parse_rate_map("256:400", "--flag"),
    ],
)
def test_bad_inputs_raise_value_error(call):
    with pytest.raises(ValueError):
        call()


def test_main_prints_one_row_per_size_and_resolution(capsys):
    table = cost_table.main(["--num-images", "1M,1B", "--resolutions", "256,1024"])
    lines = table.splitlines()
    assert len(lines) == 2 + 4
    assert lines[2].startswith("| 1M | 256 | 17,944 |")  # 17,744 schema bytes + 200 metadata
    assert capsys.readouterr().out.strip() == table


def readme_commands() -> list[str]:
    return re.findall(r"^python -m benchmarks\.cost_table.*$", README.read_text(), flags=re.MULTILINE)


def test_readme_tables_are_reproduced_by_the_printed_commands():
    commands = readme_commands()
    assert commands, "infra/README.md must print the cost_table command"
    readme = README.read_text()
    for command in commands:
        table = cost_table.main(shlex.split(command)[3:])
        assert table in readme, f"infra/README.md table is stale; rerun: {command}"
