"""Provenance for benchmark outputs and the assembly of ``benchmarks/RESULTS.md``.

Every script in this folder writes one markdown fragment to ``benchmarks/results/``,
starting with :func:`provenance_header` (command, date, machine, versions, commit), then
calls :func:`write_results_index`, which concatenates the fragments in a fixed order into
``benchmarks/RESULTS.md``. No figure reaches RESULTS.md without the command that made it.
"""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
RESULTS_FILE = BENCH_DIR / "RESULTS.md"

#: Fragment order in RESULTS.md; fragments not listed come after, alphabetically.
ORDER = [
    "recipe_search_letter", "recipe_search_mnist", "accuracy_letter_shared", "accuracy_letter",
    "accuracy_mnist_shared", "accuracy_mnist", "accuracy_cifar10_shared", "accuracy_cifar10",
    "router_search_letter_mnist", "router_search_cifar10", "router_holdout",
    "router_holdout_resnet32_gpu", "cifar_lt", "cifar_lt_gpu", "cifar_lt_gpu_bf16_probe",
    "overhead", "accuracy",
    "baselines", "ride_ablations", "dqroute_ablations", "scaling", "ride_speed", "fusion",
]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _working_tree_id() -> str:
    """The git tree id of the working tree as it is (tracked and untracked files that
    git does not ignore), from a temporary index: equal to ``<commit>^{tree}`` of the
    commit whose files these are, so that a run on a copy of the tree (a lent GPU's
    checkout, whose HEAD can be older) names the code it ran."""
    with tempfile.TemporaryDirectory() as tmp:
        env = os.environ | {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
        for command in (["git", "add", "-A", "."], ["git", "write-tree"]):
            out = subprocess.run(command, cwd=BENCH_DIR.parent, env=env, capture_output=True,
                                 text=True, check=True, timeout=60)
    return out.stdout.strip()


def _git_commit() -> str:
    """``HEAD``'s short hash; ``+dirty`` and the working tree's id when tracked files
    differ from it (find the commit with ``git log --format='%h %T' | grep TREE``)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCH_DIR,
                             capture_output=True, text=True, check=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=BENCH_DIR, capture_output=True, text=True, timeout=10)
        if not dirty.stdout.strip():
            return out.stdout.strip()
        return f"{out.stdout.strip()}+dirty (working tree {_working_tree_id()[:12]})"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_description() -> str:
    """CPU model and cores, plus the GPU name when CUDA is available."""
    import torch

    text = f"{_cpu_name()}, {os.cpu_count()} logical cores, {torch.get_num_threads()} " \
           f"torch threads"
    if torch.cuda.is_available():
        text += f"; GPU {torch.cuda.get_device_name()}"
    else:
        text += "; no GPU"
    return text


def provenance_header(title: str, argv: list[str] | None = None) -> str:
    """Markdown heading plus a provenance block for a benchmark fragment."""
    import numpy
    import sklearn
    import skorch
    import torch

    import ltroute

    argv = sys.argv if argv is None else argv
    script = Path(argv[0])
    try:
        script = script.resolve().relative_to(BENCH_DIR.parent)
    except ValueError:
        pass
    command = shlex.join(["python", str(script), *argv[1:]])
    versions = (f"Python {platform.python_version()}, torch {torch.__version__}, "
                f"numpy {numpy.__version__}, scikit-learn {sklearn.__version__}, "
                f"skorch {skorch.__version__}, ltroute {ltroute.__version__}")
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"## {title}\n\n"
            f"- command: `{command}`\n"
            f"- date: {now}, commit {_git_commit()}\n"
            f"- machine: {machine_description()}\n"
            f"- versions: {versions}\n\n")


def write_fragment(name: str, text: str) -> Path:
    """Write ``results/<name>.md`` and refresh RESULTS.md; returns the fragment path."""
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{name}.md"
    path.write_text(text.rstrip() + "\n", encoding="utf-8")
    write_results_index()
    return path


def write_runs_csv(name: str, runs: list[dict]) -> Path:
    """Write ``runs`` (one dict per fit) to ``results/<name>.csv``; the columns are every
    key in first-seen order."""
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{name}.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in runs for k in r)))
        writer.writeheader()
        writer.writerows(runs)
    return path


def read_runs_csv(name: str) -> list[dict]:
    """The runs of ``results/<name>.csv`` (as :func:`write_runs_csv` wrote them): integers
    and floats as numbers (empty cells NaN), every other cell as text; ``[]`` when there
    is none."""
    path = RESULTS_DIR / f"{name}.csv"
    if not path.exists():
        return []

    def value(text: str):
        if text == "":
            return float("nan")
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return text

    with open(path, newline="") as f:
        return [{key: value(text) for key, text in row.items()} for row in csv.DictReader(f)]


def _named_section(fragment: Path) -> str:
    """A fragment's text with its file named in its heading: runs of one script on
    several data sets or seeds share a title, and the name tells them apart."""
    text = fragment.read_text(encoding="utf-8")
    heading, newline, rest = text.partition("\n")
    if not heading.startswith("## "):
        return text
    return f"{heading} (`results/{fragment.name}`){newline}{rest}"


def write_results_index() -> Path:
    """Concatenate every fragment of ``results/`` into ``RESULTS.md``."""
    fragments = sorted(RESULTS_DIR.glob("*.md"),
                       key=lambda p: (ORDER.index(p.stem) if p.stem in ORDER else len(ORDER),
                                      p.stem))
    parts = ["# ltroute benchmark results\n\n"
             "Generated from `benchmarks/results/*.md`; each section names the command, "
             "machine and versions that produced it. Re-run a section's command to refresh "
             "it.\n"]
    parts += [_named_section(p) for p in fragments]
    RESULTS_FILE.write_text("\n".join(parts), encoding="utf-8")
    return RESULTS_FILE
