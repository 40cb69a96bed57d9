"""The benchmark tools of the fusion kernel: bench_fusion's gate and bytes, the cost model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ltroute.fusion import FusionResult, fuse_experts_reference

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_fusion  # noqa: E402


def _broken(z, **kwargs):
    out = fuse_experts_reference(z, **kwargs)
    return FusionResult(out.probs * 1.001, out.energy, out.weights, out.log_probs)


def test_gate_passes_the_reference_and_catches_a_wrong_implementation():
    Z = torch.randn(16, 3, 10, generator=torch.Generator().manual_seed(0)) * 3
    region = torch.ones(3, 10, dtype=torch.bool)
    region[0, :5] = False
    kwargs = {"region_mask": region, "return_log_probs": True}
    ok = bench_fusion.gate({"eager": lambda z: fuse_experts_reference(z, **kwargs)}, Z, kwargs)
    assert ok == []
    bad = bench_fusion.gate({"bad": lambda z: _broken(z, **kwargs)}, Z, kwargs)
    assert len(bad) == 1 and "probs" in bad[0]


def test_bench_exits_non_zero_before_timing_on_mismatch(monkeypatch, capsys):
    monkeypatch.setattr(bench_fusion, "fuse_experts_reference", _broken)
    monkeypatch.setattr(bench_fusion, "time_ms", lambda *a, **k: pytest.fail("timed"))
    monkeypatch.setattr(bench_fusion, "copy_bandwidth", lambda device: 1.0)
    assert bench_fusion.main(["--sizes", "8x3x10", "--no-compile"]) == 1
    assert "CORRECTNESS GATE FAILED" in capsys.readouterr().err


def test_io_bytes_count_only_what_the_masks_let_the_kernel_read():
    B, K, C = 4, 3, 10
    full = bench_fusion.io_bytes(B, K, C, torch.float32, backward=False, log_probs=True)
    assert full == B * K * C * 4 + 2 * B * C * 4 + 2 * B * K * 4
    region = torch.zeros(K, C, dtype=torch.bool)
    region[:, :4] = True  # 12 of 30 logits
    nested = bench_fusion.io_bytes(B, K, C, torch.float32, backward=False, log_probs=True,
                                   region=region)
    assert full - nested == B * 18 * 4
    # dZ is written whole, zeros included
    bwd = bench_fusion.io_bytes(B, K, C, torch.bfloat16, backward=True, log_probs=True,
                                region=region)
    assert bwd == B * 12 * 2 + 2 * B * C * 4 + 2 * B * K * 4 + B * C * 4 + B * K * C * 2


def test_refuses_huge_default_tensors():
    with pytest.raises(SystemExit):
        bench_fusion.main(["--sizes", "65536x8x8192", "--no-compile"])


def test_pruners_keep_only_configs_within_the_register_budget():
    """The configs the autotuners may time: no 16 warps (128 registers a thread), at most
    32 logits a thread (16 with 8 warps or a 16-bit backward); the multi-row pruner keeps
    BLOCK_B x K x BLOCK_C within its per-thread bounds."""
    kf = pytest.importorskip("ltroute.kernels.fusion")
    for max_tile, dtype in ((kf._MAX_TILE_FWD, torch.float32), (kf._MAX_TILE_BWD, torch.float32),
                            (kf._MAX_TILE_BWD, torch.bfloat16)):
        for block_k, n_classes in ((4, 32000), (16, 1000), (2, 100)):
            kept = kf._make_pruner(max_tile)(
                kf._config_grid(), {"BLOCK_K": block_k, "n_classes": n_classes,
                                "z_ptr": torch.empty(0, dtype=dtype)})
            assert kept
            for config in kept:
                per_thread = block_k * config.kwargs["BLOCK_C"] / (32 * config.num_warps)
                assert config.num_warps <= 8 and per_thread <= 32
                if config.num_warps == 8 or (max_tile == kf._MAX_TILE_BWD
                                             and dtype != torch.float32):
                    assert per_thread <= 16
    low, high = kf._ROWS_PER_THREAD_FWD
    kept = kf._make_rows_pruner((low, high))(kf._rows_config_grid(),
                                             {"N_EXPERTS": 3, "BLOCK_C": 16})
    assert kept
    for config in kept:
        assert low <= config.kwargs["BLOCK_B"] * 48 / (32 * config.num_warps) <= high


def test_kernel_cost_json_on_one_small_shape():
    """kernel_cost.py in a fresh process (no TRITON_INTERPRET): one JSON line per case."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    probe = subprocess.run(
        [sys.executable, "-c", "import triton.backends.nvidia.compiler, triton.compiler"],
        env=env, capture_output=True)
    if probe.returncode != 0:
        pytest.skip("triton's sm_90 compiler is unavailable")
    result = subprocess.run(
        [sys.executable, str(BENCH / "kernel_cost.py"), "--shapes", "64x3x10", "--dtypes",
         "fp32", "--json"], env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0 and "cuobjdump" in result.stderr:
        pytest.skip("cuobjdump unavailable")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["direction"] for r in rows] == ["fwd", "bwd"]
    for row in rows:
        assert row["shape"] == [64, 3, 10] and row["dtype"] == "fp32"
        assert row["registers"] > 0 and row["spill_bytes"] == 0
        config = row["config"]
        # K x C = 30 is small: the multi-row kernel, BLOCK_B rows of 16 classes per program
        assert config["kernel"] == "rows" and config["BLOCK_C"] == 16 and config["BLOCK_B"] >= 1
        # straight-line code (no loop): every thread runs it once for BLOCK_B x 30 logits
        assert row["sass_instructions_per_element"] == pytest.approx(
            row["sass_per_thread"] * 32 * config["num_warps"] / (config["BLOCK_B"] * 30),
            rel=1e-3)
        assert row["sass_static"] == row["sass_per_thread"]
        # the path without the underflow fallback is part of the one with it
        assert 0 < row["sass_hot_path_per_element"] < row["sass_instructions_per_element"]


