"""Triton kernels for :func:`ltroute.fusion.fuse_experts` (forward and backward).

Layout of this module, top-down: small ``@triton.jit`` helpers, the forward kernel, the
backward kernel, then the host launchers that allocate outputs, pick the block sizes and
launch. The public entry point is ``ltroute.fusion.fuse_experts``; this module is private
and imported lazily (Triton is a Linux-only dependency).

Design
------
Two kernel families share one contract and one set of saved statistics.

**Multi-row kernels** (``_fusion_fwd_rows_kernel`` / ``_fusion_bwd_rows_kernel``) take
every shape whose row fits in registers (``K x next_pow2(C) <= 8192``, the common case:
(65536, 3, 10), (8192, 3, 100), (4096, 8, 1000)). A program handles ``BLOCK_B`` rows;
``K`` and ``C`` are compile-time constants, the experts are unrolled and each is a
(BLOCK_C, BLOCK_B) tile with the rows along the lanes (inner strides are not specialised
on the value 1, or Triton would put the lanes along C and replicate every per-row
quantity on them), so a thread owns whole rows, or a slice of C of a few rows: the
per-expert reductions run in its registers, the mixture over experts is elementwise, the
padding of its rows folds away at compile time, and the per-row work (routing weights,
statistics, stores) is paid once per row. The region mask is loaded once per program,
offsets are int32 unless a tensor needs int64 (``WIDE``), guards act on per-row vectors,
and each logit costs one ``exp``: ``combine="prob"`` mixes the probabilities
``exp(z - m_k) / d_k`` the log-sum-exp already computed, ``P_c = sum_k (W_k / d_k)
e_kc``, and the backward rebuilds the responsibilities from the same ``e_kc``. A class
whose ``P_c`` falls under ``2**-100`` (where terms may have underflowed) is recomputed in
log space, as the reference computes it, in a branch taken only by programs holding such
a class. ``exp`` and ``log`` are ``ex2.approx.ftz`` / ``lg2.approx.ftz`` (one MUFU
instruction each; a subnormal ``exp`` flushes to 0, which the fallback covers).

**One-row kernels** (``_fusion_fwd_kernel`` / ``_fusion_bwd_kernel``, larger rows): one
program per row of ``Z`` keeps all ``K`` experts of a tile of ``BLOCK_C`` classes in
registers as a ``(BLOCK_K, BLOCK_C)`` block, so per-expert reductions run along axis 1
and per-class reductions (the mixture over experts) along axis 0.

* ``SINGLE_TILE`` (``C <= BLOCK_C``): the row is loaded once and every output is computed
  from registers; this is the one-pass path.
* Otherwise the row is tiled along ``C``: a first sweep keeps an online log-sum-exp per
  expert (running max and rescaled sum), the weights follow from the energies, and a
  second sweep writes ``P`` (``combine="prob"``). ``combine="logit"`` stages the combined
  logits in the output buffer during that sweep and normalises them in a third sweep over
  ``B x C`` values (far fewer than the ``B x K x C`` logits).

**Split-C forward** (``_fusion_fwd_split_stats_kernel`` / ``_fusion_fwd_split_mix_kernel``,
``combine="prob"`` only): a row too large for the multi-row kernels and too few rows to
fill the GPU (256 x 4 x 32000: 256 one-row programs; 8 rows: 8 programs) are split into
chunks of ``TILES x BLOCK_C`` classes, one program per (row, chunk). The first kernel
stores each chunk's partial log-sum-exp statistics per expert (raw max, sum of
``exp(x - max)``, at T and at 1); the second merges a row's chunks in every program of
the row (a few numbers per chunk, NaN-propagating max as above), derives energies and
weights with the one-row kernel's code, writes ``P`` / ``log P`` over its own chunk as the
one-row kernel's second sweep does, and its chunk-0 program stores energies, weights and
the statistics in the one-row kernel's layout, so the backward is the one-row kernel's,
unchanged. ``_split_plan`` picks it by shape; ``combine="logit"`` (which needs the global
max and sum of the combined logits too) keeps the one-row kernel.

Feature switches (region mask, sample mask, weighting, combine, ``T != 1``, optional
outputs, which upstream gradients exist) are ``tl.constexpr`` flags, so every variant
compiles to its own branch-free kernel. In the one-row kernels row offsets are int64 and
column offsets are widened to int64 before they are multiplied by a stride, so tensors
with more than ``2**31`` elements, or exotic strides, are addressed correctly. ``Z`` is
read through its strides: no ``.contiguous()`` copy is ever made.

Non-finite logits follow the reference: the log-sum-exp shift is a NaN-propagating max,
so an expert's energy is exact (NaN if its region holds a NaN, ``-inf`` for ``+inf``), and
a NaN or ``+inf`` where an active expert covers makes the row's ``P``/``log P`` NaN.
A ``-inf`` logit rules its class out: ``P = 0`` there, and with ``combine="logit"`` the
class's combined logit is ``-inf`` (only experts with ``W_k > 0`` enter the sum) while
it is left out of the weights' gradient (``sum_c M Z G``, ``sum_c M Z P`` use 0 for it),
so every gradient stays finite and equal to the reference's.

Cost (read offline, without a GPU)
----------------------------------
``benchmarks/kernel_cost.py`` compiles these kernels for sm_90 on a CPU
(``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 64))``), reads registers,
spills and the SASS with the ``cuobjdump`` shipped in Triton, and compares an issue-bound
time (SASS instructions x threads / (SMs x 4 schedulers x clock)) with the memory-bound
time of the bytes the op must move. On an H200 (132 SMs, 1.98 GHz, 4.8 TB/s) a kernel
stays memory-bound below about 28 (fp32) / 14 (bf16) SASS instructions per logit, plus
the output traffic. The one-row design was issue-bound at every shape that matters (431 /
120 / 63 instructions per logit, fp32 forward, at (65536,3,10) / (8192,3,100) /
(4096,8,1000)). The multi-row kernels run about 28-31 per logit there (fp32 forward, the
path without the underflow fallback; 52-56 counting the fallback's branch too, which the
model cannot rule out) and 45-56 backward (95-102 with the fallback). What remains, from
the SASS: per logit a load and its 64-bit address (the strides are runtime values), a
NaN-propagating max, ``(z - m) * log2 e`` and ``ex2``, the sum, the mixture's FMA and a
select for the region mask (about 10 instructions, times BLOCK_C / C for the class
padding: 1.6 at C = 10), plus per row the routing softmax over K, two ``div`` / ``lg2``
per expert, the stores of ``P``, ``log P``, energies, weights and statistics (about 6 per
logit at K x C = 30). The backward adds the upstream gradient's load, ``G / P`` per
class, two multiplies and an FMA per logit, and the store of ``dZ`` with its own address.
Rows too large for the multi-row kernels (K = 16 with C = 1000; C = 32000) stay on the
one-row kernels, except the forward of ``combine="prob"`` with few rows, which the split-C
kernels take: 44 instructions per logit at (256, 4, 32000) (one-row kernel: 56) over
2048 programs instead of 256, and at (8, 4, 32000) 51 over 256 programs instead of 83
over 8 (offline, fp32). Table and analysis:
``benchmarks/results/kernel_cost.md``.

Saved for backward (float32, a few numbers per row): for every expert the shift ``m``
(running max) and sum ``d = sum exp(x - m)`` of its log-sum-exp at temperature T, and at
temperature 1 too when ``combine="prob"`` and ``T != 1``; for ``combine="logit"`` the same
pair for the combined logits. The backward pass rebuilds each softmax as
``exp(x - m) / d`` (as PyTorch's backward does; ``exp(x - lse)`` would lose digits for
large logits) and recomputes the weights from ``log(d) + m`` with the same code as the
forward pass, so they are bit-identical. Everything else is recomputed from ``Z``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _is_interpreted_early() -> bool:
    """Whether Triton's own ``tl`` functions run in the interpreter (see ``_INTERPRETED``)."""
    return type(tl.max).__name__ == "InterpretedFunction"


# Largest (BLOCK_K x BLOCK_C) block one program keeps in registers, in elements.
_MAX_TILE_FWD = 16384
_MAX_TILE_BWD = 8192

# Tests set this (monkeypatch) to force a block size, e.g. to exercise tiling at small C.
_BLOCK_C_OVERRIDE: int | None = None


# ---------------------------------------------------------------------------------------
# jit helpers
# ---------------------------------------------------------------------------------------


@triton.jit
def _active_experts(sample_ptr, row, stride_sb, stride_sk, offs_k, k_in,
                    HAS_SAMPLE: tl.constexpr):
    """Boolean (BLOCK_K,) vector: expert exists and is active for this row."""
    if HAS_SAMPLE:
        flags = tl.load(sample_ptr + row * stride_sb + offs_k.to(tl.int64) * stride_sk,
                        mask=k_in, other=0)
        active = k_in & (flags != 0)
    else:
        active = k_in
    return active


@triton.jit
def _valid_block(region_ptr, stride_rk, stride_rc, offs_k, k_in, offs_c, n_classes,
                 HAS_REGION: tl.constexpr):
    """Boolean (BLOCK_K, BLOCK_C) block: in bounds, expert selected by ``k_in``, in region."""
    valid = k_in[:, None] & (offs_c < n_classes)[None, :]
    if HAS_REGION:
        flags = tl.load(region_ptr + offs_k.to(tl.int64)[:, None] * stride_rk
                        + offs_c.to(tl.int64)[None, :] * stride_rc, mask=valid, other=0)
        valid = valid & (flags != 0)
    return valid


@triton.jit
def _load_logits(z_row_ptr, stride_zk, stride_zc, offs_k, offs_c, mask,
                 EVICT: tl.constexpr = ""):
    """Load a (BLOCK_K, BLOCK_C) block of logits as float32; ``-inf`` where masked.

    ``EVICT`` is the cache hint of the tiled path, which reads a row of Z more than once:
    ``"evict_last"`` on a pass that is read again (keep the row in L2), ``"evict_first"``
    on its last pass; ``""`` (the default) where Z is read once."""
    ptrs = (z_row_ptr + offs_k.to(tl.int64)[:, None] * stride_zk
            + offs_c.to(tl.int64)[None, :] * stride_zc)
    return tl.load(ptrs, mask=mask, other=float("-inf"),
                   eviction_policy=EVICT).to(tl.float32)


