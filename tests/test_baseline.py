"""LongTailClassifier and the shared LongTailNet behaviour (validation, encoding, skorch)."""

import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from skorch.callbacks import Callback

from ltroute import LongTailClassifier
from ltroute.metrics import few_shot_scorer, group_accuracy
from ltroute.nn import NormedLinear

FAST = {"max_epochs": 3, "hidden_sizes": (32,), "expert_hidden_sizes": (), "random_state": 0}


@pytest.fixture(scope="module")
def toy():
    """Three Gaussian blobs, 60/25/8 samples, string labels that sort out of order."""
    rng = np.random.RandomState(0)
    counts = {"zeta": 60, "alpha": 25, "mu": 8}
    centers = {"zeta": [2, 0, 0, 0], "alpha": [0, 2, 0, 0], "mu": [0, 0, 2, 0]}
    X = np.concatenate([rng.randn(n, 4) + centers[c] for c, n in counts.items()])
    y = np.concatenate([[c] * n for c, n in counts.items()]).astype(object)
    return X, y


@pytest.fixture(scope="module")
def fitted(toy):
    X, y = toy
    return LongTailClassifier(**FAST).fit(X, y)


def test_fitted_attributes_and_label_encoding(fitted, toy):
    X, y = toy
    assert fitted.classes_.tolist() == ["alpha", "mu", "zeta"]
    assert fitted.class_counts_.tolist() == [25, 8, 60]
    assert fitted.n_features_in_ == 4 and fitted.input_shape_ == (4,)
    assert len(fitted.history_) == FAST["max_epochs"]
    pred = fitted.predict(X)
    assert set(pred) <= set(fitted.classes_)
    proba = fitted.predict_proba(X)
    assert proba.shape == (len(X), 3) and proba.dtype == np.float32
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(pred, fitted.classes_[proba.argmax(axis=1)])
    assert fitted.score(X, y) == pytest.approx(np.mean(pred == y))


def test_softmax_is_applied_exactly_once(fitted, toy):
    X, _ = toy
    logits = fitted.forward(X.astype(np.float32))[0]  # fused probabilities from skorch
    raw = fitted.module_(torch.as_tensor(X, dtype=torch.float32))[:, 0]
    np.testing.assert_allclose(fitted.predict_proba(X), torch.softmax(raw, 1).detach(),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits.numpy(), fitted.predict_proba(X), rtol=1e-6)


def test_non_contiguous_integer_labels_come_back_unchanged(toy):
    X, y = toy
    y_int = np.select([y == "zeta", y == "alpha"], [-7, 40], default=1000)
    clf = LongTailClassifier(**FAST).fit(X, y_int)
    assert clf.classes_.tolist() == [-7, 40, 1000]
    assert set(clf.predict(X)) <= {-7, 40, 1000}


def test_inputs_pandas_float64_torch_agree(toy):
    X, y = toy
    a = LongTailClassifier(**FAST).fit(X, y).predict_proba(X)
    frame = pd.DataFrame(X, columns=list("abcd"))
    clf = LongTailClassifier(**FAST).fit(frame, pd.Series(y))
    np.testing.assert_array_equal(clf.predict_proba(frame), a)
    assert clf.feature_names_in_.tolist() == list("abcd")
    b = LongTailClassifier(**FAST).fit(torch.tensor(X, dtype=torch.float32), y)
    np.testing.assert_array_equal(b.predict_proba(X), a)


def test_determinism_and_global_rng_left_alone(toy):
    X, y = toy
    state = torch.get_rng_state()
    a = LongTailClassifier(**FAST).fit(X, y).predict_proba(X)
    assert torch.equal(torch.get_rng_state(), state)
    b = LongTailClassifier(**FAST).fit(X, y).predict_proba(X)
    np.testing.assert_array_equal(a, b)
    c = LongTailClassifier(**(FAST | {"random_state": 1})).fit(X, y).predict_proba(X)
    assert not np.array_equal(a, c)
    d = LongTailClassifier(**(FAST | {"random_state": None})).fit(X, y).predict_proba(X)
    e = LongTailClassifier(**(FAST | {"random_state": None})).fit(X, y).predict_proba(X)
    assert not np.array_equal(d, e)


