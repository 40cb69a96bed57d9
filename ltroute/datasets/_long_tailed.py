"""Long-tailed class counts and long-tailed resampling of a labelled data set."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.utils import _safe_indexing, check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_consistent_length, check_scalar

__all__ = ["long_tailed_counts", "make_long_tailed"]

_PROFILES = ("exponential", "step")


def _floor_count(value: float) -> int:
    """Floor ``value`` as LDAM-DRW's ``int(...)`` does, robust to one-ulp misses.

    ``int(49 * (1 / 49))`` is 0 in floating point although the exact value is 1.
    When ``value`` is within 1e-12 (relative) of an integer, that integer is the
    exact result and is returned; otherwise this is ``int(value)``.  For CIFAR-10
    (``n_max=5000``) and CIFAR-100 (``n_max=500``) this equals LDAM-DRW's
    ``int(n_max * imb_factor ** (i / (C - 1)))`` for every integer ratio 1..1000.
    """
    nearest = round(value)
    if math.isclose(value, nearest, rel_tol=1e-12, abs_tol=0.0):
        return int(nearest)
    return int(value)


def _check_imbalance_ratio(imbalance_ratio: Any) -> float:
    check_scalar(imbalance_ratio, "imbalance_ratio", numbers.Real, min_val=1)
    if not math.isfinite(imbalance_ratio):
        raise ValueError(f"imbalance_ratio must be a finite number >= 1, got {imbalance_ratio!r}.")
    return float(imbalance_ratio)


def _check_profile(profile: Any) -> str:
    if not isinstance(profile, str) or profile not in _PROFILES:
        raise ValueError(f"profile must be one of {_PROFILES}, got {profile!r}.")
    return profile


def long_tailed_counts(
    n_max: int,
    n_classes: int,
    imbalance_ratio: float = 100,
    profile: str = "exponential",
) -> np.ndarray:
    """Number of samples per class of a long-tailed data set.

    Class ``i = 0 .. C-1`` (the head is ``i = 0``) gets

    - ``profile="exponential"``: ``n_i = floor(n_max * imbalance_ratio ** (-i / (C - 1)))``,
      the profile of CIFAR-10/100-LT (Cao et al., 2019) used by LDAM-DRW and RIDE;
    - ``profile="step"``: ``n_max`` for the first ``ceil(C / 2)`` classes and
      ``floor(n_max / imbalance_ratio)`` for the remaining ``floor(C / 2)``.

    Parameters
    ----------
    n_max : int
        Number of samples of the head class (class 0), at least 1.
    n_classes : int
        Number of classes ``C``, at least 1.
    imbalance_ratio : float, default=100
        Ratio between the head and the tail class counts, ``n_0 / n_{C-1}``, at
        least 1 (1 gives a balanced data set).  LDAM-DRW's ``imb_factor`` is
        ``1 / imbalance_ratio``.
    profile : {"exponential", "step"}, default="exponential"
        Shape of the decay from head to tail.

    Returns
    -------
    counts : ndarray of shape (n_classes,), dtype int64
        Non-increasing class counts, ``counts[0] == n_max``.

    Raises
    ------
    ValueError
        If a parameter is out of range, or if a class would get no sample
        (``n_max < imbalance_ratio``).

    Notes
    -----
    The exponential counts are computed in floating point exactly as LDAM-DRW does,
    ``int(n_max * (1 / imbalance_ratio) ** (i / (C - 1)))``, so that
    ``long_tailed_counts(500, 100, 100)`` gives the CIFAR-100-LT counts (10,847
    images) and ``long_tailed_counts(5000, 10, 100)`` the CIFAR-10-LT counts (12,406
    images).  One deviation: where the exact value is an integer but the float
    product lands one ulp below it (``49 * (1 / 49) == 0.999...``), the integer is
    returned instead of the integer below; this never happens for the CIFAR
    settings.

    With an odd number of classes the step profile gives the extra class to the
    head (LDAM-DRW's ``step`` drops it); one class gives ``[n_max]`` for both
    profiles.

    References
    ----------
    .. [1] K. Cao, C. Wei, A. Gaidon, N. Arechiga, T. Ma. "Learning Imbalanced
       Datasets with Label-Distribution-Aware Margin Loss", NeurIPS 2019.

    Examples
    --------
    >>> from ltroute.datasets import long_tailed_counts
    >>> counts = long_tailed_counts(500, 100, imbalance_ratio=100)
    >>> print(counts[:10], counts[-5:])
    [500 477 455 434 415 396 378 361 344 328] [6 5 5 5 5]
    >>> int(counts.sum())
    10847
    >>> print(long_tailed_counts(100, 5, imbalance_ratio=10, profile="step"))
    [100 100 100  10  10]
    """
    check_scalar(n_max, "n_max", numbers.Integral, min_val=1)
    check_scalar(n_classes, "n_classes", numbers.Integral, min_val=1)
    ratio = _check_imbalance_ratio(imbalance_ratio)
    _check_profile(profile)
    n_max, n_classes = int(n_max), int(n_classes)

    if n_classes == 1:
        return np.array([n_max], dtype=np.int64)
    if profile == "exponential":
        factor = 1.0 / ratio
        counts = [_floor_count(n_max * factor ** (i / (n_classes - 1))) for i in range(n_classes)]
    else:
        n_head = (n_classes + 1) // 2
        tail = _floor_count(n_max * (1.0 / ratio))
        counts = [n_max] * n_head + [tail] * (n_classes - n_head)
    counts = np.asarray(counts, dtype=np.int64)

    if counts.min() < 1:
        empty = np.flatnonzero(counts < 1)
        raise ValueError(
            f"long_tailed_counts(n_max={n_max}, n_classes={n_classes}, "
            f"imbalance_ratio={imbalance_ratio!r}, profile={profile!r}) gives no sample "
            f"to {empty.size} class(es) (first: class index {empty[0]}). The tail class "
            f"needs n_max / imbalance_ratio >= 1: increase n_max to at least "
            f"{math.ceil(ratio)} or lower imbalance_ratio to at most {n_max}."
        )
    return counts


def _check_class_order(class_order: Any, classes: np.ndarray) -> np.ndarray:
    """Positions in ``classes`` (sorted unique labels) of the labels in ``class_order``."""
    order = np.asarray(class_order)
    if order.ndim != 1:
        raise ValueError(
            f"class_order must be a 1-D sequence of class labels, got an array of "
            f"shape {order.shape}."
        )
    position = {label: k for k, label in enumerate(classes.tolist())}
    labels = order.tolist()
    positions = [position.get(label, -1) for label in labels]
    if len(labels) != classes.size or -1 in positions or len(set(positions)) != len(labels):
        missing = [c for c in position if c not in set(labels)]
        unknown = [c for c in labels if c not in position]
        raise ValueError(
            f"class_order must be a permutation of the class labels {list(position)}; "
            f"got {labels} (missing: {missing}, not labels: {unknown}, "
            f"length {len(labels)} instead of {classes.size})."
        )
    return np.asarray(positions, dtype=np.intp)


def _head_to_tail(available: np.ndarray, classes: np.ndarray, class_order: Any) -> np.ndarray:
    """Positions in ``classes`` from head to tail.

    By decreasing ``available`` count, ties broken by sorted label, unless
    ``class_order`` is given.
    """
    if class_order is not None:
        return _check_class_order(class_order, classes)
    return np.argsort(-available, kind="stable")


def _check_enough(
    needed: np.ndarray, available: np.ndarray, classes: np.ndarray, advice: str
) -> None:
    """Raise a ValueError naming every class that lacks the samples it needs."""
    short = np.flatnonzero(needed > available)
    if short.size:
        labels = classes.tolist()  # Python scalars: "class 'A'", "class 3"
        details = "; ".join(
            f"class {labels[k]!r} needs {needed[k]} but has {available[k]}" for k in short[:5]
        )
        more = f" (and {short.size - 5} more classes)" if short.size > 5 else ""
        raise ValueError(f"Not enough samples: {details}{more}. {advice}")


def make_long_tailed(
    X: Any,
    y: Any,
    *,
    imbalance_ratio: float = 100,
    profile: str = "exponential",
    n_max: int | None = None,
    class_order: Sequence[Any] | None = None,
    random_state: int | np.random.RandomState | None = None,
) -> tuple[Any, Any]:
    """Turn a data set into a long-tailed one by undersampling each class.

    The classes are ranked from head to tail and class ``i`` of that ranking keeps
    ``long_tailed_counts(n_max, C, imbalance_ratio, profile)[i]`` samples, drawn
    without replacement.  This is the long-tailed counterpart of imbalanced-learn's
    ``make_imbalance``.

    Parameters
    ----------
    X : {array-like, dataframe} of shape (n_samples, ...)
        Data; any number of dimensions (features ``(n, d)``, images ``(n, c, h, w)``),
        indexed along the first axis.  NumPy arrays, lists, sparse matrices and
        pandas objects are accepted and returned with the same type.
    y : array-like of shape (n_samples,)
        Class labels (integers, strings, ...).
    imbalance_ratio : float, default=100
        Ratio between the head and tail class counts, at least 1.
    profile : {"exponential", "step"}, default="exponential"
        Decay of the counts from head to tail; see :func:`long_tailed_counts`.
    n_max : int, default=None
        Number of samples kept for the head class.  ``None`` uses all the samples of
        the head class.
    class_order : array-like of shape (n_classes,), default=None
        The class labels from head to tail; must be a permutation of the labels of
        ``y``.  ``None`` ranks the classes by decreasing frequency in ``y``, ties
        broken by sorted label (so a balanced ``y`` gets the head at its smallest
        label, as in CIFAR-LT).
    random_state : int, RandomState instance or None, default=None
        Controls which samples are kept.  Pass an int for reproducible output.  The
        global NumPy random state is neither used nor changed.

    Returns
    -------
    X_res : {ndarray, dataframe, ...} of shape (n_samples_new, ...)
        The kept samples, in their original order (``X_res`` is ``X`` indexed by
        increasing row positions; pandas keeps the original index).
    y_res : {ndarray, series} of shape (n_samples_new,)
        Their labels.

    Raises
    ------
    ValueError
        If ``X`` and ``y`` have different lengths, ``class_order`` is not a
        permutation of the labels, a parameter is out of range, or a class has fewer
        samples than its long-tailed count.

    See Also
    --------
    long_tailed_counts : The counts used here.
    imblearn.datasets.make_imbalance : Undersampling to arbitrary class counts.

    Notes
    -----
    For each class the kept samples are the first ``n_i`` of a random permutation of
    its samples, the classes being visited in sorted label order; the result is then
    put back into the original row order.  Shuffle it yourself if the order
    matters.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.datasets import load_iris
    >>> from ltroute.datasets import make_long_tailed
    >>> X, y = load_iris(return_X_y=True)
    >>> print("before:", np.bincount(y))
    before: [50 50 50]
    >>> X_lt, y_lt = make_long_tailed(X, y, imbalance_ratio=10, random_state=0)
    >>> print("after: ", np.bincount(y_lt))
    after:  [50 15  5]
    >>> X_lt, y_lt = make_long_tailed(
    ...     X, y, imbalance_ratio=10, n_max=40, class_order=[2, 0, 1], random_state=0
    ... )
    >>> print("after, class 2 as head:", np.bincount(y_lt))
    after, class 2 as head: [12  4 40]
    """
    ratio = _check_imbalance_ratio(imbalance_ratio)
    _check_profile(profile)
    if n_max is not None:
        check_scalar(n_max, "n_max", numbers.Integral, min_val=1)
    y_arr = np.asarray(y)
    if y_arr.ndim != 1:
        raise ValueError(f"y must be 1-D of shape (n_samples,), got shape {y_arr.shape}.")
    check_consistent_length(X, y_arr)
    check_classification_targets(y_arr)
    rng = check_random_state(random_state)

    classes, y_idx = np.unique(y_arr, return_inverse=True)
    available = np.bincount(y_idx, minlength=classes.size)
    head_to_tail = _head_to_tail(available, classes, class_order)
    if n_max is None:
        n_max = int(available[head_to_tail[0]])
    counts = long_tailed_counts(n_max, classes.size, ratio, profile)
    needed = np.empty(classes.size, dtype=np.int64)
    needed[head_to_tail] = counts
    _check_enough(
        needed,
        available,
        classes,
        "Lower n_max or imbalance_ratio, or put the class nearer the tail with class_order.",
    )

    keep = [rng.permutation(np.flatnonzero(y_idx == k))[: needed[k]] for k in range(classes.size)]
    keep = np.sort(np.concatenate(keep))
    return _safe_indexing(X, keep, axis=0), _safe_indexing(y, keep, axis=0)


def make_long_tailed_classification(
    n_samples: int,
    *,
    n_features: int = 32,
    n_informative: int = 16,
    n_classes: int = 20,
    imbalance_ratio: float = 100,
    random_state: int | None = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic float32 features whose labels follow an exponential long tail.

    :func:`sklearn.datasets.make_classification` (one cluster per class) with class
    weights proportional to :func:`long_tailed_counts`; used by the scaling and asv
    benchmarks, where the sample count must be free.

    Parameters
    ----------
    n_samples : int
        Number of rows.
    n_features, n_informative : int, default=32, 16
        As in ``make_classification``.
    n_classes : int, default=20
        Number of classes; class ``0`` is the most frequent.
    imbalance_ratio : float, default=100
        Frequency of the head class over that of the tail class.
    random_state : int or None, default=0
        Seed of ``make_classification``.

    Returns
    -------
    X : ndarray of shape (n_samples, n_features), float32
    y : ndarray of shape (n_samples,), int

    Examples
    --------
    >>> from ltroute.datasets import make_long_tailed_classification
    >>> X, y = make_long_tailed_classification(2000, n_classes=5, imbalance_ratio=10)
    >>> X.dtype, X.shape, bool((np.bincount(y)[0] > 5 * np.bincount(y)[-1]))
    (dtype('float32'), (2000, 32), True)
    """
    from sklearn.datasets import make_classification

    counts = long_tailed_counts(1000, n_classes, imbalance_ratio).astype(float)
    X, y = make_classification(n_samples=n_samples, n_features=n_features,
                               n_informative=n_informative, n_classes=n_classes,
                               n_clusters_per_class=1, weights=counts / counts.sum(),
                               random_state=random_state)
    return X.astype(np.float32), y
