"""Every example runs, as a user would run it, with tiny epochs (LTROUTE_EXAMPLE_EPOCHS)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cifar_fixture import write_cifar
from conftest import process_reports

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name, *args, env=None, launcher=None, timeout=600):
    environment = os.environ | {"LTROUTE_EXAMPLE_EPOCHS": "1", "MPLBACKEND": "Agg"} | (env or {})
    command = [*(launcher or [sys.executable]), str(EXAMPLES / name), *args]
    done = subprocess.run(command, capture_output=True, text=True, env=environment,
                          timeout=timeout, cwd=EXAMPLES.parent)
    assert done.returncode == 0, f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.slow
def test_quickstart():
    out = run_example("quickstart.py")
    assert "few" in out and "cross-entropy" in out and "DQRoute" in out


@pytest.mark.slow
def test_pipeline_gridsearch():
    out = run_example("pipeline_gridsearch.py")
    assert "best:" in out and "mean_test_few" in out


@pytest.mark.slow
def test_cifar_lt_resnet32_on_a_tiny_cifar10(tmp_path, monkeypatch):
    """The CIFAR example end to end on a self-written 10-class CIFAR-format fixture."""
    _, checksums = write_cifar(tmp_path, n_classes=10, n_train_per_class=30,
                               n_test_per_class=3)
    monkeypatch.setattr("ltroute.datasets._cifar._MD5", checksums)
    spec = importlib.util.spec_from_file_location("cifar_example",
                                                  EXAMPLES / "cifar_lt_resnet32.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(["--root", str(tmp_path), "--n-classes", "10", "--epochs", "1",
                           "--imbalance-ratio", "10"])
    assert set(results) == {"ce", "ldam-drw", "ride", "dqroute"}
    for scores in results.values():
        assert 0.0 <= scores["overall"] <= 1.0
    factor = module.warmup_step_schedule(200)
    assert [factor(e) for e in (0, 4, 5, 159, 160, 179, 180)] == pytest.approx(
        [0.2, 1.0, 1.0, 1.0, 0.01, 0.01, 1e-4])


@pytest.mark.slow
def test_images_mnist_lt():
    out = run_example("images_mnist_lt.py")
    for name in ("cross-entropy", "RIDE", "DQRoute"):
        assert name in out


@pytest.mark.slow
def test_distributed_accelerate_with_two_cpu_processes():
    """``accelerate launch --cpu --num_processes 2``: two processes train one model."""
    pytest.importorskip("accelerate")
    # The launcher module of this interpreter: no reliance on a console script on PATH.
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--cpu",
                "--num_processes", "2"]
    out = run_example("distributed_accelerate.py", launcher=launcher)
    reports = process_reports(out)
    assert [name for name, _ in reports] == ["process 0/2", "process 1/2"]
    # Same scores, parameters and class weights in both processes.
    assert len({payload for _, payload in reports}) == 1


@pytest.mark.slow
def test_image_folder_on_a_tiny_jpeg_folder(tmp_path, capsys):
    """The image-folder example on 10 classes of 8x8 JPEGs the test writes (in-process:
    ``main`` with the arguments a user would give)."""
    from PIL import Image

    rng = np.random.RandomState(0)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
             "ship", "truck"]
    for split, n in (("train", 20), ("test", 3)):
        for label, name in enumerate(names):
            folder = tmp_path / "jpeg" / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.randint(0, 256, (8, 8, 3)).astype(np.uint8)
                pixels[..., label % 3] = 40 * (label // 3)  # a per-class colour cue
                Image.fromarray(pixels).save(folder / f"{i:04d}.jpg")
    spec = importlib.util.spec_from_file_location("image_folder_example",
                                                  EXAMPLES / "image_folder.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    figure = tmp_path / "per_class.png"
    report = module.main([str(tmp_path / "jpeg"), "--imbalance-ratio", "10", "--epochs", "1",
                          "--output", str(figure)])
    out = capsys.readouterr().out
    assert "CIFAR-10 (JPEG copy): 78 training images (20 ... 2 per class" in out
    assert "few" in out and "[CIFAR-10 (JPEG copy)]" in out
    assert "overall" in report and "few" in report
    assert figure.stat().st_size > 0


@pytest.mark.slow
def test_label_shift():
    out = run_example("label_shift.py")
    assert "estimate" in out and "total variation" in out and "ECE per group" in out