def test_clone_keeps_constructor_params_and_device_auto(fitted):
    params = fitted.get_params(deep=False)
    assert params["device"] == "auto"
    assert not any(name.startswith("_") for name in params)
    cloned = clone(fitted)
    assert cloned.get_params(deep=False).keys() == params.keys()
    assert not hasattr(cloned, "classes_") and not hasattr(cloned, "module_")
    for name in ("loss", "drw_epoch", "hidden_sizes", "random_state", "device", "max_epochs"):
        assert cloned.get_params()[name] == params[name]


def test_pickle_round_trip(fitted, toy):
    X, _ = toy
    restored = pickle.loads(pickle.dumps(fitted))
    assert restored.device == "auto"
    np.testing.assert_array_equal(restored.predict_proba(X), fitted.predict_proba(X))
    np.testing.assert_array_equal(restored.classes_, fitted.classes_)


def test_images_go_through_the_convnet(mnist):
    idx = np.flatnonzero(np.isin(mnist.y_train, [0, 1, 9]))[::4]
    X, y = mnist.X_train[idx], mnist.y_train[idx]
    clf = LongTailClassifier(max_epochs=2, random_state=0).fit(X, y)
    assert type(clf.module_.trunk).__name__ == "ConvNetTrunk"
    assert clf.input_shape_ == (1, 28, 28) and clf.n_features_in_ == 1
    proba = clf.predict_proba(mnist.X_test[:10])
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)
    assert set(clf.predict(mnist.X_test[:10])) <= {0, 1, 9}


@pytest.mark.parametrize("loss", ["ce", "focal", "ldam", "logit_adjusted", "balanced_softmax"])
def test_every_loss_learns_the_toy_problem(loss, toy):
    X, y = toy
    clf = LongTailClassifier(loss=loss, max_epochs=15, lr=1e-2, random_state=0).fit(X, y)
    assert clf.score(X, y) > 0.9
    assert isinstance(clf.module_.heads[0], NormedLinear) == (loss == "ldam")


def test_balanced_softmax_equals_logit_adjustment_with_tau_one(toy):
    X, y = toy
    a = LongTailClassifier(loss="balanced_softmax", **FAST).fit(X, y).predict_proba(X)
    b = LongTailClassifier(loss="logit_adjusted", logit_adjust_tau=1.0, **FAST).fit(X, y)
    np.testing.assert_array_equal(a, b.predict_proba(X))


class _RecordDRW(Callback):
    def on_epoch_begin(self, net, **kwargs):
        weights = net._drw_weights(net.drw_epoch, net.drw_beta)
        net.history.record("drw_weights", None if weights is None else weights.tolist())


def test_drw_switches_on_after_drw_epoch(toy):
    X, y = toy
    clf = LongTailClassifier(drw_epoch=2, callbacks=[("drw", _RecordDRW())], **(FAST | {
        "max_epochs": 4})).fit(X, y)
    recorded = clf.history[:, "drw_weights"]
    assert recorded[:2] == [None, None]
    assert recorded[2] == recorded[3]
    weights = np.array(recorded[2])
    assert weights.sum() == pytest.approx(3.0, rel=1e-6)
    assert weights[1] > weights[0] > weights[2]  # mu (8) > alpha (25) > zeta (60)


def test_pipeline_and_grid_search_with_few_shot_scorer(small_letter):
    X, y, _, _ = small_letter
    pipe = make_pipeline(StandardScaler(), LongTailClassifier(max_epochs=4, random_state=0))
    grid = GridSearchCV(pipe, {"longtailclassifier__loss": ["ce", "logit_adjusted"]},
                        scoring=few_shot_scorer, cv=StratifiedKFold(2), error_score="raise")
    grid.fit(X, y)
    assert np.isfinite(grid.cv_results_["mean_test_score"]).all()
    best = grid.best_estimator_[-1]
    assert best.class_counts_.sum() == len(y)


def test_warm_start_continues_training_and_checks_classes(toy):
    X, y = toy
    clf = LongTailClassifier(warm_start=True, **FAST).fit(X, y)
    clf.fit(X, y)
    assert len(clf.history_) == 2 * FAST["max_epochs"]
    with pytest.raises(ValueError, match="same classes"):
        clf.fit(X[y != "mu"], y[y != "mu"])


def test_partial_fit_is_not_offered(fitted):
    assert not hasattr(fitted, "partial_fit")


