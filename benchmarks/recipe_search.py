"""Choose the shared training recipe of each data set on a validation split.

Every method (``--methods``) is fitted under every candidate recipe of
``benchmarks/_recipes.py`` (and under its own registered configuration, "own") on 80 %
of the long-tailed training split and scored on the other 20 % (stratified, seeded:
``accuracy.validation_split``); the test split is never read. The score is the balanced
accuracy on the validation part (the mean of per-class recalls, what the balanced test
split measures). The shared recipe is the candidate with the best mean over methods and
seeds: one recipe that serves every method, not the best of one of them. Each method's
best candidate is marked too.

Writes ``benchmarks/results/<name>.md`` (+ ``.csv``) and refreshes RESULTS.md; copy the
chosen recipe into ``_recipes.SHARED``.

Usage::

    /work/bin/heavy python benchmarks/recipe_search.py --datasets letter --seeds 0 1 2 \\
        --threads 1
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

from _provenance import provenance_header, write_fragment, write_runs_csv  # noqa: E402
from _recipes import CANDIDATES  # noqa: E402
from accuracy import DATASETS, validation_split  # noqa: E402

from ltroute._registry import METHODS, make_estimator  # noqa: E402

DEFAULT_METHODS = ["ce", "ldam-drw", "logit-adjusted", "balanced-softmax", "ride",
                   "ride-no-router", "dqroute"]


def validation_score(method: str, recipe: str, data, *, epochs: int, seed: int) -> float:
    """Balanced validation accuracy of ``method`` under ``recipe`` ("own": its registered
    configuration), fitted on the other 80 % of the training split."""
    val = validation_split(data.y_train, seed=seed)
    clf = make_estimator(method, max_epochs=epochs, random_state=seed)
    if recipe != "own":
        clf.set_params(**CANDIDATES[recipe].params(epochs))
    clf.fit(data.X_train[~val], data.y_train[~val])
    return float(balanced_accuracy_score(data.y_train[val], clf.predict(data.X_train[val])))


def table(runs: list[dict], dataset: str, methods: list[str], recipes: list[str]) -> list[str]:
    """Mean ± std validation accuracy per method and recipe; the shared choice (best mean
    over methods among the candidates) and each method's best are in bold."""
    def scores(method, recipe):
        return 100 * np.array([r["val_balanced_acc"] for r in runs if r["dataset"] == dataset
                               and r["method"] == method and r["recipe"] == recipe])

    means = {(m, r): scores(m, r).mean() for m in methods for r in recipes}
    candidates = [r for r in recipes if r != "own"]
    # Without candidates (``--recipes own``) the table compares the methods only.
    shared = (max(candidates, key=lambda r: np.mean([means[m, r] for m in methods]))
              if candidates else None)
    lines = ["| method | " + " | ".join(recipes) + " |", "|---" * (len(recipes) + 1) + "|"]
    for method in methods:
        best = max(candidates, key=lambda r: means[method, r]) if candidates else None
        cells = []
        for recipe in recipes:
            values = scores(method, recipe)
            cell = f"{values.mean():.1f} ± {values.std():.1f}"
            cells.append(f"**{cell}**" if recipe == best else cell)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines.append("| *mean over methods* | " + " | ".join(
        (f"**{np.mean([means[m, r] for m in methods]):.1f}**" if r == shared else
         f"{np.mean([means[m, r] for m in methods]):.1f}") for r in recipes) + " |")
    if shared is not None:
        lines += ["", f"Shared recipe chosen for {DATASETS[dataset][0]}: **`{shared}`**."]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=["letter"])
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS),
                        default=DEFAULT_METHODS)
    parser.add_argument("--recipes", nargs="+", choices=["own", *CANDIDATES],
                        default=["own", *CANDIDATES])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--name", default=None,
                        help="fragment name (default: recipe_search_<datasets>)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    name = args.name or "recipe_search_" + "_".join(args.datasets)

    runs = []
    for dataset in args.datasets:
        title, loader = DATASETS[dataset]
        for seed in args.seeds:
            data = loader(random_state=seed)
            for method in args.methods:
                for recipe in args.recipes:
                    start = time.perf_counter()
                    score = validation_score(method, recipe, data, epochs=args.epochs,
                                             seed=seed)
                    runs.append({"dataset": dataset, "seed": seed, "method": method,
                                 "recipe": recipe, "val_balanced_acc": score,
                                 "fit_s": time.perf_counter() - start})
                    print(f"{title:10s} seed {seed} {method:18s} {recipe:13s} "
                          f"val {100 * score:5.1f} ({runs[-1]['fit_s']:.1f}s)", flush=True)

    write_runs_csv(name, runs)
    argv_used = [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]
    text = provenance_header("Shared recipe search (validation split)", argv_used)
    text += (f"Seeds {args.seeds}, {args.epochs} epochs. Each method fitted on 80 % of the "
             "long-tailed training split (stratified, seeded) and scored by balanced "
             "accuracy (%) on the other 20 %; the test split is not used. Columns: `own` = "
             "the method's registered configuration; the others are the candidates of "
             "`benchmarks/_recipes.py`: "
             + "; ".join(f"`{r}` = {CANDIDATES[r].describe(args.epochs)}"
                         for r in args.recipes if r != "own")
             + ". Bold: each method's best candidate, and the shared choice (best mean over "
             f"methods). torch CPU threads: {torch.get_num_threads()}. Every run is in "
             f"`benchmarks/results/{name}.csv`.\n")
    for dataset in args.datasets:
        text += f"\n### {DATASETS[dataset][0]}\n\n"
        text += "\n".join(table(runs, dataset, args.methods, args.recipes)) + "\n"
    path = write_fragment(name, text)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
