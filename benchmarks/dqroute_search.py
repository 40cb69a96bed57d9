"""DQRoute on images: where its errors come from, and the search behind its defaults.

Everything here is measured on a **validation split of the training data** (80 / 20,
stratified per class, seeded; the rule of ``benchmarks/accuracy.py``'s hardest third),
never on the test split. For each configuration and seed it fits on the 80 % and
reports on the 20 %, as mean per-class recall (the test splits are balanced):

- the fused prediction: overall / many / medium / few;
- every expert alone, within its own region (argmax over ``S_k`` of ``z_k``, on the
  samples whose class lies in ``S_k``): many / medium / few — how good each region
  classifier is, whatever the routing;
- *group error*: the share of validation samples (class-balanced) whose fused prediction
  falls in another partition group than the label's, i.e. errors of the between-region
  balance (routing energies and prior) rather than of the experts;
- post-hoc prior shift: overall and many / few when the fused log-probabilities are
  shifted by ``delta log pi`` (``delta > 0`` favours frequent classes). A best ``delta``
  far from 0 means the training over- (``> 0``) or under- (``< 0``) corrects the prior.

Baselines (``logit-adjusted``, ``ride``, ``ride-no-router`` of ``ltroute._registry``)
can be listed beside the DQRoute configurations; experts and routing are then skipped.

Usage::

    python benchmarks/dqroute_search.py --dataset mnist --seeds 0 1 2 --threads 1
    python benchmarks/dqroute_search.py --dataset cifar --root /work/data/cifar10-jpeg \\
        --epochs 10 --seeds 0 --configs default disjoint --threads 1

``--dataset cifar`` trains with ``benchmarks/cifar_lt.py``'s recipe (SGD 0.1, warm-up,
x0.01 steps, crop + flip) on the ``--backbone`` (default convnet, the CPU proxy).
Writes ``benchmarks/results/<name>.md`` (+ ``.csv``) and refreshes RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _provenance import provenance_header, write_fragment, write_runs_csv  # noqa: E402
from accuracy import validation_folds  # noqa: E402

from ltroute._registry import make_estimator  # noqa: E402
from ltroute.dqroute import DQRouteClassifier, partition_classes  # noqa: E402
from ltroute.metrics import shot_groups  # noqa: E402

#: DQRoute configurations searched: parameters on top of the registered ``dqroute``.
CONFIGS: dict[str, dict] = {
    "default": {},
    "disjoint": {"region_overlap": "none"},
    "tau-0.5": {"fused_logit_adjust_tau": 0.5, "expert_logit_adjust_tau": 0.5},
    "tau_e-0": {"expert_logit_adjust_tau": 0.0},
    "tau_f-0.5": {"fused_logit_adjust_tau": 0.5},
    "linear": {"cosine_head": False},
    "cosine": {"cosine_head": True},
    "cosine-tau-0.5": {"cosine_head": True, "fused_logit_adjust_tau": 0.5,
                       "expert_logit_adjust_tau": 0.5},
    "no-fuse-ce": {"lambda_fuse": 0.0},
    "fuse-2": {"lambda_fuse": 2.0},
    "route-tau-2": {"routing_tau": 2.0},
    "size-correction": {"energy_size_correction": True},
    "difficulty": {"use_difficulty": True},
    "no-prior": {"use_prior": False},
    "per-expert-mean": {"expert_loss_reduction": "per_expert_mean"},
}
BASELINES = ("logit-adjusted", "ride", "ride-no-router", "ce")
DELTAS = (-0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0)
GROUPS = ("overall", "many", "medium", "few")


def group_recalls(y: np.ndarray, pred: np.ndarray, groups: dict[str, np.ndarray],
                  classes: np.ndarray | None = None) -> dict[str, float]:
    """Mean per-class recall overall and in each shot group (classes present only)."""
    classes = np.unique(y) if classes is None else classes
    recall = {c: np.mean(pred[y == c] == c) for c in classes if np.any(y == c)}
    out = {"overall": float(np.mean(list(recall.values())))}
    for name, members in groups.items():
        values = [recall[c] for c in members if c in recall]
        out[name] = float(np.mean(values)) if values else float("nan")
    return out


def expert_logits(clf, X: np.ndarray) -> torch.Tensor:
    """The fitted network's expert logits (n, K, C) in eval mode, on the CPU."""
    module = clf.module_
    module.eval()
    outputs = []
    with torch.no_grad():
        for start in range(0, len(X), 512):
            batch = torch.as_tensor(X[start:start + 512], device=clf.device
                                    if clf.device != "auto" else "cpu")
            outputs.append(module(batch).float().cpu())
    return torch.cat(outputs)


