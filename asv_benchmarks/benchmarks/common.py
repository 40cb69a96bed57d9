"""Shared base of the asv suites: wall-clock timing, repeats, timeouts, device helpers.

Modelled on scikit-learn's ``asv_benchmarks/benchmarks/common.py``: every suite derives
from :class:`Benchmark`, declares ``params``/``param_names``, prepares its data in
``setup`` (or ``setup_cache`` for expensive fits) and raises ``NotImplementedError`` in
``setup`` to skip a parameter combination, e.g. through :func:`skip_without_cuda`.
Timed functions that launch GPU work call :func:`synchronize` before returning, so the
wall clock covers the work and not only its launch.
"""

from __future__ import annotations

import statistics
import time
import timeit
from collections.abc import Callable

import torch


def cuda_available() -> bool:
    """Whether a CUDA device is usable in this process."""
    return torch.cuda.is_available()


def default_device() -> str:
    """``"cuda"`` when a GPU is present, else ``"cpu"``."""
    return "cuda" if cuda_available() else "cpu"


def skip_without_cuda(what: str = "this benchmark") -> None:
    """Skip the current parameter combination (asv: ``NotImplementedError``) without CUDA."""
    if not cuda_available():
        raise NotImplementedError(f"{what} needs a CUDA device")


def synchronize(device: str | torch.device) -> None:
    """Wait for queued GPU work (no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn: Callable[[], object], device: str, *, repeat: int = 7) -> float:
    """Median wall time of ``fn`` in seconds after one warm-up call, synchronised.

    For ``track_`` benchmarks, which asv calls once and which must time themselves.
    """
    fn()
    synchronize(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class Benchmark:
    """Base class of the ltroute suites.

    ``timer`` is the wall clock (GPU and multi-threaded CPU work are not captured by
    process time); ``processes`` separate interpreter runs per benchmark (Triton compiles
    and autotunes once per process, in ``setup``); ``timeout`` is generous because model
    fits and kernel autotuning take tens of seconds.
    """

    timer = timeit.default_timer
    processes = 2
    timeout = 600
    warmup_time = 0.5
    repeat = (3, 20, 30.0)
    param_names: list[str] = []
    params: list = []
