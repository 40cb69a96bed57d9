"""Fusion of expert logits: energies, confidence weights and combined probabilities.

One contract serves every estimator (see ``fuse_experts``):

* energy ``E[b, k] = -T * logsumexp_{c in S_k}(Z[b, k, c] / T)``;
* weights ``W = softmax_k(-E / tau)`` over the active experts (``weighting="energy"``)
  or equal over the active experts (``weighting="uniform"``);
* ``combine="prob"``: ``P = sum_k W[b, k] * softmax_{c in S_k}(Z[b, k, :])`` (DQRoute);
  ``combine="logit"``: ``P = softmax_c(sum_k W[b, k] * M[k, c] * Z[b, k, c])`` (RIDE).

This module holds the PyTorch reference implementation (the CPU path and the oracle
for the Triton kernel; without masks and gradients, equal weights with
``combine="logit"`` take a shorter path to the same values), the
``torch.autograd.Function`` around the Triton kernels of ``ltroute.kernels.fusion`` and
the ``fuse_experts`` dispatcher. Triton is imported lazily,
only when the Triton backend runs, so this module imports without it.
"""

from __future__ import annotations

import importlib
import importlib.util
import numbers
from types import ModuleType
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

__all__ = ["FusionResult", "fuse_experts", "fuse_experts_reference"]

_WEIGHTINGS = ("energy", "uniform")
_COMBINES = ("prob", "logit")
_BACKENDS = ("auto", "torch", "triton")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRITON_MAX_EXPERTS = 64


class FusionResult(NamedTuple):
    """Outputs of :func:`fuse_experts`.

    Attributes
    ----------
    probs : torch.Tensor of shape (B, C)
        Fused class probabilities; each row sums to one.
    energy : torch.Tensor of shape (B, K)
        Region energy of every expert (computed for inactive experts too).
    weights : torch.Tensor of shape (B, K)
        Combination weights; zero for inactive experts, each row sums to one.
    log_probs : torch.Tensor of shape (B, C) or None
        ``log(probs)`` computed stably (``-inf`` where a class has probability zero);
        ``None`` unless ``return_log_probs=True``.
    """

    probs: torch.Tensor
    energy: torch.Tensor
    weights: torch.Tensor
    log_probs: torch.Tensor | None


