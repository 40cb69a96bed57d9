"""Label shift: correct a classifier's class prior, and estimate an unknown one.

A classifier's posterior ``p_s(y|x)`` learned under a *source* class prior ``pi_s`` (the
training distribution, or the uniform prior for a model trained with a balancing loss)
becomes the posterior under a *target* prior ``pi_t`` by Bayes' rule, when only the
class prior changes (label shift: ``p(x|y)`` is the same in both):

    p_t(y|x)  proportional to  p_s(y|x) * pi_t(y) / pi_s(y).

:func:`prior_correction` computes ``log p_s(y|x) - tau * log pi_s(y) + log pi_t(y)``,
renormalised (``tau = 1`` is Bayes' rule; other values are post-hoc logit adjustment,
Menon et al. 2021). It is the one implementation used by
:class:`PriorCorrectedClassifier` (any scikit-learn classifier) and by the
``target_prior`` parameter of every ltroute estimator.

:func:`estimate_target_prior` estimates an unknown ``pi_t`` from unlabelled samples
with the EM algorithm of Saerens, Latinne & Decaestecker (2002). Its assumptions: label
shift (above); probabilities that are *calibrated* posteriors under ``pi_s`` — plain
EM on miscalibrated probabilities can collapse, so calibrate first, on held-out data
(Alexandari et al. 2020; :mod:`ltroute.calibration`); and a batch large enough to
contain the classes it is to find.

References
----------
.. [1] M. Saerens, P. Latinne and C. Decaestecker, "Adjusting the Outputs of a Classifier
   to New a Priori Probabilities: A Simple Procedure", Neural Computation 14(1), 2002.
.. [2] A. Alexandari, A. Kundaje and A. Shrikumar, "Maximum Likelihood with
   Bias-Corrected Calibration is Hard-To-Beat at Label Shift Adaptation", ICML 2020.
.. [3] A. K. Menon, S. Jayasumana, A. S. Rawat, H. Jain, A. Veit and S. Kumar,
   "Long-tail learning via logit adjustment", ICLR 2021.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy.special import log_softmax, logsumexp
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.utils import get_tags
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, column_or_1d

from ltroute.calibration import (
    _check_cv,
    apply_temperature,
    as_log_proba,
    fit_under_prior,
    heldout_log_proba,
)

__all__ = [
    "PriorCorrectedClassifier",
    "UncalibratedEstimateWarning",
    "check_prior",
    "estimate_target_prior",
    "prior_correction",
]

#: Smallest entry of an estimated prior: EM never returns a zero.
PRIOR_FLOOR = 1e-8

_NAMED_PRIORS = ("uniform", "train", "estimate")


class UncalibratedEstimateWarning(UserWarning):
    """Warning raised when ``target_prior="estimate"`` runs EM on probabilities that
    were never calibrated on held-out data (an ltroute estimator before its
    ``calibrate``): the estimate can then drift far from the true prior."""


def check_prior(
    prior: Any, classes: ArrayLike, *, name: str = "target_prior", allow_zero: bool = True
) -> np.ndarray:
    """Validate a class prior given as an array or a mapping; return it normalised.

    Parameters
    ----------
    prior : array-like of shape (n_classes,) or mapping
        Non-negative weights aligned with ``classes`` (an array) or keyed by class label
        (a mapping, e.g. a dict or a pandas Series, covering every class). Any positive
        scale: the result is divided by its sum.
    classes : array-like of shape (n_classes,)
        The classifier's ``classes_``.
    name : str, default="target_prior"
        Name used in error messages.
    allow_zero : bool, default=True
        Whether a class may have prior 0 (it is then never predicted).

    Returns
    -------
    ndarray of shape (n_classes,)
        Float64, summing to one.

    Raises
    ------
    ValueError
        Wrong length, labels that are not classes (or classes missing from a mapping),
        non-finite or negative values, all zero, or a zero where not allowed.
    TypeError
        Values that are not numbers.

    Examples
    --------
    >>> from ltroute.prior import check_prior
    >>> check_prior({"a": 3, "b": 1}, ["a", "b"])
    array([0.75, 0.25])
    """
    classes = np.asarray(classes)
    if isinstance(prior, Mapping) or (hasattr(prior, "items") and hasattr(prior, "keys")):
        lookup = dict(prior.items())
        known = set(classes.tolist())
        unknown = [key for key in lookup if key not in known]
        if unknown:
            raise ValueError(
                f"{name} has labels that are not classes of the estimator: "
                f"{unknown}; classes are {classes.tolist()}."
            )
        missing = [label for label in classes.tolist() if label not in lookup]
        if missing:
            raise ValueError(f"{name} must give a value for every class; missing for {missing}.")
        values = [lookup[label] for label in classes.tolist()]
    else:
        if isinstance(prior, str):
            raise ValueError(
                f"{name}={prior!r} is not one of {list(_NAMED_PRIORS)}, an array or a mapping."
            )
        values = prior
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must hold numbers; got {values!r}.") from exc
    if array.ndim != 1 or len(array) != len(classes):
        raise ValueError(
            f"{name} must have one entry per class ({len(classes)}); got shape {array.shape}."
        )
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite; got {array.tolist()}.")
    if np.any(array < 0):
        raise ValueError(
            f"{name} must be non-negative; negative for classes {classes[array < 0].tolist()}."
        )
    if not np.any(array > 0):
        raise ValueError(f"{name} is all zero; at least one class needs a positive prior.")
    if not allow_zero and np.any(array == 0):
        raise ValueError(
            f"{name} must be positive for every class; zero for classes "
            f"{classes[array == 0].tolist()}."
        )
    return array / array.sum()


def _check_tau(tau: Any) -> float:
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not np.isfinite(tau):
        raise ValueError(f"tau must be a finite real number; got {tau!r}.")
    return float(tau)


def prior_correction(
    log_proba: ArrayLike, *, source_prior: ArrayLike, target_prior: ArrayLike, tau: float = 1.0
) -> np.ndarray:
    """Log-posteriors under ``target_prior`` of log-posteriors under ``source_prior``.

    Computes ``log_softmax(log_proba - tau * log(source_prior) + log(target_prior))``
    row by row, in float64. A target prior of zero gives a class log-probability
    ``-inf`` (probability 0); nothing becomes NaN.

    Parameters
    ----------
    log_proba : array-like of shape (n_samples, n_classes)
        Log-probabilities (or logits) of a classifier; finite or ``-inf``.
    source_prior : array-like of shape (n_classes,)
        Positive prior the probabilities were learned under (normalised here).
    target_prior : array-like of shape (n_classes,)
        Non-negative prior to adapt to (normalised here).
    tau : float, default=1.0
        Scale of the source-prior term (1: Bayes' rule).

    Returns
    -------
    ndarray of shape (n_samples, n_classes)
        Corrected log-probabilities; ``exp`` of each row sums to one.

    Examples
    --------
    >>> import numpy as np
    >>> from ltroute.prior import prior_correction
    >>> log_p = np.log([[0.6, 0.4]])
    >>> np.exp(prior_correction(log_p, source_prior=[0.75, 0.25], target_prior=[0.5, 0.5]))
    array([[0.33333333, 0.66666667]])
    """
    tau = _check_tau(tau)
    z = np.asarray(log_proba, dtype=np.float64)
    if z.ndim != 2:
        raise ValueError(f"log_proba must be 2-D; got shape {z.shape}.")
    if np.any(np.isnan(z)) or np.any(z == np.inf):
        raise ValueError("log_proba contains NaN or +inf.")
    source = np.asarray(source_prior, dtype=np.float64)
    target = np.asarray(target_prior, dtype=np.float64)
    for name, prior in (("source_prior", source), ("target_prior", target)):
        if prior.shape != (z.shape[1],):
            raise ValueError(f"{name} must have shape ({z.shape[1]},); got {prior.shape}.")
    if not np.all(source > 0) or not np.all(np.isfinite(source)):
        raise ValueError("source_prior must be positive and finite.")
    if not np.all(target >= 0) or not np.any(target > 0) or not np.all(np.isfinite(target)):
        raise ValueError("target_prior must be non-negative, finite and not all zero.")
    # Rows with -inf where the target is positive stay finite: log(tiny) floor.
    z = np.maximum(z, np.log(np.finfo(np.float64).tiny))
    with np.errstate(divide="ignore"):
        log_target = np.log(target / target.sum())
    adjusted = z - tau * np.log(source / source.sum()) + log_target
    return log_softmax(adjusted, axis=1)


def estimate_target_prior(
    proba: ArrayLike, *, source_prior: ArrayLike, max_iter: int = 100, tol: float = 1e-6
) -> tuple[np.ndarray, int]:
    """EM estimate of the class prior of an unlabelled batch (Saerens et al. 2002).

    Starting from ``pi = source_prior``, alternate: posteriors under ``pi``
    (:func:`prior_correction` with ``tau=1``), then ``pi = `` their mean over the batch;
    stop when no entry moves by more than ``tol`` or after ``max_iter`` iterations. Each
    iterate increases the likelihood of the batch under the mixture ``sum_y pi_y
    p(x|y)``.

    Assumptions: label shift only (``p(x|y)`` unchanged); ``proba`` calibrated
    posteriors under ``source_prior`` (calibrate on held-out data first, see
    :mod:`ltroute.calibration`); a batch representative of the target distribution.

    Parameters
    ----------
    proba : array-like of shape (n_samples, n_classes)
        Calibrated probabilities of the unlabelled batch.
    source_prior : array-like of shape (n_classes,)
        Positive prior those probabilities are posteriors under.
    max_iter : int, default=100
    tol : float, default=1e-6

    Returns
    -------
    prior : ndarray of shape (n_classes,)
        Estimated target prior, summing to one, mixed with the uniform prior at weight
        ``n_classes * PRIOR_FLOOR`` so that every entry is at least ``PRIOR_FLOOR``
        (1e-8): never a zero, so that it can be divided by and logged.
    n_iter : int
        Iterations run.

    Examples
    --------
    >>> import numpy as np
    >>> from ltroute.prior import estimate_target_prior
    >>> proba = np.array([[0.9, 0.1]] * 3 + [[0.1, 0.9]])
    >>> prior, _ = estimate_target_prior(proba, source_prior=[0.5, 0.5])
    >>> prior.round(2)  # 3 of 4 look like class 0, but 10% of class 1 would too
    array([0.81, 0.19])
    """
    _check_em_params(max_iter, tol)
    log_p = as_log_proba(proba)
    if len(log_p) == 0:
        raise ValueError("estimate_target_prior needs at least one sample.")
    return _em_prior(log_p, source_prior, max_iter=max_iter, tol=tol)


def _check_em_params(max_iter: Any, tol: Any) -> None:
    for name, value, kind in (
        ("max_iter", max_iter, numbers.Integral),
        ("tol", tol, numbers.Real),
    ):
        if isinstance(value, bool) or not isinstance(value, kind) or not value >= 0:
            raise ValueError(f"{name} must be a non-negative number; got {value!r}.")


def _em_prior(
    log_proba: np.ndarray, source_prior: ArrayLike, *, max_iter: int, tol: float
) -> tuple[np.ndarray, int]:
    """EM of :func:`estimate_target_prior` on log-probabilities (finite or ``-inf``,
    renormalised here), without the exp/log round trip; the one implementation."""
    log_p = np.maximum(np.asarray(log_proba, dtype=np.float64),
                       np.log(np.finfo(np.float64).tiny))
    source = np.asarray(source_prior, dtype=np.float64)
    if source.shape != (log_p.shape[1],) or not np.all(source > 0):
        raise ValueError(f"source_prior must be positive with shape ({log_p.shape[1]},).")
    source = source / source.sum()
    log_p = log_softmax(log_p, axis=1)
    prior = source.copy()
    n_iter = 0
    for n_iter in range(1, max_iter + 1):  # noqa: B007 (n_iter is returned)
        log_post = log_p - np.log(source) + np.log(prior)
        log_post -= logsumexp(log_post, axis=1, keepdims=True)
        new = np.exp(logsumexp(log_post, axis=0) - np.log(len(log_p)))
        new = PRIOR_FLOOR + (1.0 - len(new) * PRIOR_FLOOR) * (new / new.sum())
        converged = np.max(np.abs(new - prior)) <= tol
        prior = new
        if converged:
            break
    return prior, n_iter


class PriorCorrectedClassifier(ClassifierMixin, BaseEstimator):
    """Make any probabilistic classifier predict for a chosen (or estimated) class prior.

    ``fit`` fits ``estimator``, records the training class prior and, unless
    ``calibration=None``, fits a calibration of the probabilities on held-out
    predictions (``cv`` extra fits of a clone, see :mod:`ltroute.calibration`).
    Prediction is ::

        argmax_y  log p(y|x) - tau * log pi_train(y) + log pi_target(y)

    where ``log p(y|x)`` are the (calibrated) log-probabilities of ``estimator``;
    ``predict_proba`` is the renormalised ``exp`` of the same quantity. With the
    defaults (``target_prior="uniform"``, ``tau=1``) this is post-hoc logit adjustment
    (Menon et al. 2021): the balanced-accuracy decision of a model fitted on long-tailed
    data.

    Order of operations: ``estimator.predict_proba`` -> calibration (temperature and
    biases fitted at ``fit``) -> prior correction (with ``"estimate"``: EM on the
    calibrated probabilities of the batch first) -> renormalisation.

    Parameters
    ----------
    estimator : classifier with ``predict_proba``
        Any scikit-learn classifier (``SVC(probability=True)``,
        ``HistGradientBoostingClassifier``, an ltroute estimator, a ``Pipeline``...).
        Cloned, never modified.
    target_prior : "uniform", "train", "estimate", array-like or mapping, default="uniform"
        Class prior of the traffic to predict for:

        - ``"uniform"``: every class equally likely (balanced test sets);
        - ``"train"``: the training distribution (``train_prior_``);
        - ``"estimate"``: estimated from each batch given to ``predict`` /
          ``predict_proba`` by EM (:func:`estimate_target_prior`; see
          ``estimate_prior``). The batch must be large and representative;
          a single sample estimates nothing useful;
        - an array aligned with ``classes_`` or a mapping ``label -> weight`` over all
          classes (any positive scale; zeros allowed: the class is never predicted).

        May be changed with ``set_params`` after ``fit`` without refitting.
    tau : float, default=1.0
        Scale of the training-prior term (tunable, e.g. in ``GridSearchCV``).
    train_prior : "fit", "uniform", array-like or mapping, default="fit"
        Prior ``estimator``'s probabilities are posteriors under: ``"fit"`` uses the
        class frequencies of ``y`` in ``fit``; ``"uniform"`` suits an estimator that is
        itself trained with a balancing loss (e.g. ``LongTailClassifier(loss=
        "logit_adjusted")``); or positive weights per class.
    calibration : {"bcts", "temperature"} or None, default="bcts"
        Calibration of the probabilities, fitted on held-out predictions of the
        training data: ``"bcts"`` a temperature and per-class biases (Alexandari et al.
        2020), ``"temperature"`` a temperature only, ``None`` none. Needed for a
        reliable ``"estimate"`` (EM on miscalibrated probabilities can collapse). The
        held-out samples follow the empirical training prior; with another
        ``train_prior`` the fit adds the fixed offset ``log pi_fit - log pi_train``, so
        that the calibrated probabilities stay posteriors under ``train_prior_`` (e.g.
        a balanced ltroute estimator with ``train_prior="uniform"``).
    cv : int or cross-validation splitter, default=5
        How held-out predictions are made for the calibration
        (``cross_val_predict``; an int is a stratified k-fold). Unused when
        ``calibration=None``.
    em_max_iter : int, default=100
        EM iterations for ``"estimate"``.
    em_tol : float, default=1e-6
        EM stopping tolerance on the prior.

    Attributes
    ----------
    estimator_ : classifier
        ``estimator`` fitted on all the training data.
    classes_ : ndarray of shape (n_classes,)
    class_counts_ : ndarray of shape (n_classes,)
        Training samples per class (so ltroute's shot-group scorers work on it).
    train_prior_ : ndarray of shape (n_classes,)
        The resolved ``train_prior``.
    temperature_ : float
        Fitted temperature (1 without calibration).
    biases_ : ndarray of shape (n_classes,)
        Fitted per-class biases (zeros unless ``calibration="bcts"``).
    n_features_in_ : int
        When ``estimator_`` has it.

    See Also
    --------
    ltroute.calibration.TemperatureScaling : The calibration as a separate step.

    References
    ----------
    .. [1] Menon et al., "Long-tail learning via logit adjustment", ICLR 2021.
    .. [2] Saerens, Latinne and Decaestecker, "Adjusting the Outputs of a Classifier to
       New a Priori Probabilities: A Simple Procedure", Neural Computation 2002.
    .. [3] Alexandari, Kundaje and Shrikumar, "Maximum Likelihood with Bias-Corrected
       Calibration is Hard-To-Beat at Label Shift Adaptation", ICML 2020.

    Examples
    --------
    >>> from sklearn.linear_model import LogisticRegression
    >>> from ltroute import PriorCorrectedClassifier
    >>> from ltroute.datasets import load_digits_lt
    >>> data = load_digits_lt()
    >>> clf = PriorCorrectedClassifier(LogisticRegression(max_iter=2000), cv=3)
    >>> clf.fit(data.X_train, data.y_train).classes_[:3]
    array([0, 1, 2])
    >>> clf.predict_proba(data.X_test[:2]).sum(axis=1).round(6)
    array([1., 1.])
    >>> clf.estimate_prior(data.X_test).shape
    (10,)
    """

    _parameter_constraints: dict = {
        "estimator": [HasMethods(["fit", "predict_proba"])],
        "target_prior": [StrOptions(set(_NAMED_PRIORS)), "array-like", Mapping],
        "tau": [Interval(numbers.Real, None, None, closed="neither")],
        "train_prior": [StrOptions({"fit", "uniform"}), "array-like", Mapping],
        "calibration": [StrOptions({"bcts", "temperature"}), None],
        "cv": ["cv_object"],
        "em_max_iter": [Interval(numbers.Integral, 1, None, closed="left")],
        "em_tol": [Interval(numbers.Real, 0, None, closed="left")],
    }

    def __init__(
        self,
        estimator,
        *,
        target_prior="uniform",
        tau=1.0,
        train_prior="fit",
        calibration="bcts",
        cv=5,
        em_max_iter=100,
        em_tol=1e-6,
    ):
        self.estimator = estimator
        self.target_prior = target_prior
        self.tau = tau
        self.train_prior = train_prior
        self.calibration = calibration
        self.cv = cv
        self.em_max_iter = em_max_iter
        self.em_tol = em_tol

    def fit(self, X, y, **fit_params):
        """Fit ``estimator``, the training prior and the calibration.

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
        _check_tau(self.tau)
        if self.calibration is not None:
            _check_cv(self.cv)
        y = column_or_1d(y, warn=True)
        check_classification_targets(y)
        classes, y_codes = np.unique(y, return_inverse=True)
        if len(classes) < 2:
            raise ValueError(
                "PriorCorrectedClassifier needs at least 2 classes; got 1 class: "
                f"{classes.tolist()}."
            )
        counts = np.bincount(y_codes, minlength=len(classes)).astype(np.int64)
        train_prior = self._resolve_train_prior(classes, counts)
        temperature, biases = 1.0, np.zeros(len(classes))
        if self.calibration is not None:
            held_out = heldout_log_proba(self.estimator, X, y, cv=self.cv, fit_params=fit_params)
            # The held-out samples follow the empirical training prior; calibrate the
            # probabilities as posteriors under ``train_prior_`` (no offset for "fit").
            temperature, biases = fit_under_prior(
                held_out, y_codes, train_prior, bias=self.calibration == "bcts"
            )
        estimator = clone(self.estimator).fit(X, y, **fit_params)
        if not np.array_equal(np.asarray(estimator.classes_), classes):
            raise ValueError(
                "estimator.classes_ must be the sorted unique labels of y; got "
                f"{np.asarray(estimator.classes_).tolist()}."
            )
        self.estimator_ = estimator
        self.classes_ = estimator.classes_
        self.class_counts_ = counts
        self.train_prior_ = train_prior
        self.temperature_, self.biases_ = temperature, biases
        if hasattr(estimator, "n_features_in_"):
            self.n_features_in_ = estimator.n_features_in_
        return self

    def _resolve_train_prior(self, classes: np.ndarray, counts: np.ndarray) -> np.ndarray:
        if isinstance(self.train_prior, str):
            if self.train_prior == "fit":
                return counts / counts.sum()
            return np.full(len(classes), 1.0 / len(classes))
        return check_prior(self.train_prior, classes, name="train_prior", allow_zero=False)

    def _calibrated_log_proba(self, X) -> np.ndarray:
        check_is_fitted(self, "estimator_")
        proba = self.estimator_.predict_proba(X)
        log_proba = as_log_proba(proba, f"{type(self.estimator_).__name__} probabilities")
        return apply_temperature(log_proba, self.temperature_, self.biases_)

    def _target(self, log_proba: np.ndarray) -> np.ndarray:
        target = self.target_prior
        if isinstance(target, str):
            if target == "uniform":
                return np.full(len(self.classes_), 1.0 / len(self.classes_))
            if target == "train":
                return self.train_prior_
            if target == "estimate":
                return self._estimate(log_proba)
        return check_prior(target, self.classes_, name="target_prior")

    def _estimate(self, log_proba: np.ndarray) -> np.ndarray:
        """EM estimate of the target prior from calibrated log-probabilities."""
        if len(log_proba) == 0:
            raise ValueError("target_prior='estimate' needs at least one sample.")
        _check_em_params(self.em_max_iter, self.em_tol)
        return _em_prior(
            log_proba, self.train_prior_, max_iter=self.em_max_iter, tol=self.em_tol
        )[0]

    def estimate_prior(self, X) -> np.ndarray:
        """EM estimate of the class prior of the unlabelled batch ``X``.

        Parameters
        ----------
        X : array-like
            Unlabelled samples of the target distribution (many of them).

        Returns
        -------
        ndarray of shape (n_classes,)
            Aligned with ``classes_``; sums to one; no zeros.
        """
        return self._estimate(self._calibrated_log_proba(X))

    def predict_log_proba(self, X) -> np.ndarray:
        """Prior-corrected log-probabilities, columns aligned with ``classes_``."""
        self._validate_params()
        log_proba = self._calibrated_log_proba(X)
        return prior_correction(
            log_proba,
            source_prior=self.train_prior_,
            target_prior=self._target(log_proba),
            tau=self.tau,
        )

    def predict_proba(self, X) -> np.ndarray:
        """Prior-corrected probabilities (rows sum to one), aligned with ``classes_``."""
        return np.exp(self.predict_log_proba(X))

    def predict(self, X) -> np.ndarray:
        """Class of highest prior-corrected probability."""
        log_proba = self.predict_log_proba(X)
        return self.classes_[np.argmax(log_proba, axis=1)]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        inner = get_tags(self.estimator)
        tags.input_tags.sparse = inner.input_tags.sparse
        tags.input_tags.allow_nan = inner.input_tags.allow_nan
        tags.input_tags.pairwise = inner.input_tags.pairwise
        return tags
