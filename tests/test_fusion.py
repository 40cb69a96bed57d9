"""The PyTorch reference of ``fuse_experts`` against a naive loop and the doc's identity."""

import math

import pytest
import torch
from torch.testing import assert_close

from ltroute.fusion import fuse_experts


def naive_fuse(Z, region, active, weighting, combine, T, tau):
    """Row-by-row, expert-by-expert fusion in float64 with Python loops."""
    B, K, C = Z.shape
    Z = Z.double()
    P = torch.zeros(B, C, dtype=torch.float64)
    E = torch.zeros(B, K, dtype=torch.float64)
    W = torch.zeros(B, K, dtype=torch.float64)
    for b in range(B):
        for k in range(K):
            cols = [c for c in range(C) if region[k, c]]
            E[b, k] = -T * math.log(sum(math.exp(Z[b, k, c].item() / T) for c in cols))
        ks = [k for k in range(K) if active[b, k]]
        if weighting == "energy":
            denom = sum(math.exp(-E[b, j].item() / tau) for j in ks)
            for k in ks:
                W[b, k] = math.exp(-E[b, k].item() / tau) / denom
        else:
            for k in ks:
                W[b, k] = 1.0 / len(ks)
        if combine == "prob":
            for k in ks:
                cols = [c for c in range(C) if region[k, c]]
                z = sum(math.exp(Z[b, k, c].item()) for c in cols)
                for c in cols:
                    P[b, c] += W[b, k] * math.exp(Z[b, k, c].item()) / z
        else:
            logits = [sum(W[b, k] * Z[b, k, c].item() for k in ks if region[k, c])
                      for c in range(C)]
            z = sum(math.exp(v) for v in logits)
            for c in range(C):
                P[b, c] = math.exp(logits[c]) / z
    return P, E, W


def random_masks(B, K, C, generator):
    region = torch.rand(K, C, generator=generator) < 0.6
    region[torch.arange(K), torch.randint(0, C, (K,), generator=generator)] = True
    active = torch.rand(B, K, generator=generator) < 0.6
    active[torch.arange(B), torch.randint(0, K, (B,), generator=generator)] = True
    return region, active


@pytest.mark.parametrize("weighting", ["energy", "uniform"])
@pytest.mark.parametrize("combine", ["prob", "logit"])
@pytest.mark.parametrize("masks", [False, True])
@pytest.mark.parametrize("temps", [(1.0, 1.0), (2.0, 0.5)])
def test_reference_matches_naive_loop(weighting, combine, masks, temps):
    g = torch.Generator().manual_seed(0)
    B, K, C = 5, 3, 7
    Z = torch.randn(B, K, C, generator=g) * 3
    if masks:
        region, active = random_masks(B, K, C, g)
    else:
        region, active = torch.ones(K, C, dtype=torch.bool), torch.ones(B, K, dtype=torch.bool)
    T, tau = temps
    out = fuse_experts(Z, region_mask=region if masks else None,
                       sample_mask=active if masks else None, weighting=weighting,
                       combine=combine, energy_temperature=T, routing_temperature=tau,
                       return_log_probs=True)
    P, E, W = naive_fuse(Z, region, active, weighting, combine, T, tau)
    assert_close(out.probs.double(), P, atol=1e-6, rtol=1e-5)
    assert_close(out.energy.double(), E, atol=1e-5, rtol=1e-5)
    assert_close(out.weights.double(), W, atol=1e-6, rtol=1e-5)
    finite = P > 0
    assert_close(out.log_probs[finite].double(), P[finite].log(), atol=1e-5, rtol=1e-5)
    assert torch.all(out.log_probs[~finite] == -torch.inf)


@pytest.mark.parametrize("nested", [False, True])
def test_stitched_softmax_identity(nested):
    """T = tau = 1, combine='prob': P(y) = sum_{k: y in S_k} e^{z_ky} / sum_k sum_{S_k} e^z."""
    g = torch.Generator().manual_seed(1)
    B, K, C = 6, 3, 9
    Z = torch.randn(B, K, C, generator=g, dtype=torch.float64) * 4
    region = torch.zeros(K, C, dtype=torch.bool)
    groups = [range(0, 3), range(3, 6), range(6, 9)]
    for k in range(K):
        for j in range(k if nested else k, K if nested else k + 1):
            region[k, list(groups[j])] = True
    out = fuse_experts(Z, region_mask=region)
    numer = (Z.exp() * region).sum(dim=1)
    expected = numer / numer.sum(dim=1, keepdim=True)
    assert_close(out.probs, expected, atol=1e-12, rtol=1e-10)
    if not nested:
        owner = region.float().argmax(dim=0)
        stitched = Z[:, owner, torch.arange(C)]
        assert_close(out.probs, torch.softmax(stitched, dim=1), atol=1e-12, rtol=1e-10)


