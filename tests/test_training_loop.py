"""The training loop's bookkeeping (ltroute/_base.py): per-fit loss statistics, training
mode, the history, and how the passes over the training fold inside ``fit`` load."""

import collections
import pickle
import warnings

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning
from skorch.callbacks import Callback, EpochTimer, PrintLog
from torch.testing import assert_close

from ltroute import DQRouteClassifier, LongTailClassifier, RIDEClassifier
from ltroute._inputs import ArrayBatches, ArrayBatchIterator, batch_loader
from ltroute.callbacks import ConvergenceCheck
from ltroute.losses import (
    balanced_softmax_loss,
    distribution_aware_temperature,
    effective_number_weights,
    ldam_loss,
    ldam_margins,
    log_class_prior,
    logit_adjusted_loss,
    ride_diversity_loss,
)


def fitted(cls, small_letter, **params):
    X, y = small_letter[:2]
    params = {"max_epochs": 2, "batch_size": 64, "random_state": 0, "device": "cpu"} | params
    return cls(**params).fit(X, y)


def a_batch(clf, small_letter, n=48):
    X, y = small_letter[:2]
    Xb = torch.as_tensor(X[:n], dtype=torch.float32)
    yb = torch.as_tensor(np.searchsorted(clf.classes_, y[:n]))
    with torch.no_grad():
        return clf.module_(Xb), yb


@pytest.mark.parametrize("drw_epoch", [None, 1])
def test_ride_loss_equals_the_pure_functions(small_letter, drw_epoch):
    # The margins, DRW weights and temperatures are computed once per fit; the loss is
    # the one written with the pure functions of ltroute.losses, as before.
    clf = fitted(RIDEClassifier, small_letter, router=False, drw_epoch=drw_epoch)
    logits, y = a_batch(clf, small_letter)
    counts, (_, k, c) = clf.class_counts_, logits.shape
    weight = None if drw_epoch is None else effective_number_weights(counts, beta=clf.drw_beta)
    temperature = (torch.tensor(float(clf.diversity_temperature)) if weight is None else
                   distribution_aware_temperature(counts,
                                                  base_temperature=clf.diversity_temperature,
                                                  reweight_factor=clf.reweight_factor))
    expected = k * ldam_loss(logits.reshape(-1, c), y.repeat_interleave(k),
                             margins=ldam_margins(counts, max_margin=clf.ldam_max_margin),
                             scale=clf.head_scale, weight=weight)
    expected = expected + clf.diversity_weight * ride_diversity_loss(logits,
                                                                     temperature=temperature)
    for _ in range(2):  # computed, then read back
        assert_close(clf._training_loss(logits, y), expected, rtol=0, atol=0)


@pytest.mark.parametrize("loss", ["ldam", "logit_adjusted", "balanced_softmax"])
def test_baseline_loss_equals_the_pure_functions(small_letter, loss):
    clf = fitted(LongTailClassifier, small_letter, loss=loss, drw_epoch=1)
    logits, y = a_batch(clf, small_letter)
    z, counts = logits[:, 0], clf.class_counts_
    weight = effective_number_weights(counts, beta=clf.drw_beta)
    if loss == "ldam":
        expected = ldam_loss(z, y, margins=ldam_margins(counts, max_margin=clf.ldam_max_margin),
                             scale=clf.head_scale, weight=weight)
    elif loss == "logit_adjusted":
        expected = logit_adjusted_loss(z, y, log_prior=log_class_prior(counts),
                                       tau=clf.logit_adjust_tau, weight=weight)
    else:
        expected = balanced_softmax_loss(z, y, log_prior=log_class_prior(counts),
                                         weight=weight)
    assert_close(clf._training_loss(logits, y), expected, rtol=0, atol=0)


