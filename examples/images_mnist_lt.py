"""
Image inputs: RIDE vs DQRoute vs cross-entropy on MNIST-LT
==========================================================

The estimators take image tensors ``(N, C, H, W)`` as they take feature matrices: with
28x28 digits the default backbone is a small ConvNet (shared trunk, one convolutional
block per expert). MNIST-LT is the MNIST t10k set with its training split made
long-tailed (imbalance ratio 100: 625 images of digit 0 down to 6 of digit 9, 1,547 in
all) and a balanced test split of 267 images per digit. Seed ``RANDOM_STATE``.
A few minutes on a laptop CPU.
"""

# %%
import os
import time

from ltroute import DQRouteClassifier, LongTailClassifier, RIDEClassifier
from ltroute.datasets import load_mnist_lt
from ltroute.metrics import group_accuracy

RANDOM_STATE = 0
EPOCHS = int(os.environ.get("LTROUTE_EXAMPLE_EPOCHS", 30))

data = load_mnist_lt(random_state=RANDOM_STATE)
print("training images:", data.X_train.shape, "test images:", data.X_test.shape)
print("training counts per digit:", data.class_counts)

# %%
# Three estimators, same data, same seed. RIDE's router (trained after the experts)
# lets easy test digits stop after the first expert: ``expert_usage_`` reports the
# mean number of experts evaluated per test image on the last prediction.
models = {
    "cross-entropy": LongTailClassifier(loss="ce", max_epochs=EPOCHS,
                                        random_state=RANDOM_STATE),
    "RIDE": RIDEClassifier(max_epochs=EPOCHS, random_state=RANDOM_STATE),
    "DQRoute": DQRouteClassifier(max_epochs=EPOCHS, random_state=RANDOM_STATE),
}
for name, model in models.items():
    start = time.perf_counter()
    model.fit(data.X_train, data.y_train)
    seconds = time.perf_counter() - start
    scores = group_accuracy(data.y_test, model.predict(data.X_test),
                            class_counts=data.class_counts)
    usage = getattr(model, "expert_usage_", model.module_.n_experts)
    print(f"{name:14s} " + "  ".join(f"{k} {100 * v:5.1f}" for k, v in scores.items())
          + f"  experts/image {usage:.2f}  fit {seconds:.0f}s")
