"""The Triton fusion kernels against the PyTorch reference, forward and backward.

On a machine without CUDA the kernels run in the Triton interpreter. Triton reads
``TRITON_INTERPRET`` when ``@triton.jit`` decorates -- for its own ``tl.max``/``tl.sum``
when triton is first imported -- and importing ltroute already imports triton (through
``torch.utils.flop_counter``), so ``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before
any import when CUDA is absent; this module does the same when it is the first to import
triton. If triton was imported in compiled mode anyway, the interpreter tests skip with
that reason. On a CUDA machine the interpreter tests are skipped (unless the whole run sets
``TRITON_INTERPRET=1``) and ``TestCompiledKernel`` compares the compiled kernels with the
reference at large shapes.

Every comparison runs the same inputs and the same upstream gradients through both
backends and checks all outputs and ``dL/dZ`` with ``torch.testing.assert_close``.
"""

import os
import sys

import pytest
import torch

_CUDA = torch.cuda.is_available()
if not _CUDA and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch.testing import assert_close  # noqa: E402

import ltroute.fusion as fusion_module  # noqa: E402
from ltroute.fusion import fuse_experts  # noqa: E402

kernels = fusion_module._triton_kernels()  # ltroute.kernels.fusion
INTERPRETER = kernels._INTERPRETED
needs_interpreter = pytest.mark.skipif(
    not INTERPRETER,
    reason="the Triton kernels were not decorated for the interpreter (CUDA present, or "
    "triton imported before TRITON_INTERPRET=1 could be set)",
)


def interpreter_test(fn):
    """Mark a test as running the kernels through ``TRITON_INTERPRET=1`` on the CPU."""
    return pytest.mark.interpreter(needs_interpreter(fn))


# Forward outputs are float32 computed from the same float32 values in both backends, so
# they agree to float32 rounding whatever the input dtype. Gradients are returned in the
# input dtype: one rounding of that dtype apart. Absolute tolerances are relative to the
# largest magnitude in the compared tensor (rounding errors scale with it).
_GRAD_RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
_FWD_RTOL = 1e-5
# 16 float32 ulps of a logit of 1e4, in units of _FWD_RTOL (see test_extreme_logits).
_LARGE_LOGIT_FACTOR = 16 * 1e4 * torch.finfo(torch.float32).eps / _FWD_RTOL


def _check(actual, expected, rtol):
    if expected is None:
        assert actual is None
        return
    finite = torch.isfinite(expected)
    scale = float(expected[finite].abs().max()) if finite.any() else 1.0
    assert_close(actual, expected, rtol=rtol, atol=rtol * max(1.0, scale), equal_nan=False)


def make_case(B, K, C, *, dtype=torch.float32, masks="both", scale=3.0, strided=False,
              seed=0, device="cpu"):
    """Logits (optionally strided) and masks; every region and sample row non-empty."""
    g = torch.Generator().manual_seed(seed)
    if strided:  # (B, C, K) storage viewed as (B, K, C): no unit stride along C
        Z = (torch.randn(B, C, K, generator=g) * scale).to(dtype).transpose(1, 2)
    else:
        Z = (torch.randn(B, K, C, generator=g) * scale).to(dtype)
    region = sample = None
    if masks in ("both", "region"):
        region = torch.rand(K, C, generator=g) < 0.6
        region[torch.arange(K), torch.randint(0, C, (K,), generator=g)] = True
    if masks in ("both", "sample"):
        sample = torch.rand(B, K, generator=g) < 0.6
        sample[torch.arange(B), torch.randint(0, K, (B,), generator=g)] = True
    to = (lambda t: None if t is None else t.to(device))  # noqa: E731
    return Z.to(device), to(region), to(sample)