def _masked_logsumexp(x: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """``log(sum(exp(x) * mask))`` along ``dim``: ``-inf`` (with zero gradient) when empty.

    The double ``where`` keeps gradients finite for fully masked slices, where
    ``torch.logsumexp`` of an all ``-inf`` slice would back-propagate NaN. A ``NaN`` in the
    slice gives ``NaN`` and a ``+inf`` (without ``NaN``) gives ``+inf``, as the exact value.
    """
    filled = x.masked_fill(~mask, float("-inf"))
    row_max = filled.amax(dim=dim, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    total = (torch.exp(filled - row_max)).sum(dim=dim, keepdim=True)
    empty = total == 0  # NaN and +inf totals are not empty: they propagate
    safe_total = torch.where(empty, torch.ones_like(total), total)
    out = torch.where(empty, torch.full_like(total, -torch.inf), torch.log(safe_total) + row_max)
    return out.squeeze(dim)


def _poisoned_rows(z: torch.Tensor, contributes: torch.Tensor) -> torch.Tensor:
    """(B, 1) bool: the row has a ``NaN`` or ``+inf`` logit where an active expert covers."""
    bad = torch.isnan(z) | (z == torch.inf)
    return (bad & contributes).flatten(1).any(dim=1, keepdim=True)


def fuse_experts_reference(
    Z: torch.Tensor,
    *,
    region_mask: torch.Tensor | None = None,
    sample_mask: torch.Tensor | None = None,
    weighting: str = "energy",
    combine: str = "prob",
    energy_temperature: float = 1.0,
    routing_temperature: float = 1.0,
    return_log_probs: bool = False,
) -> FusionResult:
    """Pure-PyTorch fusion of expert logits (no input validation; see :func:`fuse_experts`).

    Computes in float32 (float64 inputs stay float64, which makes this an fp64 oracle).
    Differentiable in ``Z`` through ordinary autograd.
    """
    compute_dtype = torch.float64 if Z.dtype == torch.float64 else torch.float32
    z = Z.to(compute_dtype)
    n_samples, n_experts, n_classes = z.shape
    if region_mask is None:
        region = torch.ones(n_experts, n_classes, dtype=torch.bool, device=z.device)
    else:
        region = region_mask.to(device=z.device, dtype=torch.bool)
    if sample_mask is None:
        active = torch.ones(n_samples, n_experts, dtype=torch.bool, device=z.device)
    else:
        active = sample_mask.to(device=z.device, dtype=torch.bool)
    region_b = region.unsqueeze(0).expand(n_samples, -1, -1)

    energy = -energy_temperature * _masked_logsumexp(z / energy_temperature, region_b, dim=2)

    if weighting == "energy":
        scores = (-energy / routing_temperature).masked_fill(~active, float("-inf"))
        log_weights = torch.log_softmax(scores, dim=1)
        weights = torch.where(active, torch.exp(log_weights), torch.zeros_like(log_weights))
        log_weights = torch.where(active, log_weights, torch.full_like(log_weights, -torch.inf))
    else:
        # Uniform weights depend on the masks only, so log(0) = -inf carries no gradient.
        weights = active.to(compute_dtype) / active.sum(dim=1, keepdim=True).to(compute_dtype)
        log_weights = torch.log(weights)

    contributes = region_b & active.unsqueeze(2)
    if combine == "prob":
        # log p_k restricted to S_k (temperature 1), then log-space mixture over experts.
        expert_lse = _masked_logsumexp(z, region_b, dim=2)
        log_pk = z - expert_lse.unsqueeze(2)
        log_probs = _masked_logsumexp(log_weights.unsqueeze(2) + log_pk, contributes, dim=1)
    else:
        # Inactive experts have weight 0; masking them keeps 0 * inf out of the sum. A -inf
        # logit makes its class -inf in the combination (weight > 0) without entering the
        # product: d(w * z)/dw = z = -inf would turn the class's zero probability into a NaN
        # gradient for the weights (and through them every logit of the row).
        is_neg_inf = z == float("-inf")
        neg_inf = is_neg_inf & contributes & (weights.unsqueeze(2) > 0)
        # An expert whose weight underflowed to 0 adds nothing, its -inf included.
        finite_z = z.masked_fill(~contributes | is_neg_inf, 0.0)
        combined = (weights.unsqueeze(2) * finite_z).sum(dim=1)
        combined = combined.masked_fill(neg_inf.any(dim=1), float("-inf"))
        log_probs = torch.log_softmax(combined, dim=1)
    # NaN / +inf where an active expert covers: the whole row is NaN, never a probability.
    log_probs = log_probs.masked_fill(_poisoned_rows(z, contributes), float("nan"))
    probs = torch.exp(log_probs)
    return FusionResult(probs, energy, weights, log_probs if return_log_probs else None)


def _fuse_mean_logits(Z: torch.Tensor, energy_temperature: float,
                      return_log_probs: bool) -> FusionResult:
    """:func:`fuse_experts_reference` for equal weights over every expert, every class
    and ``combine="logit"`` (RIDE's and the single-expert estimators' prediction),
    without gradients: the same values (``NaN`` rows, ``-inf`` logits included) from a
    handful of operations instead of the masked general path, whose per-call cost a
    small network's inference and training steps notice on the CPU."""
    compute_dtype = torch.float64 if Z.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        z = Z.to(compute_dtype)
        n_samples, n_experts, _ = z.shape
        energy = -energy_temperature * torch.logsumexp(z / energy_temperature, dim=2)
        # A mean of logits: -inf stays -inf; NaN or +inf poison the row (below).
        log_probs = torch.log_softmax(z.mean(dim=1), dim=1)
        every = torch.ones((), dtype=torch.bool, device=z.device)  # every logit counts
        log_probs = log_probs.masked_fill(_poisoned_rows(z, every), float("nan"))
        weights = torch.full((n_samples, n_experts), 1.0 / n_experts, dtype=compute_dtype,
                             device=z.device)
        return FusionResult(torch.exp(log_probs), energy, weights,
                            log_probs if return_log_probs else None)


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_kernels() -> ModuleType:
    """Import ``ltroute.kernels.fusion`` (and with it Triton) on first use."""
    try:
        return importlib.import_module("ltroute.kernels.fusion")
    except ImportError as exc:
        if _triton_installed():
            raise
        raise ImportError(
            "backend='triton' needs the 'triton' package, which is not installed (it is a "
            "Linux-only dependency of ltroute: `pip install triton`). Use backend='torch', or "
            "backend='auto', which falls back to the PyTorch reference."
        ) from exc


def _resolve_backend(Z: torch.Tensor, backend: str) -> str:
    """``"torch"`` or ``"triton"`` for validated ``Z`` and ``backend``."""
    if backend == "torch":
        return "torch"
    if backend == "auto":
        use_triton = (Z.is_cuda and Z.dtype in _TRITON_DTYPES
                      and Z.shape[1] <= _TRITON_MAX_EXPERTS and _triton_installed())
        return "triton" if use_triton else "torch"
    if Z.dtype not in _TRITON_DTYPES:
        raise TypeError(f"backend='triton' supports float16, bfloat16 and float32 logits, got "
                        f"{Z.dtype}; use backend='torch' for float64.")
    if Z.shape[1] > _TRITON_MAX_EXPERTS:
        raise ValueError(f"backend='triton' supports at most {_TRITON_MAX_EXPERTS} experts, got "
                         f"{Z.shape[1]}; use backend='torch'.")
    kernels = _triton_kernels()
    if not Z.is_cuda and not kernels._INTERPRETED:
        raise ValueError(
            f"backend='triton' needs Z on a CUDA device, got Z on {Z.device}. On the CPU the "
            "Triton kernels run only under the Triton interpreter: set the environment "
            "variable TRITON_INTERPRET=1 before triton and ltroute.kernels.fusion are first "
            "imported (slow; meant for tests). Use backend='torch' or 'auto' for CPU tensors."
        )
    return "triton"


class _TritonFusion(torch.autograd.Function):
    """``fuse_experts`` through the Triton kernels, differentiable in ``Z``.

    Saved for backward: ``Z`` itself (no copy), the masks, and a few float32 numbers per
    row from the forward kernel (the shift and sum of each expert's log-sum-exp, and of
    the combined logits for ``combine="logit"``). The backward kernel recomputes the rest
    from ``Z`` and accepts any subset of upstream gradients (``None`` for the others).
    """

    @staticmethod
    def forward(ctx, Z, region_mask, sample_mask, options):
        kernels = _triton_kernels()
        probs, energy, weights, log_probs, stats = kernels._fusion_forward(
            Z, region_mask, sample_mask, save_stats=True, **options)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(Z, region_mask, sample_mask, *stats)
        ctx.options = {k: v for k, v in options.items() if k != "return_log_probs"}
        if not options["energy_weights"]:
            ctx.mark_non_differentiable(weights)  # uniform weights depend on the masks only
        return probs, energy, weights, log_probs

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_probs, grad_energy, grad_weights, grad_log_probs):
        Z, region_mask, sample_mask, *stats = ctx.saved_tensors
        grad_z = None
        if ctx.needs_input_grad[0]:
            grad_z = _triton_kernels()._fusion_backward(
                Z, region_mask, sample_mask, tuple(stats), grad_probs, grad_energy,
                grad_weights, grad_log_probs, **ctx.options)
        return grad_z, None, None, None


def _fuse_experts_triton(
    Z: torch.Tensor,
    region_mask: torch.Tensor | None,
    sample_mask: torch.Tensor | None,
    weighting: str,
    combine: str,
    energy_temperature: float,
    routing_temperature: float,
    return_log_probs: bool,
) -> FusionResult:
    options = {
        "energy_weights": weighting == "energy",
        "prob_combine": combine == "prob",
        "energy_temperature": energy_temperature,
        "routing_temperature": routing_temperature,
        "return_log_probs": return_log_probs,
    }
    if torch.is_grad_enabled() and Z.requires_grad:
        return FusionResult(*_TritonFusion.apply(Z, region_mask, sample_mask, options))
    probs, energy, weights, log_probs, _ = _triton_kernels()._fusion_forward(
        Z, region_mask, sample_mask, save_stats=False, **options)
    return FusionResult(probs, energy, weights, log_probs)


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; expected one of {allowed}.")


def _check_positive(name: str, value: object) -> None:
    # Any real scalar (Python or NumPy: np.float32(1.0) is as good as 1.0), never a bool.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive float, got {type(value).__name__}.")
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"{name} must be a finite float > 0, got {value!r}.")


