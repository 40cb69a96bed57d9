"""RIDE's router trained on samples stage 1 did not fit: a test-split report, no choice.

On data that stage 1 fits without error (MNIST-LT's clean training split: no training
sample is misclassified), the router's targets hold almost no "add an expert" sample and
it stops every sample after the first expert (``RIDEClassifier``'s Notes). This script
tests whether a router trained on held-out training samples, which the experts do
misclassify, fixes that. Per data set and seed, ``RIDEClassifier`` (its registered
configuration with the data set's handling of ``accuracy.DATA_SETTINGS``) is fitted with
``router=False`` on a stratified, seeded part of the long-tailed training split (the
fit part, 1 - ``--holdout``); ``fit_router`` then trains one router per
``router_margin`` (``--margins``; 0: the official targets) on the fit part, as ``fit``
does, and one on the held-out part, the network unchanged. Each is scored on the
test split: balanced accuracy (and per shot group), experts per sample (and per shot
group, as the official code reports), beside the same network with all experts and
beside the default ``RIDEClassifier`` fitted on the whole training split (what a user
gives up by holding samples out). Nothing is chosen on these figures: the default is
chosen on validation splits (``router_search.py``).

Usage::

    python benchmarks/router_holdout.py --datasets letter mnist --seeds 0 1 2 --threads 1

The protocol of issue 15 (ResNet-32, 40 epochs, MNIST-LT; on a GPU when there is one, the
estimators' ``device="auto"``)::

    python benchmarks/router_holdout.py --datasets mnist --backbone resnet32 --epochs 40 \\
        --name router_holdout_resnet32
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _provenance import provenance_header, write_fragment, write_runs_csv  # noqa: E402
from accuracy import DATASETS, load, validation_split  # noqa: E402
from router_search import GOAL_EXPERTS, TOLERANCE  # noqa: E402

from ltroute._registry import make_estimator  # noqa: E402
from ltroute.metrics import group_accuracy, shot_groups  # noqa: E402

GROUPS = ("many", "medium", "few")


def score_on_test_split(clf, data, classes: np.ndarray, counts: np.ndarray) -> dict[str, float]:
    """Balanced accuracy and per-group accuracy (%) of ``clf`` on the test split, and
    experts per sample overall and per shot group (all experts without router)."""
    pred = clf.predict(data.X_test)
    used = (clf.route(data.X_test) if clf.router
            else np.full(len(pred), clf.n_experts))
    accuracy = group_accuracy(data.y_test, pred, class_counts=counts, classes=classes)
    scores = {"balanced_acc": 100 * balanced_accuracy_score(data.y_test, pred),
              "experts": float(used.mean())}
    for group, labels in shot_groups(counts, classes=classes).items():
        in_group = np.isin(data.y_test, labels)
        scores[f"{group}_acc"] = 100 * accuracy[group] if in_group.any() else float("nan")
        scores[f"{group}_experts"] = (float(used[in_group].mean()) if in_group.any()
                                      else float("nan"))
    return scores


def run(dataset: str, seed: int, args: argparse.Namespace) -> list[dict]:
    """One stage-1 fit on the fit part, then a router per (training part, margin); plus
    the default on the whole training split. One run (row) each."""
    data = load(dataset, seed, args)
    classes, counts = np.unique(data.y_train, return_counts=True)
    held_out = validation_split(data.y_train, seed=seed, fraction=args.holdout)
    parts = {"fit part": ~held_out, "held-out part": held_out}
    column = {"fit part": "error_fit", "held-out part": "error_held_out"}
    base = {"dataset": dataset, "seed": seed, "holdout": args.holdout}

    clf = make_estimator("ride", max_epochs=args.epochs, random_state=seed)
    clf.set_params(**data.settings, router=False)
    clf.fit(data.X_train[~held_out], data.y_train[~held_out])
    errors = {column[part]: 100 * float(np.mean(clf.predict(data.X_train[mask])
                                                 != data.y_train[mask]))
              for part, mask in parts.items()}
    runs = [{**base, "router": "none (all experts)", "margin": float("nan"), **errors,
             **score_on_test_split(clf, data, classes, counts)}]
    for part, mask in parts.items():
        for margin in args.margins:
            clf.set_params(router=True, router_margin=margin)
            clf.fit_router(data.X_train[mask], data.y_train[mask])
            runs.append({**base, "router": part, "margin": margin, **errors,
                         "experts_own_data": clf.expert_usage_,
                         **score_on_test_split(clf, data, classes, counts)})
            print(f"{DATASETS[dataset][0]} seed {seed} router on the {part}, margin "
                  f"{margin:g}: {runs[-1]['balanced_acc']:.2f} % at "
                  f"{runs[-1]['experts']:.2f} experts (all experts "
                  f"{runs[0]['balanced_acc']:.2f} %)", flush=True)
        clf.set_params(router=False)

    default = make_estimator("ride", max_epochs=args.epochs, random_state=seed)
    default.set_params(**data.settings).fit(data.X_train, data.y_train)
    routed = score_on_test_split(default, data, classes, counts)
    all_experts = score_on_test_split(default.set_params(router=False), data, classes, counts)
    runs.append({**base, "router": "default, whole training split",
                 "margin": default.router_margin_, **routed,
                 "all_experts_same_fit": all_experts["balanced_acc"]})
    return runs


def table(runs: list[dict], dataset: str) -> list[str]:
    """Per router: test balanced accuracy (mean ± std over seeds), its difference to the
    same network with all experts per seed, experts per sample (per seed and per shot
    group) and the seeds on which the router goal was met."""
    rows = [r for r in runs if r["dataset"] == dataset]
    seeds = sorted({int(r["seed"]) for r in rows})

    def of(router, margin=None):
        chosen = [r for r in rows if r["router"] == router
                  and (margin is None or float(r["margin"]) == margin)]
        return sorted(chosen, key=lambda r: int(r["seed"]))

    full = {int(r["seed"]): float(r["balanced_acc"]) for r in of("none (all experts)")}
    errors = of("none (all experts)")
    lines = [f"Seeds {seeds}. Stage-1 error with all experts on its own fit part: "
             + " / ".join(f"{float(r['error_fit']):.2f}" for r in errors)
             + " %; on the held-out part: "
             + " / ".join(f"{float(r['error_held_out']):.2f}" for r in errors) + " %.", "",
             "| router trained on | router_margin | balanced accuracy | − all experts "
             "(per seed) | experts / sample (per seed) | many / medium / few experts | "
             "goal met (seeds) |", "|---|---|---|---|---|---|---|"]
    keys = [("none (all experts)", None)]
    keys += [(part, m) for part in ("fit part", "held-out part")
             for m in sorted({float(r["margin"]) for r in of(part)})]
    keys += [("default, whole training split", None)]
    for router, margin in keys:
        chosen = of(router, margin)
        if not chosen:
            continue
        acc = np.array([float(r["balanced_acc"]) for r in chosen])
        experts = np.array([float(r["experts"]) for r in chosen])
        reference = np.array([float(r["all_experts_same_fit"]) if "default" in router
                              else full[int(r["seed"])] for r in chosen])
        gap = acc - reference
        group_experts = " / ".join(
            f"{np.mean([float(r[f'{g}_experts']) for r in chosen]):.2f}" for g in GROUPS)
        goal = int(np.sum((gap >= -TOLERANCE - 1e-9) & (experts <= GOAL_EXPERTS)))
        margin_cell = ("–" if router == "none (all experts)" else
                       f"{float(chosen[0]['margin']):g}" + (" (auto)" if "default" in router
                                                             else ""))
        lines.append(
            f"| {router} | {margin_cell} | {acc.mean():.1f} ± {acc.std():.1f} | "
            + ("–" if router == "none (all experts)" else
               " / ".join(f"{g:+.2f}" for g in gap))
            + f" | {experts.mean():.2f} ({' / '.join(f'{e:.2f}' for e in experts)}) | "
            f"{group_experts} | "
            + ("–" if router == "none (all experts)" else f"{goal} of {len(chosen)}")
            + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", choices=["letter", "mnist"],
                        default=["letter", "mnist"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--margins", nargs="+", type=float, default=[0, 0.5])
    parser.add_argument("--holdout", type=float, default=0.2,
                        help="fraction of the training split held out of stage 1")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--backbone", help="override the data sets' backbone")
    parser.add_argument("--name", default="router_holdout")
    args = parser.parse_args(argv)
    if not 0 < args.holdout < 1:
        parser.error("--holdout must lie strictly between 0 and 1")
    args.cifar_root = None  # what accuracy.load reads
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    runs = [r for dataset in args.datasets for seed in args.seeds
            for r in run(dataset, seed, args)]
    write_runs_csv(args.name, runs)
    argv_used = [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]
    text = provenance_header("RIDE router trained on held-out training samples (test "
                             "split, a report)", argv_used)
    backbone = f", backbone {args.backbone!r}" if args.backbone else ""
    text += (f"{args.epochs} epochs, RIDE's registered configuration with each data set's "
             f"handling{backbone}; stage 1 (`router=False`) fitted on a stratified, seeded "
             f"{100 * (1 - args.holdout):g} % of the long-tailed training split (the fit "
             f"part), then `fit_router` per `router_margin` (0: the official targets) on "
             f"the fit part (as `fit` does) or on the held-out {100 * args.holdout:g} %, "
             "the network unchanged. Test split: balanced accuracy (%), its difference to "
             "the same network with all experts, experts per sample, and the seeds where "
             f"the router goal (≤ {GOAL_EXPERTS} experts, within {TOLERANCE} points) was "
             "met. *default, whole training split*: `RIDEClassifier` with its defaults "
             "fitted on the whole training split, against the same fit with all experts. "
             "Nothing is chosen on these figures (the test split). torch CPU threads: "
             f"{torch.get_num_threads()}. Every run is in "
             f"`benchmarks/results/{args.name}.csv`.\n")
    for dataset in dict.fromkeys(r["dataset"] for r in runs):
        text += f"\n### {DATASETS[dataset][0]}\n\n" + "\n".join(table(runs, dataset)) + "\n"
    path = write_fragment(args.name, text)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
