"""Temperature scaling (optionally with per-class biases) for any probabilistic classifier.

A classifier's probabilities ``p(y|x)`` are recalibrated as
``softmax(log p(y|x) / T + b_y)``: one temperature ``T > 0`` (Guo et al. 2017) and, with
``bias=True``, one bias per class ("bias-corrected temperature scaling", BCTS, Alexandari
et al. 2020). Both are fitted by minimising the negative log-likelihood of *held-out*
predictions: probabilities of samples the classifier was not trained on, obtained by
cross-validation (``cross_val_predict``). A temperature alone never changes the argmax;
biases can.

Order of operations with a prior correction (:mod:`ltroute.prior`): calibrate first,
then correct the prior. The held-out predictions follow the *training* distribution, so
the calibrated probabilities are posteriors under the training class prior, which is
exactly what the prior correction and the EM label-shift estimator assume.

References
----------
.. [1] C. Guo, G. Pleiss, Y. Sun and K. Q. Weinberger, "On Calibration of Modern Neural
   Networks", ICML 2017.
.. [2] A. Alexandari, A. Kundaje and A. Shrikumar, "Maximum Likelihood with
   Bias-Corrected Calibration is Hard-To-Beat at Label Shift Adaptation", ICML 2020.
"""

from __future__ import annotations

from numbers import Integral

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import minimize
from scipy.special import log_softmax, logsumexp
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.model_selection import cross_val_predict
from sklearn.utils import get_tags
from sklearn.utils._param_validation import HasMethods
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, column_or_1d

__all__ = ["TemperatureScaling", "fit_temperature", "apply_temperature", "as_log_proba"]

#: Largest inverse temperature searched (``T >= exp(-6)``) and the smallest (``T <= e^6``).
_LOG_INV_T_BOUND = 6.0


def as_log_proba(proba: ArrayLike, name: str = "probabilities") -> np.ndarray:
    """Float64 log-probabilities of a (n_samples, n_classes) probability matrix.

    Zeros become ``log(tiny)`` (finite), so that no later step turns them into NaN.
    Non-finite or negative entries raise a ``ValueError``.
    """
    proba = np.asarray(proba, dtype=np.float64)
    if proba.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n_samples, n_classes); got shape {proba.shape}.")
    if not np.all(np.isfinite(proba)):
        raise ValueError(f"{name} contain NaN or infinite values.")
    if np.any(proba < 0):
        raise ValueError(f"{name} contain negative values.")
    return np.log(np.maximum(proba, np.finfo(np.float64).tiny))


def fit_temperature(
    log_proba: ArrayLike, y: ArrayLike, *, bias: bool = False, offset: ArrayLike | None = None
) -> tuple[float, np.ndarray]:
    """Fit a temperature (and per-class biases) by maximum likelihood.

    Parameters
    ----------
    log_proba : array-like of shape (n_samples, n_classes)
        Held-out log-probabilities (or logits) of a classifier.
    y : array-like of shape (n_samples,)
        Encoded labels ``0 .. n_classes - 1`` of those samples.
    bias : bool, default=False
        Also fit one bias per class (BCTS). The biases are centred (mean zero), which
        leaves the calibrated probabilities unchanged.
    offset : array-like of shape (n_classes,), default=None
        Fixed per-class log-offset ``o`` added during the fit only: the likelihood is
        that of ``softmax(log_proba / T + b + o)``. Used when the probabilities are
        posteriors under a prior other than the held-out samples' one (``o = log
        pi_held_out - log pi_source``), so that ``T`` and ``b`` calibrate them under
        their own prior. ``-inf`` marks a class absent from the data (held-out prior 0):
        it takes no probability during the fit and its bias, which the data cannot
        determine, is set to the mean of the others.

    Returns
    -------
    temperature : float
        ``T`` in ``softmax(log_proba / T + b)``, within ``[e^-6, e^6]``.
    biases : ndarray of shape (n_classes,)
        ``b`` (zeros when ``bias=False``).
    """
    z = np.asarray(log_proba, dtype=np.float64)
    y = column_or_1d(y).astype(np.intp)
    n, n_classes = z.shape
    if len(y) != n:
        raise ValueError(f"log_proba has {n} rows but y has {len(y)} labels.")
    if not np.all(np.isfinite(z)):
        raise ValueError("log_proba must be finite to fit a temperature.")
    rows = np.arange(n)
    shift = np.zeros(n_classes) if offset is None else np.asarray(offset, dtype=np.float64)
    if shift.shape != (n_classes,) or np.any(np.isnan(shift)) or np.any(shift == np.inf):
        raise ValueError(f"offset must have shape ({n_classes},) with no NaN or +inf.")
    if np.any(y < 0) or np.any(y >= n_classes):
        raise ValueError(f"y must hold encoded labels 0 .. {n_classes - 1}.")
    if not np.all(np.isfinite(shift[y])):
        raise ValueError("offset is -inf for a class that occurs in y.")

    def nll(params: np.ndarray) -> tuple[float, np.ndarray]:
        inv_t = np.exp(params[0])
        b = params[1:] if bias else np.zeros(n_classes)
        s = inv_t * z + b + shift
        lse = logsumexp(s, axis=1)
        loss = np.mean(lse - s[rows, y])
        grad_s = np.exp(s - lse[:, None])
        grad_s[rows, y] -= 1.0
        grad_s /= n
        grad = [np.sum(grad_s * z) * inv_t]
        if bias:
            grad.extend(grad_s.sum(axis=0))
        return float(loss), np.asarray(grad)

    x0 = np.zeros(1 + (n_classes if bias else 0))
    bounds = [(-_LOG_INV_T_BOUND, _LOG_INV_T_BOUND)] + [(None, None)] * (len(x0) - 1)
    result = minimize(nll, x0, jac=True, method="L-BFGS-B", bounds=bounds)
    params = result.x
    biases = np.zeros(n_classes)
    if bias:
        # A class with offset -inf (prior 0 in the data) has no likelihood term: its
        # bias is not identified and gets the mean of the others (a neutral value).
        free = np.isfinite(shift)
        biases = params[1:].copy()
        biases[~free] = biases[free].mean()
        biases -= biases.mean()
    return float(np.exp(-params[0])), biases


