"""Evaluation prompt sources and generation groups: MJHQ's layout, JSONL, text, the shapes split; a fixed
order, per-category prefixes, clear errors; groups that do not depend on anything but the protocol."""

from __future__ import annotations

import json

import pytest

from pipelines.eval_protocol import PROTOCOLS, EvalProtocol, groups, read_prompts


def test_mjhq_layout_sorted_by_id_with_per_category_prefix(tmp_path):
    meta = {"b2": {"category": "animals", "prompt": "a cat"}, "a1": {"category": "people", "prompt": "a man"},
            "a0": {"category": "animals", "prompt": "a dog"}, "c3": {"category": "animals", "prompt": "a fox"}}
    path = tmp_path / "meta_data.json"
    path.write_text(json.dumps(meta))
    items = read_prompts(str(path))
    assert [i.id for i in items] == ["a0", "a1", "b2", "c3"] and items[0].category == "animals"
    assert [i.id for i in read_prompts(str(path), per_category=1)] == ["a0", "a1"]
    assert [i.id for i in read_prompts(str(path), limit=3)] == ["a0", "a1", "b2"]
    path.write_text(json.dumps({"x": "not a record"}))
    with pytest.raises(ValueError, match="meta_data.json layout"):
        read_prompts(str(path))


def test_jsonl_text_and_shapes_sources(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "one", "id": "7"}\n\n{"prompt": "two", "category": "c"}\n')
    assert [(i.id, i.prompt, i.category) for i in read_prompts(str(jsonl))] == [("000002", "two", "c"), ("7", "one", "all")]
    jsonl.write_text('{"text": "no prompt field"}\n')
    with pytest.raises(ValueError, match="line 1: no 'prompt' field"):
        read_prompts(str(jsonl))
    text = tmp_path / "p.txt"
    text.write_text("first\n\nsecond\n")
    assert [i.prompt for i in read_prompts(str(text))] == ["first", "second"]
    heldout = read_prompts("shapes:heldout")
    assert len(heldout) == 18 and all(i.category == "shapes" for i in heldout)
    with pytest.raises(ValueError, match="prompt file not found"):
        read_prompts(str(tmp_path / "absent.json"))
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"prompt": "a", "id": "1"}\n{"prompt": "b", "id": "1"}\n')
    with pytest.raises(ValueError, match="not unique"):
        read_prompts(str(dup))


def test_groups_are_fixed_by_the_protocol():
    prompts = read_prompts("shapes:heldout")
    protocol = EvalProtocol(batch_size=4, images_per_prompt=2, seed=10)
    rows = groups(prompts, protocol)
    assert len(rows) == 9 and [r["seed"] for r in rows] == list(range(10, 19))
    assert rows[0]["ids"] == ["heldout-0000-0", "heldout-0000-1", "heldout-0001-0", "heldout-0001-1"]
    assert sum(len(r["ids"]) for r in rows) == 36 and groups(prompts, protocol) == rows
    assert PROTOCOLS["hart-mjhq-1024"].more_smooth is False and PROTOCOLS["hart-mjhq-1024"].top_k == (600, 300)
    with pytest.raises(ValueError, match="unknown metric"):
        EvalProtocol(metrics=("fid", "is"))


def test_star_sampling_uses_one_top_k_and_stars_top_p():
    from pipelines.eval_protocol import EvalProtocol

    assert EvalProtocol(cfg=3.0, top_k=(16, 8)).star_sampling() == {"cfg": 3.0, "top_k": 16, "top_p": 0.8,
                                                                   "more_smooth": False}
    assert EvalProtocol(top_p=0.5, more_smooth=True).star_sampling()["top_p"] == 0.5


def test_protocol_with_applies_typed_overrides_then_metrics():
    from pipelines.eval_protocol import protocol_with

    protocol = protocol_with("shapes", ("cfg=2", "top_k=[8, 4]", "metrics=fid,clip"))
    assert (protocol.cfg, protocol.top_k, protocol.metrics) == (2.0, (8, 4), ("fid", "clip"))
    assert protocol_with("shapes", ("metrics=fid",), ("shapes", "clip")).metrics == ("shapes", "clip")
    assert protocol_with("demo") == PROTOCOLS["demo"]
    with pytest.raises(ValueError, match="protocol 'nope': expected one of"):
        protocol_with("nope")
    with pytest.raises(ValueError, match="FIELD=VALUE with FIELD one of"):
        protocol_with("shapes", ("cfg",))
    with pytest.raises(ValueError, match="protocol.seed"):
        protocol_with("shapes", ("seed=true",))
