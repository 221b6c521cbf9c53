from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(2)
os.environ.setdefault("CURVINF_PROGRESS", "0")  # bars are tested explicitly


@pytest.fixture
def one_torch_thread():
    """One torch thread inside the test (small models: faster, far faster on a loaded
    machine), the thread count restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=["ce", "mse"])
def kind(request) -> str:
    return request.param