def _check_mask(name: str, mask: object, shape: tuple[int, int], device: torch.device) -> None:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}.")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must have dtype torch.bool, got {mask.dtype}.")
    if tuple(mask.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(mask.shape)}.")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but Z is on {device}.")


def _validate(
    Z: object,
    region_mask: object,
    sample_mask: object,
    weighting: object,
    combine: object,
    energy_temperature: object,
    routing_temperature: object,
    backend: object,
    check_masks: bool,
) -> None:
    if not isinstance(Z, torch.Tensor):
        raise TypeError(f"Z must be a torch.Tensor of shape (B, K, C), got {type(Z).__name__}.")
    if Z.ndim != 3:
        raise ValueError(f"Z must have shape (B, K, C) with 3 dimensions, got {Z.ndim}: "
                         f"{tuple(Z.shape)}.")
    if Z.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"Z must be float16, bfloat16, float32 or float64, got {Z.dtype}.")
    n_samples, n_experts, n_classes = Z.shape
    if n_experts < 1 or n_classes < 1:
        raise ValueError(f"Z needs at least one expert and one class, got shape {tuple(Z.shape)}.")
    _check_choice("weighting", weighting, _WEIGHTINGS)
    _check_choice("combine", combine, _COMBINES)
    _check_choice("backend", backend, _BACKENDS)
    _check_positive("energy_temperature", energy_temperature)
    _check_positive("routing_temperature", routing_temperature)
    if region_mask is not None:
        _check_mask("region_mask", region_mask, (n_experts, n_classes), Z.device)
        if check_masks and not bool(region_mask.any(dim=1).all()):
            empty = torch.nonzero(~region_mask.any(dim=1)).flatten().tolist()
            raise ValueError(f"region_mask leaves expert(s) {empty} with no class; every "
                             "expert needs a non-empty region.")
    if sample_mask is not None:
        _check_mask("sample_mask", sample_mask, (n_samples, n_experts), Z.device)
        if check_masks and n_samples and not bool(sample_mask.any(dim=1).all()):
            rows = torch.nonzero(~sample_mask.any(dim=1)).flatten()[:5].tolist()
            raise ValueError(f"sample_mask leaves row(s) {rows} with no active expert; every "
                             "sample needs at least one.")


