"""
Deploying into long-tailed traffic: target priors, label-shift estimation, calibration
=======================================================================================

Long-tail methods are tuned for a *balanced* test set, but real traffic is often as
long-tailed as the training data (or tail-heavy, or unknown). This example fits two
models on letter-LT (UCI Letter, training split long-tailed at imbalance ratio 100:
500 "A" down to 5 "Z"; balanced test split) and then, without refitting, predicts for
three kinds of traffic drawn from the test split: forward long-tailed (the training head
stays the head, imbalance 50), uniform, and backward long-tailed (reversed) — the
test-agnostic protocol of SADE (Zhang et al. 2022).

- ``PriorCorrectedClassifier`` makes any scikit-learn classifier long-tail aware (here an
  RBF ``SVC``), with calibrated probabilities and an EM estimate of the test prior.
- Every ltroute estimator takes the same ``target_prior`` (here ``LongTailClassifier``
  with the logit-adjusted loss); its ``calibrate`` method, on a split of the training data
  held out from ``fit``, calibrates the probabilities that ``"estimate"`` needs.

Seed ``RANDOM_STATE = 0``. About a minute on a laptop CPU.
"""

# %%
# Data: the long-tailed training split and three test sets from the balanced test split.
import os
import warnings

import numpy as np
from sklearn.model_selection import train_test_split
from sklearn.svm import SVC

from ltroute import LongTailClassifier, PriorCorrectedClassifier
from ltroute.datasets import load_letter_lt, make_long_tailed
from ltroute.metrics import expected_calibration_error

RANDOM_STATE = 0
EPOCHS = int(os.environ.get("LTROUTE_EXAMPLE_EPOCHS", 30))

data = load_letter_lt(random_state=RANDOM_STATE)
head_first = sorted(data.class_counts, key=data.class_counts.get, reverse=True)
test_sets = {
    "forward-LT 50": make_long_tailed(data.X_test, data.y_test, imbalance_ratio=50,
                                      class_order=head_first, random_state=RANDOM_STATE),
    "uniform": (data.X_test, data.y_test),
    "backward-LT 50": make_long_tailed(data.X_test, data.y_test, imbalance_ratio=50,
                                       class_order=head_first[::-1],
                                       random_state=RANDOM_STATE),
}

# %%
# Any classifier: an RBF ``SVC`` with libsvm's multi-class Platt probabilities inside
# ``PriorCorrectedClassifier``. (``probability=True`` is deprecated in scikit-learn 1.9;
# the suggested ``CalibratedClassifierCV(SVC(), ensemble=False)`` calibrates one class
# against the rest and measured clearly worse on this data.) ``fit`` also calibrates the
# probabilities (a temperature and per-class biases, "BCTS") on 5-fold held-out
# predictions: EM label-shift estimation needs calibrated probabilities.
svc = PriorCorrectedClassifier(SVC(C=10.0, probability=True, random_state=RANDOM_STATE))
with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # the deprecation of probability=True
    svc.fit(data.X_train, data.y_train)

# %%
# A deep estimator: the logit-adjusted loss trains for the balanced error; its
# ``target_prior`` moves the decision to any other class prior, after the fit. EM needs
# calibrated probabilities: fit on 80 % of the training data and ``calibrate`` (a
# temperature, by maximum likelihood) on the other 20 %, stratified, never on test data.
# Without it, ``target_prior="estimate"`` warns and can drift.
X_fit, X_held, y_fit, y_held = train_test_split(
    data.X_train, data.y_train, test_size=0.2, stratify=data.y_train,
    random_state=RANDOM_STATE)
net = LongTailClassifier(loss="logit_adjusted", max_epochs=EPOCHS,
                         random_state=RANDOM_STATE).fit(X_fit, y_fit)
net.calibrate(X_held, y_held)
print(f"LA-MLP calibration temperature: {net.calibration_temperature_:.2f}")

# %%
# Accuracy for each kind of traffic and each ``target_prior``: "uniform" (the default),
# "train" (the training frequencies), the true prior of the test set (an oracle) and
# "estimate" (EM on the unlabelled test batch itself).
print(f"{'model':<8} {'target_prior':<12} " + " ".join(f"{n:>15}" for n in test_sets))
for name, clf in (("SVC", svc), ("LA-MLP", net)):
    for mode in ("uniform", "train", "true", "estimate"):
        cells = []
        for X, y in test_sets.values():
            true_prior = {c: int(np.sum(y == c)) for c in clf.classes_}
            clf.set_params(target_prior=true_prior if mode == "true" else mode)
            cells.append(f"{100 * np.mean(clf.predict(X) == y):14.1f}%")
        print(f"{name:<8} {mode:<12} " + " ".join(cells))

# %%
# The estimated prior of the forward-LT traffic against the truth (total variation).
X, y = test_sets["forward-LT 50"]
estimated = svc.estimate_prior(X)
true = np.array([np.mean(y == c) for c in svc.classes_])
print(f"\nSVC: total variation between estimated and true prior on forward-LT 50: "
      f"{0.5 * np.abs(estimated - true).sum():.3f}")
print("head classes, estimated vs true:", np.round(estimated[:3], 3), np.round(true[:3], 3))

# %%
# Calibration per shot group (expected calibration error, 15 equal-width bins), on the
# uniform test set with ``target_prior="uniform"``.
svc.set_params(target_prior="uniform")
ece = expected_calibration_error(data.y_test, svc.predict_proba(data.X_test),
                                 class_counts=svc.class_counts_, classes=svc.classes_)
print("SVC ECE per group (%):", {k: round(100 * v, 1) for k, v in ece.items()})

# %%
# The same as a per-group reliability diagram (needs matplotlib).
try:
    import matplotlib.pyplot as plt

    from ltroute.plotting import plot_reliability_diagram
except ImportError:
    pass
else:
    ax = plot_reliability_diagram(data.y_test, svc.predict_proba(data.X_test),
                                  class_counts=svc.class_counts_, classes=svc.classes_)
    ax.set_title("SVC + PriorCorrectedClassifier on letter-LT (uniform test set)")
    plt.close(ax.figure)
