"""``python -m ltroute``: fit ltroute's methods on a bundled long-tailed data set.

With no arguments it trains the default methods on letter-LT (UCI Letter, 26 classes,
imbalance ratio 100) and prints overall / many / medium / few-shot accuracy on the
balanced test split, with fit times.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Sequence

import numpy as np
import torch

from ltroute import __version__
from ltroute._base import resolve_device
from ltroute._registry import DEFAULT_METHODS, METHODS, make_estimator
from ltroute.callbacks import EpochProgressBar
from ltroute.datasets import load_digits_lt, load_letter_lt, load_mnist_lt
from ltroute.metrics import group_accuracy

DATASETS = {
    "letter": ("letter-LT", load_letter_lt),
    "mnist": ("MNIST-LT", load_mnist_lt),
    "digits": ("digits-LT", load_digits_lt),
}

COLUMNS = ("overall", "many", "medium", "few")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ltroute",
        description="Fit long-tailed classifiers on a bundled data set and print many/"
                    "medium/few-shot accuracy on its balanced test split.",
    )
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="letter",
                        help="bundled data set (default: letter)")
    parser.add_argument("--method", action="append", choices=sorted(METHODS),
                        help="method to fit; repeat for several (default: "
                             f"{' '.join(DEFAULT_METHODS)})")
    parser.add_argument("--epochs", type=int, default=30,
                        help="training epochs (default: 30)")
    parser.add_argument("--seed", type=int, default=0,
                        help="random_state of the data split and of every fit (default: 0)")
    parser.add_argument("--device", default="auto",
                        help="torch device: auto, cpu, cuda, ... (default: auto)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def _format_table(rows: list[tuple[str, dict[str, float], float]]) -> str:
    width = max(len("method"), *(len(name) for name, _, _ in rows))
    header = f"{'method':<{width}}  " + "  ".join(f"{c:>7}" for c in COLUMNS) + "   fit (s)"
    lines = [header, "-" * len(header)]
    for name, scores, seconds in rows:
        cells = "  ".join(f"{100 * scores[c]:7.1f}" for c in COLUMNS)
        lines.append(f"{name:<{width}}  {cells}   {seconds:7.1f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the process exit code."""
    args = _parser().parse_args(argv)
    if args.epochs < 1:
        _parser().error("--epochs must be at least 1")
    methods = args.method or DEFAULT_METHODS
    title, loader = DATASETS[args.dataset]
    data = loader(random_state=args.seed)
    counts = np.array(list(data.class_counts.values()))
    device = resolve_device(args.device)
    print(f"ltroute {__version__} | {title}: {len(counts)} classes, {len(data.y_train)} "
          f"train / {len(data.y_test)} test (balanced), imbalance {counts.max() // counts.min()}"
          f" | seed {args.seed}, {args.epochs} epochs, device {device} "
          f"({platform.processor() or platform.machine()}, torch {torch.__version__})")

    rows = []
    for method in methods:
        callbacks = [] if args.no_progress else [("progress", EpochProgressBar(desc=method))]
        clf = make_estimator(method, max_epochs=args.epochs, random_state=args.seed,
                             device=args.device, callbacks=callbacks)
        start = time.perf_counter()
        clf.fit(data.X_train, data.y_train)
        seconds = time.perf_counter() - start
        scores = group_accuracy(data.y_test, clf.predict(data.X_test),
                                class_counts=data.class_counts)
        rows.append((method, scores, seconds))

    print("\nAccuracy (%) on the balanced test split; groups by training count: many > 100,"
          " medium 20-100, few < 20")
    print(_format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
