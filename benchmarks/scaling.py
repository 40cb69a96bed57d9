"""Fit-time scaling of RIDEClassifier and DQRouteClassifier on synthetic features.

Two sweeps on long-tailed ``make_classification`` data (32 features, 20 classes,
exponential profile with ratio 100): fit time against ``n_samples`` (1k ... 100k, 3
experts) and against ``n_experts`` (1 ... 8, 10k samples). Each fit runs a fixed number
of epochs, so the time per epoch is the quantity compared. The growth exponent is the
least-squares slope of log(time) against log(n_samples). Writes
``benchmarks/results/scaling.md`` (+ ``.png``) and refreshes ``benchmarks/RESULTS.md``.

Usage::

    python benchmarks/scaling.py
    python benchmarks/scaling.py --samples 1000 10000 --experts 1 3 --epochs 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _provenance import RESULTS_DIR, provenance_header, write_fragment  # noqa: E402

from ltroute import DQRouteClassifier, RIDEClassifier  # noqa: E402
from ltroute.datasets import make_long_tailed_classification  # noqa: E402

ESTIMATORS = {"RIDE": RIDEClassifier, "DQRoute": DQRouteClassifier}
N_CLASSES = 20  # make_long_tailed_classification's default


def time_fit(name: str, X: np.ndarray, y: np.ndarray, *, n_experts: int, epochs: int,
             repeats: int = 1) -> float:
    """Median wall time of ``repeats`` fits (RIDE: stage 1 only, ``router=False``)."""
    times = []
    for _ in range(repeats):
        clf = ESTIMATORS[name](n_experts=n_experts, max_epochs=epochs, batch_size=256,
                               random_state=0, device="cpu")
        if name == "RIDE":
            clf.set_params(router=False)  # stage 1 only: the router's cost is counted elsewhere
        start = time.perf_counter()
        clf.fit(X, y)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _plot(sample_rows, expert_rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name in ESTIMATORS:
        rows = [r for r in sample_rows if r[0] == name]
        left.loglog([r[1] for r in rows], [r[2] for r in rows], "o-", label=name)
        rows = [r for r in expert_rows if r[0] == name]
        right.plot([r[1] for r in rows], [r[2] for r in rows], "o-", label=name)
    left.set(xlabel="n_samples", ylabel="fit time (s)", title="3 experts")
    right.set(xlabel="n_experts", ylabel="fit time (s)", title="10k samples")
    for ax in (left, right):
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", nargs="+", type=int,
                        default=[1000, 3000, 10000, 30000, 100000])
    parser.add_argument("--experts", nargs="+", type=int, default=[1, 2, 3, 4, 6, 8])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="fits per point (median)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice, all cores)")
    parser.add_argument("--name", default="scaling")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    warm_X, warm_y = make_long_tailed_classification(1000)
    for name in ESTIMATORS:  # first fits pay one-off start-up costs: not timed
        time_fit(name, warm_X, warm_y, n_experts=3, epochs=1)

    sample_rows, expert_rows = [], []
    for n in args.samples:
        X, y = make_long_tailed_classification(n)
        for name in ESTIMATORS:
            seconds = time_fit(name, X, y, n_experts=3, epochs=args.epochs,
                               repeats=args.repeats)
            sample_rows.append((name, n, seconds))
            print(f"{name:8s} n_samples {n:7d}: {seconds:7.2f} s", flush=True)
    X, y = make_long_tailed_classification(10000)
    for k in args.experts:
        for name in ESTIMATORS:
            seconds = time_fit(name, X, y, n_experts=k, epochs=args.epochs,
                               repeats=args.repeats)
            expert_rows.append((name, k, seconds))
            print(f"{name:8s} n_experts {k:2d}: {seconds:7.2f} s", flush=True)

    argv_used = [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]
    text = provenance_header("Fit-time scaling (CPU)", argv_used)
    text += (f"Synthetic long-tailed features (32 features, {N_CLASSES} classes, ratio 100), "
             f"{args.epochs} epochs, batch 256, default MLP, RIDE without its stage-2 "
             f"router; median of {args.repeats} fits per point after an untimed warm-up "
             f"fit; torch CPU threads: {torch.get_num_threads()}.\n\n")
    text += "| estimator | " + " | ".join(f"n={n}" for n in args.samples) + " | growth |\n"
    text += "|---|" + "---|" * (len(args.samples) + 1) + "\n"
    for name in ESTIMATORS:
        rows = [r for r in sample_rows if r[0] == name]
        slope = np.polyfit(np.log([r[1] for r in rows]), np.log([r[2] for r in rows]), 1)[0]
        text += (f"| {name} | " + " | ".join(f"{r[2]:.1f} s" for r in rows)
                 + f" | time ∝ n^{slope:.2f} |\n")
    text += "\n| estimator | " + " | ".join(f"K={k}" for k in args.experts) + " |\n"
    text += "|---|" + "---|" * len(args.experts) + "\n"
    for name in ESTIMATORS:
        rows = [r for r in expert_rows if r[0] == name]
        text += f"| {name} | " + " | ".join(f"{r[2]:.1f} s" for r in rows) + " |\n"
    png = RESULTS_DIR / f"{args.name}.png"
    RESULTS_DIR.mkdir(exist_ok=True)
    _plot(sample_rows, expert_rows, png)
    text += f"\n![fit time scaling]({png.relative_to(RESULTS_DIR.parent)})\n"
    path = write_fragment(args.name, text)
    print(f"\nwrote {path} and benchmarks/RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
