"""CIFAR-10-LT (imbalance ratio 100) with the papers' recipe: CE, LDAM-DRW, logit
adjustment, RIDE (3 experts) and DQRoute, from an image-folder copy of CIFAR-10.

The recipe of Cao et al. (2019), which Menon et al. (2021) and RIDE follow on CIFAR-LT:
ResNet-32, 200 epochs, SGD (lr 0.1, momentum 0.9, weight decay 5e-4; 2e-4 for LDAM-DRW),
batch 128, 5 epochs of linear warm-up, learning rate x0.01 after epoch 160 and again
after 180 (:class:`ltroute.schedules.StepWarmupSchedule`), deferred re-weighting from
epoch 160 for LDAM-DRW and RIDE, random crops (padding 4) and horizontal flips. Every
method gets the same recipe. The split is :func:`ltroute.datasets.load_cifar_lt`'s
(Cao et al.'s selection); accuracy is measured on the balanced 10,000-image test split:
overall and many / medium / few-shot (classes with > 100 / 20-100 / < 20 training
images; on CIFAR-10-LT the smallest class has 50, so "few" is empty).

Two ways to run it:

- **The recipe, on a GPU**: several fits side by side on the one GPU, one process per
  method (``--jobs``)::

      python benchmarks/cifar_lt.py /data/cifar10-jpeg --device cuda --jobs 5

- **A CPU proxy** with a stated short schedule (any run that is not 200 epochs of
  ResNet-32 is labelled "CPU proxy, not the recipe" or "short run, not the recipe")::

      /work/bin/heavy python benchmarks/cifar_lt.py /data/cifar10-jpeg \\
          --backbone convnet --epochs 30

``--time-limit MIN`` bounds a side-by-side run (a lent GPU's minutes): fits still running
then are stopped and the fragment lists each with the epoch it reached and its seconds per
epoch, never a figure it did not produce. Each fit appends a line per epoch to
``--epoch-log`` (a folder), which also shows how far a run that was killed got.

``--resume-dir DIR`` lets the recipe span several leases: each fit saves its network,
optimiser and history to ``DIR/<method>/state.pt`` after every epoch (written to a
temporary file, then renamed, so a stopped process never leaves half a file), and a run
with the same folder continues each unfinished fit from its last saved epoch (the
learning-rate schedule and DRW read the restored history) and takes each finished fit's
scores from ``DIR/<method>/result.json``. A resumed fit is not bit-identical to an
uninterrupted one: the data order and augmentation restart from the seed, and callback
state (DQRoute's difficulty statistics, when ``use_difficulty=True``) is not saved.

Writes ``benchmarks/results/cifar_lt.md`` (``--name``) and refreshes RESULTS.md. The
data are a JPEG copy of CIFAR-10: figures are labelled "CIFAR-10 (JPEG copy)".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from skorch.callbacks import Callback, LRScheduler
from skorch.history import History

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _provenance import provenance_header, write_fragment  # noqa: E402

from ltroute._registry import make_estimator  # noqa: E402
from ltroute.callbacks import EpochProgressBar  # noqa: E402
from ltroute.datasets import load_cifar_lt  # noqa: E402
from ltroute.metrics import EmptyGroupWarning, group_accuracy  # noqa: E402
from ltroute.schedules import StepWarmupSchedule  # noqa: E402

DATA_LABEL = "CIFAR-10 (JPEG copy)"
METHODS = ("ce", "ldam-drw", "logit-adjusted", "ride", "dqroute")
GROUPS = ("overall", "many", "medium", "few")
#: Published overall top-1 (%) on CIFAR-10-LT, ratio 100, ResNet-32.
PUBLISHED = {
    "ce": ("70.4", "Cao et al. 2019, Table 2"),
    "ldam-drw": ("77.0", "Cao et al. 2019, Table 2"),
    "logit-adjusted": ("77.7", "Menon et al. 2021, Table 3"),
    "ride": ("–", "no CIFAR-10-LT figure used here"),
    "dqroute": ("–", "no published figure could be retrieved"),
}
#: Per-channel statistics LDAM-DRW and RIDE normalise CIFAR with.
CIFAR_MEAN = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32)[:, None, None]
CIFAR_STD = np.array([0.2023, 0.1994, 0.2010], dtype=np.float32)[:, None, None]
RECIPE_EPOCHS, RECIPE_BACKBONE = 200, "resnet32"


def recipe_params(method: str, *, epochs: int, warmup_epochs: int, backbone: str,
                  batch_size: int) -> dict:
    """The recipe's estimator parameters (on top of the method's registry defaults)."""
    schedule = StepWarmupSchedule(epochs, warmup_epochs=warmup_epochs, gamma=0.01)
    return {
        "backbone": backbone,
        "optimizer": torch.optim.SGD,
        "lr": 0.1,
        "optimizer__momentum": 0.9,
        "optimizer__weight_decay": 2e-4 if method == "ldam-drw" else 5e-4,
        "batch_size": batch_size,
        "lr_schedule": None,  # the schedule below replaces the estimators' default
        "callbacks": [("lr_schedule", LRScheduler(torch.optim.lr_scheduler.LambdaLR,
                                                  lr_lambda=schedule))],
        # Crop (padding 4) + flip, batched on the training device (a collate_fn would
        # augment row by row in the loader: on an H200 with 5 fits side by side the
        # epochs took 17-18 s, bound by the CPU side).
        "augmentation": "cifar",
    }


class EpochLog(Callback):
    """Appends ``{"epoch": k, "dur": seconds}`` to ``path`` after every training epoch."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_epoch_end(self, net, **kwargs) -> None:
        with open(self.path, "a") as log:
            log.write(json.dumps({"epoch": len(net.history),
                                  "dur": net.history[-1]["dur"]}) + "\n")


