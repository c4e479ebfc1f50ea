"""Timers and machine description for benchmarks: medians after warm-up, device-synchronised on CUDA."""
from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from util.provenance import git_commit


@dataclass
class Timing:
    """Median and all timed runs (seconds) of one measurement."""
    median: float
    runs: list[float] = field(default_factory=list)
    warmup: int = 0


def synchronize(device: torch.device) -> None:
    """Wait for queued work on `device` (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1,
            min_seconds: float = 0.0, max_repeats: int = 25) -> Timing:
    """Median wall time of `fn()` over at least `repeats` runs after `warmup` runs, device-synchronised.

    Cheap calls repeat until `min_seconds` of timed runs (at most `max_repeats` runs), so that the
    median resists bursts of load from other processes.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    runs: list[float] = []
    while len(runs) < max(1, repeats) or (sum(runs) < min_seconds and len(runs) < max_repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        runs.append(time.perf_counter() - start)
    return Timing(statistics.median(runs), runs, warmup)


def dispatch_fraction(fn: Callable[[], object], device: torch.device, repeats: int = 3) -> float:
    """CUDA only: (time for Python to return from `fn`) / (time until the GPU has finished it).

    Well below 1: the GPU is the bottleneck (GPU-bound); close to 1: Python/launch-bound.
    """
    fn()
    fractions = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        issued = time.perf_counter() - start
        synchronize(device)
        fractions.append(issued / (time.perf_counter() - start))
    return statistics.median(fractions)


def machine_description(device: torch.device) -> dict:
    """CPU model (/proc/cpuinfo), cores, torch/python versions and the GPU name when on CUDA."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {"cpu": cpu, "cores": usable, "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "os": platform.platform()}
    if hasattr(os, "getloadavg"):
        info["load average (1, 5, 15 min) when described"] = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    info["code (git HEAD)"] = git_commit() or "unknown"
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info
