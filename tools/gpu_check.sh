#!/usr/bin/env bash
# One prepared GPU check (issue 18): proves every CUDA code path once and measures the paper-scale
# figures, in at most 8 minutes on one H100; everything goes under $OUT (or --out, default
# runs/gpu_check): summary.md (also printed), results.json, log.txt, BENCHMARKS.md, benchmark.json.
#
#   tools/gpu_check.sh              on a machine with a CUDA GPU
#   tools/gpu_check.sh --dry-run    on CPU at 64 x 64, a few steps: same steps, same summary (CI)
#   tools/gpu_check.sh --dry-run --quick   the dry-run without the benchmark and `official` runs
#
# Runs on a bare python3 with torch >= 2.11 (no `make setup`): wheels of the packages that machine
# lacks (tools/gpu_wheels.txt: sacred, nibabel, ...) are carried in .whl/ (tools/fetch_gpu_wheels.sh
# downloads them here) and installed first with `pip install --no-index --target`; the repository's own
# packages import through PYTHONPATH (no `pip install -e .` there). The steps are
# listed in tools/gpu_check.py. PYTHON=... picks the interpreter (default .venv/bin/python when it
# exists, else python3).
#
# What only a CUDA run can prove (the CPU proxies in tests/test_gpu_proxies.py and this script's
# --dry-run cover the same code paths on CPU, but these can fail on CUDA alone):
#   - nccl: process-group start-up, DDP with device_ids, all_gather_object/broadcast on CUDA tensors
#   - cuDNN kernels in bf16 / fp16 (and TF32 in "fp32"), channels_last cuDNN kernels, their speed
#   - torch.cuda.is_bf16_supported(), CUDA autocast op lists (differ from CPU autocast's)
#   - the CUDA GradScaler's inf/NaN check and unscale kernels (the CPU scaler runs other kernels)
#   - pinned host memory and non_blocking host-to-device copies
#   - CUDA RNG states in checkpoints (get/set_rng_state_all) and resume with map_location=cuda
#   - CUDA memory: out-of-memory at 512 x 512, torch.cuda.max_memory_allocated figures
#   - torch.cuda.synchronize in the benchmark timers; the GPU section of BENCHMARKS.md
#   - data loading starving the GPU (the data-wait fraction means little on CPU)
set -u
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PYTHON" -c "import sacred, nibabel, pkg_resources" 2>/dev/null; then
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "gpu_check: $PYTHON lacks sacred/nibabel and no wheels are in .whl/:" \
             "run tools/fetch_gpu_wheels.sh where PyPI is reachable and carry .whl" >&2
        exit 2
    fi
    SITE="${GPU_CHECK_SITE:-/tmp/lslpn-gpu-site}"
    echo "gpu_check: installing $(ls .whl/*.whl | wc -l) carried wheels into $SITE"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        .whl/*.whl || { echo "gpu_check: FAIL installing the carried wheels" >&2; exit 2; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PYTHON" tools/gpu_check.py "$@"
