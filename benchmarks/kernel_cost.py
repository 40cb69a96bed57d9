"""Offline cost model of the Triton fusion kernels: compile for sm_90 on a CPU, read the SASS.

No GPU is needed. For every (shape, dtype, direction) this script compiles every config
the autotuner would keep (``kernels/fusion.py``'s pruner) with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 64))``, disassembles the
cubin with the ``cuobjdump`` that ships inside Triton, and reports

* ``registers`` and ``spill_bytes`` (``cuobjdump --dump-resource-usage``: REG and STACK);
* ``sass_instructions_per_element``: the dynamic SASS instruction count of one thread,
  times the threads of a program, divided by the ``K x C`` logits the program owns. Loops
  are found from backward branches in the SASS; each runs ``ceil(C / BLOCK_C)`` times
  (every loop of these kernels sweeps the class tiles). Predicated-off instructions still
  issue, so straight-line code counts in full; both ``if`` branches are counted, so this is
  an upper bound;
* the issue-bound time, ``warp instructions / (SMs x 4 schedulers x clock)`` (at least one
  warp's own instruction stream at one instruction per clock), against the memory-bound
  time, ``bytes / bandwidth``, where bytes are what the op must move once: ``Z`` read
  once, the float32 outputs (``P`` and ``log P`` (B, C); energy, weights and two saved
  statistics (B, K)) written; backward: ``Z`` and ``dL/dP`` read, ``dL/dZ`` written.

Latencies, occupancy limits, the L2 and the second pass over ``Z`` of the tiled path are not
modelled: the model says which bound a config hits first, not its run time. The compiled
variant is DQRoute's training call: region mask, ``weighting="energy"``,
``combine="prob"``, ``T = tau = 1``, ``log P`` returned, statistics saved; the backward
gets ``dL/dP`` only. The config reported per case is the one the model ranks first
(smallest ``max(issue, memory)`` time, spilling configs last).

Usage::

    python benchmarks/kernel_cost.py --shapes 65536x3x10,4096x8x1000 --json
    python benchmarks/kernel_cost.py --write        # the table in results/kernel_cost.md

Run it with the editable install and without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_SHAPES = "65536x3x10,8192x3x100,4096x8x1000,256x4x32000,4096x16x1000"
_DTYPE_BYTES = {"fp32": 4, "bf16": 2}


@dataclass
class Cost:
    """Model figures of one compiled config."""

    shape: list[int]
    dtype: str
    direction: str
    config: dict
    registers: int
    spill_bytes: int
    sass_static: int
    sass_per_thread: int
    sass_instructions_per_element: float
    sass_hot_path_per_element: float
    issue_us: float
    issue_hot_us: float
    memory_us: float
    bound: str
    fraction_of_bandwidth: float


def _cost(shape: list[int], dtype_name: str, direction: str, config: dict,
          compiled: tuple[int, int, int, int], per_element: float, hot_per_element: float,
          issue_us: float, hot_us: float, memory_us: float) -> Cost:
    """A :class:`Cost` from one compiled config (``compiled``: registers, spill bytes,
    static and dynamic SASS counts); the bound is judged on the hot path."""
    registers, spill, static, dynamic = compiled
    return Cost(
        shape=shape, dtype=dtype_name, direction=direction, config=config,
        registers=registers, spill_bytes=spill, sass_static=static, sass_per_thread=dynamic,
        sass_instructions_per_element=round(per_element, 2),
        sass_hot_path_per_element=round(hot_per_element, 2),
        issue_us=round(issue_us, 2), issue_hot_us=round(hot_us, 2),
        memory_us=round(memory_us, 2),
        bound="issue" if hot_us > memory_us else "memory",
        fraction_of_bandwidth=round(min(1.0, memory_us / hot_us), 3))


def _triton():
    if os.environ.get("TRITON_INTERPRET"):
        raise RuntimeError("kernel_cost.py compiles for sm_90: unset TRITON_INTERPRET.")
    import ltroute.kernels.fusion as kf
    import torch
    import triton
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource

    return torch, triton, kf, ASTSource, GPUTarget, BaseBackend


def _specialize(backend_cls, value, specialize: bool = True):
    """Triton's own launch-time specialisation of one argument: (type, "D"/"" hint).

    ``specialize=False`` for a ``do_not_specialize`` parameter (no value 1, no alignment).
    """
    from triton._C.libtriton import native_specialize_impl

    return native_specialize_impl(backend_cls, value, False,
                                  specialize and not isinstance(value, float), specialize)


def _source(fn, args: tuple, flags: dict):
    torch, triton, kf, ASTSource, GPUTarget, BaseBackend = _triton()
    signature, attrs, constants = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in flags or i >= len(args):  # a flag, or a constexpr left at its default
            signature[name] = "constexpr"
            constants[name] = flags[name] if name in flags else fn.params[i].default
            continue
        ty, spec = _specialize(BaseBackend, args[i], not fn.params[i].do_not_specialize)
        if ty == "constexpr":
            signature[name] = "constexpr"
            constants[name] = spec
        else:
            signature[name] = ty
            if spec == "D":
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, signature, constants, attrs)


def _fwd_case(B: int, K: int, C: int, dtype):
    """Arguments of a forward launch (tiny tensors: only dtypes and strides matter)."""
    torch, _, kf, *_ = _triton()
    # Strides of the real (B, K, C) tensor without allocating it.
    Z = torch.empty_strided((B, K, C), (K * C, C, 1), dtype=dtype, device="meta")
    probs = torch.empty(1, C)
    energy = torch.empty(1, K)
    stats = torch.empty(1, 2, K)
    region = torch.ones(K, C, dtype=torch.uint8)
    args = (Z, *Z.stride(), region, *region.stride(), probs, 0, 0, probs, probs, energy,
            energy, stats, stats.stride(0), energy, K, C, 1.0, 1.0)
    flags = dict(HAS_REGION=True, HAS_SAMPLE=False, ENERGY_WEIGHTS=True, PROB_COMBINE=True,
                 HAS_T=False, STORE_LOG_PROBS=True, SAVE_STATS=True, BLOCK_K=kf._block_k(K))
    return kf._fusion_fwd_kernel, args, flags


def _bwd_case(B: int, K: int, C: int, dtype):
    torch, _, kf, *_ = _triton()
    Z = torch.empty_strided((B, K, C), (K * C, C, 1), dtype=dtype, device="meta")
    stats = torch.empty(1, 2, K)
    grad_p = torch.empty_strided((B, C), (C, 1), device="meta")
    region = torch.ones(K, C, dtype=torch.uint8)
    args = (Z, *Z.stride(), region, *region.stride(), stats, 0, 0, stats, stats.stride(0),
            stats, grad_p, *grad_p.stride(), stats, 0, 0, stats, 0, 0, stats, 0, 0,
            Z, *Z.stride(), K, C, 1.0, 1.0)
    flags = dict(HAS_REGION=True, HAS_SAMPLE=False, ENERGY_WEIGHTS=True, PROB_COMBINE=True,
                 HAS_T=False, HAS_GRAD_PROBS=True, HAS_GRAD_LOG_PROBS=False,
                 HAS_GRAD_ENERGY=False, HAS_GRAD_WEIGHTS=False, NEEDS_G=True,
                 BLOCK_K=kf._block_k(K))
    return kf._fusion_bwd_kernel, args, flags


def _kept_configs(direction: str, K: int, C: int, dtype) -> list:
    torch, _, kf, *_ = _triton()
    max_tile = kf._MAX_TILE_FWD if direction == "fwd" else kf._MAX_TILE_BWD
    prune = kf._make_pruner(max_tile)
    z = torch.empty(0, dtype=dtype, device="meta")
    return prune(kf._configs(), {"BLOCK_K": kf._block_k(K), "n_classes": C, "z_ptr": z})


def _cuobjdump(cubin: bytes, *flags: str) -> str:
    _, triton, *_ = _triton()
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        return subprocess.run([str(tool), *flags, path], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(path)


_SASS_LINE = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?);")


def sass_counts(sass: str, n_tiles: int) -> tuple[int, int]:
    """(static, dynamic) instruction counts of one thread (NOPs excluded).

    A branch to an earlier address closes a loop that runs ``n_tiles`` times.
    """
    instructions = []  # (address, text)
    for line in sass.splitlines():
        match = _SASS_LINE.match(line)
        if match:
            instructions.append((int(match.group(1), 16), match.group(2).strip()))
    real = [(a, t) for a, t in instructions if not re.sub(r"^@!?U?P\w+\s+", "", t)
            .startswith("NOP")]
    static = len(real)
    dynamic = static
    for address, text in real:
        target = re.search(r"\bBRA\b.*?`?\(?\.?L?_?x?_?(0x[0-9a-f]+)", text)
        if "BRA" not in text.split()[0 if not text.startswith("@") else 1] or target is None:
            continue
        dest = int(target.group(1), 16)
        if dest < address:
            body = sum(1 for a, _ in real if dest <= a <= address)
            dynamic += body * (n_tiles - 1)
    return static, dynamic


def _rows_case(direction: str, B: int, K: int, C: int, dtype):
    """Arguments of a multi-row launch: the row kernel's, with (B, 1) for (K, C)."""
    torch, triton, kf, *_ = _triton()
    fn, args, flags = (_fwd_case if direction == "fwd" else _bwd_case)(B, K, C, dtype)
    args = (*args[:-4], B, 1, *args[-2:])
    flags = {k: v for k, v in flags.items() if k != "BLOCK_K"}
    flags.update(WIDE=False, N_EXPERTS=K, N_CLASSES=C, BLOCK_C=triton.next_power_of_2(C))
    rows_fn = kf._fusion_fwd_rows_kernel if direction == "fwd" else kf._fusion_bwd_rows_kernel
    return rows_fn, args, flags


