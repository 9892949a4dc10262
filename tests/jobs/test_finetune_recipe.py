"""The fine-tuning recipe end to end on stand-ins: an official-format tiny release (tokenizer/ and llm/
with ema_model.bin, written by this project's export code) and a tiny random Qwen2 built offline take the
steps of docs/fine-tuning.md: precompute with them, fine-tune `jobs/configs/finetune_hart_0.7b.yaml` (sizes and devices
overridden for a CPU) from the release's EMA weights, export, load the export and generate."""

from __future__ import annotations

import torch

from hart.config import tokenizer_config, transformer_config
from hart.transformer.generate import generate, load_models
from hart.tokenizer.model import HybridTokenizer
from hart.transformer.model import HARTForT2I
from trainer.stages import read_start_weights
from trainer.driver import run_training
from trainer.config import load_train_config
from tests.training_fixtures import REPO, save_tiny_qwen


def test_finetune_recipe_from_a_release_with_qwen_features(ray_local, tmp_path):
    from pipelines.config import load_precompute_config
    from pipelines.plan import run_precompute
    from pipelines.shapes import write_shapes_shards

    qwen = save_tiny_qwen(tmp_path / "qwen")
    transformer = {"preset": "tiny", "context_dim": 32, "context_token": 24}  # the tiny Qwen2's width
    release = tmp_path / "hart-tiny-release"
    torch.manual_seed(0)
    tokenizer = HybridTokenizer(tokenizer_config("tiny"))
    tokenizer.save_pretrained(release / "tokenizer")
    model = HARTForT2I(transformer_config(transformer))
    model.init_weights()
    ema = {k: v + 0.01 if v.is_floating_point() else v for k, v in model.state_dict().items()}  # EMA != raw
    model.save_pretrained(release / "llm", ema_state=ema, tokenizer=tokenizer.config)
    start = read_start_weights(str(release / "llm"))  # the recipe starts from the released EMA weights
    assert all(torch.equal(start[k], ema[k]) for k in ema)

    write_shapes_shards(str(tmp_path / "shards"), num_samples=24, num_shards=1)
    summary = run_precompute(load_precompute_config(None, [
        f"input.shards=['{tmp_path}/shards/*.tar']", f"output={tmp_path}/cache", "progress=false",
        f"tokenizer.checkpoint={release / 'tokenizer'}", f"text.encoder={qwen}", "text.max_length=24",
        "compute.tokenizer_cpus=0.5",
    ]), log=lambda *a: None)
    assert summary.samples_written == 24

    config = load_train_config(str(REPO / "jobs/configs/finetune_hart_0.7b.yaml"), "joint", [
        f"run.storage_path={tmp_path / 'storage'}", "run.max_steps=2", "run.checkpoint_every=2", "run.log_every=1",
        "model.tokenizer=tiny", "model.transformer={preset: tiny, context_dim: 32, context_token: 24}",
        f"model.tokenizer_checkpoint={release / 'tokenizer'}", f"model.init_from={release / 'llm'}",
        f"data.cache={tmp_path / 'cache'}", f"data.text_encoder={qwen}", "data.batch_size=4",
        "data.grad_accumulation=1", "optim.fused=false", "optim.warmup_steps=0", "precision=fp32",
        "parallel.strategy=none", "parallel.mixed_precision=none", "parallel.compile=false",
        "parallel.activation_checkpointing=false", "scaling.num_workers=1", "scaling.use_gpu=false",
        "scaling.cpus_per_worker=1", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "tracking.sample_every=0", "tracking.sample_prompts=['a red circle']",
    ])
    outcome = run_training(config, str(tmp_path / "export"))
    assert outcome["final_step"] == 2

    export = tmp_path / "export"
    tuned = HARTForT2I.from_pretrained(export / "llm", ema=True)
    moved = [k for k, v in tuned.state_dict().items() if v.is_floating_point() and not torch.equal(v, ema[k])]
    assert moved  # fine-tuning changed the released weights
    model, tok, encoder = load_models(str(export / "llm"), str(export / "tokenizer"), qwen, ema=True, device="cpu")
    images = generate(model, tok, encoder, ["a red circle on a white background"], seed=0).images_BRR3
    assert images.shape[1] == tok.config.patch_nums[-1] * tok.config.downsample_factor()
