"""Speed of ``fuse_experts``: Triton kernel vs eager and ``torch.compile``-d PyTorch reference.

For each ``B x K x C`` (up to 65536 x 8 x 1000; ``--quick``: ltroute's four typical shapes)
and dtype, first checks every implementation against a float64 reference on the first rows
(``--quick`` and the default grid alike; the script exits with status 1 on a mismatch,
before anything is timed), then times the forward pass and the forward + backward pass of

* ``kernel``: ``fuse_experts(..., backend="triton")`` (CUDA only),
* ``eager``: the PyTorch reference ``fuse_experts_reference``,
* ``compile``: ``torch.compile(fuse_experts_reference)``,

with ``triton.testing.do_bench`` (median, L2 flushed between runs; inputs rotated among
copies when they would fit in cache), and reports the kernel's effective bandwidth --
bytes that must be read and written once (the logits of ``Z`` inside the region mask --
the kernel's masked loads skip the others -- and the upstream gradient in; ``P``,
``log P``, ``E``, ``W`` or the whole ``dZ`` out) divided by the time -- against the
device-to-device copy bandwidth measured here (``dst.copy_(src)`` of 1 GiB). Inputs larger
than 4 GiB are refused unless ``--allow-large``.

Without CUDA the script still runs, on small sizes and the reference only (eager and
compiled, timed with a wall clock), labelled CPU: a smoke test of the script, not a kernel
measurement.

The table (markdown) goes to stdout with the command, date, machine, GPU and versions;
``--out FILE`` also writes it to a file, and ``--write-results`` (CUDA only) writes it as
the ``fusion`` section of ``benchmarks/RESULTS.md``.

Usage::

    python benchmarks/bench_fusion.py                      # default grid (GPU) or CPU smoke
    python benchmarks/bench_fusion.py --quick              # <= 3 minutes on one GPU
    python benchmarks/bench_fusion.py --dtype bf16 --combine logit --out fusion_bf16.md
    python benchmarks/bench_fusion.py --sizes 65536x8x8192 --no-compile
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import ltroute.fusion as _fusion

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _provenance import provenance_header, write_fragment  # noqa: E402

from ltroute.fusion import fuse_experts, fuse_experts_reference  # noqa: E402

GPU_SIZES = [(65536, 3, 10), (8192, 3, 100), (4096, 3, 100), (16384, 3, 1000),
             (65536, 3, 1000), (65536, 8, 100), (4096, 8, 1000), (65536, 8, 1000),
             (256, 4, 32000), (8192, 8, 8192)]
QUICK_SIZES = [(65536, 3, 10), (8192, 3, 100), (4096, 8, 1000), (256, 4, 32000)]
CPU_SIZES = [(256, 3, 100), (1024, 3, 1000), (4096, 8, 100)]
CPU_QUICK_SIZES = [(256, 3, 10), (64, 8, 100)]
MAX_Z_BYTES = 4 * 2**30
GATE_ROWS = 256  # rows checked against the float64 reference before timing
# Outputs are float32 (compiled kernels use fast exp/log); dZ is rounded to Z's dtype.
GATE_RTOL = 1e-4
GATE_GRAD_RTOL = {torch.float32: 1e-4, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


class CorrectnessError(RuntimeError):
    """An implementation disagrees with the float64 reference: nothing is timed."""
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ROTATE_BYTES = 256 * 2**20  # rotate copies of inputs smaller than this
COPY_BYTES = 2**30


def parse_size(text: str) -> tuple[int, int, int]:
    try:
        b, k, c = (int(v) for v in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected BxKxC, got {text!r}") from exc
    return b, k, c


# ---------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------


def time_ms(fn: Callable[[], object], device: str, grad_to_none=None) -> float:
    """Median milliseconds of ``fn``: ``do_bench`` on CUDA, a wall clock on the CPU."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, grad_to_none=grad_to_none,
                                             return_mode="median"))
    fn()  # warm-up (and compilation)
    times = []
    deadline = time.perf_counter() + 1.0
    while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 100):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device: str) -> float:
    """Measured copy bandwidth in GB/s (bytes read + written / time)."""
    n_bytes = COPY_BYTES if device == "cuda" else COPY_BYTES // 8
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * n_bytes / ms / 1e6


