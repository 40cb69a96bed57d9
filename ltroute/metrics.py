"""Metrics for long-tailed classification: shot groups, group accuracy, report, scorers.

Classes are split by their number of *training* samples ``n_c`` into three shot groups
(Liu et al., 2019):

- ``"many"``: ``n_c > many_threshold`` (100 by default),
- ``"medium"``: ``few_threshold <= n_c <= many_threshold`` (20 to 100 by default),
- ``"few"``: ``n_c < few_threshold`` (20 by default).

The accuracy of a group is the mean of the per-class accuracies (recalls) of the classes of
that group that appear in ``y_true``. Functions named ``*_accuracy`` return a score to
maximize; the scorers are ``(estimator, X, y)`` callables that read the training class
counts from the fitted estimator's ``class_counts_``.

Every function takes ``class_counts`` in one of two forms:

- a mapping ``label -> training count`` (a ``dict``, a ``collections.Counter``, a pandas
  ``Series``); ``classes`` then selects and orders labels among its keys;
- an array-like of counts aligned with ``classes``; ``classes`` defaults to
  ``0, 1, ..., n_classes - 1``.
"""

import numbers
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.pipeline import Pipeline
from sklearn.utils.validation import check_is_fitted, check_scalar, column_or_1d

__all__ = [
    "EmptyGroupWarning",
    "shot_groups",
    "group_accuracy",
    "many_shot_accuracy",
    "medium_shot_accuracy",
    "few_shot_accuracy",
    "expected_calibration_error",
    "long_tail_report",
    "make_shot_scorer",
    "many_shot_scorer",
    "medium_shot_scorer",
    "few_shot_scorer",
]

_GROUPS = ("many", "medium", "few")
_SCORER_GROUPS = (*_GROUPS, "overall", "balanced")


class EmptyGroupWarning(UndefinedMetricWarning):
    """Warning raised when a shot group has no class that appears in ``y_true``.

    The accuracy of such a group is undefined and reported as ``nan``. This is a subclass
    of :class:`sklearn.exceptions.UndefinedMetricWarning` (itself a ``UserWarning``), so
    filters written for scikit-learn's undefined metrics apply to it too.
    """


# --------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------


def _check_thresholds(many_threshold: int, few_threshold: int) -> None:
    for name, value in (("many_threshold", many_threshold), ("few_threshold", few_threshold)):
        if isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {value!r}.")
        check_scalar(value, name, target_type=numbers.Integral, min_val=0)
    if few_threshold > many_threshold + 1:
        raise ValueError(
            f"few_threshold must be <= many_threshold + 1 so that the groups do not "
            f"overlap; got few_threshold={few_threshold} and many_threshold={many_threshold}."
        )


def _as_labels(values: Any, name: str) -> np.ndarray:
    """1-D array of class labels; refuses a mix of strings and numbers."""
    # Check the raw values: numpy would silently turn [0, "b"] into ["0", "b"].
    raw = values.tolist() if hasattr(values, "tolist") else values
    if np.ndim(raw) == 1:
        is_str = [isinstance(label, str) for label in raw]
        if any(is_str) and not all(is_str):
            raise ValueError(f"{name} mixes string and non-string labels: {list(raw)}.")
    labels = np.asarray(values)
    if labels.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got an array of shape {labels.shape}.")
    if len(set(labels.tolist())) != len(labels):
        raise ValueError(f"{name} contains duplicate labels: {labels.tolist()}.")
    return labels


