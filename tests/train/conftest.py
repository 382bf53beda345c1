"""One intra-op thread for the training tests: the toy tensors are tiny, and with two pytest-xdist
workers on two cores, multi-threaded kernels spend more time contending than computing."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
