"""ltroute.plotting and the example script that uses it."""

import os
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

from ltroute.plotting import plot_per_class_accuracy

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "plot_per_class_accuracy.py"
COUNTS = {"cat": 500, "dog": 50, "emu": 5}
Y_TRUE = ["cat", "cat", "dog", "dog", "emu", "emu"]


def test_one_series_per_model_with_group_shading():
    preds = {"a": ["cat", "cat", "dog", "cat", "emu", "cat"],
             "b": ["cat", "dog", "dog", "dog", "emu", "emu"]}
    ax = plot_per_class_accuracy(Y_TRUE, preds, class_counts=COUNTS)
    lines = ax.get_lines()
    assert len(lines) == 2
    np.testing.assert_array_equal(lines[0].get_xdata(), [5, 50, 500])  # by class size
    np.testing.assert_allclose(lines[0].get_ydata(), [0.5, 0.5, 1.0])
    np.testing.assert_allclose(lines[1].get_ydata(), [1.0, 1.0, 0.5])
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert labels[0] == "a (overall 66.7%, few 50.0%)"
    assert {t.get_text() for t in ax.texts} == {"many-shot", "medium-shot", "few-shot"}
    assert ax.get_xscale() == "log"
    plt.close(ax.figure)


def test_single_prediction_array_and_given_axes():
    fig, ax = plt.subplots()
    out = plot_per_class_accuracy(np.array([0, 1, 1]), np.array([0, 1, 0]),
                                  class_counts=[30, 3], ax=ax, log_scale=False)
    assert out is ax and ax.get_xscale() == "linear"
    assert ax.get_legend().get_texts()[0].get_text().startswith("model (overall 66.7%")
    plt.close(fig)


def test_bad_input_is_reported():
    with pytest.raises(ValueError, match="not in classes"):
        plot_per_class_accuracy(Y_TRUE, ["cat"] * 5 + ["yak"], class_counts=COUNTS)
    with pytest.raises(ValueError, match="empty mapping"):
        plot_per_class_accuracy(Y_TRUE, {}, class_counts=COUNTS)


def test_missing_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"pip install ltroute\[plot\]"):
        plot_per_class_accuracy(Y_TRUE, Y_TRUE, class_counts=COUNTS)


def test_example_script_runs_and_saves_the_figure(tmp_path, monkeypatch):
    out = tmp_path / "per_class.png"
    monkeypatch.setenv("LTROUTE_EXAMPLE_EPOCHS", "1")
    monkeypatch.setenv("LTROUTE_EXAMPLE_OUTPUT", os.fspath(out))
    runpy.run_path(os.fspath(EXAMPLE), run_name="__main__")
    assert out.stat().st_size > 10_000
    plt.close("all")


def test_reliability_diagram_one_line_per_group_with_ece():
    from ltroute.plotting import plot_reliability_diagram

    y_proba = [[0.9, 0.1, 0.0], [0.75, 0.25, 0.0], [0.3, 0.7, 0.0], [0.45, 0.55, 0.0]]
    ax = plot_reliability_diagram(["cat", "emu", "emu", "emu"], y_proba,
                                  class_counts=COUNTS, classes=["cat", "emu", "dog"],
                                  n_bins=5)
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert labels == ["overall (ECE 25.0%, n=4)", "many (ECE 10.0%, n=1)",
                      "few (ECE 30.0%, n=3)"]  # no medium-shot sample: no line
    few = ax.get_lines()[3]
    np.testing.assert_allclose(few.get_xdata(), [0.55, 0.725])
    np.testing.assert_allclose(few.get_ydata(), [1.0, 0.5])
    plt.close(ax.figure)