@triton.jit
def _max_nan_combine(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _max_nan(x, axis: tl.constexpr):
    """``max`` along ``axis`` that returns ``NaN`` if the slice holds one (as ``amax``).

    ``tl.max`` (``fmax``) skips ``NaN``; the log-sum-exp shift must not, so that a ``NaN``
    logit gives a ``NaN`` energy and ``+inf`` (without ``NaN``) an exact ``+inf``.
    """
    return tl.reduce(x, axis, _max_nan_combine)


@triton.jit
def _safe_max(m):
    """The running max with ``-inf`` (nothing seen) replaced by 0, as the shift to use."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _rows_max_sum(x):
    """Shift ``m`` (safe row max) and ``d = sum exp(x - m)`` along axis 1 (``-inf`` masked)."""
    m = _safe_max(_max_nan(x, 1))
    d = tl.sum(tl.exp(x - m[:, None]), axis=1)
    return m, d


@triton.jit
def _online_max_sum(m, d, x):
    """One tile of the online log-sum-exp: running max ``m`` and rescaled sum ``d``."""
    m_new = tl.maximum(m, _max_nan(x, 1), propagate_nan=tl.PropagateNan.ALL)
    shift = _safe_max(m_new)
    d = d * tl.exp(m - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)
    return m_new, d


@triton.jit
def _lse(m, d):
    """``log(d) + m``; ``-inf`` for an empty sum; ``m`` itself when it is ``+inf``/``NaN``.

    ``m`` is the shift from :func:`_max_nan`: ``NaN`` if the slice holds a ``NaN``, else
    ``+inf`` if it holds ``+inf`` (``d`` is ``NaN`` then, from ``inf - inf``).
    """
    lse = tl.where(d > 0, tl.log(tl.where(d > 0, d, 1.0)) + m, float("-inf"))
    return tl.where(m < float("inf"), lse, m)


@triton.jit
def _poisoned(lse_1, active):
    """Whether an active expert's region holds a ``NaN`` or ``+inf`` logit (one row).

    The row's ``P`` and ``log P`` are then ``NaN``, as in the reference: a ``NaN`` must
    never turn into a plausible probability (``P = 0`` of an uncovered class included).
    """
    bad = active & ~(lse_1 < float("inf"))
    return tl.max(bad.to(tl.int32), axis=0) > 0


@triton.jit
def _softmax_block(x, m, d, mask):
    """``exp(x - m) / d`` per row where ``mask``, else 0 (the derivative of the lse)."""
    d_safe = tl.where(d > 0, d, 1.0)
    return tl.where(mask, tl.exp(x - m[:, None]) / d_safe[:, None], 0.0)


@triton.jit
def _routing_weights(energy, active, routing_temperature, ENERGY_WEIGHTS: tl.constexpr):
    """Weights and log-weights of one row; zero / ``-inf`` for inactive experts."""
    if ENERGY_WEIGHTS:
        scores = tl.where(active, -energy / routing_temperature, float("-inf"))
        shifted = scores - tl.max(scores, axis=0)
        log_w = shifted - tl.log(tl.sum(tl.exp(shifted), axis=0))
        log_w = tl.where(active, log_w, float("-inf"))
        w = tl.where(active, tl.exp(log_w), 0.0)
    else:
        n_active = tl.sum(active.to(tl.float32), axis=0)
        w = tl.where(active, 1.0 / n_active, 0.0)
        log_w = tl.where(active, tl.log(tl.where(active, w, 1.0)), float("-inf"))
    return w, log_w


@triton.jit
def _mixture_log_probs(z, contrib, log_w, lse_1):
    """``log P`` of one tile for ``combine="prob"`` (log-space mixture over experts).

    Returns the per-class ``log P`` and the per-(expert, class) terms
    ``log W_k + (Z_kc - lse1_k)`` (``-inf`` where expert k does not contribute).
    """
    log_w_safe = tl.where(log_w == float("-inf"), 0.0, log_w)
    lse_1_safe = tl.where(lse_1 == float("-inf"), 0.0, lse_1)
    terms = tl.where(contrib, log_w_safe[:, None] + (z - lse_1_safe[:, None]), float("-inf"))
    m = _safe_max(tl.max(terms, axis=0))
    total = tl.sum(tl.exp(terms - m[None, :]), axis=0)
    log_p = tl.where(total > 0, tl.log(tl.where(total > 0, total, 1.0)) + m, float("-inf"))
    return log_p, terms


@triton.jit
def _responsibilities(terms, log_p, contrib):
    """``r_kc = W_k p_kc / P_c`` from the log-space terms; 0 where k does not contribute."""
    log_p_safe = tl.where(log_p == float("-inf"), 0.0, log_p)
    return tl.where(contrib, tl.exp(terms - log_p_safe[None, :]), 0.0)


@triton.jit
def _weighted_logits(z, contrib, w):
    """``s_c = sum_k W_k M_kc Z_kc`` of one tile for ``combine="logit"``.

    Only experts with ``W_k > 0`` enter the sum, so a ``-inf`` logit makes its class
    ``-inf`` (as in the reference) and never meets a zero weight (``0 * -inf = NaN``).
    """
    return tl.sum(w[:, None] * tl.where(contrib & (w > 0)[:, None], z, 0.0), axis=0)


@triton.jit
def _finite_below(z, contrib):
    """``M_kc Z_kc`` with ``-inf`` logits replaced by 0, for the weights' gradient.

    A ``-inf`` logit rules its class out (``P_c = 0``): like the reference, it must not
    enter ``sum_c M Z G`` / ``sum_c M Z P`` as ``-inf * 0 = NaN``.
    """
    return tl.where(contrib & (z > float("-inf")), z, 0.0)


@triton.jit
def _live_class_grad(g, log_p):
    """``G_c`` with 0 for classes ruled out by a ``-inf`` logit (``log P_c = -inf``).

    The reference masks such a class after the combination, so no gradient flows through
    it into the weights or the other experts' logits of that class.
    """
    return tl.where(log_p > float("-inf"), g, 0.0)


@triton.jit
def _logit_log_probs(z, contrib, w, m_s, log_d_s, c_in):
    """``log P = (s - m_s) - log d_s`` of one tile for ``combine="logit"``; ``-inf`` past C."""
    s = _weighted_logits(z, contrib, w)
    return tl.where(c_in, (s - m_s) - log_d_s, float("-inf"))


@triton.jit
def _store_probs(probs_ptrs, log_probs_ptrs, log_p, mask, poisoned,
                 STORE_LOG_PROBS: tl.constexpr):
    """Store ``P = exp(log P)`` (and ``log P``); ``NaN`` for a poisoned row."""
    log_p = tl.where(poisoned, float("nan"), log_p)
    tl.store(probs_ptrs, tl.exp(log_p), mask=mask)
    if STORE_LOG_PROBS:
        tl.store(log_probs_ptrs, log_p, mask=mask)


@triton.jit
def _upstream_class_grad(grad_probs_row, stride_gpc, grad_log_probs_row, stride_glc,
                         offs_c, c_in, log_p,
                         HAS_GRAD_PROBS: tl.constexpr, HAS_GRAD_LOG_PROBS: tl.constexpr):
    """``G_c = dL/dlogP_c = gL_c + gP_c * P_c`` for one tile (0 outside the row)."""
    g = tl.zeros_like(log_p)
    if HAS_GRAD_LOG_PROBS:
        g += tl.load(grad_log_probs_row + offs_c.to(tl.int64) * stride_glc, mask=c_in,
                     other=0.0).to(tl.float32)
    if HAS_GRAD_PROBS:
        gp = tl.load(grad_probs_row + offs_c.to(tl.int64) * stride_gpc, mask=c_in,
                     other=0.0).to(tl.float32)
        g += tl.where(c_in, gp * tl.exp(log_p), 0.0)
    return g


@triton.jit
def _grad_block(z, valid, contrib, g, log_p, terms, w, m_t, d_t, m_1, d_1,
                grad_energy_total, red_prob, sum_g, energy_temperature,
                PROB_COMBINE: tl.constexpr, HAS_T: tl.constexpr, NEEDS_G: tl.constexpr):
    """``dL/dZ`` of one (BLOCK_K, BLOCK_C) block.

    ``-gE_k q_kc`` (energy path, ``q`` the region softmax at temperature T), plus for
    ``combine="prob"`` ``G_c r_kc - p_kc R_k`` and for ``combine="logit"``
    ``W_k M_kc (G_c - P_c sum G)``.
    """
    if HAS_T:
        q = _softmax_block(z / energy_temperature, m_t, d_t, valid)
    else:
        q = _softmax_block(z, m_t, d_t, valid)
    dz = -grad_energy_total[:, None] * q
    if NEEDS_G:
        if PROB_COMBINE:
            resp = _responsibilities(terms, log_p, contrib)
            if HAS_T:
                p_1 = _softmax_block(z, m_1, d_1, contrib)
            else:
                p_1 = tl.where(contrib, q, 0.0)
            dz += g[None, :] * resp - p_1 * red_prob[:, None]
        else:
            grad_s = _live_class_grad(g, log_p) - tl.exp(log_p) * sum_g
            dz += tl.where(contrib, w[:, None] * grad_s[None, :], 0.0)
    return dz


# ---------------------------------------------------------------------------------------
# Forward kernel
# ---------------------------------------------------------------------------------------


@triton.jit
def _fusion_fwd_kernel(
    z_ptr, stride_zb, stride_zk, stride_zc,
    region_ptr, stride_rk, stride_rc,
    sample_ptr, stride_sb, stride_sk,
    probs_ptr, log_probs_ptr, energy_ptr, weights_ptr,
    row_stats_ptr, stride_stats, class_stats_ptr,
    n_experts, n_classes,
    energy_temperature, routing_temperature,
    HAS_REGION: tl.constexpr,
    HAS_SAMPLE: tl.constexpr,
    ENERGY_WEIGHTS: tl.constexpr,
    PROB_COMBINE: tl.constexpr,
    HAS_T: tl.constexpr,
    STORE_LOG_PROBS: tl.constexpr,
    SAVE_STATS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
):
    """Fused energies, routing weights and combined probabilities of one row of ``Z``.

    Parameters
    ----------
    z_ptr, stride_zb, stride_zk, stride_zc
        Logits ``Z`` (B, K, C) in float32/float16/bfloat16 and their element strides.
    region_ptr, stride_rk, stride_rc
        ``region_mask`` (K, C) as uint8 and its strides; unused unless ``HAS_REGION``.
    sample_ptr, stride_sb, stride_sk
        ``sample_mask`` (B, K) as uint8 and its strides; unused unless ``HAS_SAMPLE``.
    probs_ptr, log_probs_ptr
        Contiguous float32 (B, C) outputs; ``log_probs`` only if ``STORE_LOG_PROBS``.
        With ``combine="logit"`` and tiling, ``probs`` also stages the combined logits.
    energy_ptr, weights_ptr
        Contiguous float32 (B, K) outputs.
    row_stats_ptr, stride_stats, class_stats_ptr
        Statistics saved for the backward pass when ``SAVE_STATS``: per expert the shift
        ``m`` and the sum ``d = sum exp(x - m)`` of its log-sum-exp at temperature T, then
        (``combine="prob"`` with ``T != 1`` only) at temperature 1, as a contiguous
        (B, 2 or 4, K) tensor whose row stride is ``stride_stats``; for
        ``combine="logit"``, ``(m, d)`` of the combined logits, (B, 2).
    n_experts, n_classes
        ``K`` and ``C``.
    energy_temperature, routing_temperature
        ``T`` and ``tau``.
    HAS_REGION, HAS_SAMPLE, ENERGY_WEIGHTS, PROB_COMBINE, HAS_T, STORE_LOG_PROBS, SAVE_STATS
        Feature switches; ``HAS_T`` is ``T != 1`` (a second log-sum-exp is needed).
    BLOCK_K, BLOCK_C
        Block shape: ``BLOCK_K >= K`` (power of two), ``BLOCK_C`` classes per tile.
    SINGLE_TILE
        ``C <= BLOCK_C``: load the row once and keep it in registers.
    """
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_zb
    offs_k = tl.arange(0, BLOCK_K)
    k_in = offs_k < n_experts
    active = _active_experts(sample_ptr, row, stride_sb, stride_sk, offs_k, k_in, HAS_SAMPLE)

    # 1. Per-expert log-sum-exp over the region, at temperature T (energy) and 1 (softmax).
    if SINGLE_TILE:
        offs_c = tl.arange(0, BLOCK_C)
        valid = _valid_block(region_ptr, stride_rk, stride_rc, offs_k, k_in, offs_c, n_classes,
                             HAS_REGION)
        z = _load_logits(z_row, stride_zk, stride_zc, offs_k, offs_c, valid)
        if HAS_T:
            m_t, d_t = _rows_max_sum(z / energy_temperature)
        else:
            m_t, d_t = _rows_max_sum(z)
        if HAS_T and PROB_COMBINE:
            m_1, d_1 = _rows_max_sum(z)
        else:
            m_1, d_1 = m_t, d_t
    else:
        m_t = tl.full([BLOCK_K], float("-inf"), tl.float32)
        d_t = tl.zeros([BLOCK_K], tl.float32)
        m_1 = tl.full([BLOCK_K], float("-inf"), tl.float32)
        d_1 = tl.zeros([BLOCK_K], tl.float32)
        for c0 in range(0, n_classes, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            valid = _valid_block(region_ptr, stride_rk, stride_rc, offs_k, k_in, offs_c,
                                 n_classes, HAS_REGION)
            z = _load_logits(z_row, stride_zk, stride_zc, offs_k, offs_c, valid,
                             "evict_last")  # read again by the combination pass
            if HAS_T:
                m_t, d_t = _online_max_sum(m_t, d_t, z / energy_temperature)
                if PROB_COMBINE:
                    m_1, d_1 = _online_max_sum(m_1, d_1, z)
            else:
                m_t, d_t = _online_max_sum(m_t, d_t, z)
        m_t = _safe_max(m_t)
        if HAS_T and PROB_COMBINE:
            m_1 = _safe_max(m_1)
        else:
            m_1, d_1 = m_t, d_t
    lse_t = _lse(m_t, d_t)
    lse_1 = _lse(m_1, d_1)
    poisoned = _poisoned(lse_1, active)

    # 2. Energies and routing weights (K values).
    energy = -energy_temperature * lse_t
    w, log_w = _routing_weights(energy, active, routing_temperature, ENERGY_WEIGHTS)
    out_k = row * n_experts + offs_k
    tl.store(energy_ptr + out_k, energy, mask=k_in)
    tl.store(weights_ptr + out_k, w, mask=k_in)
    if SAVE_STATS:
        stats_row = row_stats_ptr + row * stride_stats + offs_k
        tl.store(stats_row, m_t, mask=k_in)
        tl.store(stats_row + n_experts, d_t, mask=k_in)
        if HAS_T and PROB_COMBINE:
            tl.store(stats_row + 2 * n_experts, m_1, mask=k_in)
            tl.store(stats_row + 3 * n_experts, d_1, mask=k_in)

    # 3. Combination.
    probs_row = probs_ptr + row * n_classes
    log_probs_row = log_probs_ptr + row * n_classes
    if SINGLE_TILE:
        c_in = offs_c < n_classes
        contrib = valid & active[:, None]
        if PROB_COMBINE:
            log_p, terms = _mixture_log_probs(z, contrib, log_w, lse_1)
        else:
            s = tl.where(c_in, _weighted_logits(z, contrib, w), float("-inf"))
            m_s = tl.max(s, axis=0)
            d_s = tl.sum(tl.exp(s - m_s), axis=0)
            log_p = (s - m_s) - tl.log(d_s)
            if SAVE_STATS:
                tl.store(class_stats_ptr + 2 * row, m_s)
                tl.store(class_stats_ptr + 2 * row + 1, d_s)
        _store_probs(probs_row + offs_c, log_probs_row + offs_c, log_p, c_in, poisoned,
                     STORE_LOG_PROBS)
    else:
        if PROB_COMBINE:
            for c0 in range(0, n_classes, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                c_in = offs_c < n_classes
                contrib = _valid_block(region_ptr, stride_rk, stride_rc, offs_k, active, offs_c,
                                       n_classes, HAS_REGION)
                z = _load_logits(z_row, stride_zk, stride_zc, offs_k, offs_c, contrib,
                                 "evict_first")  # the last read of this row
                log_p, terms = _mixture_log_probs(z, contrib, log_w, lse_1)
                _store_probs(probs_row + offs_c, log_probs_row + offs_c, log_p, c_in,
                             poisoned, STORE_LOG_PROBS)
        else:
            # Stage s = sum_k W_k M_k Z_k in the probs buffer while reducing its lse ...
            m_s = float("-inf")
            d_s = 0.0
            for c0 in range(0, n_classes, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                c_in = offs_c < n_classes
                contrib = _valid_block(region_ptr, stride_rk, stride_rc, offs_k, active, offs_c,
                                       n_classes, HAS_REGION)
                z = _load_logits(z_row, stride_zk, stride_zc, offs_k, offs_c, contrib,
                                 "evict_first")  # the last read of this row
                s = _weighted_logits(z, contrib, w)
                tl.store(probs_row + offs_c, s, mask=c_in)
                s = tl.where(c_in, s, float("-inf"))
                m_new = tl.maximum(m_s, tl.max(s, axis=0))
                d_s = d_s * tl.exp(m_s - m_new) + tl.sum(tl.exp(s - m_new), axis=0)
                m_s = m_new
            log_d_s = tl.log(d_s)
            if SAVE_STATS:
                tl.store(class_stats_ptr + 2 * row, m_s)
                tl.store(class_stats_ptr + 2 * row + 1, d_s)
            tl.debug_barrier()
            # ... then normalise it in place (each thread rereads what it wrote).
            for c0 in range(0, n_classes, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                c_in = offs_c < n_classes
                s = tl.load(probs_row + offs_c, mask=c_in, other=float("-inf"))
                _store_probs(probs_row + offs_c, log_probs_row + offs_c, (s - m_s) - log_d_s,
                             c_in, poisoned, STORE_LOG_PROBS)


# ---------------------------------------------------------------------------------------
# Backward kernel
# ---------------------------------------------------------------------------------------


@triton.jit
def _fusion_bwd_kernel(
    z_ptr, stride_zb, stride_zk, stride_zc,
    region_ptr, stride_rk, stride_rc,
    sample_ptr, stride_sb, stride_sk,
    row_stats_ptr, stride_stats, class_stats_ptr,
    grad_probs_ptr, stride_gpb, stride_gpc,
    grad_log_probs_ptr, stride_glb, stride_glc,
    grad_energy_ptr, stride_geb, stride_gek,
    grad_weights_ptr, stride_gwb, stride_gwk,
    grad_z_ptr, stride_dzb, stride_dzk, stride_dzc,
    n_experts, n_classes,
    energy_temperature, routing_temperature,
    HAS_REGION: tl.constexpr,
    HAS_SAMPLE: tl.constexpr,
    ENERGY_WEIGHTS: tl.constexpr,
    PROB_COMBINE: tl.constexpr,
    HAS_T: tl.constexpr,
    HAS_GRAD_PROBS: tl.constexpr,
    HAS_GRAD_LOG_PROBS: tl.constexpr,
    HAS_GRAD_ENERGY: tl.constexpr,
    HAS_GRAD_WEIGHTS: tl.constexpr,
    NEEDS_G: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
):
    """Gradient of ``(P, E, W, log P)`` with respect to one row of ``Z``.

    With ``G_c = gL_c + gP_c P_c`` (upstream gradient of ``log P``; ``P = exp(log P)``):

    * ``combine="prob"``: ``r_kc = W_k p_kc / P_c`` (responsibility, computed in log
      space), ``R_k = sum_c G_c r_kc``; then ``dZ_kc += G_c r_kc - p_kc R_k`` and the
      gradient reaching ``log W_k`` is ``R_k``.
    * ``combine="logit"``: ``g_c = G_c - P_c sum_c G_c``; ``dZ_kc += W_k M_kc g_c`` and the
      gradient reaching ``W_k`` is ``sum_c M_kc Z_kc g_c``.
    * ``weighting="energy"``: with ``gW`` / ``gLW`` the total gradients reaching ``W`` /
      ``log W``, the routing scores ``s_k = -E_k / tau`` get
      ``gs_k = W_k (gW_k - sum_j W_j gW_j) + gLW_k - W_k sum_j gLW_j``, and
      ``gE_k <- gE_k - gs_k / tau``.
    * Energy: ``dE_k / dZ_kc = -q_kc`` (region softmax at temperature T), so
      ``dZ_kc -= gE_k q_kc``.

    The pointer arguments mirror :func:`_fusion_fwd_kernel`; ``grad_*`` are the upstream
    gradients with their strides (any strides, zero included) and ``grad_z`` the output
    (Z's dtype). ``HAS_GRAD_*`` mark which upstream gradients exist; ``NEEDS_G`` is
    ``HAS_GRAD_PROBS or HAS_GRAD_LOG_PROBS``. Softmaxes are rebuilt as ``exp(x - m) / d``
    from the saved shift and sum, as PyTorch's own backward does, rather than
    ``exp(x - lse)``, which loses digits when the logits are large.
    """
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_zb
    grad_z_row = grad_z_ptr + row * stride_dzb
    grad_probs_row = grad_probs_ptr + row * stride_gpb
    grad_log_probs_row = grad_log_probs_ptr + row * stride_glb
    offs_k = tl.arange(0, BLOCK_K)
    k_in = offs_k < n_experts
    active = _active_experts(sample_ptr, row, stride_sb, stride_sk, offs_k, k_in, HAS_SAMPLE)

    stats_row = row_stats_ptr + row * stride_stats + offs_k
    m_t = tl.load(stats_row, mask=k_in, other=0.0)
    d_t = tl.load(stats_row + n_experts, mask=k_in, other=0.0)
    if HAS_T and PROB_COMBINE:
        m_1 = tl.load(stats_row + 2 * n_experts, mask=k_in, other=0.0)
        d_1 = tl.load(stats_row + 3 * n_experts, mask=k_in, other=0.0)
    else:
        m_1, d_1 = m_t, d_t
    lse_1 = _lse(m_1, d_1)
    if PROB_COMBINE:
        m_s = 0.0
        log_d_s = 0.0
    else:
        m_s = tl.load(class_stats_ptr + 2 * row)
        log_d_s = tl.log(tl.load(class_stats_ptr + 2 * row + 1))
    energy = -energy_temperature * _lse(m_t, d_t)
    w, log_w = _routing_weights(energy, active, routing_temperature, ENERGY_WEIGHTS)

    # Pass A: per-expert reductions over the classes of G (only if log P / P get gradients).
    red_prob = tl.zeros([BLOCK_K], tl.float32)  # prob: R_k = sum_c G_c r_kc
    red_zg = tl.zeros([BLOCK_K], tl.float32)  # logit: sum_c M Z G
    red_zp = tl.zeros([BLOCK_K], tl.float32)  # logit: sum_c M Z P
    sum_g = 0.0
    if SINGLE_TILE:
        offs_c = tl.arange(0, BLOCK_C)
        c_in = offs_c < n_classes
        valid = _valid_block(region_ptr, stride_rk, stride_rc, offs_k, k_in, offs_c, n_classes,
                             HAS_REGION)
        contrib = valid & active[:, None]
        z = _load_logits(z_row, stride_zk, stride_zc, offs_k, offs_c, valid)
        if NEEDS_G:
            if PROB_COMBINE:
                log_p, terms = _mixture_log_probs(z, contrib, log_w, lse_1)
            else:
                log_p = _logit_log_probs(z, contrib, w, m_s, log_d_s, c_in)
                terms = z
            g = _upstream_class_grad(grad_probs_row, stride_gpc, grad_log_probs_row,
                                     stride_glc, offs_c, c_in, log_p, HAS_GRAD_PROBS,
                                     HAS_GRAD_LOG_PROBS)
            if PROB_COMBINE:
                resp = _responsibilities(terms, log_p, contrib)
                red_prob += tl.sum(resp * g[None, :], axis=1)
            else:
                zm = _finite_below(z, contrib)
                red_zg += tl.sum(zm * _live_class_grad(g, log_p)[None, :], axis=1)
                red_zp += tl.sum(zm * tl.exp(log_p)[None, :], axis=1)
                sum_g += tl.sum(g, axis=0)
        else:
            log_p = tl.zeros([BLOCK_C], tl.float32)
            terms = z
            g = log_p
    else:
        if NEEDS_G:
            for c0 in range(0, n_classes, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                c_in = offs_c < n_classes
                contrib = _valid_block(region_ptr, stride_rk, stride_rc, offs_k, active, offs_c,
                                       n_classes, HAS_REGION)
                z = _load_logits(z_row, stride_zk, stride_zc, offs_k, offs_c, contrib,
                                 "evict_last")  # read again by pass B
                if PROB_COMBINE:
                    log_p, terms = _mixture_log_probs(z, contrib, log_w, lse_1)
                else:
                    log_p = _logit_log_probs(z, contrib, w, m_s, log_d_s, c_in)
                g = _upstream_class_grad(grad_probs_row, stride_gpc, grad_log_probs_row,
                                         stride_glc, offs_c, c_in, log_p, HAS_GRAD_PROBS,
                                         HAS_GRAD_LOG_PROBS)
                if PROB_COMBINE:
                    resp = _responsibilities(terms, log_p, contrib)
                    red_prob += tl.sum(resp * g[None, :], axis=1)
                else:
                    zm = _finite_below(z, contrib)
                    red_zg += tl.sum(zm * _live_class_grad(g, log_p)[None, :], axis=1)
                    red_zp += tl.sum(zm * tl.exp(log_p)[None, :], axis=1)
                    sum_g += tl.sum(g, axis=0)

    # Per-expert totals: gradient reaching E (directly and through the routing weights).
    grad_energy_total = tl.zeros([BLOCK_K], tl.float32)
    if HAS_GRAD_ENERGY:
        grad_energy_total += tl.load(grad_energy_ptr + row * stride_geb
                                     + offs_k.to(tl.int64) * stride_gek,
                                     mask=k_in, other=0.0).to(tl.float32)
    if ENERGY_WEIGHTS:
        grad_w = tl.zeros([BLOCK_K], tl.float32)
        if HAS_GRAD_WEIGHTS:
            grad_w += tl.load(grad_weights_ptr + row * stride_gwb
                              + offs_k.to(tl.int64) * stride_gwk,
                              mask=k_in, other=0.0).to(tl.float32)
        if NEEDS_G and not PROB_COMBINE:
            grad_w += red_zg - sum_g * red_zp
        grad_scores = w * (grad_w - tl.sum(w * grad_w, axis=0))
        if NEEDS_G and PROB_COMBINE:
            grad_scores += red_prob - w * tl.sum(red_prob, axis=0)
        grad_energy_total -= grad_scores / routing_temperature

    # Pass B: write dZ for every in-bounds entry (zeros outside the regions).
    if SINGLE_TILE:
        dz = _grad_block(z, valid, contrib, g, log_p, terms, w, m_t, d_t, m_1, d_1,
                         grad_energy_total, red_prob, sum_g, energy_temperature,
                         PROB_COMBINE, HAS_T, NEEDS_G)
        tl.store(grad_z_row + offs_k.to(tl.int64)[:, None] * stride_dzk
                 + offs_c.to(tl.int64)[None, :] * stride_dzc,
                 dz, mask=k_in[:, None] & c_in[None, :])
    else:
        for c0 in range(0, n_classes, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            c_in = offs_c < n_classes
            valid = _valid_block(region_ptr, stride_rk, stride_rc, offs_k, k_in, offs_c,
                                 n_classes, HAS_REGION)
            contrib = valid & active[:, None]
            z = _load_logits(z_row, stride_zk, stride_zc, offs_k, offs_c, valid,
                             "evict_first")  # the last read of this row
            if NEEDS_G:
                if PROB_COMBINE:
                    log_p, terms = _mixture_log_probs(z, contrib, log_w, lse_1)
                else:
                    log_p = _logit_log_probs(z, contrib, w, m_s, log_d_s, c_in)
                    terms = z
                g = _upstream_class_grad(grad_probs_row, stride_gpc, grad_log_probs_row,
                                         stride_glc, offs_c, c_in, log_p, HAS_GRAD_PROBS,
                                         HAS_GRAD_LOG_PROBS)
            else:
                log_p = tl.zeros([BLOCK_C], tl.float32)
                terms = z
                g = log_p
            dz = _grad_block(z, valid, contrib, g, log_p, terms, w, m_t, d_t, m_1, d_1,
                             grad_energy_total, red_prob, sum_g, energy_temperature,
                             PROB_COMBINE, HAS_T, NEEDS_G)
            tl.store(grad_z_row + offs_k.to(tl.int64)[:, None] * stride_dzk
                     + offs_c.to(tl.int64)[None, :] * stride_dzc,
                     dz, mask=k_in[:, None] & c_in[None, :])


# ---------------------------------------------------------------------------------------
# Multi-row kernels: BLOCK_B rows of a small K x C per program
# ---------------------------------------------------------------------------------------

# Below this a class's mixture probability may have lost digits to underflow (a term
# ``exp(z - m_k)`` under float32's smallest normal, 2**-126, with the sum still >= 2**-100
# is off by less than K * 2**-26 relative); such classes are recomputed in log space.
_TINY_PROB = tl.constexpr(7.888609052210118e-31)  # 2**-100

# Inner strides of the multi-row kernels are not specialised on the value 1: Triton would
# then lay the tiles out with lanes along C (the contiguous axis), which replicates every
# per-(row, expert) quantity on those lanes. Unspecialised, the rows axis is the fastest
# one: a thread owns whole rows (or a slice of C of them when C is large) and the
# per-expert reductions stay in its registers.
_ROWS_FWD_DNS = ["stride_zk", "stride_zc", "stride_rk", "stride_rc", "stride_sk", "unit"]
_ROWS_BWD_DNS = _ROWS_FWD_DNS + ["stride_gpc", "stride_glc", "stride_gek", "stride_gwk",
                                 "stride_dzk", "stride_dzc"]

# Compiled for a GPU, the multi-row kernels use ``ex2.approx.ftz`` (one MUFU instruction;
# Triton's ``tl.exp`` adds a range fix-up around it, three more instructions per logit)
# and ``div.full`` (approximate division). Under the interpreter, and on ROCm (the inline
# assembly is PTX): ``tl.exp``, ``tl.log`` and ``/``.
_FAST_MATH = tl.constexpr(not _is_interpreted_early() and torch.version.hip is None)
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _exp(x):
    """``exp(x)``: ``2**(x log2 e)`` with a subnormal result flushed to 0 when compiled."""
    if _FAST_MATH:
        y = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x * _LOG2E],
                                      dtype=tl.float32, is_pure=True, pack=1)
    else:
        y = tl.exp(x)
    return y


@triton.jit
def _log(x):
    """``log(x)`` as ``log2(x) ln 2`` (``lg2.approx.ftz``, one MUFU) when compiled."""
    if _FAST_MATH:
        y = tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=f,f", [x],
                                      dtype=tl.float32, is_pure=True, pack=1) * _LN2
    else:
        y = tl.log(x)
    return y


@triton.jit
def _rows_lse(m, d):
    """:func:`_lse` with :func:`_log`."""
    lse = tl.where(d > 0, _log(tl.where(d > 0, d, 1.0)) + m, float("-inf"))
    return tl.where(m < float("inf"), lse, m)


@triton.jit
def _opaque(x):
    """``x``, hidden from the compiler (an ``inline asm`` move) when compiled, so that
    values derived from it are recomputed rather than kept live from earlier uses."""
    if _FAST_MATH:
        y = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=tl.int32,
                                      is_pure=True, pack=1)
    else:
        y = x
    return y


@triton.jit
def _div(x, y):
    """``x / y`` to about 2 ulp (``div.full.f32`` when compiled)."""
    if _FAST_MATH:
        q = tl.fdiv(x, y, ieee_rounding=False)
    else:
        q = x / y
    return q


@triton.jit
def _row_ids(n_samples, BLOCK_B: tl.constexpr, WIDE: tl.constexpr):
    """Rows of this program (int64 if ``WIDE``, else int32) and their in-bounds mask."""
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_in = offs_b < n_samples
    if WIDE:
        offs_b = offs_b.to(tl.int64)
    return offs_b, b_in


@triton.jit
def _rows_load(src, k: tl.constexpr, rows, b_in, offs_c, c_in, HAS_REGION: tl.constexpr,
               HAS_SAMPLE: tl.constexpr):
    """Expert ``k`` of the program's rows; ``src`` is ``(z_ptr, stride_zb, stride_zk,
    stride_zc, region_ptr, stride_rk, stride_rc, sample_ptr, stride_sb, stride_sk)``.

    Returns the (BLOCK_C, BLOCK_B) logits as float32 (``-inf`` where not valid), their
    valid mask (in bounds and in the region), the (BLOCK_C,) region mask of the expert
    (loaded once per program) and the (BLOCK_B,) active flags.
    """
    z_ptr, stride_zb, stride_zk, stride_zc = src[0], src[1], src[2], src[3]
    region_ptr, stride_rk, stride_rc = src[4], src[5], src[6]
    sample_ptr, stride_sb, stride_sk = src[7], src[8], src[9]
    cb_in = c_in[:, None] & b_in[None, :]
    covers = c_in
    if HAS_REGION:
        flags = tl.load(region_ptr + k * stride_rk + offs_c * stride_rc, mask=c_in, other=0)
        covers = c_in & (flags != 0)
    valid = covers[:, None] & b_in[None, :]
    z = tl.load(z_ptr + (k * stride_zk + offs_c * stride_zc)[:, None]
                + (rows * stride_zb)[None, :], mask=valid, other=float("-inf")).to(tl.float32)
    if HAS_SAMPLE:
        active = b_in & (tl.load(sample_ptr + rows * stride_sb + k * stride_sk, mask=b_in,
                                 other=0) != 0)
    else:
        active = b_in
    return z, valid & cb_in, covers, active


@triton.jit
def _rows_exp_sum(x):
    """Per row: shift ``m`` (``-inf`` -> 0), ``e = exp(x - m)`` and its sum (axis 0)."""
    m = _safe_max(_max_nan(x, 0))
    e = _exp(x - m[None, :])
    return m, e, tl.sum(e, axis=0)


@triton.jit
def _rows_routing_weights(energy, active, routing_temperature, N_EXPERTS: tl.constexpr,
                          ENERGY_WEIGHTS: tl.constexpr):
    """:func:`_routing_weights` for tuples of per-expert (BLOCK_B,) energies and flags."""
    w = ()
    log_w = ()
    if ENERGY_WEIGHTS:
        inv_tau = 1.0 / routing_temperature
        scores = ()
        top = tl.full(energy[0].shape, float("-inf"), tl.float32)
        for k in tl.static_range(N_EXPERTS):
            scores = scores + (tl.where(active[k], -energy[k] * inv_tau, float("-inf")),)
            top = tl.maximum(top, scores[k])
        top = tl.where(top == float("-inf"), 0.0, top)
        total = tl.zeros_like(top)
        for k in tl.static_range(N_EXPERTS):
            total += tl.exp(scores[k] - top)
        log_total = _log(total)
        for k in tl.static_range(N_EXPERTS):
            lw = tl.where(active[k], (scores[k] - top) - log_total, float("-inf"))
            log_w = log_w + (lw,)
            w = w + (tl.where(active[k], tl.exp(lw), 0.0),)
    else:
        n_active = tl.zeros(energy[0].shape, tl.float32)
        for k in tl.static_range(N_EXPERTS):
            n_active += active[k].to(tl.float32)
        for k in tl.static_range(N_EXPERTS):
            wk = tl.where(active[k], 1.0 / n_active, 0.0)
            w = w + (wk,)
            log_w = log_w + (tl.where(active[k], _log(tl.where(active[k], wk, 1.0)),
                                      float("-inf")),)
    return w, log_w


@triton.jit
def _rows_log_mixture(src, rows, b_in, offs_c, c_in, log_w, lse_1, N_EXPERTS: tl.constexpr,
                      HAS_REGION: tl.constexpr, HAS_SAMPLE: tl.constexpr):
    """``log P`` of ``combine="prob"`` in log space (as :func:`_mixture_log_probs`) and
    the per-expert terms ``log W_k + Z_kc - lse1_k`` (tuples over the experts).

    The underflow fallback: it reloads the logits (from the cache) rather than keep them
    in registers through the fast path."""
    terms = ()
    contrib = ()
    top = tl.full([offs_c.shape[0], rows.shape[0]], float("-inf"), tl.float32)
    # Addresses recomputed here: kept live from the fast path they would cost registers.
    rows_again = _opaque(rows.to(tl.int32)).to(rows.dtype)
    offs_c_again = _opaque(offs_c)
    for k in tl.static_range(N_EXPERTS):
        z_k, valid_k, _, active_k = _rows_load(src, k, rows_again, b_in, offs_c_again, c_in,
                                               HAS_REGION, HAS_SAMPLE)
        contrib = contrib + (valid_k & active_k[None, :],)
        shift = (tl.where(log_w[k] == float("-inf"), 0.0, log_w[k])
                 - tl.where(lse_1[k] == float("-inf"), 0.0, lse_1[k]))
        terms = terms + (tl.where(contrib[k], shift[None, :] + z_k, float("-inf")),)
        top = tl.maximum(top, terms[k])
    top = _safe_max(top)
    total = tl.zeros_like(top)
    for k in tl.static_range(N_EXPERTS):
        total += _exp(terms[k] - top)
    log_p = tl.where(total > 0, _log(tl.where(total > 0, total, 1.0)) + top, float("-inf"))
    return log_p, terms, contrib


@triton.jit
def _rows_any(flags):
    """Whether a (BLOCK_C, BLOCK_B) boolean tile holds a ``True`` (a scalar)."""
    return tl.max(tl.max(flags.to(tl.int32), axis=1), axis=0) > 0


@triton.jit
def _rows_prob_mixture(src, rows, b_in, offs_c, c_in, e_1, d_1, w, log_w, lse_1, covers,
                       active, contrib, N_EXPERTS: tl.constexpr, HAS_REGION: tl.constexpr,
                       HAS_SAMPLE: tl.constexpr, UNDERFLOW_FALLBACK: tl.constexpr):
    """``P`` and ``log P`` of ``combine="prob"`` from ``e_1 = exp(z - m_1)`` (no new exp).

    ``P_c = sum_k (W_k / d_k) e_kc``; ``log P = log P_c``. Where a covered class has
    ``P_c < 2**-100`` its terms may have underflowed: if the tile holds such a class, its
    ``log P`` and ``P`` are recomputed in log space as the reference does
    (``UNDERFLOW_FALLBACK``; only the offline cost model turns it off, to count the
    instructions of the path taken when no probability is that small).
    Returns ``P``, ``log P``, the classes recomputed, and ``a_k = W_k / d_k``.
    """
    mix = tl.zeros(e_1[0].shape, tl.float32)
    covered = tl.zeros(e_1[0].shape, tl.int1)
    a = ()
    for k in tl.static_range(N_EXPERTS):
        a_k = tl.where(d_1[k] > 0, _div(w[k], tl.where(d_1[k] > 0, d_1[k], 1.0)), 0.0)
        a = a + (a_k,)
        if HAS_SAMPLE:  # an inactive expert's NaN must not reach the mixture
            mix += a_k[None, :] * tl.where(contrib[k], e_1[k], 0.0)
            covered = covered | (covers[k][:, None] & active[k][None, :])
        else:
            mix += a_k[None, :] * e_1[k]
            covered = covered | covers[k][:, None]
    log_p = _log(mix)
    need = (mix < _TINY_PROB) & covered & c_in[:, None]
    if UNDERFLOW_FALLBACK:
        if _rows_any(need):
            log_p_slow, _, _ = _rows_log_mixture(src, rows, b_in, offs_c, c_in, log_w, lse_1,
                                                 N_EXPERTS, HAS_REGION, HAS_SAMPLE)
            log_p = tl.where(need, log_p_slow, log_p)
            mix = tl.where(need, _exp(log_p_slow), mix)
    return mix, log_p, need, a


@triton.jit(do_not_specialize=_ROWS_FWD_DNS)
def _fusion_fwd_rows_kernel(
    z_ptr, stride_zb, stride_zk, stride_zc,
    region_ptr, stride_rk, stride_rc,
    sample_ptr, stride_sb, stride_sk,
    probs_ptr, log_probs_ptr, energy_ptr, weights_ptr,
    row_stats_ptr, stride_stats, class_stats_ptr,
    n_samples, unit,
    energy_temperature, routing_temperature,
    HAS_REGION: tl.constexpr,
    HAS_SAMPLE: tl.constexpr,
    ENERGY_WEIGHTS: tl.constexpr,
    PROB_COMBINE: tl.constexpr,
    HAS_T: tl.constexpr,
    STORE_LOG_PROBS: tl.constexpr,
    SAVE_STATS: tl.constexpr,
    WIDE: tl.constexpr,
    N_EXPERTS: tl.constexpr,
    N_CLASSES: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    UNDERFLOW_FALLBACK: tl.constexpr = True,
):
    """:func:`_fusion_fwd_kernel` for ``BLOCK_B`` whole rows per program (``C <= BLOCK_C``).

    Same arguments, except: ``n_samples`` (B); ``unit`` (the value 1, not specialised:
    the stride of the outputs' inner axes, see ``_ROWS_FWD_DNS``); ``WIDE`` (offsets in
    int64, else int32 when every offset fits); ``K`` and ``C`` are compile-time
    ``N_EXPERTS`` and ``N_CLASSES``: the experts are unrolled, each a (BLOCK_C, BLOCK_B)
    tile (no padding along K), and the mixture over experts is elementwise.

    The region mask is loaded once per program, the guards act on per-(expert, row) or
    per-(class, row) vectors, and each logit costs one ``exp`` (``combine="prob"`` mixes
    the probabilities ``exp(z - m_k) / d_k`` of the log-sum-exp, falling back to log space
    only for classes whose probability is under ``2**-100``).
    """
    rows, b_in = _row_ids(n_samples, BLOCK_B, WIDE)
    src = (z_ptr, stride_zb, stride_zk, stride_zc, region_ptr, stride_rk, stride_rc,
           sample_ptr, stride_sb, stride_sk)
    offs_c = tl.arange(0, BLOCK_C)
    c_in = offs_c < N_CLASSES
    cb_in = c_in[:, None] & b_in[None, :]

    # 1. Per-expert log-sum-exp at temperature T (energy) and 1 (softmax).
    z = ()
    valid = ()
    covers = ()
    active = ()
    contrib = ()
    m_t = ()
    d_t = ()
    e_1 = ()
    m_1 = ()
    d_1 = ()
    lse_t = ()
    lse_1 = ()
    energy = ()
    poisoned = tl.zeros([BLOCK_B], tl.int1)
    for k in tl.static_range(N_EXPERTS):
        z_k, valid_k, covers_k, active_k = _rows_load(src, k, rows, b_in, offs_c, c_in,
                                                      HAS_REGION, HAS_SAMPLE)
        if HAS_T:
            mt_k, _, dt_k = _rows_exp_sum(_div(z_k, energy_temperature))
            m1_k, e1_k, d1_k = _rows_exp_sum(z_k)
        else:
            mt_k, e1_k, dt_k = _rows_exp_sum(z_k)
            m1_k, d1_k = mt_k, dt_k
        z = z + (z_k,)
        valid = valid + (valid_k,)
        covers = covers + (covers_k,)
        active = active + (active_k,)
        contrib = contrib + (valid_k & active_k[None, :],)
        m_t = m_t + (mt_k,)
        d_t = d_t + (dt_k,)
        e_1 = e_1 + (e1_k,)
        m_1 = m_1 + (m1_k,)
        d_1 = d_1 + (d1_k,)
        lse_t = lse_t + (_rows_lse(mt_k, dt_k),)
        lse_1 = lse_1 + (_rows_lse(m1_k, d1_k),)
        energy = energy + (-energy_temperature * lse_t[k],)
        poisoned = poisoned | (active_k & ~(lse_1[k] < float("inf")))

    # 2. Energies and routing weights.
    w, log_w = _rows_routing_weights(energy, active, routing_temperature, N_EXPERTS,
                                     ENERGY_WEIGHTS)
    out_k = rows * N_EXPERTS
    stats = row_stats_ptr + rows * stride_stats
    for k in tl.static_range(N_EXPERTS):
        tl.store(energy_ptr + out_k + k * unit, energy[k], mask=b_in)
        tl.store(weights_ptr + out_k + k * unit, w[k], mask=b_in)
        if SAVE_STATS:
            tl.store(stats + k * unit, m_t[k], mask=b_in)
            tl.store(stats + (N_EXPERTS + k) * unit, d_t[k], mask=b_in)
            if HAS_T and PROB_COMBINE:
                tl.store(stats + (2 * N_EXPERTS + k) * unit, m_1[k], mask=b_in)
                tl.store(stats + (3 * N_EXPERTS + k) * unit, d_1[k], mask=b_in)

    # 3. Combination.
    if PROB_COMBINE:
        probs, log_p, _, _ = _rows_prob_mixture(src, rows, b_in, offs_c, c_in, e_1, d_1, w,
                                                log_w, lse_1, covers, active, contrib,
                                                N_EXPERTS, HAS_REGION, HAS_SAMPLE,
                                                UNDERFLOW_FALLBACK)
    else:
        s = tl.zeros([BLOCK_C, BLOCK_B], tl.float32)
        for k in tl.static_range(N_EXPERTS):
            s += w[k][None, :] * tl.where(contrib[k] & (w[k] > 0)[None, :], z[k], 0.0)
        s = tl.where(c_in[:, None], s, float("-inf"))
        m_s = tl.max(s, axis=0)
        d_s = tl.sum(_exp(s - m_s[None, :]), axis=0)
        log_p = (s - m_s[None, :]) - _log(d_s)[None, :]
        probs = _exp(log_p)
        if SAVE_STATS:
            tl.store(class_stats_ptr + 2 * rows, m_s, mask=b_in)
            tl.store(class_stats_ptr + 2 * rows + 1, d_s, mask=b_in)
    log_p = tl.where(poisoned[None, :], float("nan"), log_p)
    probs = tl.where(poisoned[None, :], float("nan"), probs)
    out_c = offs_c[:, None] * unit + (rows * N_CLASSES)[None, :]
    tl.store(probs_ptr + out_c, probs, mask=cb_in)
    if STORE_LOG_PROBS:
        tl.store(log_probs_ptr + out_c, log_p, mask=cb_in)


@triton.jit(do_not_specialize=_ROWS_BWD_DNS)
def _fusion_bwd_rows_kernel(
    z_ptr, stride_zb, stride_zk, stride_zc,
    region_ptr, stride_rk, stride_rc,
    sample_ptr, stride_sb, stride_sk,
    row_stats_ptr, stride_stats, class_stats_ptr,
    grad_probs_ptr, stride_gpb, stride_gpc,
    grad_log_probs_ptr, stride_glb, stride_glc,
    grad_energy_ptr, stride_geb, stride_gek,
    grad_weights_ptr, stride_gwb, stride_gwk,
    grad_z_ptr, stride_dzb, stride_dzk, stride_dzc,
    n_samples, unit,
    energy_temperature, routing_temperature,
    HAS_REGION: tl.constexpr,
    HAS_SAMPLE: tl.constexpr,
    ENERGY_WEIGHTS: tl.constexpr,
    PROB_COMBINE: tl.constexpr,
    HAS_T: tl.constexpr,
    HAS_GRAD_PROBS: tl.constexpr,
    HAS_GRAD_LOG_PROBS: tl.constexpr,
    HAS_GRAD_ENERGY: tl.constexpr,
    HAS_GRAD_WEIGHTS: tl.constexpr,
    NEEDS_G: tl.constexpr,
    WIDE: tl.constexpr,
    N_EXPERTS: tl.constexpr,
    N_CLASSES: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    UNDERFLOW_FALLBACK: tl.constexpr = True,
):
    """:func:`_fusion_bwd_kernel` for ``BLOCK_B`` whole rows per program (``C <= BLOCK_C``),
    with the conventions of :func:`_fusion_fwd_rows_kernel`.

    Same formulas; with ``combine="prob"`` the responsibilities reuse the rebuilt
    ``e_kc = exp(z_kc - m_k)``: ``r_kc = (W_k / d_k) e_kc / P_c``, so that
    ``dZ_kc = e_kc (W_k G_c / (d_k P_c) - R_k / d_k) - gE_k q_kc`` costs one ``exp`` per
    logit (two with ``T != 1``); classes with ``P_c < 2**-100`` use log space.
    """
    rows, b_in = _row_ids(n_samples, BLOCK_B, WIDE)
    src = (z_ptr, stride_zb, stride_zk, stride_zc, region_ptr, stride_rk, stride_rc,
           sample_ptr, stride_sb, stride_sk)
    offs_c = tl.arange(0, BLOCK_C)
    c_in = offs_c < N_CLASSES
    cb_in = c_in[:, None] & b_in[None, :]
    stats = row_stats_ptr + rows * stride_stats

    z = ()
    covers = ()
    active = ()
    contrib = ()
    e_t = ()
    inv_d_t = ()
    e_1 = ()
    d_1 = ()
    inv_d_1 = ()
    lse_1 = ()
    energy = ()
    for k in tl.static_range(N_EXPERTS):
        z_k, valid_k, covers_k, active_k = _rows_load(src, k, rows, b_in, offs_c, c_in,
                                                      HAS_REGION, HAS_SAMPLE)
        mt_k = tl.load(stats + k * unit, mask=b_in, other=0.0)
        dt_k = tl.load(stats + (N_EXPERTS + k) * unit, mask=b_in, other=0.0)
        if HAS_T and PROB_COMBINE:
            m1_k = tl.load(stats + (2 * N_EXPERTS + k) * unit, mask=b_in, other=0.0)
            d1_k = tl.load(stats + (3 * N_EXPERTS + k) * unit, mask=b_in, other=0.0)
        else:
            m1_k, d1_k = mt_k, dt_k
        if HAS_T:
            et_k = _exp(_div(z_k, energy_temperature) - mt_k[None, :])
        else:
            et_k = _exp(z_k - mt_k[None, :])
        if HAS_T and PROB_COMBINE:
            e1_k = _exp(z_k - m1_k[None, :])
        else:
            e1_k = et_k
        z = z + (z_k,)
        covers = covers + (covers_k,)
        active = active + (active_k,)
        contrib = contrib + (valid_k & active_k[None, :],)
        e_t = e_t + (et_k,)
        inv_d_t = inv_d_t + (tl.where(dt_k > 0, _div(1.0, tl.where(dt_k > 0, dt_k, 1.0)), 0.0),)
        e_1 = e_1 + (e1_k,)
        d_1 = d_1 + (d1_k,)
        inv_d_1 = inv_d_1 + (tl.where(d1_k > 0, _div(1.0, tl.where(d1_k > 0, d1_k, 1.0)),
                                      0.0),)
        lse_1 = lse_1 + (_rows_lse(m1_k, d1_k),)
        energy = energy + (-energy_temperature * _rows_lse(mt_k, dt_k),)
    w, log_w = _rows_routing_weights(energy, active, routing_temperature, N_EXPERTS,
                                     ENERGY_WEIGHTS)

    # Pass A: per-expert reductions over the classes of G (only if log P / P get gradients).
    red_prob = ()  # prob: R_k = sum_c G_c r_kc
    g_r = ()  # prob: G_c r_kc
    red_w = ()  # logit: sum_c M Z G - sum G * sum_c M Z P (the gradient reaching W_k)
    sum_g = tl.zeros([BLOCK_B], tl.float32)
    probs = tl.zeros([BLOCK_C, BLOCK_B], tl.float32)
    log_p = tl.zeros([BLOCK_C, BLOCK_B], tl.float32)
    g = tl.zeros([BLOCK_C, BLOCK_B], tl.float32)
    if NEEDS_G:
        if PROB_COMBINE:
            probs, log_p, need, a = _rows_prob_mixture(
                src, rows, b_in, offs_c, c_in, e_1, d_1, w, log_w, lse_1, covers, active,
                contrib, N_EXPERTS, HAS_REGION, HAS_SAMPLE, UNDERFLOW_FALLBACK)
        else:
            m_s = tl.load(class_stats_ptr + 2 * rows, mask=b_in, other=0.0)
            log_d_s = _log(tl.load(class_stats_ptr + 2 * rows + 1, mask=b_in, other=1.0))
            s = tl.zeros([BLOCK_C, BLOCK_B], tl.float32)
            for k in tl.static_range(N_EXPERTS):
                s += w[k][None, :] * tl.where(contrib[k] & (w[k] > 0)[None, :], z[k], 0.0)
            log_p = tl.where(c_in[:, None], (s - m_s[None, :]) - log_d_s[None, :],
                             float("-inf"))
            probs = _exp(log_p)
        if HAS_GRAD_LOG_PROBS:
            g += tl.load(grad_log_probs_ptr + offs_c[:, None] * stride_glc
                         + (rows * stride_glb)[None, :], mask=cb_in, other=0.0).to(tl.float32)
        if HAS_GRAD_PROBS:
            gp = tl.load(grad_probs_ptr + offs_c[:, None] * stride_gpc
                         + (rows * stride_gpb)[None, :], mask=cb_in, other=0.0).to(tl.float32)
            g += tl.where(cb_in, gp * probs, 0.0)
        if PROB_COMBINE:
            # G_c r_kc = e_kc a_k G_c / P_c with a_k = W_k / d_k (log space where P_c is tiny).
            h = tl.where(probs > 0, _div(g, tl.where(probs > 0, probs, 1.0)), 0.0)
            for k in tl.static_range(N_EXPERTS):
                if HAS_SAMPLE:
                    g_r = g_r + (tl.where(contrib[k], e_1[k], 0.0) * (a[k][None, :] * h),)
                else:
                    g_r = g_r + (e_1[k] * (a[k][None, :] * h),)
            if UNDERFLOW_FALLBACK:
                if _rows_any(need):
                    _, terms, contrib_slow = _rows_log_mixture(
                        src, rows, b_in, offs_c, c_in, log_w, lse_1, N_EXPERTS, HAS_REGION,
                        HAS_SAMPLE)
                    log_p_safe = tl.where(log_p == float("-inf"), 0.0, log_p)
                    slow = ()
                    for k in tl.static_range(N_EXPERTS):
                        resp = tl.where(contrib_slow[k], _exp(terms[k] - log_p_safe), 0.0)
                        slow = slow + (tl.where(need, resp * g, g_r[k]),)
                    g_r = slow
            for k in tl.static_range(N_EXPERTS):
                red_prob = red_prob + (tl.sum(g_r[k], axis=0),)
        else:
            sum_g = tl.sum(g, axis=0)
            g_live = tl.where(log_p > float("-inf"), g, 0.0)
            for k in tl.static_range(N_EXPERTS):
                zm = tl.where(contrib[k] & (z[k] > float("-inf")), z[k], 0.0)
                red_w = red_w + (tl.sum(zm * g_live, axis=0) - sum_g * tl.sum(zm * probs, axis=0),)

    # Per-expert totals: gradient reaching E (directly and through the routing weights).
    grad_e = ()
    for k in tl.static_range(N_EXPERTS):
        ge_k = tl.zeros([BLOCK_B], tl.float32)
        if HAS_GRAD_ENERGY:
            ge_k += tl.load(grad_energy_ptr + rows * stride_geb + k * stride_gek,
                            mask=b_in, other=0.0).to(tl.float32)
        grad_e = grad_e + (ge_k,)
    if ENERGY_WEIGHTS:
        grad_w = ()
        for k in tl.static_range(N_EXPERTS):
            gw_k = tl.zeros([BLOCK_B], tl.float32)
            if HAS_GRAD_WEIGHTS:
                gw_k += tl.load(grad_weights_ptr + rows * stride_gwb + k * stride_gwk,
                                mask=b_in, other=0.0).to(tl.float32)
            if NEEDS_G and not PROB_COMBINE:
                gw_k += red_w[k]
            grad_w = grad_w + (gw_k,)
        w_gw = tl.zeros([BLOCK_B], tl.float32)
        sum_r = tl.zeros([BLOCK_B], tl.float32)
        for k in tl.static_range(N_EXPERTS):
            w_gw += w[k] * grad_w[k]
            if NEEDS_G and PROB_COMBINE:
                sum_r += red_prob[k]
        inv_tau = 1.0 / routing_temperature
        total = ()
        for k in tl.static_range(N_EXPERTS):
            grad_scores = w[k] * (grad_w[k] - w_gw)
            if NEEDS_G and PROB_COMBINE:
                grad_scores += red_prob[k] - w[k] * sum_r
            total = total + (grad_e[k] - grad_scores * inv_tau,)
        grad_e = total

    # Pass B: dZ for every in-bounds entry (zeros outside the regions).
    if NEEDS_G and not PROB_COMBINE:
        grad_s = tl.where(log_p > float("-inf"), g, 0.0) - probs * sum_g[None, :]
    dz_row = (rows * stride_dzb)[None, :]
    for k in tl.static_range(N_EXPERTS):
        coef_t = -grad_e[k] * inv_d_t[k]
        if NEEDS_G and PROB_COMBINE:
            coef_1 = -red_prob[k] * inv_d_1[k]
            if HAS_T:
                dz = g_r[k] + e_1[k] * coef_1[None, :] + e_t[k] * coef_t[None, :]
            else:
                dz = g_r[k] + e_1[k] * (coef_1 + coef_t)[None, :]
        else:
            dz = e_t[k] * coef_t[None, :]
            if NEEDS_G:
                dz += tl.where(contrib[k], w[k][None, :] * grad_s, 0.0)
        tl.store(grad_z_ptr + (k * stride_dzk + offs_c * stride_dzc)[:, None] + dz_row, dz,
                 mask=cb_in)


# ---------------------------------------------------------------------------------------
# Split-C forward (small B, large C, combine="prob"): partial statistics, then the mixture
# ---------------------------------------------------------------------------------------


@triton.jit
def _fusion_fwd_split_stats_kernel(
    z_ptr, stride_zb, stride_zk, stride_zc,
    region_ptr, stride_rk, stride_rc,
    partial_ptr,
    n_experts, n_classes, n_chunks,
    energy_temperature,
    HAS_REGION: tl.constexpr,
    HAS_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
    TILES: tl.constexpr,
):
    """Partial log-sum-exp statistics of one (row, chunk of ``TILES x BLOCK_C`` classes).

    Program ``(row, chunk)`` stores, for every expert, the raw running max ``m`` (``-inf``
    when its region holds nothing in the chunk, ``NaN``/``+inf`` as :func:`_max_nan`) and
    the sum ``d = sum exp(x - safe(m))``, at temperature T and (``HAS_T``) at temperature 1,
    into ``partial`` (B, n_chunks, 4, BLOCK_K) float32, contiguous.
    """
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    z_row = z_ptr + row * stride_zb
    offs_k = tl.arange(0, BLOCK_K)
    k_in = offs_k < n_experts
    m_t = tl.full([BLOCK_K], float("-inf"), tl.float32)
    d_t = tl.zeros([BLOCK_K], tl.float32)
    m_1 = tl.full([BLOCK_K], float("-inf"), tl.float32)
    d_1 = tl.zeros([BLOCK_K], tl.float32)
    c_start = chunk * (TILES * BLOCK_C)
    for t in range(TILES):
        offs_c = c_start + t * BLOCK_C + tl.arange(0, BLOCK_C)
        valid = _valid_block(region_ptr, stride_rk, stride_rc, offs_k, k_in, offs_c,
                             n_classes, HAS_REGION)
        z = _load_logits(z_row, stride_zk, stride_zc, offs_k, offs_c, valid)
        if HAS_T:
            m_t, d_t = _online_max_sum(m_t, d_t, z / energy_temperature)
            m_1, d_1 = _online_max_sum(m_1, d_1, z)
        else:
            m_t, d_t = _online_max_sum(m_t, d_t, z)
    out = partial_ptr + (row * n_chunks + chunk) * (4 * BLOCK_K) + offs_k
    tl.store(out, m_t)
    tl.store(out + BLOCK_K, d_t)
    if HAS_T:
        tl.store(out + 2 * BLOCK_K, m_1)
        tl.store(out + 3 * BLOCK_K, d_1)


@triton.jit
def _merge_max_sum(partial_row, slot: tl.constexpr, offs_n, n_chunks,
                   BLOCK_K: tl.constexpr):
    """Merge the chunks' ``(m, d)`` of one row into the shift and sum of the whole row.

    Returns ``(safe(M), D)`` with ``M`` the NaN-propagating max over chunks and
    ``D = sum_j d_j exp(m_j - safe(M))`` (an empty chunk, ``m_j = -inf``, adds 0), as the
    one-row kernel's online log-sum-exp leaves them after its last tile.
    """
    offs_k = tl.arange(0, BLOCK_K)
    ptrs = partial_row + offs_n[:, None] * (4 * BLOCK_K) + slot * BLOCK_K + offs_k[None, :]
    n_in = (offs_n < n_chunks)[:, None]
    m = tl.load(ptrs, mask=n_in, other=float("-inf"))
    d = tl.load(ptrs + BLOCK_K, mask=n_in, other=0.0)
    shift = _safe_max(_max_nan(m, 0))
    d = tl.sum(tl.where(m == float("-inf"), 0.0, d * tl.exp(m - shift[None, :])), axis=0)
    return shift, d


@triton.jit
def _fusion_fwd_split_mix_kernel(
    z_ptr, stride_zb, stride_zk, stride_zc,
    region_ptr, stride_rk, stride_rc,
    sample_ptr, stride_sb, stride_sk,
    partial_ptr,
    probs_ptr, log_probs_ptr, energy_ptr, weights_ptr,
    row_stats_ptr, stride_stats,
    n_experts, n_classes, n_chunks,
    energy_temperature, routing_temperature,
    HAS_REGION: tl.constexpr,
    HAS_SAMPLE: tl.constexpr,
    ENERGY_WEIGHTS: tl.constexpr,
    HAS_T: tl.constexpr,
    STORE_LOG_PROBS: tl.constexpr,
    SAVE_STATS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
    TILES: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``P`` (``combine="prob"``) of one (row, chunk), from the merged statistics.

    Every program of a row merges the row's ``n_chunks`` partial statistics (a few numbers
    each, ``BLOCK_N >= n_chunks``), derives the energies and routing weights with the same
    code as :func:`_fusion_fwd_kernel` (so the backward recomputes them bit-identically),
    and writes ``P`` / ``log P`` over its chunk; the chunk-0 program also stores energies,
    weights and the statistics for the backward pass, in the one-row kernel's layout.
    """
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    z_row = z_ptr + row * stride_zb
    offs_k = tl.arange(0, BLOCK_K)
    k_in = offs_k < n_experts
    active = _active_experts(sample_ptr, row, stride_sb, stride_sk, offs_k, k_in, HAS_SAMPLE)
    partial_row = partial_ptr + row * n_chunks * (4 * BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    m_t, d_t = _merge_max_sum(partial_row, 0, offs_n, n_chunks, BLOCK_K)
    if HAS_T:
        m_1, d_1 = _merge_max_sum(partial_row, 2, offs_n, n_chunks, BLOCK_K)
    else:
        m_1, d_1 = m_t, d_t
    lse_t = _lse(m_t, d_t)
    lse_1 = _lse(m_1, d_1)
    poisoned = _poisoned(lse_1, active)
    energy = -energy_temperature * lse_t
    w, log_w = _routing_weights(energy, active, routing_temperature, ENERGY_WEIGHTS)
    if chunk == 0:
        out_k = row * n_experts + offs_k
        tl.store(energy_ptr + out_k, energy, mask=k_in)
        tl.store(weights_ptr + out_k, w, mask=k_in)
        if SAVE_STATS:
            stats_row = row_stats_ptr + row * stride_stats + offs_k
            tl.store(stats_row, m_t, mask=k_in)
            tl.store(stats_row + n_experts, d_t, mask=k_in)
            if HAS_T:
                tl.store(stats_row + 2 * n_experts, m_1, mask=k_in)
                tl.store(stats_row + 3 * n_experts, d_1, mask=k_in)
    probs_row = probs_ptr + row * n_classes
    log_probs_row = log_probs_ptr + row * n_classes
    c_start = chunk * (TILES * BLOCK_C)
    for t in range(TILES):
        offs_c = c_start + t * BLOCK_C + tl.arange(0, BLOCK_C)
        c_in = offs_c < n_classes
        contrib = _valid_block(region_ptr, stride_rk, stride_rc, offs_k, active, offs_c,
                               n_classes, HAS_REGION)
        z = _load_logits(z_row, stride_zk, stride_zc, offs_k, offs_c, contrib)
        log_p, terms = _mixture_log_probs(z, contrib, log_w, lse_1)
        _store_probs(probs_row + offs_c, log_probs_row + offs_c, log_p, c_in, poisoned,
                     STORE_LOG_PROBS)


# ---------------------------------------------------------------------------------------
# Block sizes and autotuning
# ---------------------------------------------------------------------------------------


def _is_interpreted(fn) -> bool:
    return type(fn).__name__ == "InterpretedFunction"


# Whether these kernels run in the Triton interpreter (CPU tensors allowed). Triton decides
# when ``@triton.jit`` decorates, from TRITON_INTERPRET: for our kernels when this module is
# imported, for ``tl.max`` and the rest of its standard library when Triton is imported.
# Both must agree, so the variable has to be set before either import.
# ``ltroute.fusion`` reads this before sending CPU tensors here.
_INTERPRETED = _is_interpreted(_fusion_fwd_kernel) and _is_interpreted(tl.max)

_BLOCK_C_CHOICES = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
_WARP_CHOICES = (1, 2, 4, 8, 16)
# Under the interpreter, one config: large enough that C <= 1024 is a single tile.
_INTERPRETER_BLOCK_C = 1024


def _block_k(n_experts: int) -> int:
    return max(2, triton.next_power_of_2(n_experts))


def _make_pruner(max_tile: int):
    """Keep the three largest ``BLOCK_C`` that fit a row (or the register budget).

    For each, keep ``num_warps`` giving 4 to 32 elements per thread, so about ten configs
    are timed per key instead of the full grid. Configs that spill are left out: compiled
    for sm_90 offline (``benchmarks/kernel_cost.py --all-configs``), 16 warps cap a thread
    at 128 registers and spill at K = 16, and 32 elements per thread spill with 8 warps
    (K = 16 forward) or in the backward of 16-bit logits (K = 4), so none is kept.
    """

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        block_k = args["BLOCK_K"]
        n_classes = args["n_classes"]
        backward = max_tile <= _MAX_TILE_BWD
        z = args.get("z_ptr")
        fp32 = z is None or z.dtype == torch.float32
        top = min(max(16, triton.next_power_of_2(n_classes)), max(16, max_tile // block_k))
        wanted = {top, max(16, top // 2), max(16, top // 4)}
        kept = []
        for config in configs:
            block_c = config.kwargs["BLOCK_C"]
            if block_c not in wanted:
                continue
            per_thread = block_k * block_c / (32 * config.num_warps)
            high = 16 if config.num_warps >= 8 or (backward and not fp32) else 32
            if 4 <= per_thread <= high and config.num_warps <= 8:
                kept.append(config)
        if not kept:
            kept = [c for c in configs if c.kwargs["BLOCK_C"] == top and c.num_warps == 1]
        return kept

    return prune


def _config_grid() -> list[triton.Config]:
    """Every config of the one-row kernels, before pruning."""
    return [triton.Config({"BLOCK_C": block_c}, num_warps=warps)
            for block_c in _BLOCK_C_CHOICES for warps in _WARP_CHOICES]


def _configs() -> list[triton.Config]:
    if _INTERPRETED:
        return [triton.Config({"BLOCK_C": _INTERPRETER_BLOCK_C}, num_warps=1)]
    return _config_grid()


def _single_tile(args: dict) -> bool:
    return args["n_classes"] <= args["BLOCK_C"]


_FWD_KEY = ["n_experts", "n_classes", "HAS_REGION", "HAS_SAMPLE", "ENERGY_WEIGHTS",
            "PROB_COMBINE", "HAS_T", "STORE_LOG_PROBS", "SAVE_STATS", "BLOCK_K"]
_BWD_KEY = ["n_experts", "n_classes", "HAS_REGION", "HAS_SAMPLE", "ENERGY_WEIGHTS",
            "PROB_COMBINE", "HAS_T", "HAS_GRAD_PROBS", "HAS_GRAD_LOG_PROBS", "HAS_GRAD_ENERGY",
            "HAS_GRAD_WEIGHTS", "NEEDS_G", "BLOCK_K"]

_fwd_fixed = triton.heuristics({"SINGLE_TILE": _single_tile})(_fusion_fwd_kernel)
_bwd_fixed = triton.heuristics({"SINGLE_TILE": _single_tile})(_fusion_bwd_kernel)
_fwd_tuned = triton.autotune(
    configs=_configs(), key=_FWD_KEY,
    prune_configs_by={"early_config_prune": _make_pruner(_MAX_TILE_FWD)},
)(_fwd_fixed)
_bwd_tuned = triton.autotune(
    configs=_configs(), key=_BWD_KEY,
    prune_configs_by={"early_config_prune": _make_pruner(_MAX_TILE_BWD)},
)(_bwd_fixed)


def _launch(tuned, fixed, grid, args: tuple, flags: dict) -> None:
    if _BLOCK_C_OVERRIDE is None:
        tuned[grid](*args, **flags)
    else:
        fixed[grid](*args, **flags, BLOCK_C=_BLOCK_C_OVERRIDE, num_warps=1)


# Multi-row kernels: a row of BLOCK_K x BLOCK_C slots at most this large goes to them.
_MAX_ROW_FWD = 8192
_MAX_ROW_BWD = 8192
# Logits held per thread by a multi-row program, at most (compiled for sm_90 offline by
# benchmarks/kernel_cost.py: no config within these bounds spills, for K <= 16).
_ROWS_PER_THREAD_FWD = (16, 64)
_ROWS_PER_THREAD_BWD = (16, 48)
_BLOCK_B_CHOICES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_ROWS_WARP_CHOICES = (1, 2, 4, 8)
# Under the interpreter: two rows per program, so that small tests cover several rows per
# program and a partial last block. Tests set the override to force another block.
_INTERPRETER_BLOCK_B = 2
_BLOCK_B_OVERRIDE: int | None = None


def _rows_config_grid() -> list[triton.Config]:
    """Every config of the multi-row kernels, before pruning."""
    return [triton.Config({"BLOCK_B": block_b}, num_warps=warps)
            for block_b in _BLOCK_B_CHOICES for warps in _ROWS_WARP_CHOICES]


def _rows_configs() -> list[triton.Config]:
    if _INTERPRETED:
        return [triton.Config({"BLOCK_B": _INTERPRETER_BLOCK_B}, num_warps=1)]
    return _rows_config_grid()


def _make_rows_pruner(per_thread: tuple[int, int]):
    """Keep the configs holding ``per_thread`` logits (min, max) per thread."""
    low, high = per_thread

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        row = args["N_EXPERTS"] * args["BLOCK_C"]
        kept = [c for c in configs
                if low <= c.kwargs["BLOCK_B"] * row / (32 * c.num_warps) <= high]
        if not kept:  # a row larger than the bound: one row, as many warps as possible
            kept = [max((c for c in configs if c.kwargs["BLOCK_B"] == 1),
                        key=lambda c: c.num_warps)]
        return kept

    return prune


_ROWS_KEY = ["N_EXPERTS", "N_CLASSES", "HAS_REGION", "HAS_SAMPLE", "ENERGY_WEIGHTS",
             "PROB_COMBINE", "HAS_T", "WIDE", "BLOCK_C"]
_fwd_rows_tuned = triton.autotune(
    configs=_rows_configs(), key=_ROWS_KEY + ["STORE_LOG_PROBS", "SAVE_STATS"],
    prune_configs_by={"early_config_prune": _make_rows_pruner(_ROWS_PER_THREAD_FWD)},
)(_fusion_fwd_rows_kernel)
_bwd_rows_tuned = triton.autotune(
    configs=_rows_configs(),
    key=_ROWS_KEY + ["HAS_GRAD_PROBS", "HAS_GRAD_LOG_PROBS", "HAS_GRAD_ENERGY",
                     "HAS_GRAD_WEIGHTS", "NEEDS_G"],
    prune_configs_by={"early_config_prune": _make_rows_pruner(_ROWS_PER_THREAD_BWD)},
)(_fusion_bwd_rows_kernel)


def _use_rows(n_experts: int, n_classes: int, max_row: int) -> bool:
    """Whether the multi-row kernel takes this shape (whole rows in registers)."""
    return (_BLOCK_C_OVERRIDE is None
            and n_experts * triton.next_power_of_2(n_classes) <= max_row)


def _launch_rows(kernel, n_samples: int, args: tuple, flags: dict) -> None:
    """Launch a multi-row kernel over ``n_samples`` rows (``args`` end before B, K, C)."""
    if _BLOCK_B_OVERRIDE is None:
        grid = lambda meta: (triton.cdiv(n_samples, meta["BLOCK_B"]),)  # noqa: E731
        kernel[grid](*args, **flags)
    else:
        kernel.fn[(triton.cdiv(n_samples, _BLOCK_B_OVERRIDE),)](
            *args, **flags, BLOCK_B=_BLOCK_B_OVERRIDE, num_warps=1)


# Split-C forward (combine="prob", rows too large for the multi-row kernels, few rows): a
# tile of this many (BLOCK_K x BLOCK_C) logits, 64 per thread (2 warps: the reductions over
# C stay mostly in a thread's registers), and enough chunks per row that B x chunks reaches
# about 132 SMs x 16 programs on an H100/H200. Chosen offline (benchmarks/kernel_cost.py,
# sm_90, fp32 forward at 256x4x32000): 16 logits per thread with 8 warps cost 95 SASS per
# logit, 32 with 4 warps 63, 64 with 2 warps 47 (44 with 8 chunks instead of 5), no spills.
_SPLIT_TILE = 4096
_SPLIT_PER_THREAD = 64
_SPLIT_TARGET_PROGRAMS = 132 * 16
# Tests set this to (BLOCK_C, TILES per chunk) to force the split path at any shape.
_SPLIT_OVERRIDE: tuple[int, int] | None = None


def _split_plan(n_samples: int, n_experts: int, n_classes: int) -> tuple | None:
    """``(BLOCK_C, TILES, n_chunks, num_warps)`` of the split-C forward, or ``None``.

    Taken (``combine="prob"`` only) when a row is too large for the multi-row kernels and
    ``B`` rows alone would leave SMs idle: the one-row kernel runs one program per row.
    The interpreter keeps the one-row kernel unless a test forces the split.
    """
    block_k = _block_k(n_experts)
    if _SPLIT_OVERRIDE is not None:
        block_c, tiles = _SPLIT_OVERRIDE
    else:
        if (_INTERPRETED or _BLOCK_C_OVERRIDE is not None
                or _use_rows(n_experts, n_classes, _MAX_ROW_FWD)):
            return None
        block_c = max(16, min(triton.next_power_of_2(n_classes), _SPLIT_TILE // block_k))
        n_tiles = triton.cdiv(n_classes, block_c)
        wanted = min(n_tiles, triton.cdiv(_SPLIT_TARGET_PROGRAMS, n_samples))
        if wanted < 2:
            return None
        tiles = triton.cdiv(n_tiles, wanted)
    n_chunks = triton.cdiv(n_classes, block_c * tiles)
    warps = max(1, min(8, block_k * block_c // (32 * _SPLIT_PER_THREAD)))
    if _SPLIT_OVERRIDE is not None:
        warps = 1
    return block_c, tiles, n_chunks, warps


def _launch_split(plan: tuple, Z, region_args: tuple, sample_args: tuple, outputs: tuple,
                  row_stats, flags: dict, energy_temperature: float,
                  routing_temperature: float) -> None:
    """Launch the two split-C kernels (partial statistics, then merge and mixture)."""
    block_c, tiles, n_chunks, warps = plan
    n_samples, n_experts, n_classes = Z.shape
    block_k = _block_k(n_experts)
    probs, log_probs, energy, weights = outputs
    partial = torch.empty(n_samples, n_chunks, 4, block_k, dtype=torch.float32,
                          device=Z.device)
    grid = (n_samples, n_chunks)
    blocks = {"BLOCK_K": block_k, "BLOCK_C": block_c, "TILES": tiles, "num_warps": warps}
    _fusion_fwd_split_stats_kernel[grid](
        Z, *Z.stride(), *region_args, partial, n_experts, n_classes, n_chunks,
        float(energy_temperature),
        HAS_REGION=flags["HAS_REGION"], HAS_T=flags["HAS_T"], **blocks)
    _fusion_fwd_split_mix_kernel[grid](
        Z, *Z.stride(), *region_args, *sample_args, partial,
        probs, probs if log_probs is None else log_probs, energy, weights,
        energy if row_stats is None else row_stats,
        0 if row_stats is None else row_stats.stride(0),
        n_experts, n_classes, n_chunks,
        float(energy_temperature), float(routing_temperature),
        HAS_REGION=flags["HAS_REGION"], HAS_SAMPLE=flags["HAS_SAMPLE"],
        ENERGY_WEIGHTS=flags["ENERGY_WEIGHTS"], HAS_T=flags["HAS_T"],
        STORE_LOG_PROBS=flags["STORE_LOG_PROBS"], SAVE_STATS=flags["SAVE_STATS"],
        BLOCK_N=max(2, triton.next_power_of_2(n_chunks)), **blocks)


def _int64_needed(*tensors: torch.Tensor) -> bool:
    """Whether an element offset into one of these tensors can pass ``2**31 - 1``, the
    rows of a last, partial block included (masked lanes still compute their offsets)."""
    for t in tensors:
        last = sum((size - 1) * abs(stride)
                   for size, stride in zip(t.shape, t.stride(), strict=True))
        if last + max(_BLOCK_B_CHOICES) * abs(t.stride(0)) >= 2**31 - 1:
            return True
    return False


# ---------------------------------------------------------------------------------------
# Host launchers
# ---------------------------------------------------------------------------------------


def _mask_arg(mask: torch.Tensor | None, fallback: torch.Tensor) -> tuple:
    """A bool mask as (uint8 view, stride0, stride1); a dummy pointer when absent."""
    if mask is None:
        return fallback, 0, 0
    view = mask.view(torch.uint8)
    return view, view.stride(0), view.stride(1)


def _fusion_forward(
    Z: torch.Tensor,
    region_mask: torch.Tensor | None,
    sample_mask: torch.Tensor | None,
    *,
    energy_weights: bool,
    prob_combine: bool,
    energy_temperature: float,
    routing_temperature: float,
    return_log_probs: bool,
    save_stats: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, tuple]:
    """Launch the forward kernel (dtype and expert count are checked by the caller,
    :func:`ltroute.fusion.fuse_experts`).

    Returns
    -------
    probs, energy, weights, log_probs, stats
        float32 outputs (``log_probs`` is ``None`` unless requested) and, for
        :func:`_fusion_backward`, ``(row_stats, class_stats)``: per-expert (shift, sum) of
        the log-sum-exps, (B, 2 or 4, K), and for ``combine="logit"`` those of the
        combined logits, (B, 2) (``None`` entries when not needed or not ``save_stats``).
    """
    n_samples, n_experts, n_classes = Z.shape
    device = Z.device
    f32 = torch.float32
    probs = torch.empty(n_samples, n_classes, dtype=f32, device=device)
    energy = torch.empty(n_samples, n_experts, dtype=f32, device=device)
    weights = torch.empty(n_samples, n_experts, dtype=f32, device=device)
    log_probs = (torch.empty(n_samples, n_classes, dtype=f32, device=device)
                 if return_log_probs else None)
    has_t = energy_temperature != 1.0
    row_stats = class_stats = None
    if save_stats:
        n_stats = 4 if (prob_combine and has_t) else 2
        row_stats = torch.empty(n_samples, n_stats, n_experts, dtype=f32, device=device)
        if not prob_combine:
            class_stats = torch.empty(n_samples, 2, dtype=f32, device=device)
    if n_samples == 0:
        return probs, energy, weights, log_probs, (row_stats, class_stats)

    region, stride_rk, stride_rc = _mask_arg(region_mask, probs)
    sample, stride_sb, stride_sk = _mask_arg(sample_mask, probs)
    args = (
        Z, *Z.stride(),
        region, stride_rk, stride_rc,
        sample, stride_sb, stride_sk,
        probs, probs if log_probs is None else log_probs, energy, weights,
        energy if row_stats is None else row_stats,
        0 if row_stats is None else row_stats.stride(0),
        energy if class_stats is None else class_stats,
        n_experts, n_classes,
        float(energy_temperature), float(routing_temperature),
    )
    flags = {
        "HAS_REGION": region_mask is not None,
        "HAS_SAMPLE": sample_mask is not None,
        "ENERGY_WEIGHTS": energy_weights,
        "PROB_COMBINE": prob_combine,
        "HAS_T": has_t,
        "STORE_LOG_PROBS": return_log_probs,
        "SAVE_STATS": save_stats,
        "BLOCK_K": _block_k(n_experts),
    }
    split = _split_plan(n_samples, n_experts, n_classes) if prob_combine else None
    if split is not None:
        _launch_split(split, Z, (region, stride_rk, stride_rc), (sample, stride_sb, stride_sk),
                      (probs, log_probs, energy, weights), row_stats, flags,
                      energy_temperature, routing_temperature)
    elif _use_rows(n_experts, n_classes, _MAX_ROW_FWD):
        args = (*args[:-4], n_samples, 1, *args[-2:])
        flags["WIDE"] = _int64_needed(
            Z, probs, energy, *(t for t in (row_stats, class_stats) if t is not None))
        flags.pop("BLOCK_K")
        flags.update(N_EXPERTS=n_experts, N_CLASSES=n_classes,
                     BLOCK_C=triton.next_power_of_2(n_classes))
        _launch_rows(_fwd_rows_tuned, n_samples, args, flags)
    else:
        _launch(_fwd_tuned, _fwd_fixed, (n_samples,), args, flags)
    return probs, energy, weights, log_probs, (row_stats, class_stats)


def _grad_arg(grad: torch.Tensor | None, fallback: torch.Tensor) -> tuple:
    if grad is None:
        return fallback, 0, 0
    return grad, grad.stride(0), grad.stride(1)


def _fusion_backward(
    Z: torch.Tensor,
    region_mask: torch.Tensor | None,
    sample_mask: torch.Tensor | None,
    stats: tuple,
    grad_probs: torch.Tensor | None,
    grad_energy: torch.Tensor | None,
    grad_weights: torch.Tensor | None,
    grad_log_probs: torch.Tensor | None,
    *,
    energy_weights: bool,
    prob_combine: bool,
    energy_temperature: float,
    routing_temperature: float,
) -> torch.Tensor:
    """Launch the backward kernel; returns ``dL/dZ`` (Z's shape and dtype, contiguous).

    ``stats`` is what :func:`_fusion_forward` returned with ``save_stats=True``. Any
    subset of the upstream gradients may be ``None``; they may have any strides.
    """
    n_samples, n_experts, n_classes = Z.shape
    grad_z = torch.empty(Z.shape, dtype=Z.dtype, device=Z.device)
    if n_samples == 0:
        return grad_z
    row_stats, class_stats = stats
    region, stride_rk, stride_rc = _mask_arg(region_mask, row_stats)
    sample, stride_sb, stride_sk = _mask_arg(sample_mask, row_stats)
    args = (
        Z, *Z.stride(),
        region, stride_rk, stride_rc,
        sample, stride_sb, stride_sk,
        row_stats, row_stats.stride(0), row_stats if class_stats is None else class_stats,
        *_grad_arg(grad_probs, row_stats),
        *_grad_arg(grad_log_probs, row_stats),
        *_grad_arg(grad_energy, row_stats),
        *_grad_arg(grad_weights, row_stats),
        grad_z, *grad_z.stride(),
        n_experts, n_classes,
        float(energy_temperature), float(routing_temperature),
    )
    flags = {
        "HAS_REGION": region_mask is not None,
        "HAS_SAMPLE": sample_mask is not None,
        "ENERGY_WEIGHTS": energy_weights,
        "PROB_COMBINE": prob_combine,
        "HAS_T": energy_temperature != 1.0,
        "HAS_GRAD_PROBS": grad_probs is not None,
        "HAS_GRAD_LOG_PROBS": grad_log_probs is not None,
        "HAS_GRAD_ENERGY": grad_energy is not None,
        "HAS_GRAD_WEIGHTS": grad_weights is not None and energy_weights,
        "NEEDS_G": grad_probs is not None or grad_log_probs is not None,
        "BLOCK_K": _block_k(n_experts),
    }
    if _use_rows(n_experts, n_classes, _MAX_ROW_BWD):
        args = (*args[:-4], n_samples, 1, *args[-2:])
        grads = (t for t in (grad_probs, grad_log_probs, grad_energy, grad_weights)
                 if t is not None)
        flags["WIDE"] = _int64_needed(
            Z, grad_z, row_stats, *(t for t in (class_stats,) if t is not None), *grads)
        flags.pop("BLOCK_K")
        flags.update(N_EXPERTS=n_experts, N_CLASSES=n_classes,
                     BLOCK_C=triton.next_power_of_2(n_classes))
        _launch_rows(_bwd_rows_tuned, n_samples, args, flags)
    else:
        _launch(_bwd_tuned, _bwd_fixed, (n_samples,), args, flags)
    return grad_z
