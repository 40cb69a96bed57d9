"""RIDEClassifier: the RIDE loss against the spec's hand values, router, routing, sklearn."""

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from skorch.history import History
from torch.testing import assert_close

from ltroute import LongTailClassifier, RIDEClassifier
from ltroute.augmentation import ImageAugmentation
from ltroute.datasets import long_tailed_counts
from ltroute.losses import (
    distribution_aware_temperature,
    effective_number_weights,
    ldam_loss,
    ldam_margins,
    ride_diversity_loss,
    router_loss,
    router_targets,
)
from ltroute.metrics import few_shot_scorer, group_accuracy
from ltroute.ride import RIDESGD
from ltroute.schedules import StepWarmupSchedule

CIFAR100_LT = long_tailed_counts(500, 100, 100)
# (class index, n_c, LDAM margin m_c, DRW weight w_c, temperature T_c): ride.md, 2.4.
HAND_VALUES = [
    (0, 500, 0.1581, 0.0449, 1.0000),
    (34, 102, 0.2353, 0.2157, 0.8446),
    (35, 98, 0.2376, 0.2244, 0.8430),
    (69, 20, 0.3536, 1.0954, 0.8126),
    (70, 19, 0.3581, 1.1530, 0.8122),
    (99, 5, 0.5000, 4.3783, 0.8067),
]

FAST = {"max_epochs": 4, "hidden_sizes": (32,), "expert_hidden_sizes": (16,),
        "router_epochs": 3, "random_state": 0, "device": "cpu"}


@pytest.fixture(scope="module")
def data(small_letter):
    """small_letter, standardised (10 classes: A-F with 500..., W-Z with ... 5)."""
    X_train, y_train, X_test, y_test = small_letter
    scaler = StandardScaler().fit(X_train)
    return scaler.transform(X_train), y_train, scaler.transform(X_test), y_test


@pytest.fixture(scope="module")
def fitted(data):
    """One routed RIDE model, read-only for the tests below."""
    X, y, _, _ = data
    return RIDEClassifier(**FAST).fit(X, y)


def _at_epoch(clf, epoch, class_counts):
    """Put an unfitted estimator in the state of training epoch ``epoch`` (1-based)."""
    clf.class_counts_ = np.asarray(class_counts)
    clf.history_ = History()
    for _ in range(epoch):
        clf.history_.new_epoch()
    return clf


# ----------------------------------------------------------------- stage-1 loss
def test_temperature_matches_the_spec_table():
    temperature = distribution_aware_temperature(CIFAR100_LT, reweight_factor=0.05)
    for c, n_c, _, _, t_c in HAND_VALUES:
        assert CIFAR100_LT[c] == n_c
        assert temperature[c].item() == pytest.approx(t_c, abs=5e-5)
    assert temperature.mean().item() == pytest.approx(0.8471, abs=5e-5)
    # alpha scales every class; gamma = 0 means one temperature for all classes.
    assert_close(distribution_aware_temperature(CIFAR100_LT, base_temperature=2.0),
                 2 * temperature)
    assert_close(distribution_aware_temperature(CIFAR100_LT, reweight_factor=0.0),
                 torch.ones(100))


@pytest.mark.parametrize("epoch, drw", [(160, False), (161, True)])
def test_training_loss_uses_spec_margins_and_drw_weights_after_the_drw_epoch(epoch, drw):
    """Zero logits on two samples (classes 0 and 99) give the per-sample LDAM loss
    log(1 + (C - 1) exp(s m_y)); from epoch 161 of 200 ("auto" = 160) they are averaged
    with the spec's DRW weights."""
    clf = _at_epoch(RIDEClassifier(n_experts=1, diversity_weight=0, max_epochs=200,
                                   device="cpu"), epoch, CIFAR100_LT)
    y = torch.tensor([0, 99])
    loss = clf._training_loss(torch.zeros(2, 1, 100), y)
    (_, _, m0, w0, _), (_, _, m99, w99, _) = HAND_VALUES[0], HAND_VALUES[-1]
    per_sample = np.log1p(99 * np.exp(30 * np.array([m0, m99])))
    weights = np.array([w0, w99]) if drw else np.ones(2)
    expected = (weights * per_sample).sum() / weights.sum()
    assert loss.item() == pytest.approx(expected, rel=2e-4)


def test_expert_losses_are_summed_not_averaged():
    """K experts: sum over experts of each expert's (DRW-weighted) LDAM loss."""
    counts = [50, 20, 5]
    clf = _at_epoch(RIDEClassifier(n_experts=3, diversity_weight=0, drw_epoch=0,
                                   device="cpu"), 1, counts)
    clf.drw_beta = 0.9
    logits, y = 10 * torch.randn(8, 3, 3), torch.tensor([0, 1, 2, 0, 1, 2, 2, 0])
    weight = effective_number_weights(counts, beta=0.9)
    margins = ldam_margins(counts)
    expected = sum(ldam_loss(logits[:, k], y, margins=margins, weight=weight) for k in range(3))
    assert_close(clf._training_loss(logits, y), expected)


