"""Long-tailed versions of small real data sets that ship with ltroute or scikit-learn."""

from __future__ import annotations

import functools
import gzip
import hashlib
import numbers
from collections.abc import Sequence
from importlib import resources
from typing import Any

import numpy as np
from sklearn.utils import Bunch, check_random_state
from sklearn.utils.validation import check_scalar

from ltroute.datasets._long_tailed import (
    _check_class_order,
    _check_enough,
    long_tailed_counts,
)

__all__ = ["load_digits_lt", "load_letter_lt", "load_mnist_lt"]

_PACKAGE = "ltroute.datasets"

# MD5 of the files in ``ltroute/datasets/data`` (the MNIST ones are the published ones).
_MD5 = {
    "letter-recognition.data.gz": "75b88a84127488d5c526bf7a7f5a07c9",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}

# Attribute names of the UCI documentation, in column order after the letter.
_LETTER_FEATURES = (
    "x-box", "y-box", "width", "high", "onpix", "x-bar", "y-bar", "x2bar",
    "y2bar", "xybar", "x2ybr", "xy2br", "x-ege", "xegvy", "y-ege", "yegvx",
)  # fmt: skip


# ----------------------------------------------------------------------------------------
# Reading the packaged files
# ----------------------------------------------------------------------------------------
def _read_packaged(name: str) -> bytes:
    """Decompressed bytes of ``data/<name>``, after checking its MD5."""
    raw = (resources.files(_PACKAGE) / "data" / name).read_bytes()
    digest = hashlib.md5(raw, usedforsecurity=False).hexdigest()
    if digest != _MD5[name]:
        raise RuntimeError(
            f"The bundled data file {name!r} is corrupted (MD5 {digest}, expected "
            f"{_MD5[name]}). Reinstall ltroute."
        )
    return gzip.decompress(raw)


def _read_descr(name: str) -> str:
    return (resources.files(_PACKAGE) / "descr" / name).read_text(encoding="utf-8")


