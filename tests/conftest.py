"""Shared fixtures: seeded RNGs, bundled data sets loaded once per module."""

import os

# scikit-learn's common checks skip two array-API checks unless SciPy is told to
# support the array API, which must happen before SciPy is first imported.
os.environ.setdefault("SCIPY_ARRAY_API", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

# Without CUDA the Triton kernel tests (test_fusion_kernel.py) run in Triton's interpreter,
# which Triton switches on when it is first imported; importing ltroute already imports
# triton (through torch.utils.flop_counter), so this must precede the ltroute import below.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ltroute.datasets import load_letter_lt, load_mnist_lt  # noqa: E402


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


def process_reports(out: str) -> list[tuple[str, str]]:
    """``("process i/n", payload)`` for each ``process i/n: payload`` report in ``out``,
    sorted: two processes printing to one pipe at once can run their lines together
    (``...201.92process 1/2: ...``), so a report ends at a newline or the next report."""
    import re

    found = re.findall(r"(process \d+/\d+):(.*?)(?=process \d+/\d+:|\n|$)", out)
    return sorted((name, payload.strip()) for name, payload in found)