def test_zero_diversity_weight_keeps_individual_losses_and_collaborative_is_explicit():
    clf = _at_epoch(RIDEClassifier(loss="ce", diversity_weight=0, drw_epoch=None,
                                   device="cpu"), 1, [5, 5, 5])
    logits, y = torch.randn(6, 3, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    individual = sum(F.cross_entropy(logits[:, k], y) for k in range(3))
    assert_close(clf._training_loss(logits, y), individual)
    clf.collaborative = True
    assert_close(clf._training_loss(logits, y), 3 * F.cross_entropy(logits.mean(1), y))


def test_diversity_term_is_kl_from_the_detached_ensemble_with_per_class_temperature():
    torch.manual_seed(0)
    logits = (5 * torch.randn(4, 3, 6)).requires_grad_()
    temperature = torch.tensor([1.0, 0.9, 0.85, 0.8, 0.8, 0.75])
    loss = ride_diversity_loss(logits, temperature=temperature)
    target = F.softmax(logits.detach().mean(1) / temperature, dim=1)  # a constant
    expected = temperature.mean() ** 2 * sum(
        F.kl_div(F.log_softmax(logits[:, k] / temperature, dim=1), target,
                 reduction="batchmean") for k in range(3))
    assert_close(loss, expected)
    grad, = torch.autograd.grad(loss, logits)
    expected_grad, = torch.autograd.grad(expected, logits)
    assert_close(grad, expected_grad)  # no gradient through the ensemble target


def test_diversity_temperature_scaling_and_mean_temperature_factor():
    """Scaling logits and temperature by c leaves the distributions unchanged, so the
    term grows by mean(T)^2 = c^2 (the official code's gradient correction)."""
    torch.manual_seed(1)
    logits = torch.randn(5, 3, 4)
    base = ride_diversity_loss(logits)
    assert_close(ride_diversity_loss(3 * logits, temperature=3.0), 9 * base)
    # A higher temperature softens every expert: less disagreement before the factor.
    soft = ride_diversity_loss(logits, temperature=4.0) / 16
    assert soft < base


@pytest.mark.parametrize("weight, farther", [(-0.45, True), (0.45, False)])
def test_negative_diversity_weight_pushes_experts_away_from_the_ensemble(weight, farther):
    torch.manual_seed(2)
    logits = torch.randn(16, 3, 5).requires_grad_()
    before = ride_diversity_loss(logits).item()
    optimizer = torch.optim.SGD([logits], lr=0.5)
    for _ in range(20):
        optimizer.zero_grad()
        (weight * ride_diversity_loss(logits)).backward()
        optimizer.step()
    after = ride_diversity_loss(logits).item()
    assert (after > before) == farther


def test_temperature_becomes_per_class_at_the_drw_epoch():
    counts = [500, 100, 20, 5]
    logits, y = 8 * torch.randn(8, 3, 4), torch.tensor([0, 1, 2, 3] * 2)

    def diversity_part(epoch):
        clf = _at_epoch(RIDEClassifier(loss="ce", max_epochs=10, diversity_temperature=1.5,
                                       device="cpu"), epoch, counts)
        with_kl = clf._training_loss(logits, y)
        clf.diversity_weight = 0
        return (with_kl - clf._training_loss(logits, y)) / -0.45

    assert_close(diversity_part(8), ride_diversity_loss(logits, temperature=1.5))
    per_class = distribution_aware_temperature(counts, base_temperature=1.5)
    assert_close(diversity_part(9), ride_diversity_loss(logits, temperature=per_class))


def test_official_schedule_drops_the_learning_rate_with_drw(fitted):
    """Warm-up over 5 epochs, x0.01 after epoch 160 of 200 (when DRW starts), x1e-4
    after 180; the default fit records the learning rate of every epoch."""
    schedule = StepWarmupSchedule(200)
    assert [schedule(e) for e in (0, 4, 159, 160, 179, 180)] == pytest.approx(
        [0.2, 1.0, 1.0, 0.01, 0.01, 1e-4])
    lrs = fitted.history[:, "event_lr"]
    assert lrs == pytest.approx([0.1 * StepWarmupSchedule(4)(e) for e in range(4)])
    assert isinstance(fitted.optimizer_, RIDESGD)
    assert fitted.optimizer_.defaults["nesterov"] and fitted.optimizer_.defaults["momentum"] == 0.9


# ----------------------------------------------------------------------- router
def test_router_targets_on_a_hand_built_batch():
    """Targets follow the *cumulative* ensembles 0, 0+1, 0+1+2 (label 0 everywhere)."""
    right, wrong = [2.0, 0.0], [0.0, 2.0]
    big_wrong = [0.0, 5.0]
    logits = torch.tensor([
        [right, wrong, wrong],          # expert 0 alone is right: never add
        [wrong, [4.0, 0.0], wrong],     # 0 wrong, 0+1 right: add expert 1 only
        [wrong, wrong, [9.0, 0.0]],     # only 0+1+2 right: add both
        [wrong, wrong, wrong],          # nobody is right: adding cannot help
        [big_wrong, [4.0, 0.0], wrong],  # expert 1 alone right, 0+1 still wrong; 0+1+2 not
        [right, big_wrong, [9.0, 0.0]],  # 0 right: decision 0 says stop; 0+1 wrong, 0+1+2 right
    ])
    targets = router_targets(logits, torch.zeros(6, dtype=torch.long))
    expected = [[False, False], [True, False], [True, True], [False, False],
                [False, False], [False, True]]
    assert targets.tolist() == expected


def test_router_targets_with_margins_on_a_hand_built_batch():
    """With margins a prefix is right only when its *mean* logits clear the label's
    margin (label 0, margin 1.5 for class 0; class 1's margin is never used)."""
    logits = torch.tensor([
        [[1.0, 0.0], [3.0, 0.0], [3.0, 0.0]],  # means 1, 2, 2.33 ahead: 0 at risk, 0+1 clears
        [[4.0, 0.0], [0.0, 1.0], [0.0, 0.0]],  # means 4, 1.5, 1: 0 clears; stop
        [[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]],  # 1 ahead everywhere, never clears: no help
        [[0.0, 1.0], [0.0, 0.0], [6.0, 0.0]],  # means -1, -0.5, 1.67: only 0+1+2 clears
    ])
    target = torch.zeros(4, dtype=torch.long)
    margins = torch.tensor([1.5, 100.0])
    expected = [[True, False], [False, False], [False, False], [True, True]]
    assert router_targets(logits, target, margins=margins).tolist() == expected
    # No margin: the official targets (sums and means have the same argmax).
    assert_close(router_targets(logits, target, margins=torch.zeros(2)).int(),
                 router_targets(logits, target).int())
    assert router_targets(logits, target).tolist() == [[False, False]] * 3 + [[True, True]]


@pytest.mark.parametrize("scale", [False, 0.0, True, 1.0, 2.5])
def test_router_margin_scales_the_ldam_margins_of_the_targets(fitted, data, scale):
    """router_margin=s uses s * head_scale * m_y (True: 1; False and 0: the official
    targets), on the fitted network's stage-2 batch."""
    X, y, _, _ = data
    clf = pickle.loads(pickle.dumps(fitted)).set_params(router_margin=scale)
    rows = np.random.RandomState(0).choice(len(y), 512, replace=False)
    x = torch.as_tensor(X[rows], dtype=torch.float32)
    target = torch.as_tensor(np.searchsorted(clf.classes_, y[rows]))
    with torch.no_grad():
        features = clf.module_.shared(x)
        logits = torch.stack([clf.module_.expert_logits(clf.module_.expert_features(
            features, k), k) for k in range(3)], dim=1)
    margins = float(scale) * 30.0 * ldam_margins(torch.as_tensor(clf.class_counts_),
                                                 max_margin=0.5)
    _, targets = clf._router_batch(clf.router_module_, x, target)
    assert torch.equal(targets, router_targets(logits, target, margins=margins))
    if scale == 2.5:  # wider margins: more "add an expert" targets
        clf.set_params(router_margin=1.0)
        assert targets.sum() > clf._router_batch(clf.router_module_, x, target)[1].sum()


@pytest.mark.parametrize("augmented", [None, "parameter", "collate_fn"])
def test_auto_router_margin_is_official_when_augmented_and_half_otherwise(augmented):
    """router_margin="auto": the official targets (0) for an augmented training stream
    (the ``augmentation`` parameter or an ImageAugmentation collate_fn), half the LDAM
    margin otherwise; the stage-2 targets are those of the resolved value, which
    ``router_margin_`` records, and a refit without router drops it."""
    rng = np.random.RandomState(0)
    X = rng.rand(64, 3, 8, 8).astype(np.float32)
    y = np.repeat(np.arange(4), [32, 16, 10, 6])
    X[np.arange(64), y % 3] += 0.25  # a weak per-class colour cue
    extra = {"parameter": {"augmentation": "cifar"},
             "collate_fn": {"iterator_train__collate_fn": ImageAugmentation()},
             None: {}}[augmented]
    clf = RIDEClassifier(max_epochs=2, router_epochs=1, batch_size=16, device="cpu",
                         random_state=0, **extra).fit(X, y)
    expected = 0.0 if augmented else 0.5
    assert clf.router_margin == "auto" and clf.router_margin_ == expected
    x, target = torch.as_tensor(X), torch.as_tensor(y)

    def targets(router_margin):  # one stage-2 batch (the same random augmentation)
        torch.manual_seed(0)
        clf.set_params(router_margin=router_margin)
        return clf._router_batch(clf.router_module_, x, target)[1]

    other = 0.5 - expected  # the value "auto" did not take
    assert torch.equal(targets("auto"), targets(expected))
    assert not torch.equal(targets("auto"), targets(other))
    assert clf.fit_router(X, y).router_margin_ == other
    assert not hasattr(clf.set_params(router=False, max_epochs=1).fit(X, y),
                       "router_margin_")


def test_router_loss_weights_positive_targets():
    scores, targets = torch.tensor([[0.0, 0.0]]), torch.tensor([[True, False]])
    assert router_loss(scores, targets, pos_weight=100.0).item() == pytest.approx(
        (100 * np.log(2) + np.log(2)) / 2)


def test_stage_one_optimizer_never_sees_the_router(fitted):
    stage_one = {id(p) for group in fitted.optimizer_.param_groups for p in group["params"]}
    router = {id(p) for p in fitted.router_module_.parameters()}
    network = {id(p) for p in fitted.module_.parameters()}
    assert router and not stage_one & router and stage_one == network
    assert len(fitted.router_losses_) == FAST["router_epochs"]


class _RecordingCollate:
    """Training ``collate_fn`` that records the labels of every batch it collates."""

    def __init__(self):
        self.batches = []

    def __call__(self, batch):
        from torch.utils.data import default_collate
        X, y = default_collate(batch)
        self.batches.append(y.numpy().copy())
        return X, y


def test_router_trains_on_the_training_stream_class_balanced(data):
    """Stage 2 reads the training loader (its ``collate_fn``, i.e. any augmentation), in
    batches of ``router_batch_size`` drawn class-balanced, as the official EA stage."""
    X, y, _, _ = data
    spy = _RecordingCollate()
    clf = RIDEClassifier(**FAST | {"batch_size": 64, "router_batch_size": 50,
                                   "iterator_train__collate_fn": spy}).fit(X, y)
    per_epoch = -(-len(y) // 50)  # one pass of the training set per router epoch
    stage_two = spy.batches[-FAST["router_epochs"] * per_epoch:]
    sizes = [50] * (per_epoch - 1) + [len(y) - 50 * (per_epoch - 1)]
    assert [len(b) for b in stage_two] == sizes * FAST["router_epochs"]
    assert len(spy.batches) > len(stage_two)  # stage 1 went through it too
    labels = np.concatenate(stage_two)
    encoded = np.searchsorted(clf.classes_, y)
    share = np.bincount(labels, minlength=len(clf.classes_)) / len(labels)
    # Uniform over the classes (1/10 each), not the training frequencies (~0.2 to 0.002).
    assert np.abs(share - 1 / len(clf.classes_)).max() < 0.04
    assert np.bincount(encoded).min() / len(y) < 0.02


def test_routed_output_is_the_mean_logit_of_a_prefix_of_experts(fitted, data):
    _, _, X_test, _ = data
    used = fitted.route(X_test)
    assert used.min() >= 1 and used.max() <= 3 and len(np.unique(used)) > 1
    assert fitted.expert_usage_ == pytest.approx(used.mean())
    logits = fitted.module_(torch.as_tensor(X_test, dtype=torch.float32)).detach()
    prefix_mean = torch.stack([logits[i, :n].mean(0) for i, n in enumerate(used)])
    assert_close(torch.as_tensor(fitted.predict_proba(X_test)),
                 torch.softmax(prefix_mean, dim=1), rtol=1e-5, atol=1e-6)


def test_router_off_uses_all_experts_and_full_compute(fitted, data):
    _, _, X_test, _ = data
    clf = pickle.loads(pickle.dumps(fitted)).set_params(router=False)
    assert (clf.route(X_test) == 3).all()
    assert clf.expert_usage_ == 3 and clf.relative_macs_ == 1.0
    logits = clf.module_(torch.as_tensor(X_test, dtype=torch.float32)).detach()
    assert_close(torch.as_tensor(clf.predict_proba(X_test)), torch.softmax(logits.mean(1), 1))

    unrouted = RIDEClassifier(**FAST | {"router": False}).fit(*data[:2])
    assert unrouted.router_module_ is None and (unrouted.route(X_test) == 3).all()
    with pytest.raises(ValueError, match="fitted with router=False"):
        unrouted.set_params(router=True).predict(X_test)


def test_threshold_one_always_stops_after_the_first_expert(fitted, data):
    _, _, X_test, _ = data
    clf = pickle.loads(pickle.dumps(fitted)).set_params(router_threshold=1.0)
    assert (clf.route(X_test) == 1).all() and clf.expert_usage_ == 1.0
    macs = clf.macs_
    full = macs["trunk"] + sum(macs["experts"])
    first = macs["trunk"] + macs["experts"][0] + macs["router"][0]
    assert clf.relative_macs_ == pytest.approx(first / full)
    logits = clf.module_(torch.as_tensor(X_test, dtype=torch.float32)).detach()
    assert_close(torch.as_tensor(clf.predict_proba(X_test)), torch.softmax(logits[:, 0], 1))


def _official_ea_training_loss(net, router, x, target, pos_weight):
    """``ea_resnet_cifar.ResNet_s.forward(x, target)`` with ``pred_expert_help`` of the
    official code (frank-xwang/RIDE-LongTailRecognition, model/ldam_drw_resnets/
    ea_resnet_cifar.py), transcribed onto an ``ExpertNet`` and a ``RIDERouter``."""
    shared_part = net.shared(x)
    n_experts = net.n_experts
    output = shared_part.new_zeros((len(x), net.n_classes))
    expert_help_preds = output.new_zeros((len(x), n_experts - 1))
    correctness = output.new_zeros((len(x), n_experts), dtype=torch.bool)
    loss = output.new_zeros((1,))
    for i in range(n_experts):
        feat = net.expert_features(shared_part, i)
        output += net.expert_logits(feat, i)
        correctness[:, i] = output.argmax(dim=1) == target
        if i != n_experts - 1:
            feature = feat / feat.norm(dim=1, keepdim=True)
            feature = F.relu(router.hidden[i](feature))
            topk, _ = torch.topk(output / (i + 1), k=router.top_k, dim=1)
            expert_help_preds[:, i] = router.output(torch.cat((topk, feature), dim=1)).view(-1)
    for i in range(n_experts - 1):
        expert_help_target = (~correctness[:, i]) & correctness[:, i + 1:].any(dim=1)
        loss += F.binary_cross_entropy_with_logits(
            expert_help_preds[:, i], expert_help_target.float(),
            pos_weight=expert_help_preds.new_tensor([pos_weight]))
    return loss / (n_experts - 1)


def _official_ea_inference(net, router, x):
    """The official test-time branch of the same ``forward``: logits and experts used."""
    shared_part = net.shared(x)
    expert_next = shared_part.new_ones((len(x),), dtype=torch.bool)
    num_experts = shared_part.new_ones((len(x), 1), dtype=torch.long)
    feat = net.expert_features(shared_part, 0)
    output = net.expert_logits(feat, 0)
    for i in range(1, net.n_experts):
        feature = F.relu(router.hidden[i - 1](feat / feat.norm(dim=1, keepdim=True)))
        topk, _ = torch.topk(output[expert_next] / i, k=router.top_k, dim=1)
        pred = router.output(torch.cat((topk, feature), dim=1)).view(-1)
        expert_next[expert_next.clone()] = torch.sigmoid(pred) > 0.5
        if not expert_next.any():
            break
        feat = net.expert_features(shared_part[expert_next], i)
        output[expert_next] += net.expert_logits(feat, i)
        num_experts[expert_next] += 1
    return output / num_experts, num_experts.flatten()


@pytest.mark.parametrize("backbone", ["mlp", "resnet32"])
def test_stage_two_loss_and_gradients_match_the_official_code(backbone):
    """Our stage-2 batch (targets, router logits, weighted BCE) against the official EA
    training forward: same loss and same router gradients, on an MLP and on RIDE's
    ResNet-32 (BatchNorm in eval mode in both, as the official ``_hook_before_iter``)."""
    rng = np.random.RandomState(0)
    shape = (20,) if backbone == "mlp" else (3, 16, 16)
    X = rng.randn(96, *shape).astype(np.float32)
    y = np.repeat(np.arange(12), 8)
    clf = RIDEClassifier(backbone=backbone, max_epochs=1, router_epochs=1, batch_size=32,
                         router_top_k=5, hidden_sizes=(32,), expert_hidden_sizes=(16,),
                         router_margin=False, device="cpu", random_state=0).fit(X, y)
    x, target = torch.as_tensor(X), torch.as_tensor(y)
    scores, targets = clf._router_batch(clf.router_module_, x, target)
    ours = router_loss(scores, targets, pos_weight=100.0)
    grads = torch.autograd.grad(ours, list(clf.router_module_.parameters()))
    assert 0 < targets.float().mean() < 1  # both kinds of targets occur
    clf.module_.eval()
    official = _official_ea_training_loss(clf.module_, clf.router_module_, x, target, 100.0)
    expected = torch.autograd.grad(official.sum(), list(clf.router_module_.parameters()))
    assert_close(ours, official.squeeze(0), rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, expected, strict=True):
        assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_routed_inference_matches_the_official_code(fitted, data):
    """Experts used per sample and the routed output, against the official test-time
    loop (sigmoid > 0.5, prefix routing, mean of the used experts' logits)."""
    _, _, X_test, _ = data
    x = torch.as_tensor(X_test, dtype=torch.float32)
    fitted.module_.eval()
    with torch.no_grad():
        logits, used = _official_ea_inference(fitted.module_, fitted.router_module_, x)
    np.testing.assert_array_equal(fitted.route(X_test), used.numpy())
    assert 1 < used.float().mean() < 3
    assert_close(torch.as_tensor(fitted.predict_proba(X_test)), torch.softmax(logits, 1),
                 rtol=1e-5, atol=1e-6)


def test_resnet32_compute_matches_the_spec_counts():
    """Trunk 24.0 M and reduced expert 25.4 M MACs on 3x32x32 inputs with 100 classes;
    the router's heads are tiny (48 * 16 + 46 MACs each)."""
    rng = np.random.RandomState(0)
    X = rng.rand(100, 3, 32, 32).astype(np.float32)
    clf = RIDEClassifier(max_epochs=0, router_epochs=1, device="cpu", random_state=0)
    macs = clf.fit(X, np.arange(100)).macs_
    assert macs["trunk"] / 1e6 == pytest.approx(24.0, abs=0.05)
    assert [m / 1e6 for m in macs["experts"]] == pytest.approx([25.4] * 3, abs=0.05)
    assert macs["router"] == [48 * 16 + 30 + 16] * 2


# ------------------------------------------------------------ sklearn / skorch
def test_fitted_attributes_and_labels(fitted, data):
    X, y, X_test, _ = data
    assert fitted.classes_.tolist() == list("ABCDEFWXYZ")
    assert fitted.module_.n_experts == 3 and len(fitted.history_) == FAST["max_epochs"]
    proba = fitted.predict_proba(X_test)
    np.testing.assert_allclose(proba.sum(1), 1, rtol=1e-5)
    assert set(fitted.predict(X_test)) <= set(fitted.classes_)
    assert fitted.device == "cpu"


def test_same_random_state_gives_identical_models(fitted, data):
    X, y, X_test, _ = data
    again = RIDEClassifier(**FAST).fit(X, y)
    np.testing.assert_array_equal(again.predict_proba(X_test), fitted.predict_proba(X_test))
    np.testing.assert_array_equal(again.router_losses_, fitted.router_losses_)
    np.testing.assert_array_equal(again.route(X_test), fitted.route(X_test))


def test_clone_and_pickle_keep_the_router(fitted, data):
    _, _, X_test, _ = data
    restored = pickle.loads(pickle.dumps(fitted))
    np.testing.assert_array_equal(restored.predict_proba(X_test), fitted.predict_proba(X_test))
    np.testing.assert_array_equal(restored.route(X_test), fitted.route(X_test))
    for a, b in zip(restored.router_module_.parameters(), fitted.router_module_.parameters(),
                    strict=True):
        torch.testing.assert_close(a, b)
    fresh = clone(fitted)
    assert fresh.get_params()["router_threshold"] == 0.5 and not hasattr(fresh, "module_")
    # Router arguments go through skorch's prefix (``router_module__*``).
    wide = RIDEClassifier(**FAST | {"router_module__hidden_size": 4, "max_epochs": 1})
    assert wide.fit(*data[:2]).router_module_.hidden[0].out_features == 4


def test_set_params_after_fit_changes_routing_without_refitting(fitted, data):
    _, _, X_test, _ = data
    clf = pickle.loads(pickle.dumps(fitted))
    weights = [p.clone() for p in clf.module_.parameters()]
    more = clf.set_params(router_threshold=0.05).route(X_test).mean()
    fewer = clf.set_params(router_threshold=0.95).route(X_test).mean()
    assert more >= fewer
    assert all(torch.equal(a, b) for a, b in zip(weights, clf.module_.parameters(), strict=True))


def _router_state(clf) -> list[torch.Tensor]:
    return [p.detach().clone() for p in clf.router_module_.parameters()]


def test_fit_router_retrains_stage_two_only_reproducibly(fitted, data):
    """fit_router replaces the router (a new module, trained with the current router_*
    parameters), keeps every stage-1 weight and buffer, and is seeded by random_state."""
    X, y, X_test, _ = data
    clf = pickle.loads(pickle.dumps(fitted))
    network = {k: v.clone() for k, v in clf.module_.state_dict().items()}
    old_router = clf.router_module_
    clf.set_params(router_pos_weight=1e-2, router_epochs=2).fit_router(X, y)
    assert clf.router_module_ is not old_router and clf.router_losses_.shape == (2,)
    for key, value in clf.module_.state_dict().items():
        assert torch.equal(value, network[key]), key
    stopping = _router_state(clf)
    # Positive targets weigh 1e-2: "add an expert" never outweighs "stop".
    assert clf.expert_usage_ == 1.0 and (clf.route(X_test) == 1).all()
    clf.set_params(router_pos_weight=1e4).fit_router(X, y)
    assert clf.expert_usage_ > 1.0 and clf.route(X_test).mean() > 1.0
    clf.set_params(router_pos_weight=1e-2).fit_router(X, y)
    for a, b in zip(_router_state(clf), stopping, strict=True):
        assert torch.equal(a, b)


def test_fit_router_after_a_fit_without_router(data):
    """The official two-stage workflow: stage 1 with router=False, then the router."""
    X, y, X_test, _ = data
    clf = RIDEClassifier(**FAST | {"router": False}).fit(X, y)
    assert clf.router_module_ is None and (clf.route(X_test) == 3).all()
    probs_all = clf.predict_proba(X_test)
    clf.set_params(router=True).fit_router(X, y)
    routed = clf.route(X_test)
    assert set(np.unique(routed)) <= {1, 2, 3} and clf.router_losses_.shape == (3,)
    restored = pickle.loads(pickle.dumps(clf))
    np.testing.assert_array_equal(restored.route(X_test), routed)
    # With every sample routed to all experts, the prediction is the one without router.
    np.testing.assert_allclose(clf.set_params(router_threshold=0.0).predict_proba(X_test),
                               probs_all, rtol=1e-5, atol=1e-6)


def test_fit_router_from_a_dataset_equals_from_arrays():
    """A dataset of (image, label) items trains the same router as the arrays."""
    rng = np.random.RandomState(0)
    X = rng.rand(48, 3, 8, 8).astype(np.float32)
    y = np.repeat([3, 5, 7], [30, 12, 6])
    clf = RIDEClassifier(backbone="convnet", max_epochs=1, batch_size=16, router_epochs=2,
                         router_batch_size=16, normalize="auto", random_state=0,
                         device="cpu").fit(X, y)
    from_arrays = _router_state(clf.fit_router(X, y))
    dataset = torch.utils.data.TensorDataset(torch.as_tensor(X), torch.as_tensor(y))
    from_dataset = _router_state(clf.fit_router(dataset))
    for a, b in zip(from_dataset, from_arrays, strict=True):
        assert_close(a, b)


@pytest.mark.parametrize("change, call, error, match", [
    ({"router": False}, lambda X, y: (X, y), ValueError, "router=True"),
    ({}, lambda X, y: (X, np.where(y == y[0], "?", y)), ValueError, "not classes"),
    ({}, lambda X, y: (X, y[:-1]), ValueError, "labels"),
    ({}, lambda X, y: (X[:, :5], y), ValueError, "features"),
    ({}, lambda X, y: (X, None), ValueError, "needs y"),
    ({"router_margin": "yes"}, lambda X, y: (X, y), ValueError, "router_margin"),
])
def test_fit_router_rejects_bad_calls_and_changes_nothing(fitted, data, change, call,
                                                          error, match):
    X, y, X_test, _ = data
    clf = pickle.loads(pickle.dumps(fitted)).set_params(**change)
    router, losses, state = clf.router_module_, clf.router_losses_, _router_state(clf)
    with pytest.raises(error, match=match):
        clf.fit_router(*call(X, y))
    assert clf.router_module_ is router and clf.router_losses_ is losses
    assert clf.router_margin_ == fitted.router_margin_ == 0.5
    for a, b in zip(_router_state(clf), state, strict=True):
        assert torch.equal(a, b)


def test_fit_router_needs_a_fitted_network_of_several_experts(data):
    from sklearn.exceptions import NotFittedError

    X, y, _, _ = data
    with pytest.raises(NotFittedError):
        RIDEClassifier(**FAST).fit_router(X, y)
    single = RIDEClassifier(**FAST | {"n_experts": 1, "max_epochs": 1}).fit(X, y)
    with pytest.raises(ValueError, match="1 expert"):
        single.fit_router(X, y)


def test_pipeline_and_grid_search_with_a_few_shot_scorer(small_letter):
    X, y, _, _ = small_letter
    pipe = make_pipeline(StandardScaler(), RIDEClassifier(**FAST | {"max_epochs": 2}))
    grid = GridSearchCV(pipe, {"rideclassifier__diversity_weight": [0.0, -0.45]},
                        scoring=few_shot_scorer, cv=StratifiedKFold(2))
    grid.fit(X, y)
    # The scorer reads the training counts through the Pipeline: finite few-shot scores.
    assert np.all(np.isfinite(grid.cv_results_["mean_test_score"]))
    assert grid.best_estimator_[-1].router_module_ is not None


def test_images_path_with_the_convnet(mnist):
    keep = np.concatenate([np.flatnonzero(mnist.y_train == c)[:30] for c in range(10)])
    X, y = mnist.X_train[keep], mnist.y_train[keep]
    clf = RIDEClassifier(max_epochs=2, router_epochs=1, batch_size=64, device="cpu",
                         random_state=0).fit(X, y)
    assert clf.module_.trunk.__class__.__name__ == "ConvNetTrunk"
    used = clf.route(mnist.X_test[:50])
    assert used.shape == (50,) and 1 <= used.min() and used.max() <= 3
    assert clf.predict(mnist.X_test[:50]).shape == (50,)
    macs = clf.macs_
    full = macs["trunk"] + sum(macs["experts"])
    # Samples that use every expert also paid for both routing heads.
    assert macs["experts"][0] / full < clf.relative_macs_ <= 1 + sum(macs["router"]) / full


@pytest.mark.parametrize("params, match", [
    ({"drw_epoch": "late"}, "drw_epoch"),
    ({"router_threshold": 1.5}, "router_threshold"),
    ({"loss": "softmax"}, "loss"),
    ({"reweight_factor": 2.0}, "reweight_factor"),
    ({"n_experts": 0}, "n_experts"),
])
def test_invalid_parameters_are_reported_at_fit(params, match, data):
    with pytest.raises(ValueError, match=match):
        RIDEClassifier(**FAST | params).fit(*data[:2])


# --------------------------------------------------------------------- learning
@pytest.mark.slow
def test_ride_beats_cross_entropy_on_letter_lt(letter):
    """RIDE (defaults, 30 epochs) against one cross-entropy expert (defaults) on letter-LT.

    Measured over seeds 0, 1, 2 (data split and fit; this test is seed 0) on the 2-core
    CI machine kind, accuracy in %:

    ========  ===================  ===================  ===============
    seed      RIDE overall / few   CE overall / few     difference
    ========  ===================  ===================  ===============
    0         82.5 / 64.4          78.9 / 55.7          +3.6 / +8.7
    1         83.9 / 71.4          79.9 / 60.0          +4.0 / +11.4
    2         83.6 / 69.1          80.5 / 60.1          +3.1 / +9.0
    ========  ===================  ===================  ===============

    (CE: ``python benchmarks/accuracy.py --datasets letter --threads 1``,
    ``benchmarks/results/accuracy_letter.csv``; RIDE: ``RIDEClassifier(random_state=s)``
    fitted on ``load_letter_lt(random_state=s)``'s training split at 1 torch thread, with
    the default router targets, half the LDAM margin, 3 December 2026; at 2 threads seed
    0 gives 82.6.) The asserted margins (+2 overall, +5
    few-shot) keep 1.1 and 3.7 points of room below the smallest measured difference.
    """
    X, y, X_test, y_test = letter.X_train, letter.y_train, letter.X_test, letter.y_test
    ride = RIDEClassifier(random_state=0, device="cpu").fit(X, y)
    ce = LongTailClassifier(loss="ce", random_state=0, device="cpu").fit(X, y)
    ride_acc = group_accuracy(y_test, ride.predict(X_test), class_counts=letter.class_counts)
    ce_acc = group_accuracy(y_test, ce.predict(X_test), class_counts=letter.class_counts)
    assert ride_acc["overall"] >= ce_acc["overall"] + 0.02
    assert ride_acc["few"] >= ce_acc["few"] + 0.05
    # Routing. Measured over seeds 0, 1, 2 at 1 and 2 torch threads, routed minus the
    # same fit with all three experts, in points (experts per sample):
    # - the default ("auto": half the LDAM margin without augmentation): -0.12 / 0.00 /
    #   +0.08 (1.19 / 1.46 / 1.23) at 1 thread, -0.04 / -0.23 / +0.04 (1.39 / 1.21 / 1.32)
    #   at 2 threads;
    # - the official targets (router_margin=False, a new router on the same network by
    #   fit_router): -0.19 / -0.04 / 0.00 (1.03 / 1.40 / 1.39) at 1 thread, -0.48 / -0.75
    #   / -0.25 (1.00 each) at 2 threads: on clean training data that router sits at its
    #   decision threshold (see RIDEClassifier's Notes).
    # Re-measured on another machine of the CI kind (AMD EPYC with AVX-512, 4 December
    # 2026; the same code gives other floating-point results there):
    # - the default: +0.02 / -0.02 / -0.23 (1.34 / 1.34 / 1.00) at 1 thread, +0.00 /
    #   +0.00 / +0.00 (1.52 / 1.36 / 1.38) at 2 threads;
    # - the official targets: -0.38 / -0.08 / +0.02 (1.00 / 1.16 / 1.39) at 1 thread,
    #   +0.17 / 0.00 / -0.25 (1.23 / 1.38 / 1.00) at 2 threads.
    # So the number of experts moves by up to 0.3 with the CPU and the thread count, and
    # the 1.5 lies inside that spread (seed 0, 2 threads: 1.39 on one machine,
    # 1.52 on the other). Asserted for the seed: the default within 0.3 points of all
    # experts at under 75 % of their MACs (measured 0.61-0.71) and at most 1.6 experts
    # per sample, and the official targets at most 1 point below all experts.
    all_experts = pickle.loads(pickle.dumps(ride)).set_params(router=False)
    full = group_accuracy(y_test, all_experts.predict(X_test),
                          class_counts=letter.class_counts)["overall"]
    assert ride.route(X_test).mean() <= 1.6 and ride.relative_macs_ < 0.75
    assert ride_acc["overall"] >= full - 0.003
    official = ride.set_params(router_margin=False).fit_router(X, y)
    official_acc = group_accuracy(y_test, official.predict(X_test),
                                  class_counts=letter.class_counts)["overall"]
    assert official.route(X_test).mean() < 2.0
    assert official_acc >= full - 0.01


def test_router_trains_on_the_augmented_normalised_stream(monkeypatch):
    """With ``augmentation="cifar"`` and ``normalize="auto"``, stage 2 feeds the frozen
    network the same stream as stage 1: normalised, then cropped and flipped (issue 12),
    not the clean training images."""
    from ltroute._inputs import normalize_array
    from ltroute.nn import ExpertNet

    rng = np.random.RandomState(0)
    X = rng.rand(60, 3, 8, 8).astype(np.float32) * 4 + 2  # far from mean 0, std 1
    y = np.repeat([0, 1, 2], [36, 16, 8])
    in_stage_two, seen = [], []
    train_router, shared = RIDEClassifier._train_router, ExpertNet.shared

    def spy_train_router(self, *args):
        in_stage_two.append(True)
        try:
            return train_router(self, *args)
        finally:
            in_stage_two.clear()

    def spy_shared(self, x):
        if in_stage_two:
            seen.append(x.detach().clone())
        return shared(self, x)

    monkeypatch.setattr(RIDEClassifier, "_train_router", spy_train_router)
    monkeypatch.setattr(ExpertNet, "shared", spy_shared)
    clf = RIDEClassifier(backbone="convnet", max_epochs=1, batch_size=32, router_epochs=2,
                         router_batch_size=32, normalize="auto", augmentation="cifar",
                         random_state=0, device="cpu").fit(X, y)
    assert len(seen) == 2 * 2  # two router epochs of two batches each
    clean = torch.as_tensor(normalize_array(X, clf.normalize_mean_, clf.normalize_std_))
    fill = torch.as_tensor(-clf.normalize_mean_ / clf.normalize_std_)
    inputs = torch.cat(seen)
    # Crop and flip move normalised pixels (or pad with a zero pixel's normalised value),
    # up to float rounding (the padding subtracts and adds back the fill).
    for c in range(3):
        values = torch.cat([clean[:, c].flatten(), fill[c:c + 1]]).sort().values
        got = inputs[:, c].flatten()
        pos = torch.bucketize(got, values).clamp(1, len(values) - 1)
        nearest = torch.minimum((got - values[pos - 1]).abs(), (got - values[pos]).abs())
        assert nearest.max() < 1e-5
    unchanged = [any(torch.allclose(x, ref, atol=1e-5) for ref in clean) for x in inputs]
    assert sum(unchanged) < len(inputs) / 4  # augmented, not the clean images
