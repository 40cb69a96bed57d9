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
from ltroute._validation import device_problem
from ltroute.callbacks import EpochProgressBar
from ltroute.datasets import load_digits_lt, load_letter_lt, load_mnist_lt
from ltroute.metrics import group_accuracy

DATASETS = {
    "letter": ("letter-LT", load_letter_lt),
    "mnist": ("MNIST-LT", load_mnist_lt),
    "digits": ("digits-LT", load_digits_lt),
}

COLUMNS = ("overall", "many", "medium", "few")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2**32 - 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ltroute",
        description="Fit long-tailed classifiers on a bundled data set and print many/"
                    "medium/few-shot accuracy on its balanced test split.",
    )
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="letter",
                        help="bundled data set (default: letter)")
    parser.add_argument("--method", action="append", choices=sorted(METHODS),
                        metavar="METHOD",
                        help="method to fit; repeat for several (default: "
                             f"{' '.join(DEFAULT_METHODS)}); one of {', '.join(sorted(METHODS))}")
    parser.add_argument("--epochs", type=_positive_int, default=30,
                        help="training epochs (default: 30)")
    parser.add_argument("--seed", type=_seed, default=0,
                        help="random_state of the data split and of every fit, 0 to 2**32 - 1 "
                             "(default: 0)")
    parser.add_argument("--device", default="auto",
                        help="torch device: auto, cpu, cuda, ... (default: auto)")
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help="CPU threads of torch (default: torch's choice, usually the "
                             "number of cores)")
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
    parser = _parser()
    args = parser.parse_args(argv)
    problem = device_problem(args.device)
    if problem is not None:
        parser.error(f"argument --device: {args.device!r}: {problem}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    methods = args.method or DEFAULT_METHODS
    title, loader = DATASETS[args.dataset]
    data = loader(random_state=args.seed)
    counts = np.array(list(data.class_counts.values()))
    device = resolve_device(args.device)
    print(f"ltroute {__version__} | {title}: {len(counts)} classes, {len(data.y_train)} "
          f"train / {len(data.y_test)} test (balanced), imbalance {counts.max() // counts.min()}"
          f" | seed {args.seed}, {args.epochs} epochs, device {device}, "
          f"{torch.get_num_threads()} threads "
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