def _check_class_counts(class_counts: Any, classes: Any) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(classes, counts)``: two aligned 1-D arrays, counts as int64."""
    if isinstance(class_counts, Mapping) or hasattr(class_counts, "items"):
        pairs = list(class_counts.items())
        keys = _as_labels([key for key, _ in pairs], "the keys of class_counts")
        values = [value for _, value in pairs]
        if classes is None:
            classes, raw = keys, values
        else:
            classes = _as_labels(classes, "classes")
            lookup = dict(zip(keys.tolist(), values, strict=True))
            missing = [label for label in classes.tolist() if label not in lookup]
            if missing:
                raise ValueError(
                    f"classes contains labels that are not keys of class_counts: {missing}."
                )
            raw = [lookup[label] for label in classes.tolist()]
    else:
        raw = class_counts

    counts = np.asarray(raw)
    if counts.ndim != 1:
        raise ValueError(
            f"class_counts must be a mapping or a 1-D array of counts, got shape {counts.shape}."
        )
    if counts.size == 0:
        raise ValueError("class_counts is empty; at least one class is needed.")
    if classes is None:
        classes = np.arange(len(counts))
    else:
        classes = _as_labels(classes, "classes")
        if len(classes) != len(counts):
            raise ValueError(
                f"class_counts has {len(counts)} entries but classes has {len(classes)}; "
                "an array of counts must be aligned with classes."
            )
    if counts.dtype.kind == "O" and all(
            isinstance(c, numbers.Integral) and not isinstance(c, bool) for c in counts):
        counts = _as_int64_counts(counts, classes)  # Python ints beyond 64 bits
    if counts.dtype.kind not in "iuf":
        raise TypeError(f"class_counts must hold numbers, got dtype {counts.dtype}.")
    if not np.all(np.isfinite(counts)) or np.any(counts != np.round(counts)):
        raise ValueError(f"class_counts must hold whole numbers, got {counts.tolist()}.")
    if np.any(counts < 0):
        negative = classes[counts < 0].tolist()
        raise ValueError(f"class_counts must be non-negative; negative for classes {negative}.")
    # int64 holds counts below 2**63; a larger one would wrap round to a negative count.
    too_large = (counts >= 2.0**63) if counts.dtype.kind == "f" else (
        counts > np.iinfo(np.int64).max)
    if np.any(too_large):
        _raise_too_large(classes[too_large].tolist())
    return classes, counts.astype(np.int64)


def _raise_too_large(labels: list) -> None:
    raise ValueError(f"class_counts must be below 2**63 (they are stored as int64); too "
                     f"large for classes {labels}.")


def _as_int64_counts(counts: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Object array of Python ints as int64, refusing values outside [0, 2**63)."""
    values = counts.tolist()
    negative = [label for label, c in zip(classes.tolist(), values, strict=True) if c < 0]
    if negative:
        raise ValueError(f"class_counts must be non-negative; negative for classes {negative}.")
    too_large = [label for label, c in zip(classes.tolist(), values, strict=True)
                 if c >= 2**63]
    if too_large:
        _raise_too_large(too_large)
    return np.asarray(values, dtype=np.int64)