def upstream_grads(out, seed=0, which=("probs", "energy", "weights", "log_probs")):
    """Random upstream gradients for the chosen outputs (zero where log P is -inf)."""
    g = torch.Generator().manual_seed(seed + 1)
    grads = {}
    for name in which:
        value = getattr(out, name)
        if value is None or not value.requires_grad:
            continue
        grad = torch.randn(value.shape, generator=g).to(value.device)
        if name == "log_probs":
            grad = torch.where(torch.isfinite(value), grad, torch.zeros_like(grad))
        grads[name] = grad
    return grads


def compare(Z, region, sample, *, grads=("probs", "energy", "weights", "log_probs"),
            rtol_factor=1.0, seed=0, **kwargs):
    """Run both backends on ``Z`` and compare every output and ``dL/dZ``.

    ``rtol_factor`` loosens the float32 tolerances (compiled kernels use fast
    ``exp``/``log`` and reduce long rows in a different order than PyTorch); a gradient in
    float16/bfloat16 keeps at least the tolerance of its final rounding.
    """
    kwargs.setdefault("return_log_probs", True)
    z_ref = Z.detach().clone().requires_grad_()
    z_tri = Z.detach().clone().requires_grad_()
    ref = fuse_experts(z_ref, region_mask=region, sample_mask=sample, backend="torch",
                       **kwargs)
    tri = fuse_experts(z_tri, region_mask=region, sample_mask=sample, backend="triton",
                       **kwargs)
    for name in ("probs", "energy", "weights", "log_probs"):
        expected = getattr(ref, name)
        actual = getattr(tri, name)
        if expected is not None:
            assert actual.dtype == torch.float32
            assert actual.requires_grad == expected.requires_grad, name
            expected, actual = expected.detach(), actual.detach()
        _check(actual, expected, _FWD_RTOL * rtol_factor)
    upstream = upstream_grads(ref, seed=seed, which=grads)
    if not upstream:
        return
    names = list(upstream)
    grad_ref = torch.autograd.grad([getattr(ref, n) for n in names], z_ref,
                                   [upstream[n] for n in names])[0]
    grad_tri = torch.autograd.grad([getattr(tri, n) for n in names], z_tri,
                                   [upstream[n] for n in names])[0]
    assert grad_tri.dtype == Z.dtype and grad_tri.shape == Z.shape
    grad_rtol = max(_GRAD_RTOL[Z.dtype], _GRAD_RTOL[torch.float32] * rtol_factor)
    _check(grad_tri, grad_ref, grad_rtol)


@pytest.fixture
def block_c(monkeypatch):
    """Force the kernels' class-block size (``None``: the configured one)."""

    def force(value):
        monkeypatch.setattr(kernels, "_BLOCK_C_OVERRIDE", value)

    return force


# ---------------------------------------------------------------------------------------
# Interpreter: the grid
# ---------------------------------------------------------------------------------------

# (B, K, C, forced BLOCK_C). The interpreter's configured block is 1024 classes, so
# C = 2500 tiles on its own; the forced small blocks make C = 7 and 128 tile too.
SHAPES = [
    pytest.param(3, 1, 1, None, id="C1-K1"),
    pytest.param(3, 3, 7, None, id="C7-K3"),
    pytest.param(3, 8, 7, 4, id="C7-K8-tiled"),
    pytest.param(2, 3, 128, None, id="C128-K3"),
    pytest.param(2, 8, 128, 32, id="C128-K8-tiled"),
    pytest.param(2, 3, 1000, None, id="C1000-K3"),
    pytest.param(2, 1, 2500, None, id="C2500-K1-tiled"),
    pytest.param(1, 8, 2500, None, id="C2500-K8-tiled"),
]
# "plain": no masks, T = tau = 1; "masked": both masks, T = 1.5, tau = 0.7.
VARIANTS = {
    "plain": {"masks": None, "energy_temperature": 1.0, "routing_temperature": 1.0},
    "masked": {"masks": "both", "energy_temperature": 1.5, "routing_temperature": 0.7},
}


