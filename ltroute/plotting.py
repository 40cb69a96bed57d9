"""Plots for long-tailed classification (optional: needs matplotlib).

Install the extra with ``pip install ltroute[plot]``; matplotlib is imported only when a
plotting function runs, so ``import ltroute.plotting`` works without it.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from ltroute.metrics import (
    EmptyGroupWarning,
    _calibration_bins,
    _check_class_counts,
    _ClassStats,
    _group_masks,
    expected_calibration_error,
)

__all__ = ["plot_per_class_accuracy", "plot_reliability_diagram"]

_GROUP_COLOURS = {"many": "#e8eef7", "medium": "#f3f3f3", "few": "#fbeee6"}


def _pyplot() -> Any:
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(
            "ltroute.plotting needs matplotlib, which is not installed. Install it with "
            "`pip install ltroute[plot]` (or `pip install matplotlib`)."
        ) from exc
    return plt


def plot_per_class_accuracy(
    y_true: ArrayLike,
    y_pred: ArrayLike | Mapping[str, ArrayLike],
    *,
    class_counts: Mapping | ArrayLike,
    classes: ArrayLike | None = None,
    ax: Any = None,
    many_threshold: int = 100,
    few_threshold: int = 20,
    log_scale: bool = True,
) -> Any:
    """Plot the accuracy of every class against its number of training samples.

    Each model is one series: a marker per class at ``(n_c, recall_c)``, joined in order
    of class size. The background marks the many / medium / few-shot groups, and the
    legend gives each model's overall and few-shot accuracy.

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
        Ground truth labels of the (balanced) test set.

    y_pred : array-like of shape (n_samples,) or mapping of str to array-like
        Predicted labels, or a mapping ``model name -> predicted labels`` to compare
        several models on one plot.

    class_counts : mapping or array-like of shape (n_classes,)
        Training samples per class, as in :func:`ltroute.metrics.group_accuracy`
        (e.g. ``estimator.class_counts_`` with ``classes=estimator.classes_``, or a
        loader's ``class_counts`` mapping).

    classes : array-like of shape (n_classes,), default=None
        Class labels aligned with an array ``class_counts``.

    ax : matplotlib Axes, default=None
        Where to draw; ``None`` creates a new figure.

    many_threshold : int, default=100
        Classes with more training samples are many-shot.

    few_threshold : int, default=20
        Classes with fewer training samples are few-shot.

    log_scale : bool, default=True
        Logarithmic x axis (class sizes of long-tailed data span orders of magnitude).

    Returns
    -------
    ax : matplotlib Axes
        The axes drawn on.

    Raises
    ------
    ImportError
        If matplotlib is not installed.
    ValueError
        On inconsistent labels or counts (see :func:`ltroute.metrics.group_accuracy`).

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> from ltroute.plotting import plot_per_class_accuracy
    >>> counts = {"cat": 500, "dog": 50, "emu": 5}
    >>> y_true = ["cat", "cat", "dog", "dog", "emu", "emu"]
    >>> ax = plot_per_class_accuracy(
    ...     y_true, {"model": ["cat", "cat", "dog", "cat", "emu", "cat"]},
    ...     class_counts=counts)
    >>> ax.get_xlabel()
    'training samples per class'
    """
    plt = _pyplot()
    predictions = dict(y_pred) if isinstance(y_pred, Mapping) else {"model": y_pred}
    if not predictions:
        raise ValueError("y_pred is an empty mapping; give at least one model's predictions.")
    stats = {name: _ClassStats(y_true, pred, class_counts, classes, many_threshold,
                               few_threshold) for name, pred in predictions.items()}
    if ax is None:
        _, ax = plt.subplots(figsize=(7.0, 4.2))

    first = next(iter(stats.values()))
    counts = first.counts
    order = np.argsort(counts, kind="stable")
    low, high = max(counts.min(), 1) * 0.8, counts.max() * 1.25
    edges = {"few": (low, few_threshold - 0.5),
             "medium": (few_threshold - 0.5, many_threshold + 0.5),
             "many": (many_threshold + 0.5, high)}
    for group, (start, stop) in edges.items():
        start, stop = max(start, low), min(stop, high)
        if start < stop and first.masks[group].any():
            ax.axvspan(start, stop, color=_GROUP_COLOURS[group], zorder=0)
            middle = np.sqrt(start * stop) if log_scale else (start + stop) / 2
            ax.text(middle, 0.03, f"{group}-shot", ha="center", va="bottom", fontsize=8,
                    transform=ax.get_xaxis_transform())

    for name, stat in stats.items():
        present = stat.present[order]
        x, recall = stat.counts[order][present], stat.recall[order][present]
        few = stat.masks["few"] & stat.present
        few_text = f", few {100 * np.mean(stat.recall[few]):.1f}%" if few.any() else ""
        ax.plot(x, recall, marker="o", markersize=4, linewidth=1,
                label=f"{name} (overall {100 * stat.accuracy:.1f}%{few_text})")

    if log_scale:
        ax.set_xscale("log")
    ax.set_xlim(low, high)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("training samples per class")
    ax.set_ylabel("test accuracy of the class (recall)")
    ax.grid(alpha=0.3)
    ax.legend(loc="center right", fontsize=8)  # the group names sit at the bottom
    return ax


_GROUP_LINE_COLOURS = {"overall": "black", "many": "#1f77b4", "medium": "#7f7f7f",
                       "few": "#d62728"}


def plot_reliability_diagram(
    y_true: ArrayLike,
    y_proba: ArrayLike,
    *,
    class_counts: Mapping | ArrayLike,
    classes: ArrayLike | None = None,
    n_bins: int = 10,
    ax: Any = None,
    many_threshold: int = 100,
    few_threshold: int = 20,
) -> Any:
    """Reliability diagram per shot group: accuracy against confidence, binned.

    One line for all samples and one per many / medium / few-shot group (samples grouped
    by their *true* class): a marker per non-empty equal-width confidence bin at
    ``(mean confidence, accuracy)``. The diagonal is perfect calibration; the legend
    gives each line's expected calibration error
    (:func:`ltroute.metrics.expected_calibration_error`, same bins).

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
        True labels.
    y_proba : array-like of shape (n_samples, n_classes)
        Predicted probabilities, columns aligned with ``classes``.
    class_counts : mapping or array-like of shape (n_classes,)
        Training samples per class, as in :func:`ltroute.metrics.group_accuracy`.
    classes : array-like of shape (n_classes,), default=None
        Class labels of the columns of ``y_proba``.
    n_bins : int, default=10
        Number of equal-width confidence bins.
    ax : matplotlib Axes, default=None
        Where to draw; ``None`` creates a new figure.
    many_threshold, few_threshold : int, default=100, 20
        Shot-group thresholds.

    Returns
    -------
    ax : matplotlib Axes

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> from ltroute.plotting import plot_reliability_diagram
    >>> ax = plot_reliability_diagram(
    ...     [0, 1, 1], [[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]], class_counts=[500, 10])
    >>> ax.get_xlabel()
    'confidence (largest probability)'
    """
    plt = _pyplot()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EmptyGroupWarning)
        ece = expected_calibration_error(
            y_true, y_proba, class_counts=class_counts, classes=classes, n_bins=n_bins,
            many_threshold=many_threshold, few_threshold=few_threshold)
    classes, counts = _check_class_counts(class_counts, classes)
    proba = np.asarray(y_proba, dtype=np.float64)
    index = {label: i for i, label in enumerate(classes.tolist())}
    true_codes = np.array([index[label] for label in np.asarray(y_true).tolist()])
    confidence = proba.max(axis=1)
    correct = proba.argmax(axis=1) == true_codes
    if ax is None:
        _, ax = plt.subplots(figsize=(5.0, 5.0))
    ax.plot([0, 1], [0, 1], linestyle="--", color="#999999", linewidth=1)
    rows = {"overall": np.ones(len(true_codes), dtype=bool)}
    rows |= {group: mask[true_codes] for group, mask in
             _group_masks(counts, many_threshold, few_threshold).items()}
    for group, selected in rows.items():
        if not selected.any():
            continue
        count, mean_confidence, accuracy = _calibration_bins(
            confidence[selected], correct[selected], n_bins)
        filled = count > 0
        ax.plot(mean_confidence[filled], accuracy[filled], marker="o", markersize=4,
                linewidth=1.5 if group == "overall" else 1, color=_GROUP_LINE_COLOURS[group],
                label=f"{group} (ECE {100 * ece[group]:.1f}%, n={int(selected.sum())})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (largest probability)")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    return ax