def fuse_experts(
    Z: torch.Tensor,
    *,
    region_mask: torch.Tensor | None = None,
    sample_mask: torch.Tensor | None = None,
    weighting: str = "energy",
    combine: str = "prob",
    energy_temperature: float = 1.0,
    routing_temperature: float = 1.0,
    return_log_probs: bool = False,
    backend: str = "auto",
    check_masks: bool = True,
) -> FusionResult:
    r"""Fuse per-expert logits into class probabilities, energies and routing weights.

    Parameters
    ----------
    Z : torch.Tensor of shape (B, K, C)
        Logits of K experts over C classes; float16, bfloat16 or float32 (computed in
        float32; float64 is accepted by the reference backend); any strides.
    region_mask : torch.Tensor of shape (K, C), dtype bool, default=None
        ``region_mask[k, c]`` is True when expert ``k`` covers class ``c`` (its region
        ``S_k``). ``None`` means every expert covers every class. Regions must be
        non-empty.
    sample_mask : torch.Tensor of shape (B, K), dtype bool, default=None
        Experts active for each sample (RIDE's router). ``None`` means all. Each row
        needs at least one active expert. Inactive experts get weight zero; their energy
        is still computed.
    weighting : {"energy", "uniform"}, default="energy"
        ``"energy"``: ``W = softmax_k(-E / routing_temperature)`` over active experts;
        ``"uniform"``: equal weights over active experts.
    combine : {"prob", "logit"}, default="prob"
        ``"prob"``: mixture of the experts' region softmaxes (temperature 1),
        ``P = sum_k W_k softmax_{c in S_k}(Z_k)``;
        ``"logit"``: softmax of the weighted logits, ``P = softmax(sum_k W_k M_k Z_k)``,
        where a class outside an expert's region contributes zero from that expert.
    energy_temperature : float, default=1.0
        ``T`` in ``E[b, k] = -T * logsumexp_{c in S_k}(Z[b, k, c] / T)``.
    routing_temperature : float, default=1.0
        ``tau`` in the energy weighting.
    return_log_probs : bool, default=False
        Also return ``log P`` computed in log space (the numerically safe input of a
        negative log-likelihood loss).
    backend : {"auto", "torch", "triton"}, default="auto"
        ``"torch"`` runs the PyTorch reference. ``"triton"`` runs the fused Triton kernels
        (float16, bfloat16 or float32 ``Z`` on a CUDA device; on the CPU only under the
        Triton interpreter, ``TRITON_INTERPRET=1``, which is slow and meant for tests).
        ``"auto"`` picks Triton for CUDA tensors of those dtypes when Triton is installed,
        and the reference otherwise (CPU, float64). The reference computes
        ``weighting="uniform", combine="logit"`` without masks, when no gradient is
        needed (prediction), as the softmax of the mean logit: the same values from a
        few operations.
    check_masks : bool, default=True
        Check that no region is empty and every sample has an active expert. These two
        checks read the masks on the host (one synchronisation on CUDA); pass ``False``
        when the masks are known to be valid.

    Returns
    -------
    FusionResult
        ``(probs, energy, weights, log_probs)``: float32 tensors of shapes (B, C), (B, K),
        (B, K) and (B, C) or ``None``; differentiable in ``Z``.

    Raises
    ------
    TypeError, ValueError
        Invalid arguments, named in the message; with ``backend="triton"`` also float64
        ``Z``, more than 64 experts, or ``Z`` on the CPU outside the Triton interpreter.
    ImportError
        ``backend="triton"`` when Triton is not installed.

    Notes
    -----
    With ``T = tau = 1``, disjoint regions and ``combine="prob"``,
    ``W_k p_k(y) = exp(Z_{k,y}) / \sum_j \sum_{c \in S_j} exp(Z_{j,c})``, so ``P`` is the
    softmax of the logits stitched from each class's own expert (the identity the tests
    use as an oracle).

    The Triton backend reads ``Z`` once when a row of ``K x C`` logits fits in one block
    and twice otherwise, computes in float32, and agrees with the reference to float32
    rounding; its backward pass is a second fused kernel.

    Examples
    --------
    >>> import torch
    >>> from ltroute.fusion import fuse_experts
    >>> Z = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]]])
    >>> out = fuse_experts(Z, weighting="uniform", combine="logit")
    >>> out.probs.sum().item()
    1.0
    >>> out.weights
    tensor([[0.5000, 0.5000]])
    """
    _validate(Z, region_mask, sample_mask, weighting, combine, energy_temperature,
              routing_temperature, backend, check_masks)
    if _resolve_backend(Z, backend) == "triton":
        return _fuse_experts_triton(Z, region_mask, sample_mask, weighting, combine,
                                    float(energy_temperature), float(routing_temperature),
                                    bool(return_log_probs))
    if (weighting == "uniform" and combine == "logit" and region_mask is None
            and sample_mask is None and not (Z.requires_grad and torch.is_grad_enabled())):
        return _fuse_mean_logits(Z, float(energy_temperature), bool(return_log_probs))
    return fuse_experts_reference(
        Z,
        region_mask=region_mask,
        sample_mask=sample_mask,
        weighting=weighting,
        combine=combine,
        energy_temperature=float(energy_temperature),
        routing_temperature=float(routing_temperature),
        return_log_probs=return_log_probs,
    )
