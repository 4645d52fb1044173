"""Fixtures for the quant tests; helpers live in quant_testing.py."""

import pytest
import torch
import torch.nn as nn

from quant_testing import small_net as _small_net


@pytest.fixture
def small_net() -> nn.Module:
    return _small_net()


@pytest.fixture
def one_thread():
    """One torch thread for the test: on tiny problems a second thread adds only
    synchronization, which on a busy shared machine costs several times the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