def apply_temperature(log_proba: ArrayLike, temperature: float, biases: ArrayLike) -> np.ndarray:
    """Calibrated log-probabilities ``log_softmax(log_proba / T + b)``."""
    z = np.asarray(log_proba, dtype=np.float64)
    return log_softmax(z / temperature + np.asarray(biases, dtype=np.float64), axis=1)


def fit_under_prior(
    log_proba: ArrayLike, y: ArrayLike, source_prior: ArrayLike, *, bias: bool
) -> tuple[float, np.ndarray]:
    """:func:`fit_temperature` of probabilities that are posteriors under ``source_prior``
    on labelled data ``y`` (encoded) of another class distribution: the offset
    ``log pi_y - log source_prior`` (``pi_y``: the class frequencies of ``y``; ``-inf``
    for a class absent from it) keeps the calibrated probabilities posteriors under
    ``source_prior``."""
    source = np.asarray(source_prior, dtype=np.float64)
    counts = np.bincount(column_or_1d(y).astype(np.intp), minlength=len(source))
    with np.errstate(divide="ignore"):
        offset = np.log(counts / counts.sum()) - np.log(source / source.sum())
    return fit_temperature(log_proba, y, bias=bias, offset=offset)


def encode_labels(y: ArrayLike, classes: np.ndarray, caller: str) -> np.ndarray:
    """Codes ``0 .. n_classes - 1`` of the labels ``y`` in ``classes``; a ``ValueError``
    naming the labels that are not classes."""
    y = column_or_1d(np.asarray(y))
    check_classification_targets(y)
    index = {label: code for code, label in enumerate(np.asarray(classes).tolist())}
    unknown = sorted({label for label in y.tolist() if label not in index}, key=str)
    if unknown:
        raise ValueError(f"{caller}: y has labels that are not classes of the estimator: "
                         f"{unknown}; classes are {np.asarray(classes).tolist()}.")
    return np.array([index[label] for label in y.tolist()], dtype=np.intp)


def heldout_log_proba(estimator, X, y, *, cv, fit_params=None) -> np.ndarray:
    """Cross-validated (held-out) log-probabilities of a clone of ``estimator``.

    Every sample is predicted by a clone fitted without it (``cross_val_predict`` with
    ``cv``: an int means stratified k-fold). Columns follow ``np.unique(y)``; a class
    missing from a training fold gets probability 0 there (hence ``log(tiny)``).
    """
    proba = cross_val_predict(
        clone(estimator), X, y, cv=cv, method="predict_proba", params=fit_params or None
    )
    return as_log_proba(proba, "held-out probabilities")


def _check_cv(cv) -> None:
    if isinstance(cv, Integral) and not isinstance(cv, bool) and cv < 2:
        raise ValueError(f"cv must be at least 2 (folds of cross-validation); got {cv}.")


