"""Tests of hart/weights.py: safe loading (a malicious pickle is refused), folders, strict matching.

Run: .venv/bin/pytest tests/hart/test_weights.py -q
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from hart.weights import load_weight_file, load_weight_folder, match_state_dict, save_weight_file


def sample_state() -> dict[str, torch.Tensor]:
    return {"layer.weight": torch.randn(4, 3), "layer.bias": torch.randn(4), "steps": torch.tensor(7)}


@pytest.mark.parametrize("name", ["w.safetensors", "w.pth", "w.bin"])
def test_round_trip(tmp_path, name):
    state = sample_state()
    save_weight_file(state, tmp_path / name)
    loaded = load_weight_file(tmp_path / name)
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert not list(tmp_path.glob("*.tmp"))  # the atomic temp file is gone


class _Exploit:
    """Pickles into a call of os.system: executing it would create the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(1), "payload": _Exploit(str(marker))}, path)
    with pytest.raises(ValueError, match="refusing to load"):
        load_weight_file(path)
    assert not marker.exists()


def test_nested_and_non_tensor_entries(tmp_path):
    state = sample_state()
    torch.save({"model": state}, tmp_path / "nested.pth")
    assert set(load_weight_file(tmp_path / "nested.pth")) == set(state)
    # VAR's and STAR's trainer layout: the model under trainer.var_wo_ddp, beside plain data
    torch.save({"epoch": 3, "iter": 7, "trainer": {"config": {"patch_nums": (1, 2)}, "var_wo_ddp": state}},
               tmp_path / "trainer.pth")
    assert all(torch.equal(v, state[k]) for k, v in load_weight_file(tmp_path / "trainer.pth").items())
    torch.save({"weight": torch.zeros(1), "note": "text"}, tmp_path / "mixed.pth")
    with pytest.raises(ValueError, match="not tensors.*note"):
        load_weight_file(tmp_path / "mixed.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        load_weight_file(tmp_path / "list.pth")
    with pytest.raises(ValueError, match="not found"):
        load_weight_file(tmp_path / "absent.safetensors")


def test_folders_single_and_sharded(tmp_path):
    state = sample_state()
    single = tmp_path / "single"
    save_weight_file(state, single / "model.safetensors")
    assert set(load_weight_folder(single)) == set(state)
    sharded = tmp_path / "sharded"
    save_weight_file({"layer.weight": state["layer.weight"]}, sharded / "part1.safetensors")
    save_weight_file({"layer.bias": state["layer.bias"], "steps": state["steps"]}, sharded / "part2.safetensors")
    weight_map = {"layer.weight": "part1.safetensors", "layer.bias": "part2.safetensors", "steps": "part2.safetensors"}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded = load_weight_folder(sharded)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    with pytest.raises(ValueError, match="no weights in"):
        load_weight_folder(tmp_path / "empty")


def test_match_state_dict_names_every_problem():
    expected = {"a.weight": torch.zeros(2, 2), "b.weight": torch.zeros(3), "c.bias": torch.zeros(1)}
    loaded = {"a.weight": torch.zeros(2, 3), "c.bias": torch.zeros(1), "extra.weight": torch.zeros(1)}
    with pytest.raises(ValueError) as info:
        match_state_dict(expected, loaded, what="toy")
    message = str(info.value)
    assert "missing keys (1): b.weight" in message
    assert "unexpected keys (1): extra.weight" in message
    assert "a.weight: checkpoint (2, 3) vs model (2, 2)" in message
    # Explicitly ignored prefixes are not reported; matching dicts pass.
    match_state_dict(expected, {**expected, "disc.x": torch.zeros(1)}, what="toy", ignore_unexpected_prefixes=("disc.",))