def validation_outputs(clf, X_val: np.ndarray) -> dict:
    """Fused log-probabilities (n, C) and, for DQRoute, expert logits (n, K, C), the
    regions and the partition groups of one fitted model on validation inputs."""
    if not isinstance(clf, DQRouteClassifier):  # groups: DQRoute's default partition
        return {"log_p": np.log(np.clip(clf.predict_proba(X_val), 1e-30, None)),
                "group": partition_classes(clf.class_counts_, min(3, len(clf.classes_)))[1]}
    logits = expert_logits(clf, X_val)
    return {"log_p": clf._fuse(logits).probs.clamp_min(1e-30).log().numpy(),
            "logits": logits.numpy(), "membership": clf.membership_,
            "group": clf.region_of_class_}


def diagnose(out: dict, y_val: np.ndarray, counts: np.ndarray) -> dict:
    """Fused, per-expert, group-error and prior-shift figures on the validation
    samples (``out``: :func:`validation_outputs`, concatenated over folds)."""
    groups = shot_groups(counts)
    log_p = out["log_p"]
    row = {}
    if "logits" in out:
        for k, region in enumerate(out["membership"]):
            inside = np.isin(y_val, np.flatnonzero(region))
            z = out["logits"][inside, k].copy()
            z[:, ~region] = -np.inf
            scores = group_recalls(y_val[inside], z.argmax(1), groups)
            row |= {f"e{k}_{g}": v for g, v in scores.items()}
    wrong_group = out["group"][log_p.argmax(1)] != out["group"][y_val]
    row["group_error"] = float(np.mean([wrong_group[y_val == c].mean()
                                        for c in np.unique(y_val)]))
    log_prior = np.log(counts / counts.sum())
    for delta in DELTAS:
        scores = group_recalls(y_val, (log_p + delta * log_prior).argmax(1), groups)
        key = "" if delta == 0 else f"d{delta:+.2f}_"
        row |= {f"{key}{g}": v for g, v in scores.items()}
    return row


def load(args: argparse.Namespace):
    if args.dataset == "mnist":
        from ltroute.datasets import load_mnist_lt
        return lambda seed: load_mnist_lt(random_state=seed)
    from cifar_lt import load_data
    data = load_data(args.root)
    return lambda seed: data


