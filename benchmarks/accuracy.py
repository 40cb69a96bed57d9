"""Reproduce the README results table: accuracy of every method on the bundled LT data.

For each data set and method (the named configurations of ``ltroute._registry``, the
same ones ``python -m ltroute --method`` runs) and each seed (data split and fit), fit on
the long-tailed training split and score the balanced test split: overall / many /
medium / few-shot accuracy (mean ± std over seeds), mean experts used per test sample
(RIDE's router), the compute relative to running every expert, and fit time.

A *suite* names the methods: ``main`` (the README table: the baselines, RIDE and
DQRoute), ``baselines`` (every loss of ``LongTailClassifier``), ``ride`` (RIDE's
ablations beside the baselines) and ``dqroute`` (DQRoute's ablations). ``--recipe own``
(the default) trains each method with its own registered configuration; ``--recipe
shared`` trains every method with the data set's one shared recipe (optimiser, schedule
and head of ``benchmarks/_recipes.py``, chosen on a validation split by
``benchmarks/recipe_search.py``). Writes ``benchmarks/results/<suite name>.md`` (+
``.csv`` with every run, + ``.png``) and refreshes ``benchmarks/RESULTS.md``.

Usage::

    python benchmarks/accuracy.py                       # main suite: letter + mnist, 3 seeds
    python benchmarks/accuracy.py --suite ride --datasets letter
    python benchmarks/accuracy.py --datasets letter --seeds 0 --methods ce ride
    python benchmarks/accuracy.py --recipe shared     # every method, one recipe
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _provenance import (  # noqa: E402
    RESULTS_DIR,
    provenance_header,
    read_runs_csv,
    write_fragment,
    write_runs_csv,
)
from _recipes import Recipe, recipe_for  # noqa: E402

from ltroute._registry import (  # noqa: E402
    DQROUTE_ABLATIONS,
    METHODS,
    RIDE_ABLATIONS,
    make_estimator,
)
from ltroute.datasets import (  # noqa: E402
    load_cifar_lt,
    load_digits_lt,
    load_letter_lt,
    load_mnist_lt,
)
from ltroute.metrics import EmptyGroupWarning, group_accuracy, shot_groups  # noqa: E402
from ltroute.ride import RIDEClassifier  # noqa: E402

DATASETS = {"letter": ("letter-LT", load_letter_lt), "mnist": ("MNIST-LT", load_mnist_lt),
            "digits": ("digits-LT", load_digits_lt),
            # needs --cifar-root; Cao et al.'s fixed selection: seeds vary the fit only
            "cifar10": ("CIFAR-10-LT (JPEG copy)", None)}
#: Data handling every method gets on a data set, whatever the recipe: CIFAR-10-LT with
#: the papers' crop + flip and per-channel normalisation from the training data, on the
#: small ConvNet (a CPU proxy; ``--backbone resnet32`` for the papers' network).
DATA_SETTINGS = {"cifar10": {"augmentation": "cifar", "normalize": "auto",
                             "backbone": "convnet"}}
GROUPS = ("overall", "many", "medium", "few", "hardest")
BASELINES = ["ce", "ldam-drw", "logit-adjusted"]
#: suite -> (fragment name, methods, title)
SUITES = {
    "main": ("accuracy", [*BASELINES, "balanced-softmax", "ride", "ride-no-router",
                          "dqroute"],
             "Accuracy on the bundled long-tailed data sets"),
    "baselines": ("baselines", ["ce", "focal", "ldam", "ldam-drw", "logit-adjusted",
                                "balanced-softmax"], "Every LongTailClassifier loss"),
    "ride": ("ride_ablations", [*BASELINES, "ride", *RIDE_ABLATIONS, "ride-logit-adjusted"],
             "RIDE: each component switched off"),
    "dqroute": ("dqroute_ablations", [*BASELINES, "dqroute", *DQROUTE_ABLATIONS],
                "DQRoute: each component switched off"),
}


def validation_split(y: np.ndarray, *, seed: int, fraction: float = 0.2) -> np.ndarray:
    """Boolean mask of a stratified validation part of the training labels ``y``:
    ``fraction`` of each class, rounded, at least one sample of a class with two or more
    and none of a 1-sample class; seeded by ``seed``."""
    rng = np.random.default_rng(seed)
    val = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        n_val = int(round(fraction * len(members)))
        if len(members) >= 2:
            n_val = max(n_val, 1)
        val[members[:n_val]] = True
    return val


def validation_folds(y: np.ndarray, seed: int, n_folds: int) -> list[np.ndarray]:
    """Validation masks over the training labels ``y``: the one stratified 20 % split of
    :func:`validation_split` (``n_folds=0``), or the held-out folds of a seeded stratified
    ``n_folds``-fold cross-validation, which cover every sample exactly once."""
    if n_folds == 0:
        return [validation_split(y, seed=seed)]
    splitter = StratifiedKFold(n_folds, shuffle=True, random_state=seed)
    masks = []
    for _, val_index in splitter.split(np.zeros(len(y)), y):
        mask = np.zeros(len(y), dtype=bool)
        mask[val_index] = True
        masks.append(mask)
    return masks


def hardest_classes(data, *, epochs: int, seed: int) -> np.ndarray:
    """The hardest third of the classes: highest per-class error of a cross-entropy model
    (``LongTailClassifier(loss="ce")``) trained on 80 % of the training split and scored
    on the other 20 % (:func:`validation_split`); the test split is never used."""
    val = validation_split(data.y_train, seed=seed)
    X_fit, y_fit = data.X_train[~val], data.y_train[~val]
    X_val, y_val = data.X_train[val], data.y_train[val]
    clf = make_estimator("ce", max_epochs=epochs, random_state=seed)
    clf.set_params(**data.settings).fit(X_fit, y_fit)
    pred = clf.predict(X_val)
    classes = np.unique(data.y_train)
    error = np.array([np.mean(pred[y_val == c] != c) if np.any(y_val == c) else 1.0
                      for c in classes])  # a class without validation samples: hardest
    return classes[np.argsort(-error, kind="stable")[:int(np.ceil(len(classes) / 3))]]


def run_one(method: str, data, *, epochs: int, seed: int,
            hardest: np.ndarray | None = None, recipe: Recipe | None = None) -> dict:
    """Fit one configuration on one seed (under ``recipe`` when given, else the method's
    own); return its scores and timings."""
    clf = make_estimator(method, max_epochs=epochs, random_state=seed)
    clf.set_params(**data.settings)
    if recipe is not None:
        clf.set_params(**recipe.params(epochs))
    start = time.perf_counter()
    clf.fit(data.X_train, data.y_train)
    fit_seconds = time.perf_counter() - start
    pred = clf.predict(data.X_test)
    with warnings.catch_warnings():  # an empty group (CIFAR-10-LT's few) is NaN, shown "–"
        warnings.simplefilter("ignore", EmptyGroupWarning)
        scores = group_accuracy(data.y_test, pred, class_counts=data.class_counts)
    if hardest is not None:
        scores["hardest"] = float(np.mean([np.mean(pred[data.y_test == c] == c)
                                           for c in hardest]))
    experts = getattr(clf, "expert_usage_", None)  # set by predict (RIDE only)
    if experts is None:
        experts = clf.module_.n_experts
    compute = getattr(clf, "relative_macs_", 1.0)  # before the router is switched off
    per_group = {}
    if isinstance(clf, RIDEClassifier):  # experts per test sample in each shot group
        used = clf.route(data.X_test)
        for group, members in shot_groups(data.class_counts).items():
            mask = np.isin(data.y_test, members)
            per_group[f"experts_{group}"] = float(used[mask].mean()) if mask.any() else np.nan
        # The same fit with every expert (the router switched off after fit); a fit
        # without a router already used them all.
        every = scores["overall"]
        if clf.router:
            clf.set_params(router=False)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", EmptyGroupWarning)
                every = group_accuracy(data.y_test, clf.predict(data.X_test),
                                       class_counts=data.class_counts)["overall"]
        per_group["overall_all_experts"] = every
    return {**scores, "experts": float(experts), **per_group,
            "relative_compute": float(compute), "fit_s": fit_seconds}


def _summary_rows(runs: list[dict], methods: list[str], dataset: str) -> list[str]:
    lines = ["| method | overall | many | medium | few | hardest third | experts / sample "
             "(many / medium / few) | overall, all experts | rel. compute | fit (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for method in methods:
        rows = [r for r in runs if r["dataset"] == dataset and r["method"] == method]
        cells = []
        for key in GROUPS:
            values = 100 * np.array([r[key] for r in rows], dtype=float)
            cells.append("–" if np.isnan(values).all() else
                         f"{values.mean():.1f} ± {values.std():.1f}")
        experts = f"{np.mean([r['experts'] for r in rows]):.2f}"
        if not np.isnan(float(rows[0].get("experts_many", np.nan))):
            per_group = [np.mean([r[f"experts_{g}"] for r in rows])
                         for g in ("many", "medium", "few")]
            experts += " (" + " / ".join("–" if np.isnan(v) else f"{v:.2f}"
                                         for v in per_group) + ")"
        every = 100 * np.array([r.get("overall_all_experts", np.nan) for r in rows],
                               dtype=float)
        every = "–" if np.isnan(every).all() else f"{every.mean():.1f} ± {every.std():.1f}"
        compute = np.mean([r["relative_compute"] for r in rows])
        fit = np.array([r["fit_s"] for r in rows])
        lines.append(f"| {method} | {' | '.join(cells)} | {experts} | {every} | "
                     f"{compute:.2f} | {fit.mean():.1f} ± {fit.std():.1f} |")
    return lines


def _plot(runs: list[dict], methods: list[str], datasets: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 3.8),
                             squeeze=False)
    width = 0.8 / len(GROUPS)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        for g, group in enumerate(GROUPS):
            means, stds = [], []
            for method in methods:
                values = [100 * r[group] for r in runs
                          if r["dataset"] == dataset and r["method"] == method]
                means.append(np.mean(values))
                stds.append(np.std(values))
            offset = (g - (len(GROUPS) - 1) / 2) * width
            ax.bar(np.arange(len(methods)) + offset, means, width, yerr=stds,
                   label=group, capsize=2)
        ax.set_xticks(np.arange(len(methods)), methods, rotation=20)
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_title(DATASETS[dataset][0])
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(ncol=4, fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load(dataset: str, seed: int, args: argparse.Namespace):
    """The long-tailed split of ``dataset`` for ``seed``, with ``settings``: the data
    handling every method gets on it (``DATA_SETTINGS``, ``--backbone``)."""
    if dataset == "cifar10":
        data = load_cifar_lt(args.cifar_root, n_classes=10, imbalance_ratio=100)
    else:
        data = DATASETS[dataset][1](random_state=seed)
    data.settings = dict(DATA_SETTINGS.get(dataset, {}))
    if args.backbone:
        data.settings["backbone"] = args.backbone
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", choices=sorted(DATASETS),
                        default=["letter", "mnist"])
    parser.add_argument("--suite", choices=sorted(SUITES), default="main")
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS),
                        help="override the suite's methods")
    parser.add_argument("--cifar-root", help="image folder of CIFAR-10 (root/{train,test}/"
                        "<class>/), for --datasets cifar10")
    parser.add_argument("--backbone", help="override the backbone of every data set")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--recipe", choices=["own", "shared"], default="own",
                        help="own: each method's registered configuration; shared: every "
                        "method under the data set's shared recipe (benchmarks/_recipes.py)")
    parser.add_argument("--name", help="fragment name under benchmarks/results/ "
                        "(default: the suite's, + '_shared' with --recipe shared)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs already in the fragment's CSV (the same data set, "
                        "method, seed and recipe) and fit only the missing ones; the CSV is "
                        "rewritten after every fit")
    parser.add_argument("--hardest-from", metavar="NAME",
                        help="reuse the hardest third of each (data set, seed, epochs) stored "
                        "in fragment NAME's CSV (the same cross-entropy validation fit, "
                        "whatever the recipe) instead of fitting it again")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice, all cores)")
    args = parser.parse_args(argv)
    name, methods, title_text = SUITES[args.suite]
    args.methods = args.methods or methods
    args.name = args.name or (f"{name}_shared" if args.recipe == "shared" else name)
    if args.recipe == "shared":
        title_text += ", one shared recipe"
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if "cifar10" in args.datasets and not args.cifar_root:
        parser.error("--datasets cifar10 needs --cifar-root")

    runs = read_runs_csv(args.name) if args.resume else []
    stored = runs + (read_runs_csv(args.hardest_from) if args.hardest_from else [])
    for dataset in args.datasets:
        title = DATASETS[dataset][0]
        for seed in args.seeds:
            recipe = recipe_for(dataset) if args.recipe == "shared" else None
            recipe_name = recipe.name if recipe else "own"
            done = {r["method"] for r in runs if r["dataset"] == dataset
                    and r["seed"] == seed and r.get("recipe") == recipe_name
                    and r.get("epochs") == args.epochs}
            missing = [m for m in args.methods if m not in done]
            if not missing:
                continue
            data = load(dataset, seed, args)
            known = [r["hardest_classes"] for r in stored if r["dataset"] == dataset
                     and r["seed"] == seed and r.get("epochs") == args.epochs
                     and isinstance(r.get("hardest_classes"), str)]
            hardest = (np.array(json.loads(known[0])) if known else
                       hardest_classes(data, epochs=args.epochs, seed=seed))
            print(f"{title:10s} seed {seed} hardest third (CE validation error): "
                  f"{hardest.tolist()}", flush=True)
            for method in missing:
                result = run_one(method, data, epochs=args.epochs, seed=seed,
                                 hardest=hardest, recipe=recipe)
                runs.append({"dataset": dataset, "method": method, "seed": seed,
                             "recipe": recipe_name, "epochs": args.epochs, **result,
                             "hardest_classes": json.dumps(hardest.tolist())})
                write_runs_csv(args.name, runs)  # after every fit: a killed run resumes
                print(f"{title:10s} seed {seed} {method:22s} "
                      + " ".join(f"{k} {100 * result[k]:5.1f}" for k in GROUPS)
                      + f" fit {result['fit_s']:6.1f}s", flush=True)
    wanted = {"own"} if args.recipe == "own" else {recipe_for(d).name for d in args.datasets}
    runs = [r for r in runs if r["dataset"] in args.datasets and r["seed"] in args.seeds
            and r["method"] in args.methods and r.get("epochs") == args.epochs
            and r.get("recipe") in wanted]

    argv_used = [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]
    text = provenance_header(title_text, argv_used)
    if args.recipe == "shared":
        recipes = "; ".join(f"{DATASETS[d][0]}: `{recipe_for(d).name}`, "
                            f"{recipe_for(d).describe(args.epochs)}" for d in args.datasets)
        configuration = (
            "every method under its data set's shared recipe (`benchmarks/_recipes.py`, "
            "chosen on a validation split by `benchmarks/recipe_search.py`; the same "
            "optimiser, learning-rate schedule, backbone, epochs and data handling for all, "
            "heads as the recipe states; the methods' own losses, DRW epoch and routing) — "
            f"{recipes}. ")
    else:
        configuration = ("each method's registered configuration (`ltroute/_registry.py`: "
                         "the estimators' defaults, DRW at 80 % of the epochs for LDAM-DRW; "
                         "ablations change one parameter). ")
    text += (f"Seeds {args.seeds} (data split and fit), {args.epochs} epochs, "
             + configuration +
             "Accuracy in % on the balanced test split, mean ± std over seeds; groups by "
             "training count: many > 100, medium 20-100, few < 20; *hardest third*: mean "
             "test accuracy of the third of the classes with the highest per-class error "
             "of a cross-entropy model fitted on 80 % of the training split and scored on "
             "the other 20 % (stratified, same seed; the test split is not used). "
             "*experts / sample*: mean experts evaluated per test sample (RIDE: also per "
             "shot group of the test sample's class, from `route`); *rel. compute*: "
             "MACs relative to "
             "running every expert (RIDE's router). Fit time includes RIDE's router "
             f"stage; torch CPU threads: {torch.get_num_threads()}. Every run is in "
             f"`benchmarks/results/{args.name}.csv`.\n")
    for dataset in args.datasets:
        text += f"\n### {DATASETS[dataset][0]}\n\n"
        text += "\n".join(_summary_rows(runs, args.methods, dataset)) + "\n"
    if not args.no_plot:
        png = RESULTS_DIR / f"{args.name}.png"
        _plot(runs, args.methods, args.datasets, png)
        text += f"\n![accuracy per group]({png.relative_to(RESULTS_DIR.parent)})\n"
    path = write_fragment(args.name, text)
    print(f"\nwrote {path} and benchmarks/RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
