"""Triton kernels for :func:`ltroute.fusion.fuse_experts` (forward and backward).

Layout of this module, top-down: small ``@triton.jit`` helpers, the forward kernel, the
backward kernel, then the host launchers that allocate outputs, pick the block sizes and
launch. The public entry point is ``ltroute.fusion.fuse_experts``; this module is private
and imported lazily (Triton is a Linux-only dependency).

Design
------
One program handles one row ``b`` of ``Z`` (shape ``(B, K, C)``) and keeps all ``K``
experts of a tile of ``BLOCK_C`` classes in registers as a ``(BLOCK_K, BLOCK_C)`` block, so
per-expert reductions run along axis 1 and per-class reductions (the mixture over experts)
along axis 0.

* ``SINGLE_TILE`` (``C <= BLOCK_C``): the row is loaded once and every output is computed
  from registers; this is the one-pass path.
* Otherwise the row is tiled along ``C``: a first sweep keeps an online log-sum-exp per
  expert (running max and rescaled sum), the weights follow from the energies, and a
  second sweep writes ``P`` (``combine="prob"``). ``combine="logit"`` stages the combined
  logits in the output buffer during that sweep and normalises them in a third sweep over
  ``B x C`` values (far fewer than the ``B x K x C`` logits).

Feature switches (region mask, sample mask, weighting, combine, ``T != 1``, optional
outputs, which upstream gradients exist) are ``tl.constexpr`` flags, so every variant
compiles to its own branch-free kernel. Row offsets are computed in int64 and column
offsets are widened to int64 before they are multiplied by a stride, so tensors with more
than ``2**31`` elements, or exotic strides, are addressed correctly. ``Z`` is read through
its strides: no ``.contiguous()`` copy is ever made.

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
time of the bytes the op must move. On an H200 (132 SMs, 1.98 GHz, 4.8 TB/s) a kernel stays
memory-bound below about 28 (fp32) / 14 (bf16) SASS instructions per logit, plus the
output traffic. This design is issue-bound at every shape that matters (table and SASS
analysis in ``benchmarks/results/kernel_cost.md``): one program per row pays the per-row
work (K-vector reductions through shuffles, routing weights, stores) for only K x C
logits, and every element pays int64 address arithmetic, a region-mask load, per-element
``-inf`` guards and two ``exp``. The remedies, not yet built: several rows per program for
small K x C, int32 offsets when they fit, guards per vector, and a split over C when B is
small.

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
def _load_logits(z_row_ptr, stride_zk, stride_zc, offs_k, offs_c, mask):
    """Load a (BLOCK_K, BLOCK_C) block of logits as float32; ``-inf`` where masked."""
    ptrs = (z_row_ptr + offs_k.to(tl.int64)[:, None] * stride_zk
            + offs_c.to(tl.int64)[None, :] * stride_zc)
    return tl.load(ptrs, mask=mask, other=float("-inf")).to(tl.float32)


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
            z = _load_logits(z_row, stride_zk, stride_zc, offs_k, offs_c, valid)
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
                z = _load_logits(z_row, stride_zk, stride_zc, offs_k, offs_c, contrib)
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
                z = _load_logits(z_row, stride_zk, stride_zc, offs_k, offs_c, contrib)
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
                z = _load_logits(z_row, stride_zk, stride_zc, offs_k, offs_c, contrib)
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
    are timed per key instead of the full grid. (Compiled for sm_90 offline, blocks of up
    to 32 elements per thread do not spill for K <= 8; with K = 16 the per-expert vectors
    that every thread replicates push the tiled backward to 255 registers, hence the
    smaller blocks in the candidate set.)
    """

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        block_k = args["BLOCK_K"]
        n_classes = args["n_classes"]
        top = min(max(16, triton.next_power_of_2(n_classes)), max(16, max_tile // block_k))
        wanted = {top, max(16, top // 2), max(16, top // 4)}
        kept = []
        for config in configs:
            block_c = config.kwargs["BLOCK_C"]
            if block_c not in wanted:
                continue
            per_thread = block_k * block_c / (32 * config.num_warps)
            if 4 <= per_thread <= 32:
                kept.append(config)
        if not kept:
            kept = [c for c in configs if c.kwargs["BLOCK_C"] == top and c.num_warps == 1]
        return kept

    return prune


def _configs() -> list[triton.Config]:
    if _INTERPRETED:
        return [triton.Config({"BLOCK_C": _INTERPRETER_BLOCK_C}, num_warps=1)]
    return [triton.Config({"BLOCK_C": block_c}, num_warps=warps)
            for block_c in _BLOCK_C_CHOICES for warps in _WARP_CHOICES]


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
    _launch(_bwd_tuned, _bwd_fixed, (n_samples,), args, flags)
    return grad_z