def _split_case(B: int, K: int, C: int, dtype, plan: tuple):
    """Arguments of the two split-C forward launches (statistics, then mixture)."""
    torch, _, kf, *_ = _triton()
    block_c, tiles, n_chunks, _ = plan
    block_k = kf._block_k(K)
    Z = torch.empty_strided((B, K, C), (K * C, C, 1), dtype=dtype, device="meta")
    partial = torch.empty(1, n_chunks, 4, block_k)
    probs = torch.empty(1, C)
    energy = torch.empty(1, K)
    stats = torch.empty(1, 2, K)
    region = torch.ones(K, C, dtype=torch.uint8)
    blocks = dict(BLOCK_K=block_k, BLOCK_C=block_c, TILES=tiles)
    stats_args = (Z, *Z.stride(), region, *region.stride(), partial, K, C, n_chunks, 1.0)
    stats_flags = dict(HAS_REGION=True, HAS_T=False, **blocks)
    mix_args = (Z, *Z.stride(), region, *region.stride(), probs, 0, 0, partial, probs, probs,
                energy, energy, stats, stats.stride(0), K, C, n_chunks, 1.0, 1.0)
    mix_flags = dict(HAS_REGION=True, HAS_SAMPLE=False, ENERGY_WEIGHTS=True, HAS_T=False,
                     STORE_LOG_PROBS=True, SAVE_STATS=True,
                     BLOCK_N=max(2, 1 << (n_chunks - 1).bit_length()), **blocks)
    return (kf._fusion_fwd_split_stats_kernel, stats_args, stats_flags,
            kf._fusion_fwd_split_mix_kernel, mix_args, mix_flags)


