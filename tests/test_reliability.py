"""No silent wrong answers, no corrupted state, no noise: behaviour shared by every
estimator (divergence and convergence warnings, BatchNorm statistics after short runs,
warm starts and failed calls, sample weights, pandas inputs, ``n_experts="auto"``,
installs without triton, the command line)."""

import pickle
import re
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from skorch.callbacks import Callback

from ltroute import DQRouteClassifier, LongTailClassifier, RIDEClassifier
from ltroute.__main__ import main
from ltroute.datasets import load_digits_lt
from ltroute.losses import (
    balanced_softmax_loss,
    cross_entropy,
    focal_loss,
    ldam_loss,
    ldam_margins,
    logit_adjusted_loss,
    region_cross_entropy,
    ride_diversity_loss,
)

ESTIMATORS = [LongTailClassifier, RIDEClassifier, DQRouteClassifier]
FAST = {"max_epochs": 3, "hidden_sizes": (16,), "expert_hidden_sizes": (), "batch_size": 16,
        "random_state": 0}


def _fast(estimator):
    """FAST, with AdamW's lr raised to 1e-2 (RIDE keeps its SGD at 0.1): every short fit
    here converges, so no ConvergenceWarning."""
    return FAST if estimator is RIDEClassifier else FAST | {"lr": 1e-2}


@pytest.fixture(scope="module")
def digits():
    return load_digits_lt()


@pytest.fixture(scope="module")
def blobs():
    """Four separable blobs, 40/20/12/8 rows, string labels."""
    rng = np.random.RandomState(0)
    counts = [40, 20, 12, 8]
    y = np.repeat(np.array(["w", "x", "y", "z"], dtype=object), counts)
    codes = np.repeat(np.arange(4), counts)
    X = (rng.randn(len(y), 5) + 4 * np.eye(5)[codes]).astype(np.float32)
    return X, y


def _convergence_warnings(record):
    return [str(w.message) for w in record if issubclass(w.category, ConvergenceWarning)]


# ------------------------------------------------------------------ silent wrong answers
@pytest.mark.parametrize("estimator", ESTIMATORS, ids=lambda cls: cls.__name__)
def test_diverged_fit_warns_stops_and_never_predicts_a_class(estimator, digits):
    clf = estimator(max_epochs=10, lr=1e8, random_state=0)
    with pytest.warns(ConvergenceWarning, match="training loss became nan.*diverged"):
        clf.fit(digits.X_train, digits.y_train)
    assert len(clf.history_) < 10  # stopped at the first non-finite epoch
    methods = [clf.predict, clf.predict_proba, lambda X: clf.score(X, digits.y_train[:5])]
    methods += [getattr(clf, name) for name in ("route", "energies") if hasattr(clf, name)]
    for method in methods:
        with pytest.raises(ValueError, match="not finite.*diverged"):
            method(digits.X_train[:5])


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=lambda cls: cls.__name__)
def test_undertrained_fit_warns(estimator, digits):
    # One epoch at lr=1e-9 leaves the random initialisation: training accuracy 0.01-0.34
    # for seeds 0-4 of every estimator (measured), below the majority share 0.408.
    with pytest.warns(ConvergenceWarning, match="far from converged.*below 0.408"):
        estimator(max_epochs=1, lr=1e-9, random_state=0).fit(digits.X_train, digits.y_train)


@pytest.mark.slow
def test_dqroute_short_schedule_beats_the_majority_class(digits):
    """Three epochs on digits-LT (294 rows: 3 batches of 128, 9 optimiser steps).

    Training accuracy, seeds 0/1/2 (measured): 0.935/0.888/0.969 against the majority
    share 0.408 (LongTailClassifier 0.959/0.963/0.969, RIDE 0.952/0.915/0.973). Before
    the BatchNorm statistics were re-estimated after short runs DQRoute scored
    0.238/0.092/0.408: BatchNorm's running statistics still weighed their starting
    values (mean 0, variance 1) by 0.9^9 = 39 %, while the features run from 0 to 16.
    """
    majority = np.bincount(digits.y_train).max() / len(digits.y_train)
    for seed in range(3):
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConvergenceWarning)
            clf = DQRouteClassifier(max_epochs=3, random_state=seed).fit(digits.X_train,
                                                                         digits.y_train)
        assert clf.score(digits.X_train, digits.y_train) > majority + 0.35


