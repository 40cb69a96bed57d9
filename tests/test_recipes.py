"""The shared-recipe tools of the benchmarks: recipes imposed on every estimator, the
validation split they are chosen on, and the search's choice."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ltroute import DQRouteClassifier, LongTailClassifier, RIDEClassifier
from ltroute.schedules import StepWarmupSchedule

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import _provenance  # noqa: E402
import cifar_lt  # noqa: E402
from _recipes import CANDIDATES, SHARED, Recipe, recipe_for  # noqa: E402
from accuracy import validation_folds, validation_split  # noqa: E402
from recipe_search import table  # noqa: E402
from router_holdout import table as holdout_table  # noqa: E402
from router_search import table as router_table  # noqa: E402


def _data(n=240, n_features=6, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1, 2], [150, 60, 30])
    X = (rng.normal(size=(n, n_features)) + y[:, None]).astype(np.float32)
    return X, y


@pytest.mark.parametrize("cls", [LongTailClassifier, RIDEClassifier, DQRouteClassifier])
@pytest.mark.parametrize("name", ["sgd", "adamw-cosine"])
def test_recipe_replaces_each_estimators_optimiser_schedule_and_head(cls, name):
    recipe = CANDIDATES[name]
    epochs = 10
    kwargs = {"router": False} if cls is RIDEClassifier else {}
    clf = cls(max_epochs=epochs, random_state=0, batch_size=64, **kwargs)
    clf.set_params(**recipe.params(epochs)).fit(*_data())
    assert type(clf.optimizer_) is recipe.optimizer
    for key, value in recipe.optimizer_params.items():
        assert clf.optimizer_.param_groups[0][key] == value
    # The learning rate of every epoch follows the recipe's schedule, not the estimator's.
    schedule = StepWarmupSchedule(epochs, warmup_epochs=recipe.warmup(epochs),
                                  gamma=recipe.lr_decay)
    expected = [recipe.lr * schedule(e) for e in range(epochs)]
    np.testing.assert_allclose(clf.history[:, "event_lr"], expected, rtol=1e-12)
    if recipe.cosine_head is not None:
        assert clf.get_params()["cosine_head"] is recipe.cosine_head
        heads = [m for m in clf.module_.modules() if type(m).__name__ == "NormedLinear"]
        assert heads, "a cosine recipe must build cosine heads"


def test_warmup_keeps_its_epochs_in_short_runs_and_never_exceeds_the_run():
    recipe = Recipe("r", torch.optim.SGD, 0.1, warmup_epochs=5)
    assert recipe.warmup(200) == recipe.warmup(30) == 5
    assert recipe.warmup(3) == 3
    assert Recipe("r", torch.optim.SGD, 0.1).warmup(30) == 0
    assert "5 warm-up epoch(s)" in recipe.describe(30)


def test_every_shared_recipe_is_a_candidate():
    for dataset in SHARED:
        assert recipe_for(dataset) is CANDIDATES[SHARED[dataset]]
    with pytest.raises(ValueError, match="No shared recipe for 'nope'"):
        recipe_for("nope")


def test_validation_split_is_stratified_seeded_and_keeps_singletons_for_training():
    y = np.repeat(["a", "b", "c", "d", "e"], [100, 20, 6, 1, 2])
    val = validation_split(y, seed=3)
    assert val.dtype == bool and val.shape == y.shape
    counts = {c: int(val[y == c].sum()) for c in "abcde"}
    assert counts == {"a": 20, "b": 4, "c": 1, "d": 0, "e": 1}
    np.testing.assert_array_equal(val, validation_split(y, seed=3))
    assert not np.array_equal(val, validation_split(y, seed=4))


def test_search_table_marks_the_best_mean_over_methods_not_one_methods_best():
    # "a" is best for m1 alone; "b" has the best mean over the two methods.
    scores = {("m1", "a"): 0.90, ("m2", "a"): 0.50, ("m1", "b"): 0.80, ("m2", "b"): 0.70,
              ("m1", "own"): 0.10, ("m2", "own"): 0.99}
    runs = [{"dataset": "letter", "method": m, "recipe": r, "val_balanced_acc": v}
            for (m, r), v in scores.items()]
    lines = table(runs, "letter", ["m1", "m2"], ["own", "a", "b"])
    assert lines[-1] == "Shared recipe chosen for letter-LT: **`b`**."  # "own" never chosen
    assert "**90.0 ± 0.0**" in lines[2] and "**70.0 ± 0.0**" in lines[3]


def test_router_table_compares_each_margin_with_all_experts_per_seed():
    # Two seeds, all experts 80 / 90; margin 1 is best on average, margin 0 cheapest.
    runs = [{"dataset": "mnist", "seed": seed, "margin": margin, "val_all_experts": full,
             "val_balanced_acc": acc, "experts": experts, "train_experts": 1.0}
            for seed, full, rows in [(0, 0.80, [(0, 0.79, 1.0), (1, 0.80, 1.4)]),
                                     (1, 0.90, [(0, 0.88, 1.0), (1, 0.90, 1.6)])]
            for margin, acc, experts in rows]
    lines = router_table(runs, "mnist")
    assert lines[0] == "Seeds [0, 1]; all experts (no router): 85.0 ± 5.0."
    official, margin = lines[4], lines[5]
    assert official.startswith("| 0 (official) | 83.5 ± 4.5 | -1.5 | 1.00 (1.00 / 1.00) |")
    assert official.endswith("| 0 of 2 |")  # 1 and 2 points below all experts
    assert margin.startswith("| 1 | **85.0 ± 5.0** | +0.0 | 1.50 (1.40 / 1.60) |")
    assert margin.endswith("| 1 of 2 |")  # seed 1 routes more than 1.5 experts


def test_holdout_table_scores_each_router_against_its_own_network_per_seed():
    """``router_holdout.py``: routers are compared with the stage-1 network they route
    (all experts, same seed), the default with its own fit; the goal needs both at most
    1.5 experts and at most 0.3 points below."""
    groups = {"many_experts": 1.0, "medium_experts": 1.2, "few_experts": 2.0}

    def row(seed, router, margin, acc, experts, **extra):
        return {"dataset": "mnist", "seed": seed, "router": router, "margin": margin,
                "balanced_acc": acc, "experts": experts, "error_fit": 0.0,
                "error_held_out": 2.5, **groups, **extra}

    runs = [row(0, "none (all experts)", float("nan"), 90.0, 3.0),
            row(1, "none (all experts)", float("nan"), 80.0, 3.0),
            row(0, "fit part", 0.0, 89.0, 1.0), row(1, "fit part", 0.0, 80.0, 1.0),
            row(1, "held-out part", 0.0, 79.8, 1.6), row(0, "held-out part", 0.0, 90.0, 1.4),
            row(0, "default, whole training split", 0.5, 91.0, 1.2,
                all_experts_same_fit=91.5),
            row(1, "default, whole training split", 0.5, 85.0, 1.5,
                all_experts_same_fit=85.0)]
    lines = holdout_table(runs, "mnist")
    assert lines[0] == ("Seeds [0, 1]. Stage-1 error with all experts on its own fit part: "
                        "0.00 / 0.00 %; on the held-out part: 2.50 / 2.50 %.")
    full, fit, held_out, default = lines[4:8]
    assert full.startswith("| none (all experts) | – | 85.0 ± 5.0 | – |")
    assert fit == ("| fit part | 0 | 84.5 ± 4.5 | -1.00 / +0.00 | 1.00 (1.00 / 1.00) | "
                   "1.00 / 1.20 / 2.00 | 1 of 2 |")
    assert held_out.startswith("| held-out part | 0 | 84.9 ± 5.1 | +0.00 / -0.20 | "
                               "1.50 (1.40 / 1.60) |")
    assert held_out.endswith("| 1 of 2 |")  # seed 1 routes more than 1.5 experts
    assert default.startswith("| default, whole training split | 0.5 (auto) | 88.0 ± 3.0 "
                              "| -0.50 / +0.00 |")
    assert default.endswith("| 1 of 2 |")


def test_validation_folds_validate_every_training_sample_once():
    """``--folds K`` of the router and DQRoute searches: K stratified held-out folds that
    partition the training split (a 5-sample class lands once in each of 5 folds); with
    0, the one 80 / 20 mask."""
    y = np.repeat(["a", "b", "c"], [40, 12, 5])
    masks = validation_folds(y, 3, 5)
    assert len(masks) == 5
    assert np.array_equal(np.sum(masks, axis=0), np.ones(len(y)))
    per_fold = {c: sorted(int(np.sum(mask & (y == c))) for mask in masks) for c in "abc"}
    assert per_fold == {"a": [8] * 5, "b": [2, 2, 2, 3, 3], "c": [1] * 5}
    assert not np.array_equal(masks[0], validation_folds(y, 4, 5)[0])
    (single,) = validation_folds(y, 3, 0)
    assert np.array_equal(single, validation_split(y, seed=3))


def test_results_index_names_each_fragment_in_its_heading(tmp_path, monkeypatch):
    """RESULTS.md: fragments in ``ORDER`` first, then alphabetically; two fragments with
    one title (one script, two data sets) are told apart by their file names."""
    monkeypatch.setattr(_provenance, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(_provenance, "RESULTS_FILE", tmp_path / "RESULTS.md")
    for name in ("zeta", "recipe_search_mnist", "recipe_search_letter"):
        (tmp_path / f"{name}.md").write_text("## Shared recipe search\n\nbody\n")
    (tmp_path / "plain.md").write_text("no heading\n")
    text = _provenance.write_results_index().read_text()
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings == ["## Shared recipe search (`results/recipe_search_letter.md`)",
                        "## Shared recipe search (`results/recipe_search_mnist.md`)",
                        "## Shared recipe search (`results/zeta.md`)"]
    assert "\nno heading\n" in text and text.count("body") == 3


def test_cifar_lt_reports_a_stopped_fit_by_the_epoch_it_reached(tmp_path):
    """A fit stopped at ``--time-limit`` is listed with the epochs its log recorded and
    their median duration, never with an accuracy; an autocast run is not "the recipe"."""
    X, y = _data()
    log = tmp_path / "ce.jsonl"
    LongTailClassifier(hidden_sizes=(8,), max_epochs=3, random_state=0,
                       callbacks=[("log", cifar_lt.EpochLog(str(log)))]).fit(X, y)
    reached, epoch_s = cifar_lt.read_epoch_log(log)
    assert reached == 3 and epoch_s > 0
    assert cifar_lt.read_epoch_log(tmp_path / "none.jsonl")[0] == 0
    args = cifar_lt.argparse.Namespace(
        epochs=200, backbone="resnet32", precision="32", channels_last=False, device="cuda",
        batch_size=128, warmup_epochs=5, seed=0, jobs=2, time_limit=8.5, note="")
    data = cifar_lt.argparse.Namespace(class_counts={0: 5000, 1: 50}, y_test=np.zeros(20))
    done = {"method": "ce", "overall": 0.704, "many": 0.8, "medium": 0.6,
            "few": float("nan"), "fit_s": 600.0, "epoch_s": 3.0}
    stopped = {"method": "ride", "unfinished": True, "epochs_reached": reached,
               "epoch_s": epoch_s}
    rows = [line for line in cifar_lt.fragment([done, stopped], args, data, 60.0, "## t\n")
            .splitlines() if line.startswith("| ce") or line.startswith("| ride")]
    assert rows[0].startswith("| ce | 70.4 | 80.0 | 60.0 | – |")
    assert "stopped after epoch 3 of 200" in rows[1] and "%" not in rows[1]
    assert cifar_lt.label(args) == "the papers' recipe"
    args.precision = "bf16"
    assert "bf16" in cifar_lt.label(args) and "the papers' recipe under" in cifar_lt.label(args)
    args.epochs = 30
    assert cifar_lt.label(args) == "short run, not the recipe"


def _ldam_drw_with_schedule(first=(), last=()):
    """LDAM-DRW on rows with the recipe's kind of schedule (LambdaLR over 10 epochs)."""
    from skorch.callbacks import LRScheduler

    schedule = StepWarmupSchedule(10, warmup_epochs=2, gamma=0.01)
    return LongTailClassifier(
        loss="ldam", drw_epoch="auto", max_epochs=10, random_state=0, lr=0.1,
        optimizer=torch.optim.SGD, optimizer__momentum=0.9, lr_schedule=None,
        hidden_sizes=(16,), callbacks=[*first, ("lr_schedule", LRScheduler(
            torch.optim.lr_scheduler.LambdaLR, lr_lambda=schedule)), *last])