def make(config: str, args: argparse.Namespace, seed: int):
    if config in BASELINES:
        clf = make_estimator(config, max_epochs=args.epochs, random_state=seed)
    else:
        clf = make_estimator("dqroute", max_epochs=args.epochs, random_state=seed)
        clf.set_params(**CONFIGS[config])
    if args.dataset == "cifar":
        from cifar_lt import recipe_params
        clf.set_params(**recipe_params(config, epochs=args.epochs,
                                       warmup_epochs=max(1, round(args.epochs / 40)),
                                       backbone=args.backbone, batch_size=128))
    return clf.set_params(device="cpu")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=["mnist", "cifar"], default="mnist")
    parser.add_argument("--root", default="/work/data/cifar10-jpeg")
    parser.add_argument("--backbone", default="convnet")
    parser.add_argument("--configs", nargs="+", default=["default"],
                        choices=[*CONFIGS, *BASELINES])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--folds", type=int, default=0,
                        help="k-fold cross-validation of the training split instead of "
                        "one 80/20 split (0)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--name", default=None)
    args = parser.parse_args(argv)
    args.name = args.name or f"dqroute_search_{args.dataset}"
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    header = provenance_header(f"DQRoute search on a validation split ({args.dataset})",
                               [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    loader = load(args)
    runs = []
    for seed in args.seeds:
        data = loader(seed)
        folds = validation_folds(data.y_train, seed, args.folds)
        counts = np.bincount(data.y_train, minlength=len(np.unique(data.y_train)))
        for config in args.configs:
            outputs, labels, fit_s = [], [], 0.0
            for val in folds:
                clf = make(config, args, seed)
                start = time.perf_counter()
                clf.fit(data.X_train[~val], data.y_train[~val])
                fit_s += time.perf_counter() - start
                outputs.append(validation_outputs(clf, data.X_train[val]))
                labels.append(data.y_train[val])
            merged = {key: (np.concatenate([o[key] for o in outputs])
                            if key in ("log_p", "logits") else outputs[0][key])
                      for key in outputs[0]}
            row = {"config": config, "seed": seed, "fit_s": fit_s / len(folds),
                   **diagnose(merged, np.concatenate(labels), counts)}
            runs.append(row)
            print(f"seed {seed} {config:16s} " + " ".join(
                f"{g} {100 * row[g]:5.1f}" for g in GROUPS)
                + "".join(f" | e{k} " + "/".join(f"{100 * row[f'e{k}_{g}']:.0f}"
                                                 for g in GROUPS[1:])
                          for k in range(3) if f"e{k}_overall" in row)
                + (f" | grp-err {100 * row['group_error']:.1f}" if "group_error" in row
                   else "")
                + " | best delta " + max(DELTAS, key=lambda d: row[
                    "overall" if d == 0 else f"d{d:+.2f}_overall"]).__format__("+.2f")
                + f" | fit {row['fit_s']:.0f}s", flush=True)
    write_runs_csv(args.name, runs)
    write_fragment(args.name, header + table(runs, args))
    return 0


def _cell(rows: list[dict], key: str) -> str:
    values = 100 * np.array([r.get(key, np.nan) for r in rows], dtype=float)
    if np.all(np.isnan(values)):
        return "–"
    return f"{np.nanmean(values):.1f} ± {np.nanstd(values):.1f}"


def table(runs: list[dict], args: argparse.Namespace) -> str:
    """Markdown: per configuration, mean ± std over seeds."""
    recipe = ("the estimators' own defaults" if args.dataset == "mnist" else
              f"cifar_lt.py's SGD recipe on {args.backbone} (CPU proxy), CIFAR-10 (JPEG copy)")
    split = ("fit on 80 % of the training split, scored on the other 20 % (stratified, "
             "seeded)" if args.folds == 0 else
             f"{args.folds}-fold stratified cross-validation of the training split (seeded; "
             "every training sample scored once, by the model that did not see it)")
    text = (f"\n{args.epochs} epochs, seeds {args.seeds}, {recipe}; {split}; the test "
            "split is not used. Mean per-class recall in %, mean ± std over seeds. *expert k*: "
            "the expert alone within its region (many / medium / few); *group err*: "
            "class-balanced share of validation samples predicted in another partition "
            "group; *+0.5 log pi*: the fused prediction shifted post hoc toward frequent "
            "classes (overall / many / few).\n\n"
            "| config | overall | many | medium | few | expert 0 | expert 1 | expert 2 | "
            "group err | +0.5 log pi | -0.25 log pi | fit (s) |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    for config in dict.fromkeys(r["config"] for r in runs):
        rows = [r for r in runs if r["config"] == config]
        experts = [" / ".join(_cell(rows, f"e{k}_{g}").split(" ±")[0] for g in GROUPS[1:])
                   if f"e{k}_overall" in rows[0] else "–" for k in range(3)]
        shift = [" / ".join(_cell(rows, f"d{d:+.2f}_{g}").split(" ±")[0]
                            for g in ("overall", "many", "few")) for d in (0.5, -0.25)]
        text += (f"| {config} | " + " | ".join(_cell(rows, g) for g in GROUPS) + " | "
                 + " | ".join(experts) + f" | {_cell(rows, 'group_error')} | "
                 + " | ".join(shift)
                 + f" | {np.mean([r['fit_s'] for r in rows]):.0f} |\n")
    return text


if __name__ == "__main__":
    sys.exit(main())