class TemperatureScaling(ClassifierMixin, BaseEstimator):
    """Temperature scaling of a classifier's probabilities, fitted on held-out predictions.

    ``fit`` obtains held-out probabilities by cross-validation (``cv`` clones of
    ``estimator``, each predicting the fold it did not see), fits ``T`` (and per-class
    biases with ``bias=True``) on them by maximum likelihood, then fits ``estimator`` on
    all the data. ``predict_proba`` returns ``softmax(log p(y|x) / T + b)``.

    Composition with a prior correction: calibrate first, then correct, i.e.
    ``PriorCorrectedClassifier(TemperatureScaling(est), calibration=None)`` (or the
    built-in ``calibration=`` of :class:`~ltroute.PriorCorrectedClassifier`, which does
    the same in one estimator). Since the held-out samples follow the training
    distribution, the calibrated probabilities are posteriors under the training prior.

    Parameters
    ----------
    estimator : classifier with ``predict_proba``
        Cloned, never modified.
    bias : bool, default=False
        Also fit one bias per class (bias-corrected temperature scaling, BCTS). Biases
        can change the argmax; a temperature alone cannot.
    cv : int or cross-validation splitter, default=5
        How the held-out predictions are made (``sklearn.model_selection.cross_val_predict``;
        an int is a stratified k-fold). Costs ``cv`` extra fits of ``estimator``.

    Attributes
    ----------
    estimator_ : classifier
        ``estimator`` fitted on all the data.
    classes_ : ndarray of shape (n_classes,)
    temperature_ : float
    biases_ : ndarray of shape (n_classes,)

    Examples
    --------
    >>> from sklearn.linear_model import LogisticRegression
    >>> from sklearn.datasets import load_iris
    >>> from ltroute.calibration import TemperatureScaling
    >>> X, y = load_iris(return_X_y=True)
    >>> ts = TemperatureScaling(LogisticRegression(max_iter=1000), cv=3).fit(X, y)
    >>> bool(ts.temperature_ > 0)
    True
    >>> ts.predict_proba(X[:2]).sum(axis=1).round(6)
    array([1., 1.])
    """

    _parameter_constraints: dict = {
        "estimator": [HasMethods(["fit", "predict_proba"])],
        "bias": ["boolean"],
        "cv": ["cv_object"],
    }

    def __init__(self, estimator, *, bias=False, cv=5):
        self.estimator = estimator
        self.bias = bias
        self.cv = cv

    def fit(self, X, y, **fit_params):
        """Fit the calibration on held-out predictions, then ``estimator`` on all data.

        Parameters
        ----------
        X : array-like
            Training data, in any form ``estimator`` accepts.
        y : array-like of shape (n_samples,)
        **fit_params : dict
            Passed to every fit of ``estimator``.

        Returns
        -------
        self : object
        """
        self._validate_params()
        _check_cv(self.cv)
        y = column_or_1d(y, warn=True)
        check_classification_targets(y)
        classes, y_codes = np.unique(y, return_inverse=True)
        held_out = heldout_log_proba(self.estimator, X, y, cv=self.cv, fit_params=fit_params)
        temperature, biases = fit_temperature(held_out, y_codes, bias=self.bias)
        estimator = clone(self.estimator).fit(X, y, **fit_params)
        if not np.array_equal(np.asarray(estimator.classes_), classes):
            raise ValueError("estimator.classes_ must be the sorted unique labels of y.")
        self.estimator_ = estimator
        self.classes_ = estimator.classes_
        self.temperature_, self.biases_ = temperature, biases
        if hasattr(estimator, "n_features_in_"):
            self.n_features_in_ = estimator.n_features_in_
        return self

    def predict_log_proba(self, X) -> np.ndarray:
        """Calibrated log-probabilities, columns aligned with ``classes_``."""
        check_is_fitted(self, "estimator_")
        log_proba = as_log_proba(self.estimator_.predict_proba(X), "estimator probabilities")
        return apply_temperature(log_proba, self.temperature_, self.biases_)

    def predict_proba(self, X) -> np.ndarray:
        """Calibrated probabilities, columns aligned with ``classes_``."""
        return np.exp(self.predict_log_proba(X))

    def predict(self, X) -> np.ndarray:
        """Class of highest calibrated probability."""
        log_proba = self.predict_log_proba(X)
        return self.classes_[np.argmax(log_proba, axis=1)]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        inner = get_tags(self.estimator)
        tags.input_tags.sparse = inner.input_tags.sparse
        tags.input_tags.allow_nan = inner.input_tags.allow_nan
        tags.input_tags.pairwise = inner.input_tags.pairwise
        return tags