def test_single_expert_is_plain_softmax():
    Z = torch.randn(4, 1, 11)
    for combine in ("prob", "logit"):
        out = fuse_experts(Z, combine=combine, return_log_probs=True)
        assert_close(out.probs, torch.softmax(Z[:, 0], dim=1))
        assert_close(out.log_probs, torch.log_softmax(Z[:, 0], dim=1))
        assert_close(out.weights, torch.ones(4, 1))
        assert_close(out.energy[:, 0], -torch.logsumexp(Z[:, 0], dim=1))


def test_uniform_logit_is_mean_of_logits_softmax():
    """RIDE's ensemble: softmax of the mean expert logit over the active prefix."""
    Z = torch.randn(5, 3, 6)
    active = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1], [1, 1, 0], [1, 0, 0]], dtype=bool)
    out = fuse_experts(Z, sample_mask=active, weighting="uniform", combine="logit")
    for b in range(5):
        n = int(active[b].sum())
        assert_close(out.probs[b], torch.softmax(Z[b, :n].mean(0), dim=0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_probabilities_and_weights_sum_to_one(dtype):
    g = torch.Generator().manual_seed(2)
    Z = (torch.randn(8, 4, 13, generator=g) * 10).to(dtype)
    region, active = random_masks(8, 4, 13, g)
    region[:, :] |= torch.eye(4, 13, dtype=torch.bool)  # keep regions non-empty
    for combine in ("prob", "logit"):
        out = fuse_experts(Z, region_mask=region, sample_mask=active, combine=combine)
        assert out.probs.dtype == torch.float32
        assert torch.all(out.probs >= 0)
        assert_close(out.probs.sum(1), torch.ones(8))
        assert_close(out.weights.sum(1), torch.ones(8))
        assert torch.all(out.weights[~active] == 0)


def test_extreme_logits_stay_finite():
    Z = torch.tensor([[[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4]]])
    out = fuse_experts(Z, return_log_probs=True)
    assert torch.isfinite(out.probs).all() and torch.isfinite(out.energy).all()
    assert_close(out.probs.sum(1), torch.ones(1))
    # The second expert's energy is 1e4 - log(3): its weight underflows to zero.
    assert_close(out.energy[0, 1], torch.tensor(1e4 - math.log(3)))
    assert out.weights[0, 1] == 0


def nonfinite_case():
    """Rows 0-5 of logits with one non-finite entry each (row 6 clean) and their masks.

    Expert 2 is inactive in every row and class 4 lies outside expert 0's region, so a
    NaN/+inf there touches no probability.
    """
    g = torch.Generator().manual_seed(21)
    Z = torch.randn(7, 3, 5, generator=g)
    region = torch.ones(3, 5, dtype=torch.bool)
    region[0, 4] = False
    active = torch.tensor([[True, True, False]] * 7)
    Z[0, 1, 2] = torch.inf  # active expert, in region: row poisoned, energy -inf
    Z[1, 0, 1] = torch.nan  # active expert, in region: row poisoned, energy NaN
    Z[2, 0, 3] = torch.nan
    Z[2, 0, 0] = torch.inf  # NaN and +inf together: energy NaN
    Z[3, 2, 0] = torch.nan  # inactive expert: its energy only
    Z[4, 0, 4] = torch.nan  # outside expert 0's region: nothing
    Z[5, 1, 3] = -torch.inf  # -inf is an impossible class, not an error
    return Z, region, active


@pytest.mark.parametrize("weighting", ["energy", "uniform"])
@pytest.mark.parametrize("combine", ["prob", "logit"])
def test_nan_and_inf_logits_never_become_probabilities(weighting, combine):
    Z, region, active = nonfinite_case()
    out = fuse_experts(Z, region_mask=region, sample_mask=active, weighting=weighting,
                       combine=combine, return_log_probs=True)
    poisoned = torch.tensor([True, True, True, False, False, False, False])
    assert torch.isnan(out.probs[poisoned]).all() and torch.isnan(out.log_probs[poisoned]).all()
    assert torch.isfinite(out.probs[~poisoned]).all()
    assert_close(out.probs[~poisoned].sum(1), torch.ones(4))
    assert out.energy[0, 1] == -torch.inf and torch.isnan(out.energy[1, 0])
    assert torch.isnan(out.energy[2, 0]) and torch.isnan(out.energy[3, 2])
    finite = torch.ones_like(out.energy, dtype=torch.bool)
    finite[0, 1] = finite[1, 0] = finite[2, 0] = finite[3, 2] = False
    assert torch.isfinite(out.energy[finite]).all()
    if weighting == "energy":  # the weights of a poisoned row are NaN where active
        assert torch.isnan(out.weights[:3][active[:3]]).all()
    assert torch.isfinite(out.weights[3:]).all()
    assert torch.all(out.weights[~active] == 0)
    # Clean rows are what they would be with the bad entries replaced by anything finite.
    clean = Z.clone()
    clean[3, 2, 0] = clean[4, 0, 4] = 123.0
    ref = fuse_experts(clean, region_mask=region, sample_mask=active, weighting=weighting,
                       combine=combine)
    assert_close(out.probs[3:5], ref.probs[3:5])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("energy_temperature", [1.0, 2.5])
def test_mean_logit_shortcut_equals_the_reference(dtype, energy_temperature, monkeypatch):
    """Equal weights over every expert and class without gradients (RIDE's and the
    single-expert estimators' prediction) take a shortcut: the reference's values,
    non-finite logits included, and the reference's autograd path when a gradient is
    needed."""
    import ltroute.fusion as fusion_module
    from ltroute.fusion import fuse_experts_reference

    taken = []
    shortcut = fusion_module._fuse_mean_logits
    monkeypatch.setattr(fusion_module, "_fuse_mean_logits",
                        lambda *args: taken.append(1) or shortcut(*args))
    Z, _, _ = nonfinite_case()
    Z = torch.cat([Z, torch.randn(3, 3, 5) * 30, torch.full((1, 3, 5), -torch.inf)])
    Z = Z.to(dtype)
    options = dict(weighting="uniform", combine="logit", return_log_probs=True,
                   energy_temperature=energy_temperature)
    # NaN rows: a NaN or +inf logit in any expert (rows 0-4 of nonfinite_case), in the
    # first expert (rows 1, 2, 4), and every logit -inf (the last row).
    for z, nan_rows in ((Z, [0, 1, 2, 3, 4, 10]), (Z[:, :1], [1, 2, 4, 10])):
        expected = fuse_experts_reference(z, **options)
        with torch.no_grad():
            out = fuse_experts(z, **options)
        for got, want in zip(out, expected, strict=True):
            assert got.dtype == want.dtype
            assert_close(got, want, equal_nan=True)
        assert torch.isnan(out.probs).any(dim=1).nonzero().flatten().tolist() == nan_rows
    assert len(taken) == 2  # both calls took the shortcut
    # A gradient needed: the reference's graph, whatever the grad mode of the caller.
    leaf = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    out = fuse_experts(leaf, **options)
    assert out.probs.grad_fn is not None and len(taken) == 2
    torch.autograd.grad(out.log_probs[:, 0].sum(), leaf)


def test_gradients_match_naive_autograd_and_stay_finite_with_uncovered_classes():
    g = torch.Generator().manual_seed(3)
    Z = torch.randn(4, 2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    # Class 4 is in no region: probability 0, log-probability -inf, zero gradient.
    region = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 1, 1, 0]], dtype=torch.bool)
    out = fuse_experts(Z, region_mask=region, return_log_probs=True)
    assert torch.all(out.probs[:, 4] == 0)
    y = torch.tensor([0, 1, 2, 3])
    loss = -out.log_probs[torch.arange(4), y].mean() + out.energy.square().mean()
    loss.backward()
    assert torch.isfinite(Z.grad).all()
    assert torch.all(Z.grad[:, :, 4] == 0)
    z = Z.detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: fuse_experts(t, region_mask=region).probs, (z,))


