"""trainer/config.py: the run config loads from files, `--stage` and `--set` overrides; presets resolve
into model configs that share the tokenizer's scale list; bad values, unknown fields and impossible
combinations are a ValueError naming the field; the worker's dict round trip keeps the config.
(Checks that need the cache or storage run on the driver: tests/jobs/test_train_preflight.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from configuration.loader import config_from_dict
from hart.config import tokenizer_config
from trainer.config import TrainRunConfig, load_train_config, model_configs

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"


def test_bad_config_values_name_the_field():
    with pytest.raises(ValueError, match="stage"):
        load_train_config(None, "pretrain")
    with pytest.raises(ValueError, match="run.max_stepz|unknown field"):
        load_train_config(None, "ar", ["run.max_stepz=3"])
    with pytest.raises(ValueError, match="preset"):
        load_train_config(None, "ar", ["model.transformer=hart-9b"])
    with pytest.raises(ValueError, match="l1_weight and l2_weight"):
        load_train_config(None, "tokenizer", ["objective.l1_weight=0"])
    config = load_train_config(None, "tokenizer", ["objective.l1_weight=0", "objective.l2_weight=1"])
    assert (config.objective.l1_weight, config.objective.l2_weight) == (0.0, 1.0)
    with pytest.raises(ValueError, match="mixed_precision=bf16 needs precision: bf16"):
        load_train_config(None, "joint", ["parallel.strategy=fsdp", "parallel.mixed_precision=bf16", "precision=fp32"])
    with pytest.raises(ValueError, match="objective.kept_bucket must be >= 0"):
        load_train_config(None, "joint", ["objective.kept_bucket=-1"])
    with pytest.raises(ValueError, match="eval.every_steps needs eval.prompts"):
        load_train_config(None, "joint", ["eval.every_steps=10"])
    with pytest.raises(ValueError, match="FID/KID: hart-evaluate"):
        load_train_config(None, "joint", ["eval.every_steps=10", "eval.prompts=shapes:heldout", "eval.metrics=[fid]"])
    with pytest.raises(ValueError, match="'clip' needs eval.clip"):
        load_train_config(None, "joint", ["eval.every_steps=10", "eval.prompts=shapes:heldout", "eval.metrics=[clip]"])
    with pytest.raises(ValueError, match="needs a transformer stage"):
        load_train_config(None, "tokenizer", ["eval.every_steps=10", "eval.prompts=shapes:heldout"])
    with pytest.raises(ValueError, match="cannot generate from FSDP shards"):
        load_train_config(None, "joint", ["eval.every_steps=10", "eval.prompts=shapes:heldout", "parallel.strategy=fsdp"])


def test_unknown_fields_are_named_with_the_valid_ones():
    with pytest.raises(ValueError, match=r"TrainRunConfig.run.max_stepz: unknown field; valid fields: .*'max_steps'"):
        load_train_config(None, "ar", ["run.max_stepz=3"])
    with pytest.raises(ValueError, match=r"TrainRunConfig.online.compute.tokenizer_gpu: unknown field; valid fields: .*'tokenizer_actors'"):
        load_train_config(None, "joint", ["online.compute.tokenizer_gpu=1"])


def test_stage_flag_overrides_the_file_and_sets_override_both(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("stage: ar\nrun:\n  name: from-file\n  max_steps: 7\ndata:\n  batch_size: 4\n")
    config = load_train_config(str(path))
    assert (config.stage, config.run.name, config.run.max_steps, config.data.batch_size) == ("ar", "from-file", 7, 4)
    config = load_train_config(str(path), "diffusion", ["run.max_steps=9", "scaling.num_workers=2"])
    assert (config.stage, config.run.max_steps, config.scaling.num_workers, config.run.name) == ("diffusion", 9, 2, "from-file")


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml") if p.name != "precompute.yaml"))
def test_shipped_train_configs_load(name):
    config = load_train_config(str(CONFIGS / name))
    assert config.stage in ("tokenizer", "ar", "diffusion", "joint")


def test_the_transformer_takes_the_tokenizers_scale_list():
    config = load_train_config(None, "joint", ["model.tokenizer={preset: tiny, patch_nums: [1, 2, 4, 8]}"])
    tokenizer, transformer = model_configs(config)
    assert tokenizer.patch_nums == transformer.patch_nums == (1, 2, 4, 8)
    assert model_configs(load_train_config(None, "joint"))[1].patch_nums == tokenizer_config("tiny").patch_nums
    # one owner: the transformer never names a list, not even the tokenizer's
    for family, same in (("hart", "[1, 2]"), ("hart", "[1, 2, 3, 4, 6, 8]"), ("star", "[1, 2, 3, 4, 6, 8]")):
        with pytest.raises(ValueError, match=r"(transformer|star).patch_nums: the scale list is the tokenizer config's"):
            load_train_config(None, "ar", [f"model.family={family}", f"model.transformer={{preset: tiny, patch_nums: {same}}}"])


def test_transformer_fields_over_a_preset():
    config = load_train_config(None, "joint", ["model.transformer={preset: tiny, depth: 3, embed_dim: 96}"])
    _, transformer = model_configs(config)
    assert (transformer.depth, transformer.embed_dim) == (3, 96)


def test_online_section_is_checked():
    config = load_train_config(None, "joint", ["online.enabled=true", "online.epochs=3",
                                               "online.compute.tokenizer_actors=2", "online.preprocess.min_side=16"])
    assert (config.online.epochs, config.online.compute.tokenizer_actors, config.online.preprocess.min_side) == (3, 2, 16)
    with pytest.raises(ValueError, match="online.epochs must be >= 1, got 0"):
        load_train_config(None, "joint", ["online.epochs=0"])
    with pytest.raises(ValueError, match="online.enabled streams tokens to a transformer stage"):
        load_train_config(None, "tokenizer", ["online.enabled=true"])
    with pytest.raises(ValueError, match="compute.tokenizer_actors must be >= 1"):
        load_train_config(None, "joint", ["online.compute.tokenizer_actors=0"])


@pytest.mark.parametrize(("override", "message"), [
    ("run.name=a/b", "run.name must be a non-empty name without '/'"),
    ("run.checkpoint_every=0", "run.checkpoint_every must be >= 1"),
    ("data.grad_accumulation=0", "data.batch_size and data.grad_accumulation must be >= 1"),
    ("scaling.num_workers=0", "scaling.num_workers must be >= 1"),
    ("scaling.placement_strategy=RANDOM", "scaling.placement_strategy must be PACK"),
    ("ema_decay=1.0", r"ema_decay must be in \[0, 1\)"),
    ("precision=fp8", "precision must be one of"),
    ("objective.continuous_prob=1.5", r"objective.continuous_prob must be in \[0, 1\]"),
    ("eval.protocol=nope", "eval.protocol must be one of"),
    ("tracking.served_protocol=demo", r"tracking.served_protocol must be one of .* \(one image per prompt\)"),
])
def test_section_values_are_checked(override, message):
    with pytest.raises(ValueError, match=message):
        load_train_config(None, "joint", [override])


def test_the_workers_dict_round_trip_keeps_the_config():
    config = load_train_config(str(CONFIGS / "train_tiny.yaml"), "joint",
                               ["online.enabled=true", "eval.every_steps=5", "eval.prompts=shapes:heldout",
                                "model.tokenizer={preset: tiny, patch_nums: [1, 2, 4, 8]}"])
    assert config_from_dict(TrainRunConfig, config.to_dict()) == config


def test_model_family_star_resolves_a_star_config_and_refuses_what_star_does_not_have():
    from hart.star.config import StarConfig

    config = load_train_config(None, "ar", ["model.family=star", "model.transformer={preset: tiny, vocab_size: 256}"])
    _, star = model_configs(config)
    assert isinstance(star, StarConfig) and star.patch_nums == model_configs(config)[0].patch_nums
    assert star.vocab_size == 256 and star.context_dim == star.text_dim
    with pytest.raises(ValueError, match="model.family must be one of"):
        load_train_config(None, "ar", ["model.family=var"])
    for stage in ("joint", "diffusion"):
        with pytest.raises(ValueError, match="model.family star trains with the ar stage"):
            load_train_config(None, stage, ["model.family=star"])
    with pytest.raises(ValueError, match="not built for STAR yet"):
        load_train_config(None, "ar", ["model.family=star", "online.enabled=true", "data.shards=['x.tar']"])
    with pytest.raises(ValueError, match="star.depht: unknown field"):
        load_train_config(None, "ar", ["model.family=star", "model.transformer={preset: tiny, depht: 3}"])
    # STAR's token dropping: star only, and it must keep part of the last scale of the run's scale list.
    grid = model_configs(config)[1].grid
    kept = grid.offsets[-2] + 1
    dropping = load_train_config(None, "ar", ["model.family=star", f"objective.drop_scale_length={kept}"])
    assert dropping.objective.drop_scale_length == kept
    with pytest.raises(ValueError, match="drop_scale_length is STAR's token dropping"):
        load_train_config(None, "ar", [f"objective.drop_scale_length={kept}"])
    with pytest.raises(ValueError, match=rf"objective.drop_scale_length must keep part of the last scale: in \({kept - 1}, "):
        load_train_config(None, "ar", ["model.family=star", f"objective.drop_scale_length={kept - 1}"])
    with pytest.raises(ValueError, match="drop_scale_length must be >= 0"):
        load_train_config(None, "ar", ["model.family=star", "objective.drop_scale_length=-1"])


def test_every_local_path_setting_becomes_absolute_on_the_driver(tmp_path, monkeypatch):
    """What the workers, checkpoints and MLflow params see: paths against the driver's directory, built-in
    names (a text encoder, the shapes prompts) and URIs as given."""
    from trainer.config import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "qwen").mkdir()
    config = with_absolute_paths(load_train_config(None, "joint", [
        "run.storage_path=runs/train", "model.tokenizer_checkpoint=s3://bucket/tok", "data.cache=cache/v1",
        "data.shards=['shards/*.tar', 's3://bucket/raw/{0..3}.tar']", "data.text_encoder=qwen",
        "eval.prompts=prompts.txt", "objective.perceptual_weights=['lpips/vgg.pth']"]))
    assert config.run.storage_path == str(tmp_path / "runs" / "train")
    assert config.model.tokenizer_checkpoint == "s3://bucket/tok" and config.data.cache == str(tmp_path / "cache" / "v1")
    assert config.data.shards == (str(tmp_path / "shards" / "*.tar"), "s3://bucket/raw/{0..3}.tar")
    assert config.data.text_encoder == str(tmp_path / "qwen") and config.eval.prompts == str(tmp_path / "prompts.txt")
    assert config.objective.perceptual_weights == (str(tmp_path / "lpips" / "vgg.pth"),)
    kept = with_absolute_paths(load_train_config(None, "joint", ["data.text_encoder=minilm", "eval.prompts=shapes:heldout"]))
    assert (kept.data.text_encoder, kept.eval.prompts) == ("minilm", "shapes:heldout")