def test_cifar_lt_training_state_resumes_the_schedule_where_it_stopped(tmp_path):
    """A fit stopped after 6 of 10 epochs and continued from its saved state runs the
    last 4 epochs of the same schedule (learning rates as an uninterrupted fit's) from
    the trained network, and every saved epoch holds the scheduler's record."""
    X, y = _data(n=240)
    full = _ldam_drw_with_schedule().fit(X, y)
    state = cifar_lt.TrainingState(str(tmp_path / "ce"))
    assert state.epochs_saved() == 0
    first = _ldam_drw_with_schedule([("state", state)], [("save", state.saver())])
    first.fit(X, y, epochs=6)
    assert state.epochs_saved() == 6 and not list(tmp_path.rglob("*.tmp"))
    resumed = _ldam_drw_with_schedule([("state", state)], [("save", state.saver())])
    resumed.fit(X, y, epochs=4)
    assert len(resumed.history_) == 10 and state.epochs_saved() == 10
    assert resumed.history_[:, "event_lr"] == pytest.approx(full.history_[:, "event_lr"])
    assert resumed.history_[:6, "train_loss"] == first.history_[:, "train_loss"]
    # Epoch 7 starts from the trained network, not from a new one.
    assert resumed.history_[6, "train_loss"] < 0.5 * full.history_[0, "train_loss"]


