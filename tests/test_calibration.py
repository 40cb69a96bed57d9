"""Temperature scaling and its composition with the prior correction."""

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from scipy.special import log_softmax
from sklearn.linear_model import LogisticRegression
from sklearn.utils.estimator_checks import parametrize_with_checks

from ltroute import PriorCorrectedClassifier
from ltroute.calibration import TemperatureScaling, apply_temperature, fit_temperature
from ltroute.metrics import expected_calibration_error


def _overconfident(n, temperature, rng):
    """Labels drawn from softmax(z); the classifier reports logits z / temperature."""
    z = 2.0 * rng.randn(n, 5)
    p = np.exp(log_softmax(z, axis=1))
    y = np.array([rng.choice(5, p=row) for row in p])
    return z / temperature, y


def test_fit_temperature_recovers_the_generating_temperature():
    log_proba, y = _overconfident(6000, 0.5, np.random.RandomState(0))
    temperature, biases = fit_temperature(log_proba, y)
    # the reported logits are z / 0.5, so T = 2 undoes it; 6000 samples: a few percent
    assert abs(temperature - 2.0) < 0.1
    assert_array_equal(biases, 0.0)


def test_fit_temperature_with_bias_recovers_a_class_shift():
    rng = np.random.RandomState(1)
    z = 2.0 * rng.randn(6000, 3)
    shift = np.array([1.0, 0.0, -1.0])
    p = np.exp(log_softmax(z + shift, axis=1))
    y = np.array([rng.choice(3, p=row) for row in p])
    temperature, biases = fit_temperature(z, y, bias=True)
    assert abs(temperature - 1.0) < 0.1
    assert_allclose(biases, shift - shift.mean(), atol=0.15)


def test_calibration_lowers_held_out_nll():
    log_proba, y = _overconfident(4000, 0.4, np.random.RandomState(2))
    t, b = fit_temperature(log_proba[:2000], y[:2000], bias=True)
    rows = np.arange(2000)
    before = -np.mean(log_softmax(log_proba[2000:], axis=1)[rows, y[2000:]])
    after = -np.mean(apply_temperature(log_proba[2000:], t, b)[rows, y[2000:]])
    assert after < before - 0.1


def test_temperature_scaling_keeps_the_argmax_and_composes_with_the_prior():
    rng = np.random.RandomState(3)
    counts = [300, 100, 30]
    y = np.repeat(np.arange(3), counts)
    X = rng.randn(len(y), 2) + 1.5 * np.eye(3)[y][:, :2] - 1.5 * (y == 2)[:, None]
    ts = TemperatureScaling(LogisticRegression(), cv=3).fit(X, y)
    assert_array_equal(ts.predict(X), ts.estimator_.predict(X))
    assert_allclose(ts.predict_proba(X).sum(axis=1), 1.0)
    # calibrate, then correct: one estimator with calibration="temperature" is the same
    # as the correction of a TemperatureScaling step
    composed = PriorCorrectedClassifier(
        TemperatureScaling(LogisticRegression(), cv=3), calibration=None
    ).fit(X, y)
    built_in = PriorCorrectedClassifier(LogisticRegression(), calibration="temperature", cv=3).fit(
        X, y
    )
    assert_allclose(composed.predict_proba(X), built_in.predict_proba(X), rtol=1e-6)


def test_fit_temperature_rejects_bad_input():
    with pytest.raises(ValueError, match="finite"):
        fit_temperature([[0.0, np.inf]], [0])
    with pytest.raises(ValueError, match="rows"):
        fit_temperature([[0.0, 1.0]], [0, 1])
    with pytest.raises(ValueError, match="cv"):
        TemperatureScaling(LogisticRegression(), cv=1).fit([[0.0], [1.0]], [0, 1])
    with pytest.raises(ValueError, match="encoded labels"):
        fit_temperature([[0.0, 1.0]], [2])
    with pytest.raises(ValueError, match="offset must have shape"):
        fit_temperature([[0.0, 1.0]], [0], offset=[0.0, np.nan])
    with pytest.raises(ValueError, match="-inf for a class that occurs"):
        fit_temperature([[0.0, 1.0]], [0], offset=[-np.inf, 0.0])