# ---------------------------------------------------------------------------------------
# One benchmark row
# ---------------------------------------------------------------------------------------


def make_inputs(B, K, C, dtype, device, copies, masks):
    g = torch.Generator(device=device).manual_seed(0)
    Zs = [torch.randn(B, K, C, generator=g, device=device).mul_(3).to(dtype)
          for _ in range(copies)]
    region = None
    if masks:  # DQRoute-style nested regions: expert k covers the classes from k*C/K on
        start = (torch.arange(K, device=device) * C) // K
        region = torch.arange(C, device=device)[None, :] >= start[:, None]
    grad = torch.randn(B, C, generator=g, device=device)
    return Zs, region, grad


def io_bytes(B, K, C, dtype, *, backward: bool, log_probs: bool,
             region: torch.Tensor | None = None) -> int:
    """Bytes the op must move at least once (the roofline numerator).

    Only the logits inside ``region`` (K, C) are read: the kernel's masked loads skip the
    rest. ``dZ`` is written whole (zeros outside the regions).
    """
    elt = torch.finfo(dtype).bits // 8
    read_z = B * (K * C if region is None else int(region.sum())) * elt
    fwd = read_z + B * C * 4 * (2 if log_probs else 1) + 2 * B * K * 4
    if not backward:
        return fwd
    return fwd + B * C * 4 + B * K * C * elt  # read the upstream gradient, write dZ


def gate(implementations: dict, Z: torch.Tensor, kwargs: dict) -> list[str]:
    """Mismatches of each implementation against the float64 reference on ``Z``.

    Forward outputs and ``dL/dZ`` for the upstream gradient ``dL/dP = 1`` are compared with
    a tolerance relative to the largest magnitude (``GATE_RTOL``; ``GATE_GRAD_RTOL`` for
    ``dZ``, which is rounded to ``Z``'s dtype).
    """
    z64 = Z.detach().double().requires_grad_()
    expected = _fusion.fuse_experts_reference(z64, **kwargs)
    (grad64,) = torch.autograd.grad(expected.probs.sum(), z64)
    problems = []
    for name, impl in implementations.items():
        z = Z.detach().clone().requires_grad_()
        try:
            out = impl(z)
            (grad,) = torch.autograd.grad(out.probs.sum(), z)
        except Exception as exc:  # noqa: BLE001 - a crash is a failed gate too
            problems.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        pairs = [(field, getattr(out, field), getattr(expected, field))
                 for field in ("probs", "energy", "weights", "log_probs")]
        pairs.append(("dZ", grad, grad64))
        for field, actual, ref in pairs:
            if ref is None:
                continue
            rtol = GATE_GRAD_RTOL[Z.dtype] if field == "dZ" else GATE_RTOL
            actual = actual.detach().double()
            ref = ref.detach()
            finite = torch.isfinite(ref)
            scale = max(1.0, float(ref[finite].abs().max()) if finite.any() else 1.0)
            same_inf = torch.equal(torch.isfinite(actual), finite)
            err = float((actual[finite] - ref[finite]).abs().max()) if finite.any() else 0.0
            if not same_inf or not err <= rtol * scale:
                problems.append(f"{name}: {field} differs from the float64 reference by "
                                f"{err:.3g} (allowed {rtol * scale:.3g})")
    return problems


