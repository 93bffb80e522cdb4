"""Fixtures for the trainer tests."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: intra-op threads cost far more than they give (20 ms vs 1.5 ms a gated-RNN step on 2 cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
