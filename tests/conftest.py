from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(2)
os.environ.setdefault("CURVINF_PROGRESS", "0")  # bars are tested explicitly


@pytest.fixture(params=["ce", "mse"])
def kind(request) -> str:
    return request.param