_SPLIT_VARIANTS = r"""
import sys
sys.path.insert(0, sys.argv[1])
import torch
import kernel_cost as kc
import ltroute.kernels.fusion as kf
from triton.compiler import ASTSource  # noqa: F401
import triton
from triton.backends.compiler import GPUTarget

plan = kf._split_plan(8, 4, 3000)
assert plan is not None and plan[2] == 3, plan
stats_fn, stats_args, stats_flags, mix_fn, mix_args, mix_flags = kc._split_case(
    8, 4, 3000, torch.bfloat16, plan)
variants = [
    (stats_fn, stats_args, dict(stats_flags, HAS_T=True, HAS_REGION=False)),
    (mix_fn, mix_args, dict(mix_flags, HAS_T=True, HAS_SAMPLE=True, ENERGY_WEIGHTS=False)),
    (mix_fn, mix_args, dict(mix_flags, HAS_REGION=False, STORE_LOG_PROBS=False,
                            SAVE_STATS=False)),
]
for fn, args, flags in variants:
    triton.compile(kc._source(fn, args, flags), target=GPUTarget("cuda", 90, 64),
                   options={"num_warps": plan[3], "num_stages": 3})
print("ok")
"""


def test_split_kernels_compile_for_sm90_and_are_modelled():
    """The split-C forward kernels compile for sm_90 in their other feature variants
    (the interpreter does not compile), and kernel_cost.py models a split shape."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    probe = subprocess.run(
        [sys.executable, "-c", "import triton.backends.nvidia.compiler, triton.compiler"],
        env=env, capture_output=True)
    if probe.returncode != 0:
        pytest.skip("triton's sm_90 compiler is unavailable")
    compiled = subprocess.run([sys.executable, "-c", _SPLIT_VARIANTS, str(BENCH)], env=env,
                              capture_output=True, text=True, timeout=600)
    assert compiled.returncode == 0 and "ok" in compiled.stdout, compiled.stderr[-2000:]
    result = subprocess.run(
        [sys.executable, str(BENCH / "kernel_cost.py"), "--shapes", "8x4x3000", "--dtypes",
         "fp32", "--directions", "fwd", "--json"], env=env, capture_output=True, text=True,
        timeout=600)
    if result.returncode != 0 and "cuobjdump" in result.stderr:
        pytest.skip("cuobjdump unavailable")
    assert result.returncode == 0, result.stderr[-2000:]
    (row,) = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    config = row["config"]
    assert config["kernel"] == "split" and config["chunks"] == 3 and config["TILES"] == 1
    assert row["spill_bytes"] == 0 and row["registers"] > 0
    assert row["sass_instructions_per_element"] == pytest.approx(
        row["sass_per_thread"] * 32 * config["num_warps"] * config["chunks"] / (4 * 3000),
        rel=1e-3)


@pytest.mark.parametrize("argv", [["--dtypes", "float32"], ["--directions", "back"],
                                  ["--shapes", "64x3"]])
def test_kernel_cost_rejects_unknown_options_by_name(argv, capsys):
    """Bad options fail before anything compiles, naming the option (or the shape)."""
    import kernel_cost  # argument parsing needs no compiler

    with pytest.raises(SystemExit):
        kernel_cost.main(argv)
    err = capsys.readouterr().err
    assert argv[0] in err or "is not BxKxC" in err
