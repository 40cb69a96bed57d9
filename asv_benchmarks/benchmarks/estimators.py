"""asv suite for the estimators: fit and predict throughput, peak memory, few-shot accuracy.

Synthetic long-tailed features (32 features, 20 classes, ratio 100) as in
``benchmarks/scaling.py``, small MLPs and 2 epochs, so that a ``--quick`` run on a laptop
CPU stays in minutes. ``time_fit`` / ``time_predict`` are wall-clock times over the
parameters ``n_samples`` and ``n_experts``; ``peakmem_fit`` is asv's peak resident memory
of a fit; ``track_few_shot_accuracy`` follows the few-shot accuracy of a 20-epoch fit on
bundled letter-LT (seed 0) across commits, so that a change that silently breaks
learning shows up in the history.
"""

from __future__ import annotations

from benchmarks.common import Benchmark, default_device
from ltroute import DQRouteClassifier, LongTailClassifier, RIDEClassifier
from ltroute.datasets import load_letter_lt, make_long_tailed_classification
from ltroute.metrics import few_shot_accuracy

ESTIMATORS = {"ride": RIDEClassifier, "dqroute": DQRouteClassifier}
SMALL = {"hidden_sizes": (64,), "expert_hidden_sizes": (32,), "max_epochs": 2,
         "random_state": 0}


def _estimator(method: str, n_experts: int):
    params = SMALL | {"device": default_device(), "n_experts": n_experts}
    if method == "ride":
        params["router_epochs"] = 1
    return ESTIMATORS[method](**params)


class EstimatorFit(Benchmark):
    """Wall time and peak memory of ``fit`` (2 epochs; RIDE includes its router stage)."""

    param_names = ["method", "n_samples", "n_experts"]
    params = (["ride", "dqroute"], [1_000, 10_000], [1, 3, 8])

    def setup(self, method, n_samples, n_experts):
        self.X, self.y = make_long_tailed_classification(n_samples)

    def time_fit(self, method, n_samples, n_experts):
        _estimator(method, n_experts).fit(self.X, self.y)

    def peakmem_fit(self, method, n_samples, n_experts):
        _estimator(method, n_experts).fit(self.X, self.y)


class EstimatorPredict(Benchmark):
    """Wall time of ``predict_proba`` of a fitted estimator (RIDE routes; DQRoute fuses)."""

    param_names = ["method", "n_samples", "n_experts"]
    params = (["ride", "dqroute"], [1_000, 10_000], [1, 3, 8])

    def setup(self, method, n_samples, n_experts):
        self.X, y = make_long_tailed_classification(n_samples)
        self.clf = _estimator(method, n_experts).fit(self.X, y)

    def time_predict_proba(self, method, n_samples, n_experts):
        self.clf.predict_proba(self.X)


class FewShotAccuracy(Benchmark):
    """Few-shot test accuracy on bundled letter-LT (20 epochs, seed 0), per method."""

    param_names = ["method"]
    params = (["ce", "ride", "dqroute"],)
    timeout = 900

    def setup(self, method):
        self.data = load_letter_lt(random_state=0)

    def track_few_shot_accuracy(self, method):
        data = self.data
        common = {"max_epochs": 20, "random_state": 0, "device": default_device()}
        clf = (LongTailClassifier(loss="ce", **common) if method == "ce"
               else ESTIMATORS[method](**common))
        clf.fit(data.X_train, data.y_train)
        return few_shot_accuracy(data.y_test, clf.predict(data.X_test),
                                 class_counts=data.class_counts)

    track_few_shot_accuracy.unit = "accuracy"