@interpreter_test
@pytest.mark.parametrize("B, K, C, block", SHAPES)
@pytest.mark.parametrize("weighting", ["energy", "uniform"])
@pytest.mark.parametrize("combine", ["prob", "logit"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kernel_matches_reference(B, K, C, block, weighting, combine, variant, block_c):
    block_c(block)
    options = dict(VARIANTS[variant])
    Z, region, sample = make_case(B, K, C, masks=options.pop("masks"), seed=C + K)
    compare(Z, region, sample, weighting=weighting, combine=combine, **options)


@interpreter_test
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("weighting", ["energy", "uniform"])
@pytest.mark.parametrize("combine", ["prob", "logit"])
@pytest.mark.parametrize("block", [None, 4])
def test_low_precision_strided_input(dtype, weighting, combine, block, block_c):
    """fp16/bf16/fp32 logits read through their strides (C is not the unit-stride dim)."""
    block_c(block)
    Z, region, sample = make_case(4, 3, 13, dtype=dtype, strided=True, seed=5)
    assert not Z.is_contiguous()
    compare(Z, region, sample, weighting=weighting, combine=combine, energy_temperature=0.8)


@interpreter_test
@pytest.mark.parametrize("masks", ["region", "sample"])
@pytest.mark.parametrize("combine", ["prob", "logit"])
def test_one_mask_only(masks, combine):
    Z, region, sample = make_case(3, 4, 9, masks=masks, seed=7)
    compare(Z, region, sample, combine=combine, routing_temperature=2.0)


@interpreter_test
@pytest.mark.parametrize(
    "grads",
    [("probs",), ("log_probs",), ("energy",), ("weights",), ("energy", "weights"),
     ("probs", "weights")],
)
@pytest.mark.parametrize("combine", ["prob", "logit"])
@pytest.mark.parametrize("block", [None, 4])
def test_any_subset_of_upstream_gradients(grads, combine, block, block_c):
    """Outputs without a gradient reach the backward kernel as ``None``."""
    block_c(block)
    Z, region, sample = make_case(3, 3, 11, seed=11)
    compare(Z, region, sample, combine=combine, energy_temperature=2.0, grads=grads)


@interpreter_test
@pytest.mark.parametrize("combine", ["prob", "logit"])
@pytest.mark.parametrize("block", [None, 4])
def test_extreme_logits(combine, block, block_c):
    """Logits of +-1e4, a row that is -1e4 everywhere, and a large negative row.

    A softmax's relative condition number is ``|z|``: the float32 rounding of sums of
    logits of size 1e4 (``1e4 * eps ~ 1e-3``) legitimately differs between two summation
    orders, in both backends, so tolerances scale with the logits here.
    """
    block_c(block)
    Z, region, sample = make_case(4, 3, 10, seed=3)
    Z[0] = torch.where(torch.rand(3, 10, generator=torch.Generator().manual_seed(0)) < 0.5,
                       1e4, -1e4)
    Z[1] = -1e4
    Z[2] = Z[2] - 5e3
    Z[3, 1] = 1e4  # one expert dominates the energy weights; the others underflow
    for variant in VARIANTS.values():
        options = dict(variant)
        masked = options.pop("masks") is not None
        compare(Z, region if masked else None, sample if masked else None, combine=combine,
                rtol_factor=_LARGE_LOGIT_FACTOR, **options)


@interpreter_test
@pytest.mark.parametrize("combine", ["prob", "logit"])
@pytest.mark.parametrize("block", [None, 2])
def test_uncovered_classes(combine, block, block_c):
    """Classes in no region: P = 0 and log P = -inf for "prob", zero gradient there."""
    block_c(block)
    Z, _, sample = make_case(3, 2, 6, seed=13)
    region = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    compare(Z, region, sample, combine=combine)
    out = fuse_experts(Z.requires_grad_(), region_mask=region, combine=combine,
                       return_log_probs=True, backend="triton")
    if combine == "prob":
        assert torch.all(out.probs[:, 3:] == 0)
        assert torch.all(out.log_probs[:, 3:] == -torch.inf)
    y = torch.tensor([0, 1, 2])
    (-out.log_probs[torch.arange(3), y].mean()).backward()
    assert torch.isfinite(Z.grad).all()
    assert torch.all(Z.grad[:, :, 3:] == 0)


@interpreter_test
@pytest.mark.parametrize("weighting", ["energy", "uniform"])
@pytest.mark.parametrize("combine", ["prob", "logit"])
@pytest.mark.parametrize("block", [None, 2])
@pytest.mark.parametrize("T", [1.0, 1.5])
def test_nan_and_inf_logits_match_reference(weighting, combine, block, T, block_c):
    """NaN / +inf logits: same NaN pattern and values as the reference, clean rows intact.

    A NaN or +inf where an active expert covers makes the row's ``P`` and ``log P`` NaN
    (never a plausible probability); energies are exact (``-inf`` for ``+inf``, NaN for
    NaN); entries outside every active region change nothing. Gradients match in the rows
    whose region logits are not NaN or ``+inf`` (a row with a NaN energy, even of an
    inactive expert, has an unspecified gradient); a ``-inf`` logit (row 5) is compared
    everywhere, its own entry included.
    """
    block_c(block)
    g = torch.Generator().manual_seed(29)
    Z = torch.randn(7, 3, 5, generator=g)
    region = torch.ones(3, 5, dtype=torch.bool)
    region[0, 4] = False
    sample = torch.tensor([[True, True, False]] * 7)
    Z[0, 1, 2] = torch.inf
    Z[1, 0, 1] = torch.nan
    Z[2, 0, 3] = torch.nan
    Z[2, 0, 0] = torch.inf
    Z[3, 2, 0] = torch.nan  # inactive expert
    Z[4, 0, 4] = torch.inf  # outside expert 0's region
    Z[5, 1, 3] = -torch.inf
    kwargs = dict(region_mask=region, sample_mask=sample, weighting=weighting,
                  combine=combine, energy_temperature=T, return_log_probs=True)
    z_ref = Z.clone().requires_grad_()
    z_tri = Z.clone().requires_grad_()
    ref = fuse_experts(z_ref, backend="torch", **kwargs)
    tri = fuse_experts(z_tri, backend="triton", **kwargs)
    for name in ("probs", "energy", "weights", "log_probs"):
        expected, actual = getattr(ref, name).detach(), getattr(tri, name).detach()
        assert_close(actual, expected, rtol=_FWD_RTOL, atol=_FWD_RTOL, equal_nan=True)
    assert torch.isnan(tri.probs[:3]).all() and torch.isfinite(tri.probs[3:]).all()
    clean = [4, 5, 6]
    upstream = torch.randn(7, 5, generator=g)
    (grad_ref,) = torch.autograd.grad(ref.probs[clean], z_ref, upstream[clean])
    (grad_tri,) = torch.autograd.grad(tri.probs[clean], z_tri, upstream[clean])
    assert torch.isfinite(grad_tri[5]).all()
    ok = torch.isfinite(Z) | (Z == -torch.inf)
    _check(grad_tri[clean][ok[clean]], grad_ref[clean][ok[clean]], _GRAD_RTOL[torch.float32])


@interpreter_test
@pytest.mark.parametrize("weighting", ["energy", "uniform"])
@pytest.mark.parametrize("block", [None, 2])
@pytest.mark.parametrize("T", [1.0, 1.5])
def test_logit_combination_with_minus_inf_logits_matches_reference(weighting, block, T,
                                                                    block_c):
    """``combine="logit"`` with ``-inf`` logits inside active regions: the class is ruled
    out (``P = 0``), outputs and every gradient are finite and match the reference, in the
    single-tile (``block=None``) and tiled (``block=2``) kernels alike, with upstream
    gradients for all four outputs (the log P of a ruled-out class gets none)."""
    block_c(block)
    Z, region, sample = make_case(5, 3, 7, seed=31)
    region[:, :] = True
    sample[:, :] = True
    sample[3, 2] = False
    Z[0, 1, 2] = -torch.inf  # the case of tests/test_reliability.py
    Z[1, 0, 5] = -torch.inf
    Z[1, 2, 5] = -torch.inf  # two experts rule out the same class
    Z[2, 0, 0] = -torch.inf
    Z[2, 1, 6] = -torch.inf  # two classes of one row, in different tiles
    Z[3, 2, 3] = -torch.inf  # inactive expert: changes nothing
    compare(Z, region, sample, combine="logit", weighting=weighting, energy_temperature=T)
    z_tri = Z.clone().requires_grad_()
    out = fuse_experts(z_tri, region_mask=region, sample_mask=sample, combine="logit",
                       weighting=weighting, energy_temperature=T, return_log_probs=True,
                       backend="triton")
    assert out.probs[0, 2] == 0 and out.probs[1, 5] == 0 and out.probs[2, 6] == 0
    assert torch.isfinite(out.probs[3]).all() and (out.probs[3] > 0).all()
    (-out.log_probs[:, 1].sum()).backward()
    assert torch.isfinite(z_tri.grad).all()


@interpreter_test
def test_expanded_upstream_gradients_and_no_grad_path():
    """``.sum()`` hands the backward a stride-0 gradient; no-grad runs skip the save."""
    Z, region, sample = make_case(3, 3, 8, seed=17)
    z_ref = Z.clone().requires_grad_()
    z_tri = Z.clone().requires_grad_()
    for z, backend in ((z_ref, "torch"), (z_tri, "triton")):
        out = fuse_experts(z, region_mask=region, sample_mask=sample, backend=backend)
        (out.probs.sum() + 2 * out.energy.sum() + (out.weights * 3).sum()).backward()
    _check(z_tri.grad, z_ref.grad, _GRAD_RTOL[torch.float32])
    with torch.no_grad():
        out = fuse_experts(z_tri, region_mask=region, sample_mask=sample, backend="triton")
    assert not out.probs.requires_grad
    _check(out.probs, fuse_experts(Z, region_mask=region, sample_mask=sample).probs,
           _FWD_RTOL)


@interpreter_test
def test_empty_batch():
    Z = torch.zeros(0, 3, 5, requires_grad=True)
    out = fuse_experts(Z, backend="triton", return_log_probs=True)
    assert out.probs.shape == (0, 5) and out.energy.shape == (0, 3)
    out.probs.sum().backward()
    assert Z.grad.shape == (0, 3, 5)


@interpreter_test
@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    B=st.integers(1, 3),
    K=st.integers(1, 5),
    C=st.integers(1, 20),
    block=st.sampled_from([None, 2, 8]),
    weighting=st.sampled_from(["energy", "uniform"]),
    combine=st.sampled_from(["prob", "logit"]),
    masks=st.sampled_from([None, "region", "sample", "both"]),
    T=st.sampled_from([1.0, 0.5, 3.0]),
    tau=st.sampled_from([1.0, 0.25, 4.0]),
    scale=st.sampled_from([0.1, 3.0, 30.0]),
    seed=st.integers(0, 2**16),
)
def test_property_random_small_shapes(B, K, C, block, weighting, combine, masks, T, tau, scale,
                                      seed):
    kernels._BLOCK_C_OVERRIDE = block
    try:
        Z, region, sample = make_case(B, K, C, masks=masks, scale=scale, seed=seed)
        compare(Z, region, sample, weighting=weighting, combine=combine,
                energy_temperature=T, routing_temperature=tau, seed=seed)
    finally:
        kernels._BLOCK_C_OVERRIDE = None


# ---------------------------------------------------------------------------------------
# Interpreter: the multi-row kernels (several rows per program, small K x C)
# ---------------------------------------------------------------------------------------


@pytest.fixture
def block_b(monkeypatch):
    """Force the multi-row kernels' rows per program (``None``: the configured two)."""

    def force(value):
        monkeypatch.setattr(kernels, "_BLOCK_B_OVERRIDE", value)

    return force


def test_small_rows_take_the_multi_row_kernels():
    """The shapes below exercise the multi-row kernels, not the one-row kernel."""
    for K, C in ((1, 1), (3, 10), (4, 9), (3, 100), (8, 1000)):
        assert kernels._use_rows(K, C, kernels._MAX_ROW_FWD)
        assert kernels._use_rows(K, C, kernels._MAX_ROW_BWD)
    assert not kernels._use_rows(8, 2500, kernels._MAX_ROW_FWD)


@interpreter_test
@pytest.mark.parametrize("rows", [1, 2, 4])
@pytest.mark.parametrize("weighting", ["energy", "uniform"])
@pytest.mark.parametrize("combine", ["prob", "logit"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_multi_row_kernel_matches_reference(rows, weighting, combine, variant, block_b):
    """B = 7 rows, ``rows`` per program: several programs, a partial last block."""
    block_b(rows)
    options = dict(VARIANTS[variant])
    Z, region, sample = make_case(7, 3, 10, masks=options.pop("masks"), seed=rows)
    compare(Z, region, sample, weighting=weighting, combine=combine, **options)


@interpreter_test
@pytest.mark.parametrize("combine", ["prob", "logit"])
def test_multi_row_kernel_int64_offsets(combine, block_b, monkeypatch):
    """The ``WIDE`` (int64 offsets) variant, forced on small strided tensors."""
    block_b(4)
    monkeypatch.setattr(kernels, "_int64_needed", lambda *tensors: True)
    Z, region, sample = make_case(5, 4, 9, strided=True, seed=3)
    compare(Z, region, sample, combine=combine, energy_temperature=1.5)


@interpreter_test
@pytest.mark.parametrize("weighting", ["energy", "uniform"])
@pytest.mark.parametrize("masks", [None, "region", "both"])
def test_multi_row_underflow_fallback(weighting, masks, block_b):
    """Classes whose mixture probability is under ``2**-100`` (log P far below -69) are
    recomputed in log space: ``log P`` stays finite and exact, as in the reference, and
    so do the gradients; rows without such classes share the program (BLOCK_B = 4)."""
    block_b(4)
    Z, region, sample = make_case(6, 3, 8, masks=masks, seed=41)
    Z[0, :, 0] = 150.0  # class 0 dominates: the others get log P near -150
    Z[2] = Z[2] * 40.0  # log P down to about -300 for some classes
    Z[3, 1, 2] = -500.0  # one expert's logit far below the others
    Z[5, :, :4] = -1e3  # half the classes of a row out of reach, from every expert
    ref = fuse_experts(Z, region_mask=region, sample_mask=sample, weighting=weighting,
                       return_log_probs=True, backend="torch")
    finite = torch.isfinite(ref.log_probs)
    assert (ref.log_probs[finite] < -69.4).any()  # the fallback is exercised
    compare(Z, region, sample, weighting=weighting, grads=("log_probs", "energy"),
            rtol_factor=_LARGE_LOGIT_FACTOR / 10)


def _compare_poisoned_rows(Z, region, sample, g, **kwargs):
    """Kernel against reference on a (7, 3, 5) case whose rows 0 and 1 hold a NaN / +inf
    logit in an active region (NaN rows) and rows 2-5 a logit outside a region, a -inf
    or an inactive expert's NaN: outputs everywhere (NaN where the reference has NaN),
    gradients of the clean rows 2-5 (finite wherever Z is finite or -inf)."""
    kwargs = dict(region_mask=region, sample_mask=sample, return_log_probs=True, **kwargs)
    z_ref = Z.clone().requires_grad_()
    z_tri = Z.clone().requires_grad_()
    ref = fuse_experts(z_ref, backend="torch", **kwargs)
    tri = fuse_experts(z_tri, backend="triton", **kwargs)
    for name in ("probs", "energy", "weights", "log_probs"):
        expected, actual = getattr(ref, name).detach(), getattr(tri, name).detach()
        assert_close(actual, expected, rtol=_FWD_RTOL, atol=_FWD_RTOL, equal_nan=True)
    assert torch.isnan(tri.probs[:2]).all() and torch.isfinite(tri.probs[2:]).all()
    clean = [2, 3, 4, 5]
    upstream = torch.randn(7, 5, generator=g)
    (grad_ref,) = torch.autograd.grad(ref.probs[clean], z_ref, upstream[clean])
    (grad_tri,) = torch.autograd.grad(tri.probs[clean], z_tri, upstream[clean])
    ok = torch.isfinite(Z) | (Z == -torch.inf)
    assert torch.isfinite(grad_tri[clean][ok[clean]]).all()
    _check(grad_tri[clean][ok[clean]], grad_ref[clean][ok[clean]], _GRAD_RTOL[torch.float32])


@interpreter_test
@pytest.mark.parametrize("weighting", ["energy", "uniform"])
@pytest.mark.parametrize("combine", ["prob", "logit"])
@pytest.mark.parametrize("T", [1.0, 1.5])
def test_multi_row_nan_and_inf_logits(weighting, combine, T, block_b):
    """NaN / +inf / -inf logits in a multi-row program (4 rows, the last block partial):
    the poisoned rows are NaN, the others (same program) match the reference, gradients
    included; a -inf logit is compared everywhere."""
    block_b(4)
    g = torch.Generator().manual_seed(43)
    Z = torch.randn(7, 3, 5, generator=g)
    region = torch.ones(3, 5, dtype=torch.bool)
    region[0, 4] = False
    sample = torch.tensor([[True, True, False]] * 7)
    Z[0, 1, 2] = torch.inf
    Z[1, 0, 1] = torch.nan
    Z[4, 0, 4] = torch.inf  # outside expert 0's region
    Z[5, 1, 3] = -torch.inf
    Z[6, 2, 0] = torch.nan  # inactive expert
    _compare_poisoned_rows(Z, region, sample, g, weighting=weighting, combine=combine,
                           energy_temperature=T)


# ---------------------------------------------------------------------------------------
# Interpreter: the split-C forward (small B, large C, combine="prob")
# ---------------------------------------------------------------------------------------


@pytest.fixture
def split(monkeypatch):
    """Force the split-C forward with (BLOCK_C, TILES per chunk)."""

    def force(block, tiles):
        monkeypatch.setattr(kernels, "_SPLIT_OVERRIDE", (block, tiles))

    return force


def test_split_plan_by_shape(monkeypatch):
    """Few rows of large C are split; many rows, small rows and the interpreter are not."""
    monkeypatch.setattr(kernels, "_INTERPRETED", False)
    block_c, tiles, n_chunks, warps = kernels._split_plan(256, 4, 32000)
    assert n_chunks >= 2 and block_c * tiles * n_chunks >= 32000 > block_c * tiles
    assert 256 * n_chunks >= kernels._SPLIT_TARGET_PROGRAMS // 2  # tiles rounded up
    assert 4 * block_c == kernels._SPLIT_TILE
    assert 32 * warps * kernels._SPLIT_PER_THREAD == kernels._SPLIT_TILE
    assert kernels._split_plan(8, 4, 32000)[2] >= 16
    assert kernels._split_plan(8, 16, 1000) is not None
    assert kernels._split_plan(65536, 4, 32000) is None
    assert kernels._split_plan(8, 3, 100) is None  # the multi-row kernels take it
    monkeypatch.setattr(kernels, "_INTERPRETED", True)
    assert kernels._split_plan(256, 4, 32000) is None


@interpreter_test
@pytest.mark.parametrize("tiles", [1, 3])
@pytest.mark.parametrize("weighting", ["energy", "uniform"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_split_matches_reference(tiles, weighting, variant, split):
    """C = 37 in chunks of 4 x tiles classes: several chunks per row, a partial last chunk,
    and (masked) an expert whose region leaves whole chunks empty."""
    split(4, tiles)
    options = dict(VARIANTS[variant])
    masks = options.pop("masks")
    Z, region, sample = make_case(3, 3, 37, masks=masks, seed=tiles)
    if region is not None:
        region[0] = False
        region[0, 1:4] = True
    compare(Z, region, sample, weighting=weighting, combine="prob", **options)


@interpreter_test
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_split_low_precision_strided_input(dtype, split):
    """16-bit logits read through non-unit strides by both split kernels."""
    split(8, 2)
    Z, region, sample = make_case(2, 4, 41, dtype=dtype, strided=True, seed=5)
    compare(Z, region, sample, combine="prob", energy_temperature=1.5)


@interpreter_test
@pytest.mark.parametrize("weighting", ["energy", "uniform"])
@pytest.mark.parametrize("T", [1.0, 1.5])
def test_split_nan_and_inf_logits(weighting, T, split):
    """NaN / +inf / -inf logits in different chunks of a split row: the poisoned rows are
    NaN, the others match the reference, gradients included; -inf compared everywhere."""
    split(2, 1)
    g = torch.Generator().manual_seed(47)
    Z = torch.randn(7, 3, 5, generator=g)
    region = torch.ones(3, 5, dtype=torch.bool)
    region[0, 4] = False
    sample = torch.tensor([[True, True, False]] * 7)
    Z[0, 1, 2] = torch.inf
    Z[1, 0, 4] = torch.nan  # outside expert 0's region: harmless
    Z[1, 1, 0] = torch.nan
    Z[4, 0, 4] = torch.inf  # outside expert 0's region
    Z[5, 1, 3] = -torch.inf
    Z[6, 2, 0] = torch.nan  # inactive expert
    _compare_poisoned_rows(Z, region, sample, g, weighting=weighting, combine="prob",
                           energy_temperature=T)


# ---------------------------------------------------------------------------------------
# Compiled kernels on a GPU (skipped without CUDA)
# ---------------------------------------------------------------------------------------


@pytest.mark.skipif(not _CUDA or INTERPRETER, reason="needs CUDA and compiled Triton kernels")
class TestCompiledKernel:
    """Compiled kernels vs the reference at training-sized shapes, on the GPU."""

    @pytest.mark.parametrize(
        "B, K, C",
        [(4096, 3, 10), (2048, 8, 1000), (512, 16, 8192), (64, 4, 32768), (8, 2, 65537)],
    )
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
    @pytest.mark.parametrize("combine", ["prob", "logit"])
    def test_large_shapes(self, B, K, C, dtype, combine):
        Z, region, sample = make_case(B, K, C, dtype=dtype, seed=B + C, device="cuda")
        compare(Z, region, sample, combine=combine, energy_temperature=1.5,
                routing_temperature=0.7, rtol_factor=10.0)

    @pytest.mark.parametrize("weighting", ["energy", "uniform"])
    def test_strided_and_unmasked(self, weighting):
        Z, _, _ = make_case(1024, 8, 1000, strided=True, masks=None, device="cuda")
        compare(Z, None, None, weighting=weighting, rtol_factor=10.0)

    def test_auto_picks_triton_on_cuda(self):
        Z = torch.randn(8, 3, 10, device="cuda", requires_grad=True)
        out = fuse_experts(Z)
        assert "TritonFusion" in type(out.probs.grad_fn).__name__
