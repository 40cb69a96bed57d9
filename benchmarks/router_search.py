"""Choose RIDE's router targets on a validation split: stage 1 once, the router many times.

For each data set and seed, ``RIDEClassifier`` (its registered configuration, with the
data set's handling of ``accuracy.DATA_SETTINGS``) is fitted with ``router=False`` on
80 % of the long-tailed training split (stratified, seeded: ``accuracy.validation_split``);
then ``fit_router`` trains a new router on the same 80 % for every ``router_margin`` of
``--margins`` (0: the official targets; 1: the LDAM margins, the default), the network
unchanged. Each router is scored on the other 20 %: balanced accuracy (the mean of
per-class recalls, what the balanced test split measures) and experts per sample, beside
the same network with all experts. The test split is never read.

``--folds K`` validates every training sample once instead: per seed, a stratified K-fold
split of the training split (seeded); for each fold stage 1 is fitted on the other folds
and the routers trained there predict the held-out fold; balanced accuracy and experts
per sample are computed over the pooled out-of-fold predictions, so a class with five
training samples is judged on all five rather than on one (K fits per seed).

Writes ``benchmarks/results/<name>.md`` (+ ``.csv``) and refreshes RESULTS.md. Seeds can
run as separate jobs (``--name router_search_cifar10_s0`` ...) and be rendered together
with ``--merge NAME ...`` (no fitting).

Usage::

    python benchmarks/router_search.py --datasets letter mnist --seeds 0 1 2 --threads 1
    python benchmarks/router_search.py --datasets cifar10 --cifar-root ROOT --epochs 15
    python benchmarks/router_search.py --datasets letter mnist --folds 5 --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _provenance import (  # noqa: E402
    provenance_header,
    read_runs_csv,
    write_fragment,
    write_runs_csv,
)
from accuracy import DATASETS, load, validation_folds  # noqa: E402

from ltroute._registry import make_estimator  # noqa: E402

#: The router goal of issue 15: at most this many experts per sample ...
GOAL_EXPERTS = 1.5
#: ... within this many points of the same network with all experts.
TOLERANCE = 0.3


def search(dataset: str, seed: int, args: argparse.Namespace) -> list[dict]:
    """Per validation part, one stage-1 fit on the rest, then one router per margin; a
    run per margin, scored over the pooled validation predictions of every part."""
    data = load(dataset, seed, args)
    parts = validation_folds(data.y_train, seed, args.folds)
    y_val, all_experts, fit_s = [], [], 0.0
    routed = {margin: {"pred": [], "used": [], "train_experts": [], "router_s": 0.0}
              for margin in args.margins}
    for part, val in enumerate(parts, start=1):
        X_fit, y_fit = data.X_train[~val], data.y_train[~val]
        X_val = data.X_train[val]
        clf = make_estimator("ride", max_epochs=args.epochs, random_state=seed)
        clf.set_params(**data.settings, router=False)
        start = time.perf_counter()
        clf.fit(X_fit, y_fit)
        fit_s += time.perf_counter() - start
        y_val.append(data.y_train[val])
        all_experts.append(clf.predict(X_val))
        for margin in args.margins:
            start = time.perf_counter()
            clf.set_params(router=True, router_margin=margin).fit_router(X_fit, y_fit)
            result = routed[margin]
            result["router_s"] += time.perf_counter() - start
            result["train_experts"].append(clf.expert_usage_)  # before route replaces it
            result["used"].append(clf.route(X_val))
            result["pred"].append(clf.predict(X_val))
            print(f"{DATASETS[dataset][0]} seed {seed} part {part}/{len(parts)} margin "
                  f"{margin:g}: {result['used'][-1].mean():.2f} experts", flush=True)
    y_val = np.concatenate(y_val)
    all_experts = balanced_accuracy_score(y_val, np.concatenate(all_experts))
    runs = []
    for margin, result in routed.items():
        runs.append({"dataset": dataset, "seed": seed, "margin": margin,
                     "val_balanced_acc": balanced_accuracy_score(
                         y_val, np.concatenate(result["pred"])),
                     "experts": float(np.concatenate(result["used"]).mean()),
                     "val_all_experts": all_experts,
                     "train_experts": float(np.mean(result["train_experts"])),
                     "fit_s": fit_s, "router_s": result["router_s"]})
        print(f"{DATASETS[dataset][0]} seed {seed} margin {margin:g}: val "
              f"{100 * runs[-1]['val_balanced_acc']:.1f} (all experts {100 * all_experts:.1f})"
              f" at {runs[-1]['experts']:.2f} experts", flush=True)
    return runs


def table(runs: list[dict], dataset: str) -> list[str]:
    """Mean ± std per margin; bold: the best mean balanced accuracy."""
    rows = [r for r in runs if r["dataset"] == dataset]
    margins = sorted({float(r["margin"]) for r in rows})
    seeds = sorted({int(r["seed"]) for r in rows})
    all_experts = 100 * np.array([next(float(r["val_all_experts"]) for r in rows
                                       if int(r["seed"]) == s) for s in seeds])

    def values(margin, key):
        return np.array([float(r[key]) for r in rows if float(r["margin"]) == margin])

    best = max(margins, key=lambda m: values(m, "val_balanced_acc").mean())
    lines = [f"Seeds {seeds}; all experts (no router): {all_experts.mean():.1f} ± "
             f"{all_experts.std():.1f}.", "",
             "| router_margin | balanced accuracy | − all experts | experts / sample "
             "(validation) | experts / sample (training) | within "
             f"{TOLERANCE} points at ≤ {GOAL_EXPERTS} experts (seeds) |",
             "|---|---|---|---|---|---|"]
    for margin in margins:
        acc = 100 * values(margin, "val_balanced_acc")
        experts = values(margin, "experts")
        gap = acc - all_experts
        mean_gap = round(gap.mean(), 1) + 0.0  # no "-0.0"
        goal = int(np.sum((gap >= -TOLERANCE) & (experts <= GOAL_EXPERTS)))
        cell = f"{acc.mean():.1f} ± {acc.std():.1f}"
        lines.append(f"| {margin:g}{' (official)' if margin == 0 else ''} | "
                     f"{f'**{cell}**' if margin == best else cell} | {mean_gap:+.1f} | "
                     f"{experts.mean():.2f} ({' / '.join(f'{e:.2f}' for e in experts)}) | "
                     f"{values(margin, 'train_experts').mean():.2f} | {goal} of "
                     f"{len(acc)} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=["letter"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--margins", nargs="+", type=float, default=[0, 0.5, 1, 1.5, 2])
    parser.add_argument("--cifar-root", default=None, help="image-folder copy of CIFAR-10")
    parser.add_argument("--backbone", default=None, help="replace the data set's backbone")
    parser.add_argument("--name", default=None,
                        help="fragment name (default: router_search_<datasets>)")
    parser.add_argument("--merge", nargs="+", default=None, metavar="NAME",
                        help="render the runs stored under these names (no fitting)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--folds", type=int, default=0,
                        help="stratified K-fold validation over the whole training split "
                             "(K fits per seed) instead of one 80 / 20 split (0)")
    args = parser.parse_args(argv)
    if args.folds < 0 or args.folds == 1:
        parser.error("--folds needs 0 (one 80 / 20 split) or at least 2 folds")
    if "cifar10" in args.datasets and args.cifar_root is None and args.merge is None:
        parser.error("--datasets cifar10 needs --cifar-root")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    name = args.name or "router_search_" + "_".join(args.datasets)

    if args.merge:
        runs = [run for part in args.merge for run in read_runs_csv(part)]
    else:
        runs = [run for dataset in args.datasets for seed in args.seeds
                for run in search(dataset, seed, args)]
    write_runs_csv(name, runs)
    argv_used = [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]
    text = provenance_header("RIDE router targets (validation split)", argv_used)
    validation = (
        "fitted once per seed with `router=False` on 80 % of the long-tailed training "
        "split (stratified, seeded); `fit_router` then trains one router per "
        "`router_margin` on the same 80 % (0: the official targets). Balanced accuracy "
        "(%) and experts per sample on the other 20 %" if args.folds == 0 else
        f"fitted with `router=False` once per fold of a stratified {args.folds}-fold "
        "split of the long-tailed training split (seeded), on the other folds; "
        "`fit_router` then trains one router per `router_margin` on the same folds (0: "
        "the official targets) and predicts the held-out fold. Balanced accuracy (%) and "
        "experts per sample over the pooled out-of-fold predictions (every training "
        "sample validated once)")
    text += (f"{args.epochs} epochs, RIDE's registered configuration with each data set's "
             "handling (CIFAR-10-LT: crop + flip, normalisation from the training data, "
             f"small ConvNet), {validation}; the test "
             "split is not used. *− all experts*: against the same network without "
             "router. Bold: the best mean. torch CPU threads: "
             f"{torch.get_num_threads()}. Every run is in `benchmarks/results/{name}.csv`."
             "\n")
    if args.merge:
        text += ("\nRendered without fitting from the runs of "
                 + ", ".join(f"`{part}`" for part in args.merge)
                 + " (one job each, run side by side; their fragments name the commit).\n")
    for dataset in dict.fromkeys(run["dataset"] for run in runs):
        text += f"\n### {DATASETS[dataset][0]}\n\n" + "\n".join(table(runs, dataset)) + "\n"
    path = write_fragment(name, text)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