class TrainingState(Callback):
    """Restores the network, optimiser and history from ``folder/state.pt`` at the start
    of training when the file exists; :meth:`saver` is the callback that writes them.

    List it before the learning-rate scheduler, whose ``on_train_begin`` reads the
    restored history's length as its last epoch, and the saver last, so that the saved
    epoch holds every callback's record (the scheduler's ``event_lr`` included)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    @property
    def path(self) -> Path:
        return Path(self.folder) / "state.pt"

    def epochs_saved(self) -> int:
        """Epochs in the saved history (0 without a saved state)."""
        if not self.path.exists():
            return 0
        return len(torch.load(self.path, map_location="cpu", weights_only=False)["history"])

    def on_train_begin(self, net, **kwargs) -> None:
        if self.path.exists():
            state = torch.load(self.path, map_location=net.device, weights_only=False)
            net.module_.load_state_dict(state["params"])
            net.optimizer_.load_state_dict(state["optimizer"])
            net.history = History(state["history"])

    def save(self, net) -> None:
        """Write the state to a temporary file, then rename it over ``state.pt``."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".tmp")
        torch.save({"params": net.module_.state_dict(), "optimizer": net.optimizer_.state_dict(),
                    "history": net.history.to_list()}, partial)
        os.replace(partial, self.path)

    def saver(self) -> Callback:
        """A callback saving this state at the end of every epoch."""
        state = self

        class SaveTrainingState(Callback):
            def on_epoch_end(self, net, **kwargs) -> None:
                state.save(net)

        return SaveTrainingState()


def read_epoch_log(path: Path) -> tuple[int, float]:
    """Epochs reached and their median seconds per epoch (0 and nan without a log)."""
    if not path.exists():
        return 0, float("nan")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        return 0, float("nan")
    return rows[-1]["epoch"], float(np.median([r["dur"] for r in rows]))


def load_data(root: str) -> object:
    """CIFAR-10-LT from the image folder, normalised with the CIFAR statistics."""
    data = load_cifar_lt(root, n_classes=10, imbalance_ratio=100)
    data.X_train = (data.X_train - CIFAR_MEAN) / CIFAR_STD
    data.X_test = (data.X_test - CIFAR_MEAN) / CIFAR_STD
    return data


