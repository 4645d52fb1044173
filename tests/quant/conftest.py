"""Fixtures for the quant tests; helpers live in quant_testing.py."""

import pytest
import torch.nn as nn

from quant_testing import small_net as _small_net


@pytest.fixture
def small_net() -> nn.Module:
    return _small_net()
