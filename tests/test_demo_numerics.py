"""The demo's CPU numerics are pinned (demo/__main__.py PINNED_NUMERICS), so its runs
give the same bits whatever the machine's thread count and vector ISA.

Measured (README "Reproducibility of the demo"): unpinned, the same tiny training gives different
weights with 1 thread than with 2+, and on an AVX-512 machine than on an AVX2 one (oneDNN kernels);
2, 3, 4 and 8 threads agree. Here: under the pins, 2 and 3 threads train to identical weights, and
the pins reach the demo's step subprocesses (they are set in the demo's environment, inherited); the
demo reuses a finished training run only when it was trained with the config it would train now.
"""
from __future__ import annotations

import hashlib
import os

from test_training import train_cli

import demo.__main__ as demo
from models.checkpoint import load_checkpoint


def digest(path) -> str:
    state = load_checkpoint(str(path))
    sha = hashlib.sha256()
    for key, value in state["model"].items():
        sha.update(key.encode() + value.cpu().contiguous().numpy().tobytes())
    return sha.hexdigest()


def test_pins_are_set_in_the_environment_the_steps_inherit():
    environ = {"OMP_NUM_THREADS": "1"}                      # a user's setting is overridden
    pinned = demo.pin_cpu_numerics(environ)
    assert environ["OMP_NUM_THREADS"] == "2" and environ["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    assert environ["ATEN_CPU_CAPABILITY"] == "avx2" and environ["MKL_CBWR"] == "AVX2"
    assert pinned == demo.PINNED_NUMERICS


def test_a_pinned_process_runs_avx2_kernels_whatever_the_cpu():
    """ATen's own kernels follow the CPU (AVX-512 here, where present) unless capped: the capped
    process reports AVX2 (or less on a CPU without AVX2), never AVX-512; an uncapped one reports the CPU's."""
    import subprocess
    import sys
    probe = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    pinned = subprocess.run([sys.executable, "-c", probe], env={**os.environ, **demo.PINNED_NUMERICS},
                            capture_output=True, text=True, timeout=120).stdout.strip()
    assert pinned in ("AVX2", "DEFAULT"), pinned
    free_env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    free = subprocess.run([sys.executable, "-c", probe], env=free_env, capture_output=True, text=True,
                          timeout=120).stdout.strip()
    assert free in ("AVX512", "AVX2", "DEFAULT", "ZVECTOR", "VSX", "SVE256"), free


def test_pinned_training_is_bitwise_the_same_with_2_and_3_threads(tiny_prepared, tmp_path):
    """Separate processes, as the demo's steps (one process per training run)."""
    before = os.environ.get("ONEDNN_MAX_CPU_ISA")
    procs = {}
    for threads in ("2", "3"):                                  # both at once: the wall time of one
        env = {**demo.PINNED_NUMERICS, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        procs[threads] = train_cli("n_steps=3", "val_every=0", "save_every=3", "model.resolution=image",
                                   "name=pin",
                                   log_dir=tmp_path / threads, prep_dir=tiny_prepared, env=env, popen=True)
    for proc in procs.values():
        output = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, output[-2000:]
    digests = [digest(tmp_path / threads / "pin" / "1" / "last.pth") for threads in procs]
    assert digests[0] == digests[1]
    assert os.environ.get("ONEDNN_MAX_CPU_ISA") == before            # loading the script pins nothing here


def test_the_demo_reuses_only_runs_of_its_own_config(tmp_path):
    """A finished run left by an older config (other milestones, model options, data) is not reused."""
    from config import default_config
    from demo.run import training_overrides
    from experiments.runner import finished, resolved_config
    from models.checkpoint import save_checkpoint
    from training.loop import config_hash
    arguments = ["demo", *training_overrides("LSLPN", 0), f"path.log_dir={tmp_path}"]
    config = resolved_config(arguments)
    run = tmp_path / "lslpn_fold0" / "1"
    run.mkdir(parents=True)
    for digest_ in ("old", config_hash(config, default_config())):
        for name in ("last.pth", "best.pth"):
            save_checkpoint(str(run / name), {"model": {}, "model_config": {}, "step": config["n_steps"],
                                              "config_hash": digest_})
        assert finished(arguments) == (None if digest_ == "old" else run / "best.pth")
    panet = resolved_config(["demo", "panet", *arguments[1:]])
    assert config_hash(config, default_config()) != config_hash(panet, default_config())