def run_one(method: str, data, args: argparse.Namespace) -> dict:
    """Fit one method with the recipe; return its scores and timings."""
    clf = make_estimator(method, max_epochs=args.epochs, random_state=args.seed,
                         device=args.device)
    clf.set_params(**recipe_params(method, epochs=args.epochs,
                                   warmup_epochs=args.warmup_epochs,
                                   backbone=args.backbone, batch_size=args.batch_size),
                   precision=args.precision, channels_last=args.channels_last)
    if args.progress:
        clf.set_params(callbacks=[*clf.callbacks, ("progress", EpochProgressBar(desc=method))])
    if args.epoch_log:
        log = Path(args.epoch_log) / f"{method}.jsonl"
        log.unlink(missing_ok=True)
        clf.set_params(callbacks=[*clf.callbacks, ("epoch_log", EpochLog(str(log)))])
    done = 0
    if args.resume_dir:
        state = TrainingState(str(Path(args.resume_dir) / method))
        done = state.epochs_saved()
        # First, so that the scheduler's on_train_begin sees the restored history; the
        # saver last, so that each saved epoch holds every callback's record.
        clf.set_params(callbacks=[("training_state", state), *clf.callbacks,
                                  ("save_training_state", state.saver())])
        if done:
            print(f"{method}: resuming after epoch {done} of {args.epochs}", flush=True)
    start = time.perf_counter()
    # skorch's fit_loop takes ``epochs``: the rest of the schedule (max_epochs, which the
    # DRW epoch and the end-of-training callbacks read, stays the recipe's).
    clf.fit(data.X_train, data.y_train, epochs=args.epochs - done)
    fit_seconds = time.perf_counter() - start
    restored = clf.history_[:done]
    fit_seconds += sum(row["dur"] for row in restored)  # earlier runs' epochs
    with warnings.catch_warnings():  # "few" is empty on CIFAR-10-LT: reported as "–"
        warnings.simplefilter("ignore", EmptyGroupWarning)
        scores = group_accuracy(data.y_test, clf.predict(data.X_test),
                                class_counts=data.class_counts)
    epoch_seconds = [row["dur"] for row in clf.history_]
    result = {"method": method, **{k: float(v) for k, v in scores.items()},
              "fit_s": fit_seconds, "epoch_s": float(np.median(epoch_seconds)),
              "device": str(next(clf.module_.parameters()).device),
              "resumed_after": done, "epochs": len(clf.history_)}
    if args.resume_dir:
        (Path(args.resume_dir) / method / "result.json").write_text(json.dumps(result))
    return result


def finished_result(method: str, args: argparse.Namespace) -> dict | None:
    """The scores a finished fit left in ``--resume-dir``, else ``None``."""
    if not args.resume_dir:
        return None
    path = Path(args.resume_dir) / method / "result.json"
    return json.loads(path.read_text()) if path.exists() else None