def test_dqroute_short_schedule_without_recalibration_is_flagged(digits):
    # The configuration of the issue with the BatchNorm recalibration switched off:
    # training accuracy 0.238 (seed 0), below the majority share, so fit says so.
    clf = DQRouteClassifier(max_epochs=3, random_state=0,
                            callbacks__batchnorm_recalibration=None)
    with pytest.warns(ConvergenceWarning, match="far from converged"):
        clf.fit(digits.X_train, digits.y_train)
    assert clf.score(digits.X_train, digits.y_train) < 0.3


def _batch_norm_layers(clf):
    return [m for m in clf.module_.modules() if isinstance(m, torch.nn.BatchNorm1d)]


def _record_inputs(layer, sink: list):
    """Append ``(training mode, input)`` of each forward call of ``layer`` to ``sink``;
    returns the hook's handle."""
    return layer.register_forward_hook(
        lambda m, args, out: sink.append((m.training, args[0].detach().clone())))


class _FirstBatchNormSpy(Callback):
    """Records the first BatchNorm layer's inputs during training (from the first epoch)."""

    def on_train_begin(self, net, **kwargs):
        self.inputs_ = []
        self.hook_ = _record_inputs(_batch_norm_layers(net)[0], self.inputs_)

    def on_train_end(self, net, **kwargs):
        self.hook_.remove()