def test_predict_before_fit_raises_not_fitted():
    with pytest.raises(NotFittedError):
        LongTailClassifier().predict(np.zeros((2, 3)))


@pytest.mark.parametrize(
    "X_change, y_change, match",
    [
        (lambda X: np.where(np.arange(X.size).reshape(X.shape) == 5, np.nan, X), None, "NaN"),
        (lambda X: np.where(np.arange(X.size).reshape(X.shape) == 5, np.inf, X), None,
         "infinity"),
        (lambda X: X[:, 0], None, "2-D .* or 4-D .* got a 1-D"),
        (lambda X: X[:, :, None], None, "got a 3-D"),
        (lambda X: X.reshape(len(X), 1, 2, 2, 1), None, "got a 5-D"),
        (None, lambda y: y[:-3], "inconsistent numbers of samples"),
        (None, lambda y: np.full(len(y), "zeta"), "at least 2 classes"),
        (None, lambda y: np.linspace(0, 1, len(y)), "Unknown label type"),
    ],
)
def test_bad_training_input_raises_named_value_error(toy, X_change, y_change, match):
    X, y = toy
    X = X_change(X) if X_change else X
    y = y_change(y) if y_change else y
    with pytest.raises(ValueError, match=match):
        LongTailClassifier(**FAST).fit(X, y)


def test_bad_prediction_input(fitted, mnist):
    with pytest.raises(ValueError, match="X has 3 features, but .* expecting 4"):
        fitted.predict(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="fitted on feature vectors of shape"):
        fitted.predict(np.zeros((2, 1, 2, 2)))
    images = LongTailClassifier(max_epochs=1, random_state=0).fit(mnist.X_train[:40],
                                                                   mnist.y_train[:40])
    with pytest.raises(ValueError, match=r"\(1, 27, 28\), but .* images of shape \(1, 28, 28\)"):
        images.predict(np.zeros((2, 1, 27, 28), dtype=np.float32))
    with pytest.raises(ValueError, match="NaN"):
        fitted.predict(np.full((2, 4), np.nan))


@pytest.mark.parametrize(
    "params, match",
    [({"loss": "hinge"}, "'loss' parameter"), ({"drw_epoch": -1}, "'drw_epoch' parameter"),
     ({"backbone": "vit"}, "'backbone' parameter"), ({"lr": 0}, "'lr' parameter"),
     ({"dropout": 1.0}, "'dropout' parameter"), ({"drw_beta": 1.0}, "'drw_beta' parameter"),
     ({"predict_nonlinearity": torch.sigmoid}, "predict_nonlinearity"),
     ({"iterator_train_shuffle": True}, "iterator_train__shuffle")],
)
def test_bad_parameters_are_reported_at_fit(toy, params, match):
    X, y = toy
    clf = LongTailClassifier(**(FAST | params))
    with pytest.raises(ValueError, match=match):
        clf.fit(X, y)


@pytest.mark.slow
def test_logit_adjustment_beats_cross_entropy_on_few_shot_letter(letter):
    """Learning on real data: UCI Letter, ratio 100 ('A' 500 ... 'Z' 5), balanced test.

    Measured with the defaults (30 epochs, AdamW 1e-3 with the step schedule, MLP
    256-256-128) over seeds 0, 1, 2 (data split and fit) on this CI machine kind with
    ``python benchmarks/accuracy.py --threads 1``: few-shot accuracy CE 0.586 +- 0.021,
    logit-adjusted 0.694 +- 0.022 (gaps 0.109, 0.121, 0.095; overall 0.798 vs 0.839).
    The test fits seed 0 only and asks for about half the mean gap: logit adjustment
    ahead by at least 0.06 on few-shot classes,
    without losing overall accuracy.
    """
    scores = {}
    for loss in ("ce", "logit_adjusted"):
        clf = LongTailClassifier(loss=loss, random_state=0).fit(letter.X_train, letter.y_train)
        scores[loss] = group_accuracy(letter.y_test, clf.predict(letter.X_test),
                                      class_counts=letter.class_counts)
    assert scores["logit_adjusted"]["few"] >= scores["ce"]["few"] + 0.06
    assert scores["logit_adjusted"]["overall"] >= scores["ce"]["overall"]
