"""Median wall time of a callable after warm-up, device-synchronised on CUDA."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Timing:
    """Median and all timed runs (seconds) of one measurement."""
    median: float
    runs: list[float] = field(default_factory=list)
    warmup: int = 0


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1,
            min_seconds: float = 0.0, max_repeats: int = 25) -> Timing:
    """Median wall time of `fn()` over at least `repeats` runs after `warmup` runs; cheap calls repeat until
    `min_seconds` of timed runs (at most `max_repeats`), a median that resists bursts of load."""
    for _ in range(warmup):
        fn()
    runs: list[float] = []
    while len(runs) < max(1, repeats) or (sum(runs) < min_seconds and len(runs) < max_repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        runs.append(time.perf_counter() - start)
    return Timing(statistics.median(runs), runs, warmup)
