"""
Quickstart: a long-tailed classifier in five lines
==================================================

Fit DQRoute on letter-LT — the UCI Letter data set with its training split made
long-tailed (imbalance ratio 100: 500 images of "A" down to 5 of "Z") and a balanced
test split — then read the per-group report the long-tail literature uses.
Runs in well under a minute on a laptop CPU.
"""

# %%
# Load the data. ``class_counts`` are the *training* counts: they decide which classes
# are many-shot (> 100 samples), medium (20-100) or few-shot (< 20).
import os

from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ltroute import DQRouteClassifier, LongTailClassifier
from ltroute.datasets import load_letter_lt
from ltroute.metrics import group_accuracy, long_tail_report

RANDOM_STATE = 0
EPOCHS = int(os.environ.get("LTROUTE_EXAMPLE_EPOCHS", 30))

data = load_letter_lt(random_state=RANDOM_STATE)
print(f"{len(data.y_train)} training rows, {len(data.y_test)} test rows, "
      f"class counts {min(data.class_counts.values())}-{max(data.class_counts.values())}")

# %%
# Fit and predict, exactly as with any scikit-learn classifier. Labels are the letters
# themselves (strings); ``predict`` returns them.
clf = make_pipeline(StandardScaler(),
                    DQRouteClassifier(max_epochs=EPOCHS, random_state=RANDOM_STATE))
clf.fit(data.X_train, data.y_train)
y_pred = clf.predict(data.X_test)
print(long_tail_report(data.y_test, y_pred, class_counts=data.class_counts))

# %%
# Compare with plain cross-entropy: most of the gain is on the few-shot classes.
baseline = make_pipeline(StandardScaler(),
                         LongTailClassifier(loss="ce", max_epochs=EPOCHS,
                                            random_state=RANDOM_STATE))
baseline.fit(data.X_train, data.y_train)
for name, model in [("cross-entropy", baseline), ("DQRoute", clf)]:
    scores = group_accuracy(data.y_test, model.predict(data.X_test),
                            class_counts=data.class_counts)
    print(f"{name:14s} " + "  ".join(f"{k} {100 * v:5.1f}" for k, v in scores.items()))