def _uses_rows(direction: str, K: int, C: int) -> bool:
    _, _, kf, *_ = _triton()
    return kf._use_rows(K, C, kf._MAX_ROW_FWD if direction == "fwd" else kf._MAX_ROW_BWD)


def _kept_rows_configs(direction: str, K: int, C: int) -> list:
    _, triton, kf, *_ = _triton()
    per_thread = kf._ROWS_PER_THREAD_FWD if direction == "fwd" else kf._ROWS_PER_THREAD_BWD
    prune = kf._make_rows_pruner(per_thread)
    return prune(kf._rows_configs(), {"N_EXPERTS": K, "BLOCK_C": triton.next_power_of_2(C)})


def _compile(fn, args: tuple, flags: dict, warps: int, n_tiles: int) -> tuple[int, int, int, int]:
    """(registers, spill bytes, static, dynamic SASS count of one thread) of one config."""
    _, triton, _, _, GPUTarget, _ = _triton()
    compiled = triton.compile(_source(fn, args, flags), target=GPUTarget("cuda", 90, 64),
                              options={"num_warps": warps, "num_stages": 3})
    cubin = compiled.asm["cubin"]
    usage = _cuobjdump(cubin, "--dump-resource-usage")
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    spill = int(re.search(r"STACK:(\d+)", usage).group(1))
    static, dynamic = sass_counts(_cuobjdump(cubin, "-sass"), n_tiles)
    return registers, spill, static, dynamic


