"""The end-to-end demo on the synthetic phantom (demo/run.py; the data generator is the phantom package).
The CPU pins live here, importable before torch loads."""
from __future__ import annotations

import os

# 2 intra-op threads (1 thread takes other kernels; 2 or more give identical bits): two runs on one
# machine give the same bits. Kernel choice follows the CPU (an AVX2 cap cost 14% on AVX-512 and did not
# make the table reproduce across CPU kinds; BENCHMARKS.md, README). tests/test_demo_numerics.py checks it.
PINNED_NUMERICS = {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}


def pin_cpu_numerics(environ=os.environ) -> dict:
    """Set PINNED_NUMERICS in `environ` (before torch loads; subprocesses inherit it); returns the pins."""
    environ.update(PINNED_NUMERICS)
    return dict(PINNED_NUMERICS)