def _read_only(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    for array in arrays:
        array.flags.writeable = False
    return arrays


@functools.lru_cache(maxsize=1)
def _letter_data() -> tuple[np.ndarray, np.ndarray]:
    """All 20,000 rows: features (uint8, 16 columns) and letters (str)."""
    lines = _read_packaged("letter-recognition.data.gz").decode("ascii").splitlines()
    rows = np.array([line.split(",") for line in lines[1:] if line])  # line 0 is a header
    if rows.shape != (20000, 17):
        raise RuntimeError(f"Unexpected shape {rows.shape} of the bundled letter data.")
    return _read_only(rows[:, 1:].astype(np.uint8), rows[:, 0].astype("<U1"))


def _idx_array(name: str, magic: int, header_len: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """Payload and dimensions of an IDX file (big-endian int32 header)."""
    data = _read_packaged(name)
    header = np.frombuffer(data[:header_len], dtype=">i4")
    if header[0] != magic:
        raise RuntimeError(f"{name} is not an IDX file with magic number {magic}.")
    return np.frombuffer(data[header_len:], dtype=np.uint8), tuple(int(d) for d in header[1:])


@functools.lru_cache(maxsize=1)
def _mnist_t10k() -> tuple[np.ndarray, np.ndarray]:
    """MNIST t10k: images (10000, 1, 28, 28) uint8 and labels (10000,) int64."""
    pixels, (n, height, width) = _idx_array("t10k-images-idx3-ubyte.gz", 2051, 16)
    labels, (n_labels,) = _idx_array("t10k-labels-idx1-ubyte.gz", 2049, 8)
    if n != n_labels or pixels.size != n * height * width:
        raise RuntimeError("The bundled MNIST image and label files do not match.")
    return _read_only(pixels.reshape(n, 1, height, width), labels.astype(np.int64))


# ----------------------------------------------------------------------------------------
# The split shared by all loaders
# ----------------------------------------------------------------------------------------
def _balanced_test_longtailed_train(
    y: np.ndarray,
    *,
    n_test_per_class: int,
    n_max: int,
    imbalance_ratio: float,
    profile: str,
    class_order: Sequence[Any] | None,
    random_state: Any,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Row indices of a balanced test split and a disjoint long-tailed train split.

    For each class, in sorted label order, the class's rows are permuted with
    ``random_state``; the first ``n_test_per_class`` go to the test split, the next
    ``counts[rank]`` to the train split, where ``rank`` is the class's position in
    ``class_order`` (default: sorted labels, head first).  The test split therefore
    depends only on ``random_state`` and ``n_test_per_class``, and a class's train
    rows at a larger count contain those at a smaller one.

    Returns
    -------
    train_indices, test_indices : ndarray of int64, increasing
    classes : ndarray, the sorted labels
    train_counts : ndarray of int64 aligned with ``classes``
    """
    check_scalar(n_test_per_class, "n_test_per_class", numbers.Integral, min_val=1)
    rng = check_random_state(random_state)
    classes, y_idx = np.unique(y, return_inverse=True)
    available = np.bincount(y_idx, minlength=classes.size)
    counts = long_tailed_counts(n_max, classes.size, imbalance_ratio, profile)
    if class_order is None:
        ranks = np.arange(classes.size)
    else:
        ranks = _check_class_order(class_order, classes)
    train_counts = np.empty(classes.size, dtype=np.int64)
    train_counts[ranks] = counts
    _check_enough(
        train_counts + n_test_per_class,
        available,
        classes,
        "The numbers are n_test_per_class + the class's train count: lower n_max, "
        "imbalance_ratio or n_test_per_class, or move the class towards the tail.",
    )
    train, test = [], []
    for k in range(classes.size):
        rows = rng.permutation(np.flatnonzero(y_idx == k))
        test.append(rows[:n_test_per_class])
        train.append(rows[n_test_per_class : n_test_per_class + train_counts[k]])
    train_indices = np.sort(np.concatenate(train)).astype(np.int64)
    test_indices = np.sort(np.concatenate(test)).astype(np.int64)
    return train_indices, test_indices, classes, train_counts


def _load_split(
    X: np.ndarray,
    y: np.ndarray,
    *,
    to_float: Any,
    descr: str,
    extra: dict[str, Any],
    **split_kwargs: Any,
) -> Bunch:
    """Split the source rows ``X, y`` and pack the result in a Bunch.

    ``to_float`` converts the selected rows of ``X`` only, so that a loader never
    materialises the whole source as float32.
    """
    train, test, classes, counts = _balanced_test_longtailed_train(y, **split_kwargs)
    return Bunch(
        X_train=to_float(X[train]),
        y_train=y[train],
        X_test=to_float(X[test]),
        y_test=y[test],
        classes=classes,
        class_counts=dict(zip(classes.tolist(), counts.tolist(), strict=True)),
        train_indices=train,
        test_indices=test,
        target_names=classes.copy(),
        **extra,
        DESCR=descr,
    )


def _as_float32(X: np.ndarray) -> np.ndarray:
    return X.astype(np.float32)


def _as_unit_float32(X: np.ndarray) -> np.ndarray:
    return X.astype(np.float32) / np.float32(255)


_SHARED_PARAMETERS = """imbalance_ratio : float, default=100
        Ratio between the head and tail training counts, at least 1.
    profile : {{"exponential", "step"}}, default="exponential"
        Decay of the training counts; see :func:`~ltroute.datasets.long_tailed_counts`.
    n_max : int, default={n_max}
        Number of training samples of the head class.
    n_test_per_class : int, default={n_test}
        Number of test samples of every class.
    class_order : array-like of shape (n_classes,), default=None
        Class labels from head to tail (a permutation of ``{classes}``).  ``None``
        means sorted label order, head ``{head}``, as CIFAR-LT uses label-index order.
    random_state : int, RandomState instance or None, default=0
        Seed of the split.  The test split depends only on ``random_state`` and
        ``n_test_per_class``, not on the imbalance parameters."""

_RETURNS = """data : :class:`~sklearn.utils.Bunch`
        Dictionary-like object with the attributes:

        X_train, X_test : ndarray of float32
            {x_desc}
        y_train, y_test : ndarray of {y_dtype}
            Labels.
        classes : ndarray of shape (n_classes,)
            The sorted labels.
        class_counts : dict
            Training count of every label, ``{{label: count}}`` in ``classes`` order;
            pass it to the shot-group metrics of :mod:`ltroute.metrics`.
        train_indices, test_indices : ndarray of int64
            Increasing positions of the rows of the two (disjoint) splits in
            {source}.
        target_names : ndarray of shape (n_classes,)
            Same as ``classes``.{extra}
        DESCR : str
            Description of the data set, its long-tailed split and its licence."""


def _doc(template: str, **kwargs: Any) -> str:
    return template.format(**kwargs)


# ----------------------------------------------------------------------------------------
# Public loaders
# ----------------------------------------------------------------------------------------
def load_letter_lt(
    *,
    imbalance_ratio: float = 100,
    profile: str = "exponential",
    n_max: int = 500,
    n_test_per_class: int = 200,
    class_order: Sequence[Any] | None = None,
    random_state: int | np.random.RandomState | None = 0,
) -> Bunch:
    """Load a long-tailed split of the UCI Letter Recognition data set.

    20,000 capital letters (26 classes, 734 to 813 per class), each described by 16
    integer features in 0..15.  Per class, ``n_test_per_class`` rows form a balanced
    test split; the training split takes
    ``long_tailed_counts(n_max, 26, imbalance_ratio, profile)`` rows per class from
    the remaining ones.  The defaults mirror CIFAR-100-LT (head 500, tail 5): 2,935
    training rows (500 for ``"A"`` down to 5 for ``"Z"``) and 5,200 test rows.

    Labels are the letters as strings, features the raw integers as float32 (scale
    them, e.g. with a ``StandardScaler`` in a ``Pipeline``).

    Parameters
    ----------
    {parameters}

    Returns
    -------
    {returns}

    Examples
    --------
    >>> from ltroute.datasets import load_letter_lt
    >>> data = load_letter_lt()
    >>> data.X_train.shape, data.X_test.shape
    ((2935, 16), (5200, 16))
    >>> data.class_counts["A"], data.class_counts["Z"]
    (500, 5)
    """
    X, y = _letter_data()
    return _load_split(
        X,
        y,
        to_float=_as_float32,
        descr=_read_descr("letter_lt.rst"),
        extra=dict(feature_names=list(_LETTER_FEATURES)),
        n_test_per_class=n_test_per_class,
        n_max=n_max,
        imbalance_ratio=imbalance_ratio,
        profile=profile,
        class_order=class_order,
        random_state=random_state,
    )


def load_mnist_lt(
    *,
    imbalance_ratio: float = 100,
    profile: str = "exponential",
    n_max: int = 625,
    n_test_per_class: int = 267,
    class_order: Sequence[Any] | None = None,
    random_state: int | np.random.RandomState | None = 0,
) -> Bunch:
    """Load a long-tailed split of the MNIST t10k handwritten digits.

    The 10,000 MNIST test images (10 classes, 892 to 1,135 per class) as
    ``(n, 1, 28, 28)`` float32 images in [0, 1].  Per class, ``n_test_per_class``
    images form a balanced test split; the training split takes
    ``long_tailed_counts(n_max, 10, imbalance_ratio, profile)`` images per class from
    the remaining ones.  The defaults use all of the smallest class
    (267 + 625 = 892 images of digit 5) and give the split on which the RIDE
    specification was measured: 1,547 training images (625, 374, 224, 134, 80, 48,
    29, 17, 10, 6 for digits 0 .. 9) and a balanced test split of 2,670.

    Parameters
    ----------
    {parameters}

    Returns
    -------
    {returns}

    Examples
    --------
    >>> from ltroute.datasets import load_mnist_lt
    >>> data = load_mnist_lt()
    >>> data.X_train.shape, data.X_test.shape
    ((1547, 1, 28, 28), (2670, 1, 28, 28))
    >>> print(list(data.class_counts.values()))
    [625, 374, 224, 134, 80, 48, 29, 17, 10, 6]
    """
    images, labels = _mnist_t10k()
    return _load_split(
        images,
        labels,
        to_float=_as_unit_float32,
        descr=_read_descr("mnist_lt.rst"),
        extra={},
        n_test_per_class=n_test_per_class,
        n_max=n_max,
        imbalance_ratio=imbalance_ratio,
        profile=profile,
        class_order=class_order,
        random_state=random_state,
    )


def load_digits_lt(
    *,
    imbalance_ratio: float = 100,
    profile: str = "exponential",
    n_max: int = 120,
    n_test_per_class: int = 50,
    class_order: Sequence[Any] | None = None,
    random_state: int | np.random.RandomState | None = 0,
) -> Bunch:
    """Load a long-tailed split of scikit-learn's 8x8 handwritten digits.

    The 1,797 images of :func:`sklearn.datasets.load_digits` (10 classes, 174 to 183
    per class) as 64 float32 features in 0..16.  Per class, ``n_test_per_class``
    images form a balanced test split; the training split takes
    ``long_tailed_counts(n_max, 10, imbalance_ratio, profile)`` images per class from
    the remaining ones.  The defaults give 294 training images (120, 71, 43, 25, 15,
    9, 5, 3, 2, 1 for digits 0 .. 9) and a balanced test split of 500: a data set
    small enough for examples and tests.

    Parameters
    ----------
    {parameters}

    Returns
    -------
    {returns}

    Examples
    --------
    >>> from ltroute.datasets import load_digits_lt
    >>> data = load_digits_lt()
    >>> data.X_train.shape, data.X_test.shape
    ((294, 64), (500, 64))
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    return _load_split(
        digits.data,
        digits.target.astype(np.int64),
        to_float=_as_float32,
        descr=_read_descr("digits_lt.rst"),
        extra=dict(feature_names=list(digits.feature_names)),
        n_test_per_class=n_test_per_class,
        n_max=n_max,
        imbalance_ratio=imbalance_ratio,
        profile=profile,
        class_order=class_order,
        random_state=random_state,
    )


def _fill_docstrings() -> None:
    specs = {
        load_letter_lt: dict(
            n_max=500, n_test=200, classes='"A" .. "Z"', head='"A"', y_dtype="str",
            x_desc="Features of shape (n, 16), integers 0..15.",
            source="the 20,000 data rows of the UCI file",
            extra="\n        feature_names : list of str\n            The UCI attribute names.",
        ),
        load_mnist_lt: dict(
            n_max=625, n_test=267, classes="0 .. 9", head="0", y_dtype="int64",
            x_desc="Images of shape (n, 1, 28, 28), values in [0, 1].",
            source="the 10,000 MNIST t10k images", extra="",
        ),
        load_digits_lt: dict(
            n_max=120, n_test=50, classes="0 .. 9", head="0", y_dtype="int64",
            x_desc="Features of shape (n, 64), integers 0..16.",
            source="the output of :func:`sklearn.datasets.load_digits`",
            extra="\n        feature_names : list of str\n            "
            "``pixel_<row>_<col>``, as in scikit-learn.",
        ),
    }  # fmt: skip
    for func, spec in specs.items():
        if func.__doc__ is None:  # python -OO
            continue
        func.__doc__ = func.__doc__.format(
            parameters=_doc(_SHARED_PARAMETERS, **spec),
            returns=_doc(_RETURNS, **spec),
        )


_fill_docstrings()