def measure(shape: tuple[int, int, int], dtype_name: str, direction: str, *,
            sms: int, clock_ghz: float, bandwidth_tbs: float) -> list[Cost]:
    """Compile every kept config of one case and return its model figures.

    Where ``fuse_experts`` dispatches to the multi-row kernel (small K x C), its configs;
    otherwise the one-row kernel's. A multi-row kernel is compiled twice: as launched
    (``sass_instructions_per_element``: both sides of its underflow fallback counted) and
    without the fallback (``sass_hot_path_per_element``: the instructions it runs when no
    class probability of its rows is under 2**-100, the branch being skipped).
    """
    torch, triton, kf, *_ = _triton()
    B, K, C = shape
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    elt = _DTYPE_BYTES[dtype_name]
    if direction == "fwd":
        n_bytes = B * K * C * elt + 2 * B * C * 4 + 4 * B * K * 4
    else:
        n_bytes = 2 * B * K * C * elt + B * C * 4
    memory_us = n_bytes / (bandwidth_tbs * 1e12) * 1e6

    def issue_time(programs: int, warps: int, dynamic: int) -> float:
        warp_instructions = programs * warps * dynamic
        return 1e6 * max(warp_instructions / (sms * 4 * clock_ghz * 1e9),
                         dynamic / (clock_ghz * 1e9))

    costs = []
    if _uses_rows(direction, K, C):
        fn, args, flags = _rows_case(direction, B, K, C, dtype)
        for config in _kept_rows_configs(direction, K, C):
            block_b, warps = config.kwargs["BLOCK_B"], config.num_warps
            run = dict(flags, BLOCK_B=block_b)
            registers, spill, static, dynamic = _compile(fn, args, run, warps, 1)
            *_, hot = _compile(fn, args, dict(run, UNDERFLOW_FALLBACK=False), warps, 1)
            programs = math.ceil(B / block_b)
            per_row = 32 * warps / (block_b * K * C)
            issue_us = issue_time(programs, warps, dynamic)
            hot_us = issue_time(programs, warps, hot)
            costs.append(_cost(
                [B, K, C], dtype_name, direction,
                {"kernel": "rows", "BLOCK_B": block_b, "BLOCK_C": flags["BLOCK_C"],
                 "num_warps": warps, "single_tile": True},
                (registers, spill, static, dynamic), dynamic * per_row, hot * per_row,
                issue_us, hot_us, memory_us))
        return costs
    fn, args, flags = (_fwd_case if direction == "fwd" else _bwd_case)(B, K, C, dtype)
    plan = kf._split_plan(B, K, C) if direction == "fwd" else None
    if plan is not None:
        block_c, tiles, n_chunks, warps = plan
        stats_fn, stats_args, stats_flags, mix_fn, mix_args, mix_flags = _split_case(
            B, K, C, dtype, plan)
        registers, spill, static, dynamic = _compile(stats_fn, stats_args, stats_flags, warps,
                                                     tiles)
        mix = _compile(mix_fn, mix_args, mix_flags, warps, tiles)
        registers, spill = max(registers, mix[0]), max(spill, mix[1])
        static, dynamic = static + mix[2], dynamic + mix[3]
        per_element = dynamic * 32 * warps * n_chunks / (K * C)
        issue_us = issue_time(B * n_chunks, warps, dynamic)
        costs.append(_cost(
            [B, K, C], dtype_name, direction,
            {"kernel": "split", "BLOCK_C": block_c, "TILES": tiles, "chunks": n_chunks,
             "num_warps": warps, "single_tile": False},
            (registers, spill, static, dynamic), per_element, per_element,
            issue_us, issue_us, memory_us))
        return costs
    for config in _kept_configs(direction, K, C, dtype):
        block_c, warps = config.kwargs["BLOCK_C"], config.num_warps
        single = C <= block_c
        n_tiles = 1 if single else math.ceil(C / block_c)
        registers, spill, static, dynamic = _compile(
            fn, args, dict(flags, BLOCK_C=block_c, SINGLE_TILE=single), warps, n_tiles)
        per_element = dynamic * 32 * warps / (K * C)
        issue_us = issue_time(B, warps, dynamic)
        costs.append(_cost(
            [B, K, C], dtype_name, direction,
            {"kernel": "row", "BLOCK_C": block_c, "num_warps": warps, "single_tile": single},
            (registers, spill, static, dynamic), per_element, per_element,
            issue_us, issue_us, memory_us))
    return costs


