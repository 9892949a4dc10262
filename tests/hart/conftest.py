"""Fixtures shared by the model-library tests."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One intra-op thread: tiny ops on a shared 2-core machine spend more time in OpenMP
    hand-offs than in math (measured 10-50x slower with 2 threads under load)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
