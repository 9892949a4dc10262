"""Fixtures shared by the model-library tests.

- `one_torch_thread` (autouse): one intra-op thread per test module.
- `make_transformer` / `make_transformer_batch`: factories of a tiny `HARTForT2I` with every path
  contributing to its outputs, and of a matching (context, mask, teacher-forcing input) batch.
- `tiny_task`: a small embedding + blocks + head network with its cross-entropy loss and batches,
  for the training-loop, checkpoint and parallelisation tests.
"""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from hart.config import TRANSFORMER_PRESETS


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One intra-op thread: tiny ops on a shared 2-core machine spend more time in OpenMP
    hand-offs than in math (measured 10-50x slower with 2 threads under load)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --------------------------------------------------------------------------------------
# A tiny HART transformer
# --------------------------------------------------------------------------------------


def _make_transformer(config=TRANSFORMER_PRESETS["tiny"], seed=0):
    from hart.transformer.model import HARTForT2I

    torch.manual_seed(seed)
    model = HARTForT2I(config)
    model.init_weights()
    # Non-trivial gammas/biases so every path contributes to the outputs.
    with torch.no_grad():
        for block in model.blocks:
            if hasattr(block, "ada_lin"):
                block.ada_lin[-1].bias.normal_(0, 0.3)
            block.attn.q_bias.normal_(0, 0.1)
            if block.cross_attn is not None:
                block.cross_attn.proj.weight.normal_(0, 0.05)
    return model.eval()


def _make_transformer_batch(config=TRANSFORMER_PRESETS["tiny"], B=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(B, config.context_token, config.context_dim, generator=g)
    mask = torch.ones(B, config.context_token, dtype=torch.bool)
    mask[1, 5:] = False  # right padding
    tf = torch.randn(B, config.num_image_tokens() - 1, config.token_dim, generator=g)
    return ctx, mask, tf


@pytest.fixture
def make_transformer():
    """`make_transformer(config=tiny, seed=0)`: an initialised HARTForT2I in eval mode."""
    return _make_transformer


@pytest.fixture
def make_transformer_batch():
    """`make_transformer_batch(config=tiny, B=2, seed=1)`: (context, mask with a padded row, teacher forcing)."""
    return _make_transformer_batch


# --------------------------------------------------------------------------------------
# A tiny training task
# --------------------------------------------------------------------------------------


class TinyNet(nn.Module):
    """Embedding + blocks + head: enough structure for the param-group and wrapper rules."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(10, 8)
        self.pos_start = nn.Parameter(torch.zeros(1, 1, 8))
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8)) for _ in range(2))
        self.head = nn.Linear(8, 10)
        self.register_buffer("counter", torch.zeros(3))

    def forward(self, idx_BL):
        x_BLC = self.embedding(idx_BL) + self.pos_start
        for block in self.blocks:
            x_BLC = x_BLC + block(x_BLC)
        return self.head(x_BLC)


def _ce_loss(model, batch):
    logits = model(batch["x"])
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), batch["y"].flatten())
    return {"loss": loss, "ce": loss.detach()}


def _token_batch(seed=0, size=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 10, (size, 5), generator=g)
    return {"x": x, "y": (x + 1) % 10}


@pytest.fixture
def tiny_task():
    """`.Net` (the TinyNet class), `.loss(model, batch)` (cross-entropy metrics) and
    `.batch(seed=0, size=8)` (tokens x -> targets (x + 1) mod 10)."""
    return SimpleNamespace(Net=TinyNet, loss=_ce_loss, batch=_token_batch)