def best(costs: list[Cost]) -> Cost:
    """The config the model ranks first: no spills, then the smallest bound time of the
    path that runs (the hot path of a multi-row kernel)."""
    return min(costs, key=lambda c: (c.spill_bytes > 0, max(c.issue_hot_us, c.memory_us),
                                     c.sass_instructions_per_element))


def markdown_table(rows: list[Cost]) -> str:
    lines = ["| shape (B,K,C) | dtype | dir | config | regs | spill B | SASS/elt | "
             "SASS/elt hot | issue us (hot) | memory us | bound | % of BW |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cfg = r.config
        if cfg["kernel"] == "rows":
            label = f"rows {cfg['BLOCK_B']} x {cfg['BLOCK_C']}, {cfg['num_warps']} w"
        elif cfg["kernel"] == "split":
            label = (f"split {cfg['chunks']} x {cfg['TILES']} x {cfg['BLOCK_C']}, "
                     f"{cfg['num_warps']} w")
        else:
            label = f"row {cfg['BLOCK_C']}, {cfg['num_warps']} w"
        lines.append(
            f"| {'x'.join(map(str, r.shape))} | {r.dtype} | {r.direction} | {label} | "
            f"{r.registers} | {r.spill_bytes} | {r.sass_instructions_per_element:.1f} | "
            f"{r.sass_hot_path_per_element:.1f} | {r.issue_hot_us:.1f} | "
            f"{r.memory_us:.1f} | {r.bound} | {100 * r.fraction_of_bandwidth:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES,
                        help="comma-separated BxKxC (default: %(default)s)")
    parser.add_argument("--dtypes", default="fp32,bf16",
                        help="comma-separated, of fp32, bf16 (default: %(default)s)")
    parser.add_argument("--directions", default="fwd,bwd",
                        help="comma-separated, of fwd, bwd (default: %(default)s)")
    parser.add_argument("--sms", type=int, default=132, help="SM count (H200: 132)")
    parser.add_argument("--clock-ghz", type=float, default=1.98, help="SM clock (H200 boost)")
    parser.add_argument("--bandwidth-tbs", type=float, default=4.8, help="HBM TB/s (H200)")
    parser.add_argument("--json", action="store_true",
                        help="one JSON object per (shape, dtype, direction): the chosen config")
    parser.add_argument("--all-configs", action="store_true",
                        help="with --json, one object per compiled config")
    parser.add_argument("--write", metavar="LABEL", nargs="?", const="current",
                        help="append the table to benchmarks/results/kernel_cost.md")
    args = parser.parse_args(argv)
    shapes = [tuple(int(x) for x in s.lower().split("x")) for s in args.shapes.split(",")]
    for shape in shapes:
        if len(shape) != 3 or min(shape) < 1:
            parser.error(f"shape {shape} is not BxKxC with positive sizes")
    for option, given, known in (("--dtypes", args.dtypes, {"fp32", "bf16"}),
                                 ("--directions", args.directions, {"fwd", "bwd"})):
        unknown = sorted(set(given.split(",")) - known)
        if unknown:
            parser.error(f"{option}: unknown {unknown}; choose from {sorted(known)}")
    model = dict(sms=args.sms, clock_ghz=args.clock_ghz, bandwidth_tbs=args.bandwidth_tbs)
    chosen = []
    for shape in shapes:
        for dtype_name in args.dtypes.split(","):
            for direction in args.directions.split(","):
                costs = measure(shape, dtype_name, direction, **model)
                pick = best(costs)
                chosen.append(pick)
                if args.json:
                    for cost in (costs if args.all_configs else [pick]):
                        print(json.dumps(asdict(cost)), flush=True)
    if not args.json:
        print(markdown_table(chosen))
    if args.write:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _provenance import provenance_header

        path = Path(__file__).resolve().parent / "results" / "kernel_cost.md"
        header = provenance_header(f"Fusion kernel offline cost model: {args.write}")
        text = (header + f"Model: sm_90, {args.sms} SMs x 4 schedulers at {args.clock_ghz} "
                f"GHz, {args.bandwidth_tbs} TB/s HBM (H200). No GPU was used: compiled "
                "offline, figures from the SASS.\n\n" + markdown_table(chosen) + "\n")
        previous = path.read_text() if path.exists() else ""
        path.write_text(previous + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
