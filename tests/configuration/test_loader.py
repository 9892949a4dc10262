"""Tests of configuration/loader.py: strict typing of nested dataclasses, field-named errors,
YAML/TOML/JSON files, `a.b=value` overrides, presets and `replace`.

Run: .venv/bin/pytest tests/configuration/test_loader.py -q
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from configuration.loader import (
    apply_overrides, config_from_dict, config_to_dict, preset_or_dict, read_config_file, replace,
)


@dataclass(frozen=True)
class Inner:
    width: int = 4
    rate: float = 0.5
    names: tuple[str, ...] = ("a",)

    def __post_init__(self) -> None:
        if self.width < 1:
            raise ValueError(f"width must be >= 1, got {self.width}")


@dataclass(frozen=True)
class Outer:
    inner: Inner = field(default_factory=Inner)
    maybe: Inner | None = None
    flag: bool = False
    label: str = "x"


PRESETS = {"small": Inner(width=2), "big": Inner(width=64, rate=0.1)}


def test_nested_sections_lists_and_numbers_convert():
    config = config_from_dict(Outer, {"inner": {"width": 8, "rate": 1, "names": ["p", "q"]},
                                      "maybe": {"width": 3}, "flag": True})
    assert config.inner == Inner(width=8, rate=1.0, names=("p", "q"))
    assert isinstance(config.inner.rate, float) and isinstance(config.inner.names, tuple)
    assert config.maybe == Inner(width=3) and config.flag is True
    assert config_from_dict(Outer, {"maybe": None}).maybe is None
    assert config_from_dict(Outer, config_to_dict(config)) == config


@pytest.mark.parametrize("data, message", [
    ({"inner": {"widht": 3}}, r"Outer\.inner\.widht: unknown field; valid fields: \['names', 'rate', 'width'\]"),
    ({"maybe": {"wdth": 3}}, r"Outer\.maybe\.wdth: unknown field; valid fields: \['names', 'rate', 'width'\]"),
    ({"inner": {"width": "8"}}, r"Outer\.inner\.width: .*valid integer"),  # no string-to-number guessing
    ({"inner": {"width": True}}, r"Outer\.inner\.width: .*valid integer"),  # a bool is not an int here
    ({"flag": 1}, r"Outer\.flag: .*valid boolean"),
    ({"inner": {"names": ["a", 3]}}, r"Outer\.inner\.names\[1\]: .*valid string"),
    ({"inner": {"width": 0}}, r"width must be >= 1, got 0"),  # the dataclass's own check, message kept
    ({"inner": 5}, r"Outer\.inner"),
])
def test_bad_values_name_the_field(data, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict(Outer, data)


def test_several_problems_are_reported_together():
    with pytest.raises(ValueError) as caught:
        config_from_dict(Outer, {"label": 3, "inner": {"rate": "fast"}})
    assert "Outer.label" in str(caught.value) and "Outer.inner.rate" in str(caught.value)


def test_presets_and_replace():
    assert preset_or_dict(Inner, PRESETS, "small", "inner") == Inner(width=2)
    assert preset_or_dict(Inner, PRESETS, {"preset": "big", "width": 7}, "inner") == Inner(width=7, rate=0.1)
    assert preset_or_dict(Inner, PRESETS, {"rate": 0.2}, "inner") == Inner(rate=0.2)
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        preset_or_dict(Inner, PRESETS, "huge", "inner")
    with pytest.raises(ValueError, match=r"inner\.preset: unknown preset"):
        preset_or_dict(Inner, PRESETS, {"preset": "huge"}, "inner")
    changed = replace(Inner(), width=9)
    assert changed == Inner(width=9)
    with pytest.raises(ValueError, match="width"):
        replace(Inner(), width="nine")


def test_files_and_overrides(tmp_path):
    (tmp_path / "a.yaml").write_text("inner:\n  width: 8\n  names: [p]\nflag: true\n")
    (tmp_path / "a.toml").write_text('flag = true\n[inner]\nwidth = 8\nnames = ["p"]\n')
    (tmp_path / "a.json").write_text('{"inner": {"width": 8, "names": ["p"]}, "flag": true}')
    loaded = [config_from_dict(Outer, read_config_file(tmp_path / f"a.{ext}")) for ext in ("yaml", "toml", "json")]
    assert loaded[0] == loaded[1] == loaded[2] == Outer(inner=Inner(width=8, names=("p",)), flag=True)
    data = apply_overrides(read_config_file(tmp_path / "a.yaml"), ["inner.rate=0.25", "maybe.width=2", "label=y"])
    assert config_from_dict(Outer, data) == Outer(inner=Inner(width=8, rate=0.25, names=("p",)),
                                                  maybe=Inner(width=2), flag=True, label="y")
    assert apply_overrides({"label": "x"}, ["label="]) == {"label": ""}  # `--set label=` as a shell leaves `label=''`
    assert apply_overrides({}, ["maybe=null"]) == {"maybe": None}
    with pytest.raises(ValueError, match="key.subkey=value"):
        apply_overrides({}, ["novalue"])
    with pytest.raises(ValueError, match="'flag' is not a section"):
        apply_overrides({"flag": True}, ["flag.x=1"])


def test_bad_config_files(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        read_config_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.toml"
    bad.write_text("vocab_size = [")
    with pytest.raises(ValueError, match="cannot parse"):
        read_config_file(bad)
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping at the top level"):
        read_config_file(tmp_path / "list.yaml")
    wrong_suffix = tmp_path / "config.ini"
    wrong_suffix.write_text("a=1")
    with pytest.raises(ValueError, match="must end in"):
        read_config_file(wrong_suffix)
