"""Training overhead: ltroute's fit against a plain hand-written PyTorch loop.

Both sides train the same network (a copy of the estimator's initialised ``module_``)
with the same optimiser, learning rate, batch size, training loss (the estimator's own
``_training_loss``) and data, for the same number of epochs; the plain loop slices
shuffled batches from the tensors as a hand-written loop does (and as ltroute does), or
iterates a ``DataLoader`` over the image folder with the same workers, and does nothing
else. ltroute's time is its whole ``fit`` (validation, skorch's loop and callbacks, the
convergence check and, after fewer than 44 steps, the BatchNorm recalibration; RIDE
without its router stage, ``router=False``, which the plain loop has no counterpart of).
Reported: samples per second of each and their ratio (ltroute time / plain time), the
best of ``--repeats``, the ratio of ltroute's epochs alone (skorch's training loop)
to the plain loop, and the median of the per-run ratios (each run times ltroute and
then the plain loop: a paired figure that a slow stretch of a shared machine moves less
than two separate minima of sub-second fits). Several ``--images`` sizes give a row
pair each: 768 images x 5 epochs (30 steps) has the BatchNorm recalibration of short
runs, 2560 (100 steps) does not.

Usage (nothing else running; ``--threads`` torch threads)::

    python benchmarks/overhead.py --epochs 5 --repeats 5 --images 768 2560 --workers 2 \
        --image-folder /path/to/cifar10-jpeg/train
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
from _provenance import provenance_header, write_fragment
from torch.utils.data import DataLoader, Subset

from ltroute import LongTailClassifier, RIDEClassifier
from ltroute.datasets import ImageFolder, load_letter_lt


def tensor_batches(X: torch.Tensor, y: torch.Tensor, batch_size: int):
    """One epoch of shuffled batches sliced from in-memory tensors, as a hand-written
    loop takes them (and as ltroute does: a last batch of one sample is dropped)."""
    for index in torch.randperm(len(X)).split(batch_size):
        if len(index) > 1 or len(X) == 1:
            yield X[index], y[index]


def plain_loop(clf, data, epochs: int, batch_size: int, loader_kwargs: dict) -> float:
    """Seconds of a hand-written loop training a copy of ``clf.module_``: ``data`` is a
    pair of tensors (sliced a batch at a time) or a Dataset (a ``DataLoader``)."""
    module = copy.deepcopy(clf.module_).train()
    optimizer = clf.optimizer(module.parameters(), lr=clf.lr,
                              **clf.get_params_for("optimizer"))
    loader = (None if isinstance(data, tuple) else
              DataLoader(data, batch_size=batch_size, shuffle=True, **loader_kwargs))
    start = time.perf_counter()
    for _ in range(epochs):
        for X, y in tensor_batches(*data, batch_size) if loader is None else loader:
            optimizer.zero_grad()
            loss = clf._training_loss(module(X), y)
            loss.backward()
            optimizer.step()
    return time.perf_counter() - start


def measure(make, X, y, dataset, epochs, batch_size, repeats, loader_kwargs):
    """(ltroute seconds, its epochs' seconds, plain seconds), each the best of
    ``repeats``, and the median over the repeats of the paired ratio ltroute / plain
    (each repeat runs the two back to back, so a slow stretch of the machine slows
    both); the epochs are skorch's training loop alone (the sum of the history's
    ``dur``), without what ``fit`` does before and after it."""
    fits, loops, plains = [], [], []
    warm = make(random_state=0).set_params(max_epochs=1)  # first calls untimed
    warm.fit(X, y) if dataset is None else warm.fit(dataset)
    for repeat in range(repeats):
        clf = make(random_state=repeat)
        start = time.perf_counter()
        clf.fit(X, y) if dataset is None else clf.fit(dataset)
        fits.append(time.perf_counter() - start)
        loops.append(sum(epoch["dur"] for epoch in clf.history_))
        encoded = np.searchsorted(clf.classes_, y)
        data = ((torch.as_tensor(X), torch.as_tensor(encoded)) if dataset is None
                else dataset)
        torch.manual_seed(repeat)
        plains.append(plain_loop(clf, data, epochs, batch_size, loader_kwargs))
    paired = float(np.median(np.asarray(fits) / np.asarray(plains)))
    return min(fits), min(loops), min(plains), paired


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-folder", default=None,
                        help="root/<class>/<image> folder (e.g. the CIFAR-10 JPEG copy)")
    parser.add_argument("--images", type=int, nargs="+", default=[2560],
                        help="images taken from the folder (a seeded random subset); "
                             "several sizes give a row pair each")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice, all cores)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    rows = []
    common = {"max_epochs": args.epochs, "batch_size": args.batch_size,
              "lr_schedule": None, "device": "cpu"}
    letter = load_letter_lt(random_state=0)
    X, y = letter.X_train.astype(np.float32), letter.y_train
    estimators = {
        "LongTailClassifier (CE)": lambda **kw: LongTailClassifier(loss="ce", **common, **kw),
        "RIDEClassifier (3 experts)": lambda **kw: RIDEClassifier(router=False, **common,
                                                                  **kw),
    }
    for name, make in estimators.items():
        times = measure(make, X, y, None, args.epochs, args.batch_size, args.repeats, {})
        rows.append(("letter-LT, in-memory", name, len(X), *times))
        print(rows[-1], flush=True)

    if args.image_folder:
        folder = ImageFolder(args.image_folder)
        loader = {"num_workers": args.workers, "persistent_workers": args.workers > 0}
        iterator = {f"iterator_train__{k}": v for k, v in loader.items()}
        images = {"backbone": "convnet", **common, **iterator}
        estimators = {
            "LongTailClassifier (CE)": lambda **kw: LongTailClassifier(loss="ce", **images,
                                                                       **kw),
            "RIDEClassifier (3 experts)": lambda **kw: RIDEClassifier(router=False,
                                                                      **images, **kw),
        }
        for n_images in args.images:
            keep = np.sort(np.random.RandomState(0).permutation(len(folder))[:n_images])
            subset = Subset(folder, keep)
            labels = np.asarray(folder.classes)[np.asarray(folder.targets)[keep]]
            for name, make in estimators.items():
                times = measure(make, None, labels, subset, args.epochs, args.batch_size,
                                args.repeats, loader)
                rows.append((f"CIFAR-10 (JPEG copy), {len(keep)} images, image folder, "
                             f"{args.workers} workers", name, len(keep), *times))
                print(rows[-1], flush=True)

    steps = {n: args.epochs * (n // args.batch_size + (n % args.batch_size > 1))
             for n in (args.images if args.image_folder else [])}
    sizes = "; ".join(f"{n} images: {k} steps, {'so' if k < 44 else 'no'} BatchNorm "
                      "recalibration" for n, k in steps.items())
    lines = [provenance_header("Training overhead: ltroute fit vs a plain PyTorch loop"),
             f"CPU proxy: {args.epochs} epochs, batch {args.batch_size}, best of "
             f"{args.repeats} runs (seeds 0..{args.repeats - 1}); image rows use the small "
             "ConvNet backbone on 32x32 images. The plain loop slices shuffled batches "
             "from in-memory tensors and iterates a `DataLoader` over the image folder "
             "(same workers). Ratio = ltroute seconds / plain seconds (goal <= 1.10): "
             "of the whole `fit`, and of its epochs alone (skorch's training loop, the "
             "sum of the history's `dur`), each side's best run; *median paired ratio*: "
             "the median over the runs of whole `fit` / plain loop of the same run (the "
             "two run back to back); `fit` outside the epochs = input validation, "
             "network set-up and the end-of-fit checks: the convergence check (judged "
             "from the last epoch's training predictions, or else an inference pass that "
             "stops once the correct predictions reach the majority class's count) and, "
             "when fewer than 44 steps are taken, the BatchNorm recalibration (running "
             "statistics averaged over the last epoch's batches, which the plain loop "
             "lacks: its network predicts with running statistics that still weigh "
             "their starting values by 0.9^steps)."
             + (f" Image folder sizes ({sizes})." if steps else ""), "",
             "| data | estimator | samples/s ltroute | samples/s plain | ratio (fit) | "
             "ratio (epochs) | median paired ratio (fit) | fit outside the epochs (s) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for data, name, n, fit, loop, plain, paired in rows:
        lines.append(f"| {data} | {name} | {n * args.epochs / fit:,.0f} | "
                     f"{n * args.epochs / plain:,.0f} | {fit / plain:.2f} | "
                     f"{loop / plain:.2f} | {paired:.2f} | {fit - loop:.3f} |")
    path = write_fragment("overhead", "\n".join(lines) + "\n")
    print(path.read_text())


if __name__ == "__main__":
    main()