@pytest.mark.parametrize("combine", ["prob", "logit"])
def test_gradcheck_all_switches(combine):
    g = torch.Generator().manual_seed(4)
    Z = torch.randn(3, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    region, active = random_masks(3, 3, 4, g)

    def f(z):
        out = fuse_experts(z, region_mask=region, sample_mask=active, combine=combine,
                           energy_temperature=1.5, routing_temperature=0.7)
        return out.probs, out.energy, out.weights

    assert torch.autograd.gradcheck(f, (Z,))


def test_non_contiguous_input():
    Z = torch.randn(7, 5, 3).transpose(1, 2)  # (7, 3, 5), strided
    assert not Z.is_contiguous()
    a = fuse_experts(Z)
    b = fuse_experts(Z.contiguous())
    assert_close(a.probs, b.probs)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"Z": [[[0.0]]]}, TypeError, "torch.Tensor"),
        ({"Z": torch.zeros(2, 3)}, ValueError, "3 dimensions"),
        ({"Z": torch.zeros(2, 3, 4, dtype=torch.int64)}, TypeError, "float"),
        ({"Z": torch.zeros(2, 0, 4)}, ValueError, "at least one expert"),
        ({"weighting": "max"}, ValueError, "weighting"),
        ({"combine": "sum"}, ValueError, "combine"),
        ({"backend": "cuda"}, ValueError, "backend"),
        ({"energy_temperature": 0.0}, ValueError, "energy_temperature"),
        ({"routing_temperature": "1"}, TypeError, "routing_temperature"),
        ({"region_mask": torch.ones(3, 4)}, TypeError, "torch.bool"),
        ({"region_mask": torch.ones(2, 4, dtype=torch.bool)}, ValueError, r"\(3, 4\)"),
        ({"region_mask": torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]], dtype=bool)},
         ValueError, r"expert\(s\) \[2\]"),
        ({"sample_mask": torch.zeros(2, 3, dtype=torch.bool)}, ValueError, "no active expert"),
    ],
)
def test_bad_input_raises_named_error(kwargs, error, match):
    args = {"Z": torch.zeros(2, 3, 4)} | kwargs
    Z = args.pop("Z")
    with pytest.raises(error, match=match):
        fuse_experts(Z, **args)


