"""asv suite for ``ltroute.fusion.fuse_experts``: the Triton kernel vs the PyTorch reference.

``backend="triton"`` runs only on CUDA (skipped otherwise); ``backend="torch"`` runs the
reference on the GPU when there is one and on the CPU otherwise (small sizes only there).
Besides the times of the forward and forward + backward passes, ``track_forward_bandwidth``
reports the effective bandwidth: bytes the op must read and write once (``Z`` in; ``P``,
``log P``, ``E``, ``W`` out) over the median forward time.
"""

from __future__ import annotations

import torch

from benchmarks.common import (
    Benchmark,
    default_device,
    median_seconds,
    skip_without_cuda,
    synchronize,
)
from ltroute.fusion import fuse_experts

CPU_MAX_ELEMENTS = 2**20  # larger B * K * C are skipped on the CPU (reference only)


class FuseExperts(Benchmark):
    """Forward and forward + backward of ``fuse_experts`` (energy weights, nested regions)."""

    param_names = ["backend", "combine", "B", "K", "C"]
    params = (["torch", "triton"], ["prob", "logit"], [1024, 16384], [3, 8], [100, 1000])

    def setup(self, backend, combine, B, K, C):
        if backend == "triton":
            skip_without_cuda("the Triton fusion kernel")
        self.device = default_device()
        if self.device == "cpu" and B * K * C > CPU_MAX_ELEMENTS:
            raise NotImplementedError("too large for the CPU reference in a benchmark run")
        g = torch.Generator(device=self.device).manual_seed(0)
        self.Z = torch.randn(B, K, C, generator=g, device=self.device) * 3
        start = (torch.arange(K, device=self.device) * C) // K
        self.region = torch.arange(C, device=self.device)[None, :] >= start[:, None]
        self.grad = torch.randn(B, C, generator=g, device=self.device)
        self.kwargs = {"region_mask": self.region, "combine": combine, "backend": backend,
                       "return_log_probs": True, "check_masks": False}
        self.n_bytes = (self.Z.numel() * self.Z.element_size() + 2 * B * C * 4
                        + 2 * B * K * 4)
        self.time_forward_backward()  # compile/autotune outside the timings

    def time_forward(self, *params):
        with torch.no_grad():
            fuse_experts(self.Z, **self.kwargs)
        synchronize(self.device)

    def time_forward_backward(self, *params):
        z = self.Z.detach().requires_grad_()
        fuse_experts(z, **self.kwargs).probs.backward(self.grad)
        synchronize(self.device)

    def track_forward_bandwidth(self, *params):
        seconds = median_seconds(lambda: self.time_forward(), self.device)
        return self.n_bytes / seconds / 1e9

    track_forward_bandwidth.unit = "GB/s"
