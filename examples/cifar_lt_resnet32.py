"""
CIFAR-100-LT with ResNet-32: the papers' recipe
===============================================

The benchmark the RIDE paper (and most long-tailed papers) report: CIFAR-100 with its
training split made long-tailed exactly as Cao et al. (LDAM-DRW) do — imbalance ratio
100, 500 images of class 0 down to 5 of class 99, 10,847 in all — and the balanced
10,000-image test split. ResNet-32, 200 epochs, SGD (lr 0.1, momentum 0.9, Nesterov,
weight decay 5e-4, batch 128), 5 warm-up epochs, learning rate x0.01 after epoch 160
and x0.0001 after 180, deferred re-weighting from epoch 160; random crops (padding 4)
and horizontal flips, plus RIDE's ±15° rotations for RIDE; CIFAR-10 mean/std
normalisation as in the official code.

Needs the CIFAR-100 "python version" files (about 160 MB; ``--download`` fetches them)
and, for the full schedule, a GPU: 200 epochs take well over a day on a laptop CPU.

Accuracy to expect (top-1 %, balanced test split, as published):

================================  ======  =====================================
method                            overall source
================================  ======  =====================================
cross-entropy                     38.3    Cao et al. 2019 (LDAM-DRW), Table 2
cross-entropy                     39.1    RIDE repository, MODEL_ZOO.md
LDAM-DRW                          42.0    Cao et al. 2019, Table 2
RIDE, 3 experts                   48.0    Wang et al. 2021 (paper)
RIDE, 3 experts + router          48.6    RIDE repository, MODEL_ZOO.md
DQRoute                           --      no published figure could be retrieved
================================  ======  =====================================

Usage::

    python examples/cifar_lt_resnet32.py --root ~/data --download
    python examples/cifar_lt_resnet32.py --root ~/data --methods ride --epochs 200
"""

# %%
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from skorch.callbacks import LRScheduler

from ltroute import DQRouteClassifier, LongTailClassifier, RIDEClassifier
from ltroute.augmentation import ImageAugmentation
from ltroute.callbacks import EpochProgressBar
from ltroute.datasets import load_cifar_lt
from ltroute.metrics import group_accuracy
from ltroute.schedules import StepWarmupSchedule

RANDOM_STATE = 0
EPOCHS = int(os.environ.get("LTROUTE_EXAMPLE_EPOCHS", 200))
CIFAR10_MEAN = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32)[:, None, None]
CIFAR10_STD = np.array([0.2023, 0.1994, 0.2010], dtype=np.float32)[:, None, None]


# %%
# The learning-rate schedule of LDAM-DRW and RIDE, placed relative to the number of
# epochs (160 and 180 of 200), stepped once per epoch: linear warm-up, then x0.01 after
# 80 % and x0.0001 after 90 % of the epochs.
def warmup_step_schedule(max_epochs: int, warmup: int = 5) -> StepWarmupSchedule:
    """The papers' schedule; the warm-up shrinks for short runs (1 epoch per 40)."""
    return StepWarmupSchedule(max_epochs, warmup_epochs=min(warmup, max(1, max_epochs // 40)),
                              gamma=0.01)


def make_estimators(epochs: int, seed: int) -> dict:
    """The compared methods with the papers' optimisation settings."""
    common = dict(
        backbone="resnet32", max_epochs=epochs, batch_size=128, lr=0.1,
        optimizer=torch.optim.SGD, optimizer__momentum=0.9, optimizer__nesterov=True,
        optimizer__weight_decay=5e-4, random_state=seed, lr_schedule=None,
        iterator_train__collate_fn=ImageAugmentation(crop_padding=4, flip=True),
    )
    drw = int(0.8 * epochs)
    ride = common | {"iterator_train__collate_fn": ImageAugmentation(rotation=15)}
    return {
        "ce": LongTailClassifier(loss="ce", **common),
        "ldam-drw": LongTailClassifier(loss="ldam", drw_epoch=drw, **common),
        "ride": RIDEClassifier(n_experts=3, drw_epoch=drw, **ride),
        "dqroute": DQRouteClassifier(n_experts=3, **common),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="CIFAR-LT with ResNet-32.")
    parser.add_argument("--root", required=True, help="folder with (or for) the CIFAR files")
    parser.add_argument("--download", action="store_true")
    parser.add_argument("--n-classes", type=int, default=100, choices=[10, 100])
    parser.add_argument("--imbalance-ratio", type=float, default=100)
    parser.add_argument("--methods", nargs="+", default=["ce", "ldam-drw", "ride", "dqroute"])
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--seed", type=int, default=RANDOM_STATE)
    args = parser.parse_args(argv)

    data = load_cifar_lt(args.root, n_classes=args.n_classes,
                         imbalance_ratio=args.imbalance_ratio, download=args.download)
    X_train = (data.X_train - CIFAR10_MEAN) / CIFAR10_STD
    X_test = (data.X_test - CIFAR10_MEAN) / CIFAR10_STD
    print(f"CIFAR-{args.n_classes}-LT: {len(data.y_train)} training images, "
          f"{len(data.y_test)} test images")

    estimators = make_estimators(args.epochs, args.seed)
    results = {}
    for name in args.methods:
        clf = estimators[name]
        clf.set_params(callbacks=[
            ("lr_schedule", LRScheduler(torch.optim.lr_scheduler.LambdaLR,
                                        lr_lambda=warmup_step_schedule(args.epochs))),
            ("progress", EpochProgressBar(desc=name)),
        ])
        start = time.perf_counter()
        clf.fit(X_train, data.y_train)
        seconds = time.perf_counter() - start
        results[name] = group_accuracy(data.y_test, clf.predict(X_test),
                                       class_counts=data.class_counts)
        print(f"{name:9s} " + "  ".join(f"{k} {100 * v:5.1f}" for k, v in results[name].items())
              + f"  fit {seconds / 60:.1f} min on {clf.module_.heads[0].weight.device}")
    return results


if __name__ == "__main__":
    main()