# Backend dispatch (no Triton needed: the kernel tests live in test_fusion_kernel.py).


def test_auto_backend_runs_the_reference_on_cpu(monkeypatch):
    import ltroute.fusion as fusion_module

    def fail():
        raise AssertionError("backend='auto' must not load the Triton kernels for CPU tensors")

    monkeypatch.setattr(fusion_module, "_triton_kernels", fail)
    Z = torch.randn(2, 3, 4, requires_grad=True)
    out = fuse_experts(Z)
    assert "Triton" not in type(out.probs.grad_fn).__name__
    assert_close(out.probs, fuse_experts(Z, backend="torch").probs, rtol=0, atol=0)


def test_triton_backend_on_cpu_outside_the_interpreter_says_so(monkeypatch):
    import ltroute.fusion as fusion_module

    class CompiledKernels:  # what ltroute.kernels.fusion looks like without TRITON_INTERPRET
        _INTERPRETED = False

    monkeypatch.setattr(fusion_module, "_triton_kernels", lambda: CompiledKernels)
    with pytest.raises(ValueError, match="CUDA device.*TRITON_INTERPRET=1"):
        fuse_experts(torch.zeros(2, 3, 4), backend="triton")


@pytest.mark.parametrize(
    "Z, error, match",
    [
        (torch.zeros(2, 3, 4, dtype=torch.float64), TypeError, "float64"),
        (torch.zeros(2, 65, 4), ValueError, "at most 64 experts"),
    ],
)
def test_triton_backend_rejects_unsupported_inputs(Z, error, match):
    with pytest.raises(error, match=match):
        fuse_experts(Z, backend="triton")


def test_fusion_imports_and_runs_without_triton():
    """Triton is a Linux-only dependency: without it, 'auto' works and 'triton' says why."""
    import subprocess
    import sys

    code = """if True:
        import sys
        sys.modules["triton"] = None  # any `import triton` now raises ImportError
        import torch
        from ltroute.fusion import fuse_experts
        assert fuse_experts(torch.randn(2, 3, 4)).probs.shape == (2, 4)
        try:
            fuse_experts(torch.randn(2, 3, 4), backend="triton")
        except ImportError as exc:
            assert "pip install triton" in str(exc), exc
        else:
            raise AssertionError("backend='triton' without triton must raise ImportError")
    """
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
