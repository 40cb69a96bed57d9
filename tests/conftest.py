"""Shared fixtures: seeded RNGs, bundled data sets loaded once per module."""

import numpy as np
import pytest
import torch

from ltroute.datasets import load_letter_lt, load_mnist_lt


@pytest.fixture(autouse=True)
def _seed_global_rngs():
    """Tests never depend on leftover global RNG state from other tests."""
    np.random.seed(0)  # noqa: NPY002 - resets the legacy global RNG that code under test may read
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def letter():
    """UCI Letter, long-tailed train (ratio 100: 'A' 500 ... 'Z' 5), balanced test."""
    return load_letter_lt()


@pytest.fixture(scope="module")
def mnist():
    """MNIST t10k, long-tailed train (625 ... 6), balanced test of 267 per class."""
    return load_mnist_lt()


@pytest.fixture(scope="module")
def small_letter(letter):
    """A fast subset of letter-LT: the 6 most and 4 least frequent classes."""
    keep = np.isin(letter.y_train, list("ABCDEFWXYZ"))
    test = np.isin(letter.y_test, list("ABCDEFWXYZ"))
    return letter.X_train[keep], letter.y_train[keep], letter.X_test[test], letter.y_test[test]
