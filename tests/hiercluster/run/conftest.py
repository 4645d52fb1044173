"""Fixtures shared by the run tests."""

from __future__ import annotations

import pytest

from hiercluster.cli import main


@pytest.fixture(scope="session")
def trained_digits(tmp_path_factory):
    """A resnet8 trained 4 epochs on digits (about 87% test accuracy), once per test session."""
    out = tmp_path_factory.mktemp("digits-ckpt") / "r8.pt"
    assert main(["train", "configs/digits.yaml", "--out", str(out), "--set", "train.epochs=4"]) == 0
    return out