def run_parallel(args: argparse.Namespace, argv: list[str]) -> tuple[list[dict], object]:
    """One process per method, at most ``--jobs`` at a time (side by side on one GPU),
    each with its share of the CPU cores as torch threads; the data are loaded here (for
    the fragment) while the children train. Past ``--time-limit`` the fits still running
    are stopped and returned as ``{"method", "unfinished": True, "epochs_reached",
    "epoch_s"}``, and so are methods not started by then; fits finished in an earlier
    run of the same ``--resume-dir`` are taken from it."""
    finished = {m: finished_result(m, args) for m in args.methods}
    results = [r for r in finished.values() if r is not None]
    pending = [m for m, r in finished.items() if r is None]
    running = []
    # The CPU cores shared out: each process at torch's default would take them all.
    threads = max(1, (os.cpu_count() or 1) // max(1, min(args.jobs, len(pending))))
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    deadline = (time.monotonic() + 60 * args.time_limit if args.time_limit
                else float("inf"))
    data = None
    with tempfile.TemporaryDirectory() as tmp:
        epoch_log = Path(args.epoch_log or tmp)
        epoch_log.mkdir(parents=True, exist_ok=True)
        last_report = time.monotonic()
        while pending or running:
            while pending and len(running) < args.jobs:
                method = pending.pop(0)
                out = Path(tmp) / f"{method}.json"
                command = [sys.executable, __file__, *argv, "--methods", method,
                           "--jobs", "1", "--json", str(out), "--no-write",
                           "--epoch-log", str(epoch_log), "--time-limit", "0"]
                running.append((method, out, subprocess.Popen(command, env=env)))
            if data is None:
                data = load_data(args.root)
            time.sleep(1)
            for item in [r for r in running if r[2].poll() is not None]:
                running.remove(item)
                method, out, process = item
                if process.returncode != 0:
                    raise RuntimeError(f"{method} failed with exit code {process.returncode}")
                results.extend(json.loads(out.read_text()))
            if time.monotonic() - last_report >= 60 or (running and time.monotonic() > deadline):
                last_report = time.monotonic()
                print("  ".join(f"{m} epoch {read_epoch_log(epoch_log / f'{m}.jsonl')[0]}"
                                for m, _, _ in running), flush=True)
            if running and time.monotonic() > deadline:
                for method, _, process in running:
                    process.terminate()
                    process.wait()
                    reached, epoch_s = read_epoch_log(epoch_log / f"{method}.jsonl")
                    results.append({"method": method, "unfinished": True,
                                    "epochs_reached": reached, "epoch_s": epoch_s})
                for method in pending:  # never started: what an earlier run saved
                    reached = (TrainingState(str(Path(args.resume_dir) / method))
                               .epochs_saved() if args.resume_dir else 0)
                    results.append({"method": method, "unfinished": True,
                                    "epochs_reached": reached, "epoch_s": float("nan")})
                running, pending = [], []
    if data is None:  # every fit had finished in an earlier run
        data = load_data(args.root)
    order = {m: i for i, m in enumerate(args.methods)}
    return sorted(results, key=lambda r: order[r["method"]]), data


def label(args: argparse.Namespace) -> str:
    if args.device == "cpu":
        return "CPU proxy, not the recipe"
    if args.epochs != RECIPE_EPOCHS or args.backbone != RECIPE_BACKBONE:
        return "short run, not the recipe"
    if args.precision != "32":
        return f"the papers' recipe under {args.precision} autocast (they train in fp32)"
    return "the papers' recipe"


def title(args: argparse.Namespace) -> str:
    return f"CIFAR-10-LT (ratio 100), {label(args)} — {DATA_LABEL}"


def fragment(results: list[dict], args: argparse.Namespace, data, wall_s: float,
             header: str) -> str:
    """The results fragment; ``header`` is the provenance taken when the run started."""
    counts = list(data.class_counts.values())
    lines = [header.rstrip(), "",
             f"- data: {DATA_LABEL}, `load_cifar_lt(root, n_classes=10, imbalance_ratio=100)`"
             f" (Cao et al.'s selection): {sum(counts):,} training images ({counts[0]} … "
             f"{counts[-1]} per class), balanced test split of {len(data.y_test):,}",
             f"- schedule: {args.backbone}, {args.epochs} epochs, SGD lr 0.1, momentum 0.9, "
             "weight decay 5e-4 (2e-4 for LDAM-DRW), batch "
             f"{args.batch_size}, {args.warmup_epochs} warm-up epoch(s), lr x0.01 after "
             f"{int(0.8 * args.epochs)} and {int(0.9 * args.epochs)} epochs, DRW from epoch "
             f"{int(0.8 * args.epochs)}; random crop (padding 4) + flip; seed {args.seed}; "
             f"precision {args.precision}" + (", channels_last" if args.channels_last else ""),
             f"- whole run: {wall_s / 60:.1f} min wall-clock"
             + (f" ({args.jobs} processes side by side)" if args.jobs > 1 else ""), "",
             f"| method ({DATA_LABEL}) | overall | many | medium | few | published overall "
             "(recipe) | fit (min) | s / epoch |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r.get("unfinished"):
            lines.append(f"| {r['method']} | not finished within the {args.time_limit:g}-min "
                         f"limit: stopped after epoch {r['epochs_reached']} of {args.epochs} "
                         f"| | | | {PUBLISHED[r['method']][0]} | – | {r['epoch_s']:.1f} |")
            continue
        cells = " | ".join("–" if np.isnan(r[g]) else f"{100 * r[g]:.1f}" for g in GROUPS)
        value, source = PUBLISHED[r["method"]]
        lines.append(f"| {r['method']} | {cells} | {value} ({source}) | "
                     f"{r['fit_s'] / 60:.1f} | {r['epoch_s']:.1f} |")
    lines += ["",
              "Many / medium / few: > 100 / 20–100 / < 20 training images (`shot_groups`); "
              "CIFAR-10-LT's smallest class has 50, so \"few\" is empty (–). The published "
              "figures come from the full recipe on the original CIFAR-10 files (Menon et "
              "al. train longer, 1,241 epochs in their code); a run that is not the recipe "
              "is not comparable to them. Deviations: the augmentation pads the normalised "
              "images with 0 (the mean colour) where torchvision pads black; the same plain "
              "SGD for every method (RIDE's own code uses Nesterov momentum and adds 15° "
              "rotations). \"fit\" includes RIDE's router stage; \"s / epoch\" is the median "
              "training epoch."]
    resumed = [r for r in results if r.get("resumed_after")]
    if resumed:
        lines += ["", "Continued from `--resume-dir` (saved network, optimiser and history of "
                  "an earlier run; data order and augmentation restarted from the seed): "
                  + "; ".join(f"{r['method']} after epoch {r['resumed_after']}"
                              for r in resumed)
                  + ". \"fit\" adds the earlier runs' epochs; \"whole run\" is this run's."]
    if args.note:
        lines += ["", args.note]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="image folder of CIFAR-10: root/{train,test}/<class>/")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--backbone", default=RECIPE_BACKBONE)
    parser.add_argument("--epochs", type=int, default=RECIPE_EPOCHS)
    parser.add_argument("--warmup-epochs", type=int, default=None,
                        help="default: 5 for 200 epochs, scaled (at least 1) otherwise")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", choices=["32", "bf16", "16"], default="32",
                        help="the estimators' precision (the recipe: 32)")
    parser.add_argument("--channels-last", action="store_true",
                        help="channels_last memory format for the network")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--jobs", type=int, default=1,
                        help="processes side by side, one method each (on one GPU)")
    parser.add_argument("--name", default="cifar_lt", help="results fragment name")
    parser.add_argument("--progress", action="store_true", help="a progress bar per fit")
    parser.add_argument("--note", default="", help="a sentence added to the fragment")
    parser.add_argument("--time-limit", type=float, default=0,
                        help="minutes; with --jobs, fits still running then are stopped "
                        "and reported as unfinished (0: no limit)")
    parser.add_argument("--epoch-log", help="folder: one line per training epoch per method")
    parser.add_argument("--resume-dir", help="folder: save every fit's state after each "
                        "epoch, continue unfinished fits and reuse finished ones from it")
    parser.add_argument("--json", help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="do not write the fragment")
    args = parser.parse_args(argv)
    if args.warmup_epochs is None:
        args.warmup_epochs = max(1, round(5 * args.epochs / RECIPE_EPOCHS))
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda"):
        # Fixed 32x32 inputs: let cuDNN pick its fastest convolution algorithms.
        torch.backends.cudnn.benchmark = True

    start = time.perf_counter()
    header = provenance_header(title(args), [sys.argv[0], *argv])  # the code that runs
    if args.jobs > 1 and len(args.methods) > 1:
        # No progress bars from processes side by side; the children's own --epoch-log
        # and --time-limit 0 come last, so argparse takes them over the parent's.
        results, data = run_parallel(args, [a for a in argv if a != "--progress"])
    else:
        data = load_data(args.root)
        print(f"{DATA_LABEL}: CIFAR-10-LT, {len(data.y_train)} training images, "
              f"{len(data.y_test)} test images; {label(args)}", flush=True)
        results = []
        for method in args.methods:
            results.append(finished_result(method, args) or run_one(method, data, args))
            r = results[-1]
            print(f"{method:15s} " + "  ".join(f"{g} {100 * r[g]:5.1f}" for g in GROUPS)
                  + f"  fit {r['fit_s'] / 60:.1f} min ({r['epoch_s']:.1f} s/epoch) "
                  f"on {r['device']}  [{DATA_LABEL}]", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results))
    if not args.no_write:
        path = write_fragment(args.name, fragment(results, args, data,
                                                  time.perf_counter() - start, header))
        print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