def _check_targets(y_true: ArrayLike, y_pred: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y_true = column_or_1d(y_true)
    y_pred = column_or_1d(y_pred)
    if len(y_true) != len(y_pred):
        raise ValueError(
            f"y_true and y_pred have different lengths: {len(y_true)} and {len(y_pred)}."
        )
    if len(y_true) == 0:
        raise ValueError("y_true and y_pred are empty; at least one sample is needed.")
    return y_true, y_pred


def _encode(y: np.ndarray, index: dict, name: str) -> np.ndarray:
    """Positions of the labels of ``y`` in ``classes``; unknown labels raise."""
    try:
        uniques, inverse = np.unique(y, return_inverse=True)
    except TypeError as exc:
        raise ValueError(f"{name} mixes label types that cannot be compared.") from exc
    unknown = [label for label in uniques.tolist() if label not in index]
    if unknown:
        raise ValueError(
            f"{name} contains labels that are not in classes (or class_counts): {unknown}."
        )
    codes = np.array([index[label] for label in uniques.tolist()], dtype=np.intp)
    return codes[inverse.reshape(-1)]


def _group_masks(counts: np.ndarray, many_threshold: int, few_threshold: int) -> dict:
    many = counts > many_threshold
    few = counts < few_threshold
    return {"many": many, "medium": ~many & ~few, "few": few}


def _group_rule(group: str, many_threshold: int, few_threshold: int) -> str:
    return {
        "many": f"n > {many_threshold}",
        "medium": f"{few_threshold} <= n <= {many_threshold}",
        "few": f"n < {few_threshold}",
    }[group]


class _ClassStats:
    """Validated inputs and per-class counts shared by every metric of this module."""

    def __init__(self, y_true, y_pred, class_counts, classes, many_threshold, few_threshold):
        _check_thresholds(many_threshold, few_threshold)
        self.classes, self.counts = _check_class_counts(class_counts, classes)
        y_true, y_pred = _check_targets(y_true, y_pred)
        index = {label: i for i, label in enumerate(self.classes.tolist())}
        true_codes = _encode(y_true, index, "y_true")
        pred_codes = _encode(y_pred, index, "y_pred")

        n_classes = len(self.classes)
        hits = true_codes == pred_codes
        self.support = np.bincount(true_codes, minlength=n_classes)
        self.n_predicted = np.bincount(pred_codes, minlength=n_classes)
        self.n_correct = np.bincount(true_codes[hits], minlength=n_classes)
        self.accuracy = float(np.mean(hits))
        self.present = self.support > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            self.recall = np.where(self.present, self.n_correct / self.support, np.nan)
            self.precision = np.where(
                self.n_predicted > 0, self.n_correct / self.n_predicted, np.nan
            )
        self.many_threshold = many_threshold
        self.few_threshold = few_threshold
        self.masks = _group_masks(self.counts, many_threshold, few_threshold)

    def group_accuracy(self, group: str) -> float:
        """Mean recall over the classes of ``group`` present in y_true; nan if none."""
        evaluated = self.masks[group] & self.present
        if not evaluated.any():
            rule = _group_rule(group, self.many_threshold, self.few_threshold)
            warnings.warn(
                f"No class of the {group!r} group ({rule}) appears in y_true "
                f"({int(self.masks[group].sum())} class(es) of class_counts are in that "
                "group); its accuracy is undefined and set to nan.",
                EmptyGroupWarning,
                stacklevel=3,
            )
            return float("nan")
        return float(np.mean(self.recall[evaluated]))

    def balanced_accuracy(self) -> float:
        return float(np.mean(self.recall[self.present]))


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------


def shot_groups(
    class_counts: Mapping | ArrayLike,
    *,
    classes: ArrayLike | None = None,
    many_threshold: int = 100,
    few_threshold: int = 20,
) -> dict[str, np.ndarray]:
    """Split classes into many-, medium- and few-shot groups by their training counts.

    Parameters
    ----------
    class_counts : mapping or array-like of shape (n_classes,)
        Number of training samples of each class: a mapping ``label -> count`` (``dict``,
        pandas ``Series``) or an array of counts aligned with ``classes``.

    classes : array-like of shape (n_classes,), default=None
        Class labels. With an array of counts, defaults to ``0, ..., n_classes - 1``; with a
        mapping, defaults to its keys, and otherwise selects and orders labels among them.

    many_threshold : int, default=100
        Classes with strictly more training samples are many-shot.

    few_threshold : int, default=20
        Classes with strictly fewer training samples are few-shot. Must not exceed
        ``many_threshold + 1``.

    Returns
    -------
    groups : dict of str to ndarray
        Keys ``"many"``, ``"medium"``, ``"few"`` in that order, each the labels of that
        group in the order of ``classes``. A group may be empty.

    See Also
    --------
    group_accuracy : Accuracy of each group.

    Notes
    -----
    The split follows Liu et al. (2019) and the evaluation code of RIDE: many-shot when
    ``n_c > many_threshold``, few-shot when ``n_c < few_threshold``, medium-shot otherwise
    (``20 <= n_c <= 100`` with the defaults).

    References
    ----------
    .. [1] Z. Liu, Z. Miao, X. Zhan, J. Wang, B. Gong and S. X. Yu, "Large-Scale
       Long-Tailed Recognition in an Open World", CVPR 2019.

    Examples
    --------
    >>> from ltroute.metrics import shot_groups
    >>> shot_groups([500, 100, 20, 19])
    {'many': array([0]), 'medium': array([1, 2]), 'few': array([3])}
    >>> groups = shot_groups({"cat": 150, "dog": 5}, many_threshold=50, few_threshold=10)
    >>> {group: labels.tolist() for group, labels in groups.items()}
    {'many': ['cat'], 'medium': [], 'few': ['dog']}
    """
    _check_thresholds(many_threshold, few_threshold)
    classes, counts = _check_class_counts(class_counts, classes)
    masks = _group_masks(counts, many_threshold, few_threshold)
    return {group: classes[masks[group]] for group in _GROUPS}


def group_accuracy(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    *,
    class_counts: Mapping | ArrayLike,
    classes: ArrayLike | None = None,
    many_threshold: int = 100,
    few_threshold: int = 20,
) -> dict[str, float]:
    """Accuracy of the many-, medium- and few-shot groups, and overall accuracy.

    The accuracy of a group is the mean, over the classes of the group that appear in
    ``y_true``, of the per-class accuracy (the recall ``correct_c / support_c``).

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
        Ground truth labels.

    y_pred : array-like of shape (n_samples,)
        Predicted labels. May contain classes absent from ``y_true``, not unknown ones.

    class_counts : mapping or array-like of shape (n_classes,)
        Number of *training* samples of each class: a mapping ``label -> count`` or an array
        aligned with ``classes``. See :func:`shot_groups`.

    classes : array-like of shape (n_classes,), default=None
        Class labels; see :func:`shot_groups`.

    many_threshold : int, default=100
        Classes with strictly more training samples are many-shot.

    few_threshold : int, default=20
        Classes with strictly fewer training samples are few-shot.

    Returns
    -------
    scores : dict of str to float
        ``{"many": ..., "medium": ..., "few": ..., "overall": ...}``; ``"overall"`` is the
        plain sample accuracy. A group without any class in ``y_true`` scores ``nan`` and
        raises an :class:`EmptyGroupWarning`.

    Raises
    ------
    ValueError
        If ``y_true`` and ``y_pred`` differ in length or are empty, if they contain labels
        that are not classes, or if ``class_counts``/``classes`` are inconsistent.

    See Also
    --------
    shot_groups : The classes of each group.
    long_tail_report : Per-class and per-group report.

    Notes
    -----
    Classes absent from ``y_true`` are left out of their group rather than counted as
    zero, so the score of a group does not depend on which classes a small test set
    happens to miss.

    Examples
    --------
    >>> from ltroute.metrics import group_accuracy
    >>> class_counts = {"cat": 500, "dog": 50, "emu": 5}
    >>> y_true = ["cat", "cat", "dog", "dog", "emu", "emu"]
    >>> y_pred = ["cat", "cat", "dog", "cat", "emu", "cat"]
    >>> group_accuracy(y_true, y_pred, class_counts=class_counts)
    {'many': 1.0, 'medium': 0.5, 'few': 0.5, 'overall': 0.6666666666666666}
    """
    stats = _ClassStats(y_true, y_pred, class_counts, classes, many_threshold, few_threshold)
    scores = {}
    for group in _GROUPS:  # a loop, not a comprehension: keeps the warning's stacklevel
        scores[group] = stats.group_accuracy(group)
    scores["overall"] = stats.accuracy
    return scores


def many_shot_accuracy(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    *,
    class_counts: Mapping | ArrayLike,
    classes: ArrayLike | None = None,
    many_threshold: int = 100,
    few_threshold: int = 20,
) -> float:
    """Mean per-class accuracy of the many-shot classes (``n_c > many_threshold``).

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
        Ground truth labels.

    y_pred : array-like of shape (n_samples,)
        Predicted labels.

    class_counts : mapping or array-like of shape (n_classes,)
        Number of training samples of each class; see :func:`shot_groups`.

    classes : array-like of shape (n_classes,), default=None
        Class labels; see :func:`shot_groups`.

    many_threshold : int, default=100
        Classes with strictly more training samples are many-shot.

    few_threshold : int, default=20
        Classes with strictly fewer training samples are few-shot.

    Returns
    -------
    score : float
        Mean recall over the many-shot classes present in ``y_true``; ``nan`` with an
        :class:`EmptyGroupWarning` if there is none.

    See Also
    --------
    group_accuracy : All groups at once.

    Examples
    --------
    >>> from ltroute.metrics import many_shot_accuracy
    >>> many_shot_accuracy([0, 0, 1, 2], [0, 1, 1, 2], class_counts=[300, 200, 10])
    0.75
    """
    stats = _ClassStats(y_true, y_pred, class_counts, classes, many_threshold, few_threshold)
    return stats.group_accuracy("many")


def medium_shot_accuracy(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    *,
    class_counts: Mapping | ArrayLike,
    classes: ArrayLike | None = None,
    many_threshold: int = 100,
    few_threshold: int = 20,
) -> float:
    """Mean per-class accuracy of the medium-shot classes.

    Medium-shot classes have ``few_threshold <= n_c <= many_threshold`` training samples.

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
        Ground truth labels.

    y_pred : array-like of shape (n_samples,)
        Predicted labels.

    class_counts : mapping or array-like of shape (n_classes,)
        Number of training samples of each class; see :func:`shot_groups`.

    classes : array-like of shape (n_classes,), default=None
        Class labels; see :func:`shot_groups`.

    many_threshold : int, default=100
        Classes with strictly more training samples are many-shot.

    few_threshold : int, default=20
        Classes with strictly fewer training samples are few-shot.

    Returns
    -------
    score : float
        Mean recall over the medium-shot classes present in ``y_true``; ``nan`` with an
        :class:`EmptyGroupWarning` if there is none.

    See Also
    --------
    group_accuracy : All groups at once.

    Examples
    --------
    >>> from ltroute.metrics import medium_shot_accuracy
    >>> medium_shot_accuracy(
    ...     [3, 3, 7, 7, 9], [3, 7, 7, 7, 9], class_counts=[60, 20, 5], classes=[3, 7, 9]
    ... )
    0.75
    """
    stats = _ClassStats(y_true, y_pred, class_counts, classes, many_threshold, few_threshold)
    return stats.group_accuracy("medium")


def few_shot_accuracy(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    *,
    class_counts: Mapping | ArrayLike,
    classes: ArrayLike | None = None,
    many_threshold: int = 100,
    few_threshold: int = 20,
) -> float:
    """Mean per-class accuracy of the few-shot classes (``n_c < few_threshold``).

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
        Ground truth labels.

    y_pred : array-like of shape (n_samples,)
        Predicted labels.

    class_counts : mapping or array-like of shape (n_classes,)
        Number of training samples of each class; see :func:`shot_groups`.

    classes : array-like of shape (n_classes,), default=None
        Class labels; see :func:`shot_groups`.

    many_threshold : int, default=100
        Classes with strictly more training samples are many-shot.

    few_threshold : int, default=20
        Classes with strictly fewer training samples are few-shot.

    Returns
    -------
    score : float
        Mean recall over the few-shot classes present in ``y_true``; ``nan`` with an
        :class:`EmptyGroupWarning` if there is none.

    See Also
    --------
    group_accuracy : All groups at once.

    Examples
    --------
    >>> from ltroute.metrics import few_shot_accuracy
    >>> y_true = ["a", "b", "b", "c", "c", "c", "c"]
    >>> y_pred = ["a", "a", "b", "c", "c", "c", "a"]
    >>> few_shot_accuracy(y_true, y_pred, class_counts={"a": 400, "b": 12, "c": 3})
    0.625
    """
    stats = _ClassStats(y_true, y_pred, class_counts, classes, many_threshold, few_threshold)
    return stats.group_accuracy("few")


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def _check_n_bins(n_bins: Any) -> None:
    if isinstance(n_bins, bool):
        raise TypeError(f"n_bins must be an int, got {n_bins!r}.")
    check_scalar(n_bins, "n_bins", target_type=numbers.Integral, min_val=1)


def _check_proba(y_proba: Any, n_classes: int | None) -> np.ndarray:
    proba = np.asarray(y_proba, dtype=np.float64)
    if proba.ndim != 2:
        raise ValueError(f"y_proba must be 2-D (n_samples, n_classes); got shape "
                         f"{proba.shape}.")
    if n_classes is not None and proba.shape[1] != n_classes:
        raise ValueError(f"y_proba has {proba.shape[1]} columns but there are {n_classes} "
                         "classes; its columns must be aligned with classes.")
    if not np.all(np.isfinite(proba)):
        raise ValueError("y_proba contains NaN or infinite values.")
    if np.any(proba < 0) or np.any(proba > 1 + 1e-6):
        raise ValueError("y_proba must hold probabilities in [0, 1].")
    if not np.allclose(proba.sum(axis=1), 1.0, atol=1e-4):
        raise ValueError("the rows of y_proba must sum to one.")
    return proba


def _calibration_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width bin of ``confidence``: sample count, mean confidence, accuracy.

    Bin ``b`` holds confidences in ``(b / n_bins, (b + 1) / n_bins]`` (the first bin also
    holds 0). Empty bins have mean confidence and accuracy ``nan``.
    """
    inner_edges = np.linspace(0.0, 1.0, n_bins + 1)[1:-1]
    index = np.digitize(confidence, inner_edges, right=True)
    count = np.bincount(index, minlength=n_bins)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_confidence = np.bincount(index, weights=confidence, minlength=n_bins) / count
        accuracy = np.bincount(index, weights=correct.astype(np.float64),
                               minlength=n_bins) / count
    return count, mean_confidence, accuracy


def _ece(confidence: np.ndarray, correct: np.ndarray, n_bins: int) -> float:
    count, mean_confidence, accuracy = _calibration_bins(confidence, correct, n_bins)
    filled = count > 0
    gaps = np.abs(accuracy[filled] - mean_confidence[filled])
    return float(np.sum(count[filled] * gaps) / count.sum())


def expected_calibration_error(
    y_true: ArrayLike,
    y_proba: ArrayLike,
    *,
    class_counts: Mapping | ArrayLike | None = None,
    classes: ArrayLike | None = None,
    n_bins: int = 15,
    many_threshold: int = 100,
    few_threshold: int = 20,
) -> float | dict[str, float]:
    """Expected calibration error (ECE) of predicted probabilities, overall and per group.

    The confidence of a sample is its largest probability, its prediction that class.
    Confidences are put in ``n_bins`` equal-width bins of ``[0, 1]`` (bin ``b`` holds
    ``(b / n_bins, (b + 1) / n_bins]``, edges from ``numpy.linspace``), and

        ECE = sum_b (n_b / n) * |accuracy_b - mean confidence_b|

    over the non-empty bins (Naeini et al. 2015; Guo et al. 2017). ``0`` is perfect
    calibration; the ECE is at most 1.

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
        True labels.

    y_proba : array-like of shape (n_samples, n_classes)
        Predicted probabilities, columns aligned with ``classes`` (e.g. an estimator's
        ``predict_proba`` with ``classes=estimator.classes_``); rows sum to one.

    class_counts : mapping or array-like of shape (n_classes,), default=None
        Training samples per class, as in :func:`group_accuracy`. When given, the ECE is
        also computed for the samples whose *true* class is in each shot group.

    classes : array-like of shape (n_classes,), default=None
        Class labels of the columns of ``y_proba``. Default: as in
        :func:`group_accuracy` with ``class_counts``; ``0, ..., n_classes - 1`` without.

    n_bins : int, default=15
        Number of equal-width confidence bins.

    many_threshold, few_threshold : int, default=100, 20
        Shot-group thresholds, as in :func:`shot_groups`.

    Returns
    -------
    ece : float or dict of str to float
        Without ``class_counts`` the overall ECE. With it, a dict with keys
        ``"overall"``, ``"many"``, ``"medium"``, ``"few"``; a group with no sample in
        ``y_true`` is ``nan`` (with an :class:`EmptyGroupWarning`).

    References
    ----------
    .. [1] M. P. Naeini, G. Cooper and M. Hauskrecht, "Obtaining Well Calibrated
       Probabilities Using Bayesian Binning", AAAI 2015.
    .. [2] C. Guo, G. Pleiss, Y. Sun and K. Q. Weinberger, "On Calibration of Modern
       Neural Networks", ICML 2017.

    Examples
    --------
    >>> from ltroute.metrics import expected_calibration_error
    >>> y_proba = [[0.9, 0.1], [0.75, 0.25], [0.3, 0.7], [0.45, 0.55]]
    >>> round(expected_calibration_error([0, 1, 1, 1], y_proba, n_bins=5), 4)
    0.25
    >>> ece = expected_calibration_error([0, 1, 1, 1], y_proba, class_counts=[500, 10])
    >>> sorted(ece)
    ['few', 'many', 'medium', 'overall']
    """
    _check_thresholds(many_threshold, few_threshold)
    _check_n_bins(n_bins)
    if class_counts is not None:
        classes, counts = _check_class_counts(class_counts, classes)
    elif classes is not None:
        classes = _as_labels(classes, "classes")
    proba = _check_proba(y_proba, None if classes is None else len(classes))
    if classes is None:
        classes = np.arange(proba.shape[1])
    y_true = column_or_1d(y_true)
    if len(y_true) != len(proba):
        raise ValueError(f"y_true and y_proba have different lengths: {len(y_true)} and "
                         f"{len(proba)}.")
    if len(y_true) == 0:
        raise ValueError("y_true and y_proba are empty; at least one sample is needed.")
    index = {label: i for i, label in enumerate(classes.tolist())}
    true_codes = _encode(y_true, index, "y_true")
    confidence = proba.max(axis=1)
    correct = proba.argmax(axis=1) == true_codes
    overall = _ece(confidence, correct, n_bins)
    if class_counts is None:
        return overall
    result = {"overall": overall}
    for group, mask in _group_masks(counts, many_threshold, few_threshold).items():
        rows = mask[true_codes]
        if not rows.any():
            rule = _group_rule(group, many_threshold, few_threshold)
            warnings.warn(f"No sample of y_true belongs to the {group!r} group ({rule}); "
                          "its calibration error is undefined and set to nan.",
                          EmptyGroupWarning, stacklevel=2)
            result[group] = float("nan")
        else:
            result[group] = _ece(confidence[rows], correct[rows], n_bins)
    return result


def _python_scalar(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _format_table(rows: list[list[str]], first_width: int) -> list[str]:
    """Right-align each column to its widest cell; the first column to ``first_width``."""
    widths = [first_width] + [max(len(row[j]) for row in rows) for j in range(1, len(rows[0]))]
    return [
        "  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def long_tail_report(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    *,
    class_counts: Mapping | ArrayLike,
    classes: ArrayLike | None = None,
    many_threshold: int = 100,
    few_threshold: int = 20,
    digits: int = 2,
    output_dict: bool = False,
) -> str | dict:
    """Build a per-class and per-shot-group report for long-tailed classification.

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
        Ground truth labels.

    y_pred : array-like of shape (n_samples,)
        Predicted labels.

    class_counts : mapping or array-like of shape (n_classes,)
        Number of training samples of each class; see :func:`shot_groups`.

    classes : array-like of shape (n_classes,), default=None
        Class labels; see :func:`shot_groups`. The rows follow this order.

    many_threshold : int, default=100
        Classes with strictly more training samples are many-shot.

    few_threshold : int, default=20
        Classes with strictly fewer training samples are few-shot.

    digits : int, default=2
        Number of digits of the floating point values in the text report. Ignored when
        ``output_dict=True``.

    output_dict : bool, default=False
        If True, return a dict instead of a string.

    Returns
    -------
    report : str or dict
        The text report: one row per class present in ``y_true`` (its group, training
        count, test support, precision and recall), then one row per group (number of
        classes evaluated, their training count and test support, group accuracy), then the
        overall (sample) accuracy and the balanced accuracy (mean per-class recall).

        With ``output_dict=True``::

            {"classes": {label: {"group": str, "train_count": int, "support": int,
                                 "precision": float, "recall": float}, ...},
             "many": {"n_classes": int, "train_count": int, "support": int,
                      "accuracy": float},
             "medium": {...}, "few": {...}, "overall": {...}, "balanced": {...}}

        Labels are Python scalars. Undefined values are ``nan``: the precision of a class
        that is never predicted, the accuracy of a group without any class in ``y_true``
        (which also raises an :class:`EmptyGroupWarning`).

    See Also
    --------
    group_accuracy : The group accuracies of the report.
    sklearn.metrics.classification_report : The report this one is modelled on.

    Notes
    -----
    Classes absent from ``y_true`` have no row and are not counted in their group, exactly
    as in :func:`group_accuracy`. The balanced accuracy equals
    :func:`sklearn.metrics.balanced_accuracy_score` on the same labels.

    Examples
    --------
    >>> from ltroute.metrics import long_tail_report
    >>> class_counts = {"cat": 500, "dog": 50, "emu": 5}
    >>> y_true = ["cat", "cat", "dog", "dog", "emu", "emu"]
    >>> y_pred = ["cat", "cat", "dog", "cat", "emu", "cat"]
    >>> print(long_tail_report(y_true, y_pred, class_counts=class_counts))
               group  train  support  precision  recall
    <BLANKLINE>
         cat    many    500        2       0.50    1.00
         dog  medium     50        2       1.00    0.50
         emu     few      5        2       1.00    0.50
    <BLANKLINE>
              classes  train  support  accuracy
    <BLANKLINE>
        many        1    500        2      1.00
      medium        1     50        2      0.50
         few        1      5        2      0.50
    <BLANKLINE>
     overall        3    555        6      0.67
    balanced        3    555        6      0.67
    >>> report = long_tail_report(y_true, y_pred, class_counts=class_counts, output_dict=True)
    >>> report["classes"]["dog"]
    {'group': 'medium', 'train_count': 50, 'support': 2, 'precision': 1.0, 'recall': 0.5}
    >>> report["few"]
    {'n_classes': 1, 'train_count': 5, 'support': 2, 'accuracy': 0.5}
    """
    check_scalar(digits, "digits", target_type=numbers.Integral, min_val=0)
    if not isinstance(output_dict, bool | np.bool_):
        raise TypeError(f"output_dict must be a bool, got {output_dict!r}.")
    stats = _ClassStats(y_true, y_pred, class_counts, classes, many_threshold, few_threshold)

    group_of = np.empty(len(stats.classes), dtype=object)
    for group in _GROUPS:
        group_of[stats.masks[group]] = group

    report: dict[str, Any] = {"classes": {}}
    for i in np.flatnonzero(stats.present):
        report["classes"][_python_scalar(stats.classes[i])] = {
            "group": group_of[i],
            "train_count": int(stats.counts[i]),
            "support": int(stats.support[i]),
            "precision": float(stats.precision[i]),
            "recall": float(stats.recall[i]),
        }
    summaries = {group: stats.masks[group] & stats.present for group in _GROUPS}
    summaries["overall"] = summaries["balanced"] = stats.present
    accuracies = {}
    for group in _GROUPS:
        accuracies[group] = stats.group_accuracy(group)
    accuracies["overall"] = stats.accuracy
    accuracies["balanced"] = stats.balanced_accuracy()
    for name, mask in summaries.items():
        report[name] = {
            "n_classes": int(mask.sum()),
            "train_count": int(stats.counts[mask].sum()),
            "support": int(stats.support[mask].sum()),
            "accuracy": accuracies[name],
        }
    if output_dict:
        return report

    def fmt(value: float) -> str:
        return f"{value:.{digits}f}"

    class_rows = [["", "group", "train", "support", "precision", "recall"]] + [
        [
            str(label),
            row["group"],
            str(row["train_count"]),
            str(row["support"]),
            fmt(row["precision"]),
            fmt(row["recall"]),
        ]
        for label, row in report["classes"].items()
    ]
    group_rows = [["", "classes", "train", "support", "accuracy"]] + [
        [
            name,
            str(report[name]["n_classes"]),
            str(report[name]["train_count"]),
            str(report[name]["support"]),
            fmt(report[name]["accuracy"]),
        ]
        for name in summaries
    ]
    first_width = max(len(row[0]) for row in class_rows + group_rows)
    class_lines = _format_table(class_rows, first_width)
    group_lines = _format_table(group_rows, first_width)
    lines = [
        class_lines[0],
        "",
        *class_lines[1:],
        "",
        group_lines[0],
        "",
        *group_lines[1:4],
        "",
        *group_lines[4:],
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Scorers
# --------------------------------------------------------------------------------------


def _final_estimator(estimator: Any) -> Any:
    while isinstance(estimator, Pipeline):
        estimator = estimator[-1]
    return estimator


class _ShotScorer:
    """``(estimator, X, y)`` scorer for one shot group; built by :func:`make_shot_scorer`."""

    def __init__(self, group: str, many_threshold: int, few_threshold: int):
        self.group = group
        self.many_threshold = many_threshold
        self.few_threshold = few_threshold

    def __repr__(self) -> str:
        return (
            f"make_shot_scorer({self.group!r}, many_threshold={self.many_threshold}, "
            f"few_threshold={self.few_threshold})"
        )

    def __call__(self, estimator: Any, X: ArrayLike, y: ArrayLike) -> float:
        final = _final_estimator(estimator)
        if not hasattr(final, "class_counts_"):
            check_is_fitted(final)
            raise AttributeError(
                f"{type(final).__name__} has no attribute 'class_counts_'. Shot scorers "
                "need the estimator (the last step of a Pipeline) to expose the training "
                "counts 'class_counts_' aligned with 'classes_', as ltroute's estimators do."
            )
        classes, counts = _check_class_counts(final.class_counts_, final.classes_)
        y_pred = estimator.predict(X)

        # A test fold may hold a class that its training fold lacked: it was seen 0 times,
        # so it is a few-shot class that the estimator cannot predict.
        known = set(classes.tolist())
        unseen = [label for label in np.unique(column_or_1d(y)).tolist() if label not in known]
        if unseen:
            warnings.warn(
                f"y contains labels the estimator was not fitted on: {unseen}; they are "
                "scored as classes with a training count of 0.",
                UserWarning,
                stacklevel=2,
            )
            classes = np.array(classes.tolist() + unseen, dtype=object)
            counts = np.concatenate([counts, np.zeros(len(unseen), dtype=counts.dtype)])

        stats = _ClassStats(y, y_pred, counts, classes, self.many_threshold, self.few_threshold)
        if self.group == "overall":
            return stats.accuracy
        if self.group == "balanced":
            return stats.balanced_accuracy()
        return stats.group_accuracy(self.group)


def make_shot_scorer(
    group: str, *, many_threshold: int = 100, few_threshold: int = 20
) -> _ShotScorer:
    """Make a scorer for the accuracy of one shot group, for cross-validation and search.

    Parameters
    ----------
    group : {"many", "medium", "few", "overall", "balanced"}
        The score: the accuracy of a shot group (see :func:`group_accuracy`), the plain
        sample accuracy (``"overall"``) or the mean per-class recall (``"balanced"``).

    many_threshold : int, default=100
        Classes with strictly more training samples are many-shot.

    few_threshold : int, default=20
        Classes with strictly fewer training samples are few-shot.

    Returns
    -------
    scorer : callable
        ``scorer(estimator, X, y) -> float``, greater is better. It calls
        ``estimator.predict(X)`` and reads the training class counts ``class_counts_`` and
        ``classes_`` of the fitted estimator, or of the last step if ``estimator`` is a
        :class:`~sklearn.pipeline.Pipeline`.

    Raises
    ------
    ValueError
        If ``group`` is not one of the values above.

    See Also
    --------
    many_shot_scorer, medium_shot_scorer, few_shot_scorer : Ready-made scorers.

    Notes
    -----
    The counts are those of the data the estimator was fitted on, so in cross-validation a
    class may change group from one fold to the next. A fold whose test part has no class
    of the group scores ``nan`` with an :class:`EmptyGroupWarning`;
    :class:`~sklearn.model_selection.GridSearchCV` then warns that some scores are
    non-finite and ranks those candidates last. Choose ``many_threshold`` and
    ``few_threshold`` for the size of the training folds, not of the whole data set.
    A test label the estimator was not fitted on (its class fell entirely into the test
    fold) is scored as a class with a training count of 0, with a ``UserWarning``.

    An estimator without ``class_counts_`` raises an ``AttributeError``; an unfitted one
    raises :class:`~sklearn.exceptions.NotFittedError`.

    Examples
    --------
    >>> from ltroute.metrics import make_shot_scorer
    >>> scorer = make_shot_scorer("few", few_threshold=10)
    >>> scorer
    make_shot_scorer('few', many_threshold=100, few_threshold=10)

    Scorers plug into scikit-learn's model selection for estimators that expose
    ``class_counts_``: ``GridSearchCV(pipe, param_grid, scoring=scorer)``,
    ``cross_val_score(pipe, X, y, scoring=scorer)``, or several at once with
    ``cross_validate(pipe, X, y, scoring={"few": scorer, "many": many_shot_scorer})``.
    """
    if group not in _SCORER_GROUPS:
        raise ValueError(f"group must be one of {list(_SCORER_GROUPS)}, got {group!r}.")
    _check_thresholds(many_threshold, few_threshold)
    return _ShotScorer(group, many_threshold, few_threshold)


many_shot_scorer = make_shot_scorer("many")
"""Scorer for :func:`many_shot_accuracy` with the default thresholds."""

medium_shot_scorer = make_shot_scorer("medium")
"""Scorer for :func:`medium_shot_accuracy` with the default thresholds."""

few_shot_scorer = make_shot_scorer("few")
"""Scorer for :func:`few_shot_accuracy` with the default thresholds."""