def bench_row(B, K, C, dtype, device, options, providers, log):
    elt_bytes = B * K * C * (torch.finfo(dtype).bits // 8)
    copies = min(8, max(1, -(-ROTATE_BYTES // elt_bytes))) if device == "cuda" else 1
    Zs, region, grad = make_inputs(B, K, C, dtype, device, copies, options["masks"])
    kwargs = {"region_mask": region, "weighting": options["weighting"],
              "combine": options["combine"], "energy_temperature": options["T"],
              "return_log_probs": True}
    implementations = {
        "kernel": lambda z: fuse_experts(z, backend="triton", check_masks=False, **kwargs),
        "eager": lambda z: fuse_experts_reference(z, **kwargs),
    }
    if "compile" in providers:
        torch._dynamo.reset()
        compiled = torch.compile(fuse_experts_reference, dynamic=False)
        implementations["compile"] = lambda z: compiled(z, **kwargs)
    problems = gate({n: f for n, f in implementations.items() if n in providers},
                    Zs[0][:GATE_ROWS], kwargs)
    if problems:
        raise CorrectnessError(f"{B}x{K}x{C} {dtype}: " + "; ".join(problems))
    row = {}
    probs = {}
    for name, impl in implementations.items():
        if name not in providers:
            continue
        state = {"i": 0}

        def next_z(requires_grad, state=state):
            z = Zs[state["i"] % copies]
            state["i"] += 1
            return z.requires_grad_(requires_grad)

        def forward(impl=impl, next_z=next_z):
            with torch.no_grad():
                return impl(next_z(False))

        def forward_backward(impl=impl, next_z=next_z):
            out = impl(next_z(True))
            out.probs.backward(grad)

        try:
            out = forward()
            if name != "compile":
                probs[name] = out.probs.float()
            del out
            row[f"{name}_fwd"] = time_ms(forward, device)
            row[f"{name}_fwdbwd"] = time_ms(forward_backward, device, grad_to_none=Zs)
        except torch.OutOfMemoryError:
            row[f"{name}_fwd"] = row.get(f"{name}_fwd", "OOM")
            row[f"{name}_fwdbwd"] = "OOM"
        except Exception as exc:  # noqa: BLE001 - report and keep the table going
            log(f"  {name} failed at {B}x{K}x{C}: {type(exc).__name__}: {exc}")
            row.setdefault(f"{name}_fwd", "failed")
            row.setdefault(f"{name}_fwdbwd", "failed")
        for z in Zs:
            z.requires_grad_(False)
            z.grad = None
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    if "kernel" in probs and "eager" in probs:
        row["max_dp"] = float((probs["kernel"] - probs["eager"]).abs().max())
    row["read_region"] = None if region is None else region.cpu()
    return row


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def _fmt(value, digits=3):
    if isinstance(value, str):
        return value
    if value is None:
        return "-"
    return f"{value:.{digits}f}"


def _ratio(a, b):
    if isinstance(a, float) and isinstance(b, float) and a > 0:
        return f"{b / a:.2f}x"
    return "-"


def render(rows, device, copy_gbs, providers, header):
    unit = "GPU" if device == "cuda" else "CPU"
    lines = [header]
    lines.append(f"- device: **{unit}**"
                 + ("" if device == "cuda" else " (no CUDA: reference only, a smoke test of "
                    "this script, not a kernel measurement)"))
    lines.append(f"- measured copy bandwidth ({unit}, `dst.copy_(src)`): {copy_gbs:.0f} GB/s")
    lead = "kernel" if "kernel" in providers else "eager"
    lines.append(f"- times: median ms; GB/s: bytes read + written once / {lead} time"
                 + ("; speed-ups: reference time / kernel time" if lead == "kernel" else "")
                 + "\n")
    cols = ["B", "K", "C", "dtype"]
    for phase in ("fwd", "fwdbwd"):
        cols += [f"{p} {phase} ms" for p in providers]
    if "kernel" in providers:
        cols += ["kernel fwd GB/s", "% copy", "fwd vs eager", "fwd vs compile",
                 "fwd+bwd GB/s", "fwd+bwd vs eager", "max abs dP"]
    else:
        cols += ["eager fwd GB/s", "% copy"]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "---|" * len(cols))
    for (B, K, C, dtype_name, log_probs), row in rows:
        dtype = DTYPES[dtype_name]
        cells = [str(B), str(K), str(C), dtype_name]
        for phase in ("fwd", "fwdbwd"):
            cells += [_fmt(row.get(f"{p}_{phase}")) for p in providers]
        t_fwd = row.get(f"{lead}_fwd")
        region = row.get("read_region")
        gbs = (io_bytes(B, K, C, dtype, backward=False, log_probs=log_probs, region=region)
               / t_fwd / 1e6
               if isinstance(t_fwd, float) else None)
        cells += [_fmt(gbs, 1), _fmt(None if gbs is None else 100 * gbs / copy_gbs, 0)]
        if "kernel" in providers:
            t_fb = row.get("kernel_fwdbwd")
            gbs_fb = (io_bytes(B, K, C, dtype, backward=True, log_probs=log_probs,
                               region=region) / t_fb / 1e6
                      if isinstance(t_fb, float) else None)
            cells += [_ratio(t_fwd, row.get("eager_fwd")),
                      _ratio(t_fwd, row.get("compile_fwd")),
                      _fmt(gbs_fb, 0), _ratio(t_fb, row.get("eager_fwdbwd")),
                      _fmt(row.get("max_dp"), 8)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=parse_size, nargs="+", default=None,
                        help="BxKxC sizes (default: a grid up to 65536x8x1000 on CUDA, "
                             "small ones on the CPU)")
    parser.add_argument("--quick", action="store_true",
                        help="four typical shapes, fp32 only unless --dtype (<= 3 min, GPU)")
    parser.add_argument("--allow-large", action="store_true",
                        help=f"allow Z larger than {MAX_Z_BYTES // 2**30} GiB")
    parser.add_argument("--dtype", choices=sorted(DTYPES), nargs="+", default=None,
                        help="default: fp32 and bf16 (fp32 with --quick)")
    parser.add_argument("--weighting", choices=["energy", "uniform"], default="energy")
    parser.add_argument("--combine", choices=["prob", "logit"], default="prob")
    parser.add_argument("--energy-temperature", type=float, default=1.0)
    parser.add_argument("--no-masks", action="store_true", help="no region mask")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    parser.add_argument("--write-results", action="store_true",
                        help="write the table as the 'fusion' section of RESULTS.md (CUDA)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.write_results and device != "cuda":
        parser.error("--write-results records GPU measurements; no CUDA device is present")
    if args.quick:
        sizes = args.sizes or (QUICK_SIZES if device == "cuda" else CPU_QUICK_SIZES)
    else:
        sizes = args.sizes or (GPU_SIZES if device == "cuda" else CPU_SIZES)
    dtypes = args.dtype or (["fp32"] if args.quick else ["fp32", "bf16"])
    for B, K, C in sizes:
        largest = B * K * C * max(torch.finfo(DTYPES[d]).bits // 8 for d in dtypes)
        if largest > MAX_Z_BYTES and not args.allow_large:
            parser.error(f"{B}x{K}x{C} needs a {largest / 2**30:.1f} GiB Z; pass --allow-large")
    providers = (["kernel"] if device == "cuda" else []) + ["eager"]
    if not args.no_compile:
        providers.append("compile")
    options = {"weighting": args.weighting, "combine": args.combine,
               "T": args.energy_temperature, "masks": not args.no_masks}

    def log(message):
        print(message, file=sys.stderr, flush=True)

    copy_gbs = copy_bandwidth(device)
    log(f"copy bandwidth ({device}): {copy_gbs:.0f} GB/s")
    rows = []
    for dtype_name in dtypes:
        for B, K, C in sizes:
            log(f"{B}x{K}x{C} {dtype_name} ...")
            try:
                row = bench_row(B, K, C, DTYPES[dtype_name], device, options, providers, log)
            except CorrectnessError as exc:
                log(f"CORRECTNESS GATE FAILED, nothing timed: {exc}")
                return 1
            rows.append(((B, K, C, dtype_name, True), row))

    header = provenance_header("Fusion kernel: fuse_experts", argv=[sys.argv[0], *(
        sys.argv[1:] if argv is None else argv)])
    extra = [f"- options: weighting={args.weighting}, combine={args.combine}, "
             f"T={args.energy_temperature}, region mask={'no' if args.no_masks else 'nested'}, "
             "log P returned"]
    try:
        import triton

        extra.append(f"- triton {triton.__version__}"
                     + (f", CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}"
                        if device == "cuda" else ""))
    except ImportError:
        extra.append("- triton not installed")
    text = render(rows, device, copy_gbs, providers, header + "\n".join(extra) + "\n")
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    if args.write_results:
        write_fragment("fusion", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