def test_loss_statistics_follow_the_counts_and_parameters(small_letter):
    X, y = small_letter[:2]
    clf = fitted(RIDEClassifier, small_letter, router=False, max_epochs=1)
    cpu = torch.device("cpu")
    assert_close(clf._count_statistic(ldam_margins, cpu, max_margin=clf.ldam_max_margin),
                 ldam_margins(clf.class_counts_, max_margin=clf.ldam_max_margin))
    clf.set_params(ldam_max_margin=0.3)  # a changed parameter is a new statistic
    assert_close(clf._count_statistic(ldam_margins, cpu, max_margin=0.3),
                 ldam_margins(clf.class_counts_, max_margin=0.3))
    keep = y != "A"  # a refit on other counts recomputes them
    clf.fit(X[keep], y[keep])
    assert_close(clf._count_statistic(ldam_margins, cpu, max_margin=0.3),
                 ldam_margins(clf.class_counts_, max_margin=0.3))
    # The cache is not pickled (it may hold GPU tensors); the unpickled copy recomputes.
    state = pickle.loads(pickle.dumps(clf)).__dict__
    assert "_count_statistics" not in state and "_augment_fill" not in state
    copy = pickle.loads(pickle.dumps(clf))
    assert_close(copy.predict_proba(X[:5]), clf.predict_proba(X[:5]))


def test_training_mode_is_set_only_when_a_module_differs(small_letter, monkeypatch):
    clf = fitted(LongTailClassifier, small_letter, max_epochs=1)
    calls = []
    original = torch.nn.Module.train

    def train(module, mode=True):
        calls.append(mode)
        return original(module, mode)

    clf._set_training(True)
    monkeypatch.setattr(torch.nn.Module, "train", train)
    clf._set_training(True)
    assert calls == []  # every module already trains: nothing to walk
    assert all(m.training for m in clf.module_.modules())
    clf._set_training(False)
    assert not any(m.training for m in clf.module_.modules())
    next(clf.module_.children()).train(True)  # one submodule differs: all are set again
    calls.clear()
    clf._set_training(False)
    assert calls and not any(m.training for m in clf.module_.modules())


def test_history_records_every_batch_and_epoch(small_letter):
    X, _ = small_letter[:2]
    clf = fitted(LongTailClassifier, small_letter, max_epochs=3)
    assert len(clf.history_) == 3
    for epoch in clf.history_:
        sizes = [batch["train_batch_size"] for batch in epoch["batches"]]
        losses = [batch["train_loss"] for batch in epoch["batches"]]
        assert all(type(s) is int for s in sizes) and sum(sizes) == len(X)
        assert all(type(v) is float and np.isfinite(v) for v in losses)
        assert epoch["train_batch_count"] == len(sizes)
        # skorch's train_loss: the batch losses' mean weighted by the batch sizes
        assert epoch["train_loss"] == pytest.approx(np.average(losses, weights=sizes))


def test_passes_over_the_training_fold_load_like_training(small_letter):
    params = {"iterator_train__num_workers": 2, "iterator_train__timeout": 60,
              "iterator_train__persistent_workers": True, "iterator_train__shuffle": True}
    clf = LongTailClassifier(**params)
    X, y = small_letter[:2]
    dataset = clf.get_dataset(X.astype(np.float32), np.unique(y, return_inverse=True)[1])
    loader = clf._training_fold_iterator(dataset)
    assert (loader.num_workers, loader.timeout, loader.persistent_workers) == (2, 60, False)
    assert len(X) >= 4 * 2 * clf.batch_size  # at least 4 batches per worker
    few = clf._training_fold_iterator(clf.get_dataset(X[:1000].astype(np.float32),
                                                      np.zeros(1000, dtype=np.int64)))
    assert isinstance(few, ArrayBatchIterator)  # in the main process: faster than workers
    first = next(iter(loader))[0]  # in order: which batches is not the training's business
    assert_close(first, torch.as_tensor(X[:clf.batch_size], dtype=torch.float32))
    assert isinstance(clf.get_iterator(dataset, training=False),  # predict: unchanged
                      ArrayBatchIterator)
    assert "_training_fold" not in clf.__dict__
    # iterator_valid__* is the user's word on inference loading
    clf = LongTailClassifier(iterator_valid__num_workers=0, **params)
    assert isinstance(clf._training_fold_iterator(dataset), ArrayBatchIterator)