def test_fit_temperature_with_an_absent_class_gives_it_a_neutral_bias():
    """Offset -inf (the class has prior 0 in the data): the fit equals the fit on the
    other classes alone, and the absent class gets their mean bias."""
    rng = np.random.RandomState(4)
    z = 2.0 * rng.randn(3000, 4)
    p = np.exp(log_softmax(z[:, :3] + [0.5, 0.0, -0.5], axis=1))
    y = np.array([rng.choice(3, p=row) for row in p])
    t, b = fit_temperature(z, y, bias=True, offset=[0.0, 0.0, 0.0, -np.inf])
    t3, b3 = fit_temperature(z[:, :3], y, bias=True)
    assert t == pytest.approx(t3, rel=1e-4)
    assert_allclose(b[:3] - b[:3].mean(), b3, atol=1e-4)
    assert b[3] == pytest.approx(b[:3].mean(), abs=1e-12)
    assert b.mean() == pytest.approx(0.0, abs=1e-12)


@parametrize_with_checks([TemperatureScaling(LogisticRegression(), cv=3)])
def test_sklearn_compatible_estimator(estimator, check):
    check(estimator)


# ------------------------------------------------------------------------- ECE
Y_PROBA = [[0.9, 0.1], [0.75, 0.25], [0.3, 0.7], [0.45, 0.55]]


def test_ece_equals_hand_computation():
    # 5 bins of width 0.2. Confidences .9 (right) | .75 (wrong), .7 (right) | .55 (right):
    # .025 + (2/4)|.5 - .725| + (1/4)|1 - .55| = .025 + .1125 + .1125
    assert_allclose(expected_calibration_error([0, 1, 1, 1], Y_PROBA, n_bins=5), 0.25)
    # one bin: |accuracy - mean confidence| = |.75 - .725|
    assert_allclose(expected_calibration_error([0, 1, 1, 1], Y_PROBA, n_bins=1), 0.025)
    # per group, by the true class: class 0 (many) .9 right; class 1 (few) the other three
    ece = expected_calibration_error(
        ["a", "b", "b", "b"], Y_PROBA, class_counts={"a": 500, "b": 10}, n_bins=5
    )
    assert_allclose([ece["overall"], ece["many"], ece["few"]], [0.25, 0.1, 0.3])
    assert np.isnan(ece["medium"])


def test_ece_of_calibrated_probabilities_is_small():
    rng = np.random.RandomState(4)
    p = rng.dirichlet(np.ones(4), size=20000)
    y = np.array([rng.choice(4, p=row) for row in p])
    assert expected_calibration_error(y, p) < 0.02
    overconfident = np.exp(log_softmax(3 * np.log(p), axis=1))
    assert expected_calibration_error(y, overconfident) > 0.1


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(y_proba=[[0.5, 0.6]]), ValueError, "sum to one"),
        (dict(y_proba=[[np.nan, 1.0]]), ValueError, "NaN"),
        (dict(y_proba=[0.5, 0.5]), ValueError, "2-D"),
        (dict(y_proba=[[0.2, 0.3, 0.5]], classes=[0, 1]), ValueError, "columns"),
        (dict(y_true=[3]), ValueError, "not in classes"),
        (dict(n_bins=0), ValueError, "n_bins"),
        (dict(y_true=[0, 1]), ValueError, "different lengths"),
    ],
)
def test_ece_rejects_bad_input(kwargs, error, match):
    args = {"y_true": [0], "y_proba": [[0.5, 0.5]]} | kwargs
    with pytest.raises(error, match=match):
        expected_calibration_error(args.pop("y_true"), args.pop("y_proba"), **args)