class _StopAfter(Callback):
    """Stops training after ``epochs`` epochs (as early stopping would)."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_epoch_end(self, net, **kwargs):
        if len(net.history) >= self.epochs:
            raise KeyboardInterrupt


def test_batchnorm_statistics_of_a_short_run_average_its_last_epoch(blobs):
    X, y = blobs  # one batch per epoch: the last epoch's statistics are its batch's
    spy = _FirstBatchNormSpy()
    params = _fast(LongTailClassifier) | {"batch_size": -1, "max_epochs": 5}
    clf = LongTailClassifier(**params, callbacks=[("spy", spy)]).fit(X, y)
    first = _batch_norm_layers(clf)[0]
    assert int(first.num_batches_tracked) == 5  # the training steps
    assert first.momentum == 0.1  # restored after the epoch
    training_inputs = [x for training, x in spy.inputs_ if training]
    assert len(training_inputs) == 5
    last = training_inputs[-1]
    torch.testing.assert_close(first.running_mean, last.mean(dim=0))
    torch.testing.assert_close(first.running_var, last.var(dim=0))  # unbiased, as BatchNorm
    off = LongTailClassifier(**params, callbacks__batchnorm_recalibration=None).fit(X, y)
    assert not torch.allclose(_batch_norm_layers(off)[0].running_mean, first.running_mean)


@pytest.mark.parametrize("cut_short", [False, True], ids=["last_epoch=False", "stopped early"])
def test_batchnorm_statistics_are_recomputed_after_a_short_run(blobs, cut_short):
    # The pass over the training fold after training: chosen, or because the fit ended
    # before its last planned epoch (here: a callback stops it after epoch 5 of 6).
    X, y = blobs
    params = _fast(LongTailClassifier) | {"batch_size": -1, "max_epochs": 6}
    if cut_short:
        params["callbacks"] = [("stop", _StopAfter(5))]
    else:
        params["callbacks__batchnorm_recalibration__last_epoch"] = False
    clf = LongTailClassifier(**params).fit(X, y)
    assert len(clf.history_) == (5 if cut_short else 6)
    first = _batch_norm_layers(clf)[0]
    mean, var = first.running_mean.clone(), first.running_var.clone()
    assert int(first.num_batches_tracked) == len(clf.history_)  # steps, not the pass
    inputs = []
    hook = _record_inputs(first, inputs)
    with torch.no_grad():
        clf.module_.eval()(torch.as_tensor(X))  # inference mode: the layer's inputs only
    hook.remove()
    torch.testing.assert_close(mean, inputs[0][1].mean(dim=0))  # the final weights' inputs
    torch.testing.assert_close(var, inputs[0][1].var(dim=0))


def test_batchnorm_statistics_of_longer_runs_are_left_alone(blobs):
    X, y = blobs  # 80 rows, batches of 8: 10 steps per epoch, 50 steps > 44
    params = _fast(LongTailClassifier) | {"batch_size": 8, "max_epochs": 5}
    on = LongTailClassifier(**params).fit(X, y)
    off = LongTailClassifier(**params, callbacks__batchnorm_recalibration=None).fit(X, y)
    np.testing.assert_array_equal(on.predict_proba(X), off.predict_proba(X))


def test_end_of_fit_checks_leave_the_random_stream_alone(blobs):
    # RIDE's router stage follows them and draws its class-balanced schedule from the
    # seeded RNG: the same router with the checks on or off.
    X, y = blobs
    params = _fast(RIDEClassifier) | {"router_epochs": 1}
    on = RIDEClassifier(**params).fit(X, y)
    off = RIDEClassifier(**params, callbacks__convergence_check=None).fit(X, y)
    np.testing.assert_array_equal(on.router_losses_, off.router_losses_)


# ------------------------------------------------------------------------ corrupted state
def _state(clf, X):
    return (clf.predict_proba(X), clf.classes_.copy(), clf.class_counts_.copy(),
            clf.n_features_in_, list(getattr(clf, "feature_names_in_", [])),
            len(clf.history_))


def _assert_same_state(before, after):
    np.testing.assert_array_equal(before[0], after[0])
    for a, b in zip(before[1:], after[1:], strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=lambda cls: cls.__name__)
def test_failed_calls_leave_the_fitted_estimator_as_it_was(estimator, blobs):
    X, y = blobs
    clf = estimator(**_fast(estimator), warm_start=True).fit(X, y)
    before = _state(clf, X)
    failing = [
        (lambda: clf.fit(X[:, :4], y), "X has 4 features, but .* is expecting 5 features"),
        (lambda: clf.fit(np.where(np.arange(5) == 2, np.nan, X), y), "NaN"),
        (lambda: clf.fit(X, np.where(y == "z", "new", y)), "same classes"),
        (lambda: clf.fit(X, y, sample_weight=-np.ones(len(y))), "sample_weight"),
        (lambda: clf.set_params(warm_start=False, hidden_sizes=(0,)).fit(X, y),
         "hidden_sizes"),
    ]
    for call, match in failing:
        with pytest.raises(ValueError, match=match):
            call()
        _assert_same_state(before, _state(clf, X))
    clf.set_params(warm_start=True, hidden_sizes=FAST["hidden_sizes"]).fit(X, y)
    assert len(clf.history_) == 2 * FAST["max_epochs"]  # it still trains on its data


def test_warm_start_with_new_classes_keeps_the_feature_names(blobs):
    X, y = blobs
    frame = pd.DataFrame(X, columns=list("abcde"))
    clf = LongTailClassifier(**_fast(LongTailClassifier), warm_start=True).fit(frame, y)
    before = _state(clf, frame)
    for columns in ("vwxyz", "abcde"):
        with pytest.raises(ValueError, match="same classes|feature names should match"):
            clf.fit(pd.DataFrame(X, columns=list(columns)), np.where(y == "z", "new", y))
        _assert_same_state(before, _state(clf, frame))
    refit = clone(clf).set_params(warm_start=False).fit(frame, y)
    with pytest.raises(ValueError, match="NaN"):  # a fresh refit: validated first too
        refit.fit(pd.DataFrame(np.where(np.arange(5) == 2, np.nan, X), columns=list("vwxyz")),
                  y)
    assert refit.feature_names_in_.tolist() == list("abcde")


def test_dqroute_detector_confidence_set_after_fit_names_the_fix(blobs):
    X, y = blobs
    clf = DQRouteClassifier(**_fast(DQRouteClassifier)).fit(X, y)
    clf.set_params(fusion_confidence="detector")
    for method in (clf.predict, clf.predict_proba, clf.route, clf.energies):
        with pytest.raises(ValueError, match="fitted with ood_loss=None.*fusion_confidence="
                                             "'energy'"):
            method(X)
    clf.set_params(fusion_confidence="energy")
    assert clf.predict_proba(X).shape == (len(X), 4)
    with_detectors = DQRouteClassifier(**_fast(DQRouteClassifier), ood_loss="logistic").fit(X, y)
    with_detectors.set_params(fusion_confidence="detector")
    np.testing.assert_allclose(with_detectors.predict_proba(X).sum(axis=1), 1.0, rtol=1e-5)


# --------------------------------------------------------------------------- sample weights
_Z = torch.randn(12, 4, generator=torch.Generator().manual_seed(0))
_Y = torch.tensor([0, 1, 2, 3, 0, 0, 1, 2, 0, 1, 0, 3])
_S = torch.tensor([1, 0, 2, 3, 1, 1, 2, 1, 0, 4, 1, 2])
_CLASS_WEIGHT = torch.tensor([0.5, 1.0, 2.0, 4.0])
_COUNTS = torch.tensor([50, 20, 8, 3])

LOSSES = {
    "ce": lambda z, y, **kw: cross_entropy(z, y, **kw),
    "focal": lambda z, y, **kw: focal_loss(z, y, gamma=2.0, **kw),
    "ldam": lambda z, y, **kw: ldam_loss(z, y, margins=ldam_margins(_COUNTS), **kw),
    "logit_adjusted": lambda z, y, **kw: logit_adjusted_loss(
        z, y, log_prior=torch.log(_COUNTS / _COUNTS.sum()), tau=0.5, **kw),
    "balanced_softmax": lambda z, y, **kw: balanced_softmax_loss(
        z, y, log_prior=torch.log(_COUNTS / _COUNTS.sum()), **kw),
}


@pytest.mark.parametrize("class_weight", [None, _CLASS_WEIGHT], ids=["plain", "drw"])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_integer_sample_weights_equal_repeated_rows(name, class_weight):
    loss = LOSSES[name]
    weighted = loss(_Z, _Y, weight=class_weight, sample_weight=_S.float())
    repeated = loss(_Z.repeat_interleave(_S, dim=0), _Y.repeat_interleave(_S),
                    weight=class_weight)
    torch.testing.assert_close(weighted, repeated)
    torch.testing.assert_close(loss(_Z, _Y, weight=class_weight, sample_weight=torch.ones(12)),
                               loss(_Z, _Y, weight=class_weight))


@pytest.mark.parametrize("reduction", ["sample_mean", "per_expert_mean"])
def test_integer_sample_weights_equal_repeated_rows_for_region_and_diversity_losses(reduction):
    logits = torch.randn(12, 3, 4, generator=torch.Generator().manual_seed(1))
    regions = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)
    weighted = region_cross_entropy(logits, _Y, regions, weight=_CLASS_WEIGHT,
                                    reduction=reduction, sample_weight=_S.float())
    repeated = region_cross_entropy(logits.repeat_interleave(_S, dim=0),
                                    _Y.repeat_interleave(_S), regions, weight=_CLASS_WEIGHT,
                                    reduction=reduction)
    torch.testing.assert_close(weighted, repeated)
    torch.testing.assert_close(
        ride_diversity_loss(logits, temperature=2.0, sample_weight=_S.float()),
        ride_diversity_loss(logits.repeat_interleave(_S, dim=0), temperature=2.0))
    zero = region_cross_entropy(logits, _Y, regions, reduction=reduction,
                                sample_weight=torch.zeros(12))
    assert zero.item() == 0.0


_LINEAR = {"hidden_sizes": (), "expert_hidden_sizes": (), "batch_size": -1, "max_epochs": 4,
           "lr_schedule": None, "random_state": 0,
           "callbacks__convergence_check": None}  # four steps: not meant to converge


@pytest.mark.parametrize("estimator, params", [
    (LongTailClassifier, {"loss": "ce", "lr": 0.05}),
    (LongTailClassifier, {"loss": "ldam", "lr": 0.05}),
    (LongTailClassifier, {"loss": "logit_adjusted", "lr": 0.05}),
    (RIDEClassifier, {"router": False, "drw_epoch": None}),
    (DQRouteClassifier, {"weight_warmup_epochs": 1, "lr": 0.05}),
], ids=["ce", "ldam", "logit_adjusted", "ride", "dqroute"])
def test_fit_with_sample_weight_equals_fit_on_repeated_rows(estimator, params, blobs):
    """Full-batch training of networks without BatchNorm: integer weights and repeated
    rows give the same gradients. Within each class, half the rows weigh 3 and half 1,
    so the repeated data has twice the class counts (the same prior, margins and
    regions; ``class_counts_`` always counts rows, unweighted). DRW is off: its
    effective-number weights are not invariant to doubling the counts (the composition
    of sample and class weights is checked on the losses above)."""
    X, y = blobs
    weight = np.where(np.arange(len(y)) % 2 == 0, 3, 1)
    weighted = estimator(**_LINEAR | params).fit(X, y, sample_weight=weight)
    repeated = estimator(**_LINEAR | params).fit(np.repeat(X, weight, axis=0),
                                                 np.repeat(y, weight))
    np.testing.assert_array_equal(weighted.class_counts_ * 2, repeated.class_counts_)
    np.testing.assert_allclose(weighted.predict_proba(X), repeated.predict_proba(X),
                               rtol=1e-4, atol=1e-5)
    unweighted = estimator(**_LINEAR | params).fit(X, y)
    assert not np.allclose(unweighted.predict_proba(X), weighted.predict_proba(X), atol=1e-4)


def test_constant_sample_weight_is_no_weight(blobs):
    X, y = blobs
    a = DQRouteClassifier(**_fast(DQRouteClassifier)).fit(X, y)
    b = DQRouteClassifier(**_fast(DQRouteClassifier)).fit(X, y, sample_weight=np.full(len(y), 2.5))
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X))


# ------------------------------------------------------------------------------- noise
def test_dqroute_auto_experts_fit_two_classes(blobs):
    X, y = blobs
    two = np.where(y == "w", "w", "rest")
    clf = DQRouteClassifier(**_fast(DQRouteClassifier)).fit(X, two)
    assert clf.n_experts == "auto" and clf.n_experts_ == 2
    assert clf.route(X).shape == (len(X), 2)
    assert DQRouteClassifier(**_fast(DQRouteClassifier)).fit(X, y).n_experts_ == 3
    with pytest.raises(ValueError, match="n_experts must be an int between 1 and the number "
                                         r"of classes \(2\); got n_experts=3"):
        DQRouteClassifier(**_fast(DQRouteClassifier), n_experts=3).fit(X, two)


def test_pickled_estimator_keeps_its_checks(blobs):
    X, y = blobs
    clf = pickle.loads(pickle.dumps(LongTailClassifier(**_fast(LongTailClassifier)).fit(X, y)))
    with pytest.raises(ValueError, match="expecting 5 features"):
        clf.predict(X[:, :4])


# ------------------------------------------------------------------------------ install
def test_fresh_process_without_triton_fits_pandas_and_read_only_inputs_silently():
    """In a fresh interpreter (torch warns about read-only arrays once per process), with
    triton hidden as on a CPU install without the ``gpu`` extra: every estimator fits and
    predicts a float32 DataFrame (read-only under pandas 3) and a read-only array without
    any warning (neither torch's "non-writable array" nor scikit-learn's "X does not have
    valid feature names" about RIDE's own call), and fuse_experts runs."""
    script = textwrap.dedent("""
        import sys, warnings
        sys.modules["triton"] = None  # "not installed": import fails, find_spec is None
        warnings.simplefilter("error")
        import numpy as np, pandas as pd, torch
        from ltroute import DQRouteClassifier, LongTailClassifier, RIDEClassifier
        from ltroute.fusion import fuse_experts
        rng = np.random.RandomState(0)
        y = np.arange(60) % 3
        X = (rng.randn(60, 4) + 3 * np.eye(4)[y]).astype("float32")
        frame = pd.DataFrame(X, columns=list("abcd"))
        read_only = X.copy()
        read_only.flags.writeable = False
        params = dict(max_epochs=5, hidden_sizes=(8,), batch_size=16, random_state=0)
        for cls in (LongTailClassifier, RIDEClassifier, DQRouteClassifier):
            lr = {} if cls is RIDEClassifier else {"lr": 1e-2}
            clf = cls(**params, **lr).fit(frame, pd.Series(y))
            clf.predict_proba(frame), clf.score(frame, y)
            cls(**params, **lr).fit(read_only, y).predict(read_only)
        probs = fuse_experts(torch.randn(2, 3, 4), backend="auto").probs
        assert torch.allclose(probs.sum(1), torch.ones(2))
        print("ok", [m for m in sys.modules if m.startswith("triton") and sys.modules[m]])
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok []"


# ------------------------------------------------------------------------- command line
@pytest.mark.parametrize("argv, message", [
    (["--device", "nosuchdev"], "argument --device: 'nosuchdev': not a torch device"),
    (["--seed", "-5"], "argument --seed: must be between 0 and 2\\*\\*32 - 1, got -5"),
    (["--threads", "0"], "argument --threads: expected a positive integer, got 0"),
    (["--epochs", "0"], "argument --epochs: expected a positive integer, got 0"),
] + ([(["--device", "cuda"], "argument --device: 'cuda': CUDA is not available")]
     if not torch.cuda.is_available() else []))
def test_command_line_rejects_bad_arguments_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("usage: python -m ltroute")
    errors = [line for line in err if "error:" in line]
    assert len(errors) == 1
    assert re.search(message, errors[0]), errors[0]


@pytest.fixture
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_command_line_threads(capsys, _restore_threads):
    assert main(["--dataset", "digits", "--method", "ce", "--epochs", "1", "--threads", "1",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "1 threads" in out and torch.get_num_threads() == 1


def test_fitted_estimator_keeps_no_reference_to_the_training_data(blobs):
    X, y = blobs
    clf = DQRouteClassifier(**_fast(DQRouteClassifier)).fit(X, y)
    assert {name for name, _ in clf.callbacks_} >= {"batchnorm_recalibration",
                                                    "convergence_check"}
    assert all(getattr(cb, "dataset_train_", None) is None for _, cb in clf.callbacks_)


# ---------------------------------------------------------------- fuse_experts edge cases
def test_fuse_experts_takes_numpy_temperatures():
    from ltroute.fusion import fuse_experts

    Z = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(0))
    expected = fuse_experts(Z, energy_temperature=0.5, routing_temperature=2.0)
    got = fuse_experts(Z, energy_temperature=np.float32(0.5), routing_temperature=np.int64(2))
    torch.testing.assert_close(got.probs, expected.probs)
    with pytest.raises(TypeError, match="energy_temperature"):
        fuse_experts(Z, energy_temperature=True)


@pytest.mark.parametrize("weighting", ["energy", "uniform"])
def test_logit_combination_with_a_minus_inf_logit_has_finite_gradients(weighting):
    """A -inf logit is a class the expert rules out: its fused probability is 0, the loss
    of any other class and every gradient stay finite (the limit of a very negative logit)."""
    from ltroute.fusion import fuse_experts

    torch.manual_seed(0)
    base = torch.randn(3, 3, 5, dtype=torch.float64)
    with_inf = base.clone()
    with_inf[0, 1, 2] = float("-inf")
    very_negative = base.clone()
    very_negative[0, 1, 2] = -1e4
    results = []
    for Z in (with_inf, very_negative):
        Z = Z.clone().requires_grad_(True)
        out = fuse_experts(Z, combine="logit", weighting=weighting, return_log_probs=True)
        loss = -out.log_probs[:, 0].sum()
        loss.backward()
        results.append((out.probs.detach(), loss.detach(), Z.grad))
    (p_inf, loss_inf, grad_inf), (p_neg, loss_neg, grad_neg) = results
    assert torch.isfinite(loss_inf) and bool(torch.isfinite(grad_inf).all())
    assert p_inf[0, 2] == 0
    torch.testing.assert_close(p_inf, p_neg)
    torch.testing.assert_close(loss_inf, loss_neg)
    grad_neg[0, 1, 2] = 0.0  # the -inf entry itself gets no gradient (its class has p = 0)
    torch.testing.assert_close(grad_inf, grad_neg)