def test_inference_passes_take_larger_batches_with_the_same_outputs(small_letter):
    X, y = small_letter[:2]
    clf = fitted(RIDEClassifier, small_letter, router=False, max_epochs=1)
    dataset = clf.get_dataset(X.astype(np.float32), np.unique(y, return_inverse=True)[1])
    batches = list(clf._training_fold_iterator(dataset, inference_only=True))
    assert len(batches) == -(-len(X) // 1024)  # 64 KiB of 16 features: 1024 rows
    assert_close(torch.cat([clf.evaluation_step(b)[0] for b in batches]),  # same outputs
                 torch.cat([clf.evaluation_step(b)[0]
                            for b in clf.get_iterator(dataset, training=False)]))
    # BatchNorm recalibration keeps batch_size rows (batch statistics depend on them)
    assert len(next(iter(clf._training_fold_iterator(dataset)))[0]) == clf.batch_size
    images = LongTailClassifier(batch_size=32)
    for shape in [(3, 32, 32), (3, 224, 224)]:  # 64 KiB: 5 CIFAR images, batch_size
        images.input_shape_ = shape
        loader = images._training_fold_iterator(dataset, inference_only=True)
        assert loader.batch_size == 32
    # with workers, batch_size rows: each worker loads its own batches
    workers = RIDEClassifier(iterator_train__num_workers=2)
    workers.input_shape_ = clf.input_shape_
    loader = workers._training_fold_iterator(dataset, inference_only=True)
    assert (loader.num_workers, loader.sampler.batch_size) == (2, 128)


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("drop_last", [True, False])
def test_array_batches_without_the_dataloader_are_the_dataloaders(shuffle, drop_last):
    """In-memory batches taken without a DataLoader: the same batches, and the same
    draws from the global RNG, as the DataLoader over the same batch sampler."""
    rng = np.random.default_rng(0)
    dataset = ArrayBatches(rng.normal(size=(1001, 5)).astype(np.float32),
                           rng.integers(0, 7, size=1001))
    draws = []
    for kwargs in [{}, {"pin_memory_device": "cpu"}]:  # the second keeps the DataLoader
        loader = batch_loader(torch.utils.data.DataLoader, dataset, 128, shuffle,
                              drop_last, num_workers=0, **kwargs)
        assert isinstance(loader, ArrayBatchIterator) == (not kwargs)
        torch.manual_seed(3)
        batches = [batch for _ in range(2) for batch in loader]  # two epochs
        assert len(batches) == 2 * len(loader) == 2 * (7 if drop_last else 8)
        draws.append((batches, torch.rand(3)))
    (fast, after_fast), (slow, after_slow) = draws
    for (X_fast, y_fast), (X_slow, y_slow) in zip(fast, slow, strict=True):
        assert_close(X_fast, X_slow)
        assert_close(y_fast, y_slow)
    assert_close(after_fast, after_slow)


def test_fit_on_arrays_equals_fit_through_skorchs_per_row_loading(small_letter):
    """The batch-sliced arrays train the same network as skorch's own loading (one row
    per ``__getitem__``, collated; forced by a ``collate_fn``)."""
    X, y = small_letter[:2]
    collate = torch.utils.data.default_collate
    sliced = fitted(LongTailClassifier, small_letter)
    per_row = fitted(LongTailClassifier, small_letter, iterator_train__collate_fn=collate,
                     iterator_valid__collate_fn=collate)
    for a, b in zip(sliced.module_.parameters(), per_row.module_.parameters(), strict=True):
        assert_close(a, b)
    assert_close(sliced.predict_proba(X), per_row.predict_proba(X))


class _CountingHooks(Callback):
    """Counts the per-batch notifications it receives."""

    def initialize(self):
        self.calls_ = collections.Counter()
        return self

    def on_batch_begin(self, net, batch=None, training=None, **kwargs):
        self.calls_["begin"] += 1

    def on_batch_end(self, net, batch=None, training=None, loss=None, **kwargs):
        self.calls_["end"] += loss is not None and "y_pred" in kwargs

    def on_grad_computed(self, net, named_parameters, batch=None, training=None, **kwargs):
        self.calls_["grad"] += len(list(named_parameters)) > 0


def test_batch_hooks_reach_every_callback_that_implements_one(small_letter, monkeypatch):
    skipped = collections.Counter()
    for name in ("on_batch_begin", "on_batch_end", "on_grad_computed"):
        def no_op(self, net, *args, _name=name, **kwargs):
            skipped[_name] += 1
        monkeypatch.setattr(Callback, name, no_op)  # what the other callbacks inherit
    instance = []
    counting, patched = _CountingHooks(), EpochTimer()
    patched.on_batch_end = lambda net, **kwargs: instance.append(kwargs["training"])
    clf = fitted(LongTailClassifier, small_letter, max_epochs=2,
                 callbacks=[("counting", counting), ("patched", patched)])
    steps = sum(epoch["train_batch_count"] for epoch in clf.history_)
    assert dict(counting.calls_) == {"begin": steps, "end": steps, "grad": steps}
    assert instance == [True] * steps  # a hook set on the instance counts too
    assert skipped == {}  # no callback was handed a hook it leaves as skorch's no-op
    assert "_batch_listeners" not in clf.__dict__
    # outside an epoch, notify is skorch's: every callback is called
    clf.notify("on_batch_end", batch=None, training=False)
    assert skipped["on_batch_end"] > 0


def test_print_log_formats_only_what_it_prints(small_letter, capsys, monkeypatch):
    clf = fitted(LongTailClassifier, small_letter, verbose=1)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 + clf.max_epochs and "train_loss" in lines[0]
    assert isinstance(dict(clf.callbacks_)["print_log"], PrintLog)

    def table(self, row):
        raise AssertionError("a table nobody prints")

    monkeypatch.setattr(PrintLog, "table", table)
    fitted(LongTailClassifier, small_letter, verbose=0)
    assert capsys.readouterr().out == ""
    monkeypatch.undo()
    rows = []  # a sink of one's own receives every row, as with skorch's PrintLog
    fitted(LongTailClassifier, small_letter, verbose=0, callbacks__print_log__sink=rows.append)
    assert len(rows) == len(lines) and "train_loss" in rows[0]


def _convergence_pass(clf, dataset, full=False):
    """(batch sizes inferred, ConvergenceWarning messages) of the convergence check's
    pass over ``dataset``; ``full``: without stopping early."""
    calls = []
    evaluation_step = type(clf).evaluation_step

    def counted(self, batch, training=False):
        calls.append(len(batch[1]))
        return evaluation_step(self, batch, training=training)

    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings(record=True) as caught:
        if full:
            patch.setattr("ltroute.callbacks._majority_count", lambda dataset: None)
        patch.setattr(type(clf), "evaluation_step", counted)
        warnings.simplefilter("always", ConvergenceWarning)
        check = ConvergenceCheck()
        check.on_train_begin(clf)
        check.on_epoch_begin(clf, dataset_train=dataset)
        check.on_train_end(clf)
    return calls, [str(w.message) for w in caught if w.category is ConvergenceWarning]


def test_convergence_check_stops_once_the_outcome_is_decided(small_letter, monkeypatch):
    X, y = small_letter[:2]
    clf = fitted(LongTailClassifier, small_letter, max_epochs=3, lr=1e-2)
    codes = np.searchsorted(clf.classes_, y)
    dataset = clf.get_dataset(X.astype(np.float32), codes)
    monkeypatch.setattr("ltroute._base._INFERENCE_BATCH_BYTES", 64 * 4 * X.shape[1])
    early, warned = _convergence_pass(clf, dataset)
    full, warned_full = _convergence_pass(clf, dataset, full=True)
    assert warned == warned_full == []
    assert sum(full) == len(X) and len(full) == -(-len(X) // 64)
    assert len(early) < len(full) / 2  # a trained model: decided early
    # reached: the correct predictions of the batches it saw reach the majority count
    probs = clf.predict_proba(X[:sum(early)])
    assert (probs.argmax(axis=1) == codes[:sum(early)]).sum() >= np.bincount(codes).max()
    # a validation split's training fold (a Subset) and ltroute's own datasets are known
    subset = torch.utils.data.Subset(dataset, np.arange(0, len(X), 2))
    assert len(_convergence_pass(clf, subset)[0]) < -(-len(subset) // 64)
    # labels it cannot know without loading: the whole pass, as before
    items = list(zip(torch.as_tensor(X, dtype=torch.float32), codes, strict=True))
    opaque = torch.utils.data.Subset(items, range(len(X)))
    assert sum(_convergence_pass(clf, opaque)[0]) == len(X)


def test_convergence_check_outcome_is_unchanged_when_far_from_converged(small_letter,
                                                                       monkeypatch):
    X, y = small_letter[:2]
    clf = fitted(LongTailClassifier, small_letter, max_epochs=1)
    with torch.no_grad():  # predicts the rarest class everywhere
        head = [m for m in clf.module_.modules() if isinstance(m, torch.nn.Linear)][-1]
        head.weight.zero_()
        head.bias.fill_(0).data[np.argmin(clf.class_counts_)] = 1.0
    dataset = clf.get_dataset(X.astype(np.float32), np.searchsorted(clf.classes_, y))
    monkeypatch.setattr("ltroute._base._INFERENCE_BATCH_BYTES", 64 * 4 * X.shape[1])
    early, warned = _convergence_pass(clf, dataset)
    full, warned_full = _convergence_pass(clf, dataset, full=True)
    assert early == full and len(warned) == 1 and warned == warned_full
    share = clf.class_counts_.min() / len(X)
    assert f"is {share:.3f}, below {clf.class_counts_.max() / len(X):.3f}" in warned[0]


class _PredictRarest(Callback):
    """Sets the network's last linear layer to predict the rarest class everywhere, at
    the start of every epoch (with a vanishing ``lr`` it stays so)."""

    def on_epoch_begin(self, net, **kwargs):
        head = [m for m in net.module_.modules() if isinstance(m, torch.nn.Linear)][-1]
        with torch.no_grad():
            head.weight.zero_()
            head.bias.fill_(0).data[np.argmin(net.class_counts_)] = 1.0


@pytest.mark.parametrize("cls", [LongTailClassifier, RIDEClassifier, DQRouteClassifier])
def test_convergence_check_reads_the_last_epochs_training_predictions(cls, small_letter,
                                                                    monkeypatch):
    """A model whose last-epoch training predictions reach the majority count is judged
    without an inference pass (2 epochs of 24 batches: BatchNorm statistics past 44
    steps); asked not to, the pass runs; when they fall short, the pass runs and
    decides as before."""
    X, y = small_letter[:2]
    calls = []
    evaluation_step = cls.evaluation_step

    def counted(self, batch, training=False):
        calls.append(len(batch[1]))
        return evaluation_step(self, batch, training=training)

    monkeypatch.setattr(cls, "evaluation_step", counted)
    params = {"router": False} if cls is RIDEClassifier else {"lr": 1e-2}
    outcomes = {}
    for training_predictions in (True, False):
        calls.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConvergenceWarning)
            clf = fitted(cls, small_letter, **params,
                         callbacks__convergence_check__training_predictions=(
                             training_predictions))
        outcomes[training_predictions] = sum(calls)
    assert sum(clf.history_[:, "train_batch_count"]) > 44
    assert outcomes[True] == 0 and outcomes[False] > 0
    if cls is not LongTailClassifier:
        return
    calls.clear()  # it predicts the rarest class: the pass runs it through and warns
    with pytest.warns(ConvergenceWarning, match="far from converged"):
        fitted(cls, small_letter, lr=1e-12, callbacks=[("rarest", _PredictRarest())])
    assert sum(calls) == len(X)  # the whole fold: the majority count is never reached
