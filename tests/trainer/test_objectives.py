"""trainer/objectives.py: the loss modules hold exactly the trained module's parameters (the frozen
helpers stay outside the tree a data-parallel wrapper walks), and return the objective's losses.

Run: .venv/bin/pytest tests/trainer/test_objectives.py -q
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.objectives import DiscriminatorObjective, TokenizerObjective, TransformerObjective
from trainer.stages import build_stage
from trainer.data import TextFeatures, images_collate
from pipelines.cache import batch_to_tensors, read_cache_table, read_manifest, table_to_numpy
from tests.training_fixtures import tiny_config
from trainer.plan import RunPlan


def ids(module):
    return {id(p) for p in module.parameters()}


def test_transformer_objective_holds_the_transformer_only(train_assets, tmp_path):
    manifest = read_manifest(train_assets["cache"])
    table = read_cache_table(train_assets["cache"], columns=["key", "caption", "tokens", "residual"]).slice(0, 4)
    raw = batch_to_tensors(table_to_numpy(table), manifest)
    for stage_name, expected in (("ar", {"ce"}), ("joint", {"ce", "diffusion", "loss"})):
        config = tiny_config(train_assets, stage_name, tmp_path)
        plan = RunPlan.of(config, manifest=manifest)
        text = TextFeatures(plan, torch.device("cpu"))
        stage = build_stage(plan, torch.device("cpu"), text.encoder)
        batch = text.add_context(raw)
        assert isinstance(stage.objective, TransformerObjective)
        assert ids(stage.objective) == ids(stage.model)  # the frozen quantizer is not in the tree
        assert not ids(stage.objective) & ids(stage.tokenizer)
        losses = stage.objective(batch, step=0, generator=torch.Generator().manual_seed(0))
        assert expected <= set(losses) and torch.isfinite(losses["loss"])
        assert ("diffusion" in losses) == (stage_name == "joint")


def test_tokenizer_objectives_keep_generator_and_critic_apart(train_assets, tmp_path):
    config = tiny_config(train_assets, "tokenizer", tmp_path, "objective.gan_weight=0.1", "objective.tokenizer_mode=full",
                         "objective.disc_channels=16", "model.tokenizer_checkpoint=''")
    stage = build_stage(RunPlan.of(config), torch.device("cpu"))
    assert isinstance(stage.objective, TokenizerObjective) and isinstance(stage.discriminator_objective,
                                                                          DiscriminatorObjective)
    assert ids(stage.objective) == ids(stage.model)  # the critic is frozen inside the generator's loss
    assert ids(stage.discriminator_objective) == ids(stage.discriminator)
    from pipelines.shapes import render, sample_spec

    images = np.stack([np.asarray(render(sample_spec(i))) for i in range(2)])
    batch = images_collate({"image": images, "caption": np.array(["x"] * 2, dtype=object)})
    out = stage.objective(batch, step=0, generator=torch.Generator().manual_seed(0))
    assert out["reconstructions"].shape == batch["images"].shape and torch.isfinite(out["loss"])
    critic = stage.discriminator_objective({"images": batch["images"], "reconstructions": out["reconstructions"]})
    assert torch.isfinite(critic["loss"])


def test_star_objective_trains_the_same_under_fsdp2(tmp_path):
    """The STAR loss module wrapped by parallelize (FSDP2 per block, 1-process gloo group) gives the
    losses of the plain module, step for step: the ar stage's sharded path for STAR."""
    import torch.distributed as dist

    from configuration.loader import replace
    from hart.config import tokenizer_config
    from hart.star.config import STAR_PRESETS
    from hart.star.model import STARForT2I, TextFeatures
    from hart.tokenizer.model import HybridTokenizer
    from hart.training.parallelize import ParallelConfig, is_sharded, parallelize
    from hart.training.step import OptimizerConfig, build_optimizer, train_step
    from trainer.objectives import StarObjective

    tok = tokenizer_config("tiny")
    torch.manual_seed(0)
    quantizer = HybridTokenizer(tok).eval().quantize
    config = replace(STAR_PRESETS["tiny"], patch_nums=tok.patch_nums, vocab_size=tok.vocab_size, token_dim=tok.z_channels,
                     text_dim=8, cond_drop_rate=0.5)
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(4, 3, dtype=torch.bool)
    batch = {"context": torch.randn(4, 3, 8, generator=g), "context_mask": mask,
             "tokens": [torch.randint(0, tok.vocab_size, (4, pn * pn), generator=g) for pn in tok.patch_nums]}
    null = TextFeatures(torch.randn(1, 3, 8, generator=g), torch.ones(1, 3, dtype=torch.bool), torch.randn(1, 8, generator=g))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(2)
        sharded_model, plain_model = STARForT2I(config), STARForT2I(config)
        plain_model.load_state_dict(sharded_model.state_dict())
        kept = config.grid.offsets[-2] + 20  # with STAR's token dropping: the kept set is drawn on the shards' device
        sharded, plain = (StarObjective(m, quantizer, null, drop_scale_length=kept) for m in (sharded_model, plain_model))
        wrapped = parallelize(sharded, ParallelConfig(strategy="fsdp"), torch.device("cpu"))
        assert is_sharded(sharded_model)
        optim = OptimizerConfig(lr=3e-3, weight_decay=0.0)
        opt_s, opt_p = build_optimizer(sharded_model, optim), build_optimizer(plain_model, optim)
        losses = []
        for step in range(3):
            def loss(module, b, step=step):  # the same CFG-dropout draws on both sides
                return module(b, step=step, generator=torch.Generator().manual_seed(step))

            a = train_step(wrapped, loss, [batch], opt_s, step=step, clip_grad_norm=1.0,
                           parameters=list(sharded_model.parameters()))
            b = train_step(plain, loss, [batch], opt_p, step=step, clip_grad_norm=1.0,
                           parameters=list(plain_model.parameters()))
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
            losses.append(a["loss"])
        assert len(set(losses)) == 3  # the steps moved the weights (same batch each step)
    finally:
        dist.destroy_process_group()
