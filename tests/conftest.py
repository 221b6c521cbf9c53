from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(params=["ce", "mse"])
def kind(request) -> str:
    return request.param
