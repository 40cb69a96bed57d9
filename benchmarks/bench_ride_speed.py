"""Training speed of RIDE (3 experts, router off) against one expert with the same backbone.

RIDE claims compute on par with a single network: its experts own only the late stages
and, with ``reduce_dimension``, are narrower. This measures fit time per epoch (median
over the timed epochs, the first epoch excluded as warm-up) of

- ``RIDEClassifier(router=False)`` and ``LongTailClassifier(loss="ldam")`` (same
  trunk, same head type) on letter-LT features (MLP backbone), and
- the same pair with ``backbone="resnet32"`` on CIFAR-shaped random inputs
  (N x 3 x 32 x 32, 100 classes; RIDE with reduced experts, the baseline a plain
  full-width ResNet-32),

and reports the ratio, next to the analytic MACs per sample of each model. Writes
``benchmarks/results/ride_speed.md``.

Usage::

    python benchmarks/bench_ride_speed.py
    python benchmarks/bench_ride_speed.py --cifar-samples 256 --epochs 3
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _provenance import provenance_header, write_fragment  # noqa: E402

from ltroute import LongTailClassifier, RIDEClassifier  # noqa: E402
from ltroute.datasets import load_letter_lt  # noqa: E402
from ltroute.nn import count_macs  # noqa: E402


def _macs(clf) -> int:
    """MACs per sample of a fitted estimator's network with every expert."""
    module = clf.module_.eval()
    x = torch.zeros(1, *clf.input_shape_, device=next(module.parameters()).device)
    with torch.no_grad():
        return count_macs(module, x)[0]


def _time_fit(clf, X, y) -> tuple[float, float]:
    """Median seconds per epoch (first epoch excluded) and total fit seconds."""
    start = time.perf_counter()
    clf.fit(X, y)
    total = time.perf_counter() - start
    durations = [row["dur"] for row in clf.history_]
    return float(np.median(durations[1:] if len(durations) > 1 else durations)), total


def _pair(name: str, X, y, *, epochs: int, seed: int, device: str, **network) -> dict:
    common = dict(max_epochs=epochs, random_state=seed, device=device, **network)
    ride = RIDEClassifier(router=False, **common)
    single = LongTailClassifier(loss="ldam", **common)
    ride_epoch, ride_total = _time_fit(ride, X, y)
    single_epoch, single_total = _time_fit(single, X, y)
    return {"setting": name, "n": len(X), "ride_epoch": ride_epoch,
            "single_epoch": single_epoch, "ratio": ride_epoch / single_epoch,
            "ride_macs": _macs(ride), "single_macs": _macs(single),
            "throughput_ride": len(X) / ride_epoch, "throughput_single": len(X) / single_epoch}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=6,
                        help="epochs per fit; the first is not timed (default: 6)")
    parser.add_argument("--cifar-samples", type=int, default=512,
                        help="random CIFAR-shaped training images (default: 512)")
    parser.add_argument("--cifar-epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()

    rows = []
    letter = load_letter_lt(random_state=args.seed)
    rows.append(_pair("letter-LT, MLP (256, 256) trunk + (128,) per expert",
                      letter.X_train, letter.y_train, epochs=args.epochs, seed=args.seed,
                      device=args.device))
    print(rows[-1], flush=True)

    rng = np.random.RandomState(args.seed)
    X = rng.rand(args.cifar_samples, 3, 32, 32).astype(np.float32)
    y = np.arange(args.cifar_samples) % 100
    rows.append(_pair("CIFAR-shaped random, ResNet-32 (RIDE: 3 reduced experts)", X, y,
                      epochs=args.cifar_epochs, seed=args.seed, device=args.device,
                      backbone="resnet32"))
    print(rows[-1], flush=True)
    load_after = os.getloadavg()

    argv_used = [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]
    text = provenance_header("RIDE training speed against a single expert", argv_used)
    text += (f"Seed {args.seed}. Fit time per epoch = median over epochs 2..E of skorch's "
             f"`dur` (E = {args.epochs} on letter-LT, {args.cifar_epochs} on the CIFAR-shaped "
             "data), batch 128, each estimator's default optimiser (RIDE: SGD with Nesterov "
             "momentum; single expert: AdamW); RIDE with `router=False` (stage 2 not run). MACs "
             "per sample counted with `torch.utils.flop_counter` (convolutions and matrix "
             "products, all experts). 1-minute load average "
             f"{load_before[0]:.2f} before, {load_after[0]:.2f} after the run "
             f"({os.cpu_count()} logical cores): above the torch thread count means the "
             "CPU was shared with other work and timings are noisy.\n\n")
    text += ("| setting | N | RIDE s/epoch | single s/epoch | ratio | RIDE MMACs | "
             "single MMACs | MAC ratio | RIDE samples/s | single samples/s |\n"
             "|---|---|---|---|---|---|---|---|---|---|\n")
    for r in rows:
        text += (f"| {r['setting']} | {r['n']} | {r['ride_epoch']:.3f} | "
                 f"{r['single_epoch']:.3f} | {r['ratio']:.2f} | {r['ride_macs'] / 1e6:.3f} | "
                 f"{r['single_macs'] / 1e6:.3f} | {r['ride_macs'] / r['single_macs']:.2f} | "
                 f"{r['throughput_ride']:.0f} | {r['throughput_single']:.0f} |\n")
    if not torch.cuda.is_available():
        text += ("\nNo GPU on this machine: GPU images/s are not measured (run this script "
                 "on a CUDA machine to fill them in).\n")
    out = write_fragment("ride_speed", text)
    print(f"wrote {out} and benchmarks/RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