@pytest.mark.slow
def test_cifar_lt_resume_dir_reuses_finished_fits(tmp_path, monkeypatch):
    """With --resume-dir, a finished fit's scores are saved and a second run takes them
    instead of training again."""
    from cifar_fixture import write_cifar

    _, checksums = write_cifar(tmp_path, n_classes=10, n_train_per_class=100,
                               n_test_per_class=3)
    monkeypatch.setattr("ltroute.datasets._cifar._MD5", checksums)
    argv = [str(tmp_path), "--backbone", "convnet", "--epochs", "2", "--methods", "ce",
            "--device", "cpu", "--no-write", "--resume-dir", str(tmp_path / "state")]
    (first,) = cifar_lt.main(argv)
    assert first["epochs"] == 2 and first["resumed_after"] == 0
    assert (tmp_path / "state" / "ce" / "result.json").exists()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished fit was trained again")

    monkeypatch.setattr(cifar_lt, "run_one", no_training)
    assert repr(cifar_lt.main(argv)) == repr([first])  # "many" is NaN here


def test_provenance_names_the_tree_a_dirty_checkout_ran(tmp_path, monkeypatch):
    """A run on a modified checkout records "+dirty" and the working tree's id, which is
    the tree of the commit that later holds exactly these files (a lent GPU's checkout
    has an older HEAD but the newest files)."""
    import subprocess

    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              cwd=tmp_path, capture_output=True, text=True,
                              check=True).stdout.strip()

    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "first")
    monkeypatch.setattr(_provenance, "BENCH_DIR", tmp_path / "benchmarks")
    assert _provenance._git_commit() == git("rev-parse", "--short", "HEAD")
    (tmp_path / "code.py").write_text("x = 2\n")
    (tmp_path / "new.py").write_text("y = 3\n")  # untracked, not ignored: it ran too
    recorded = _provenance._git_commit()
    git("add", "-A")
    git("commit", "-qm", "second")
    assert recorded.startswith(git("rev-parse", "--short", "HEAD~1") + "+dirty (working tree ")
    assert git("rev-parse", "HEAD^{tree}").startswith(recorded.split()[-1].rstrip(")"))
