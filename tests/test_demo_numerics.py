"""The demo's CPU numerics (demo/__init__.py PINNED_NUMERICS) and speed settings (config.py `make_demo`):
2 and 3 threads train to identical weights, the pins reach the step subprocesses, amp=True falls back in one
logged line, and a finished run is reused only under the config the demo would train now."""
from __future__ import annotations

import hashlib
import logging
import os

import torch
from test_training import train_cli

import demo
from models.checkpoint import load_checkpoint


def digest(path) -> str:
    state = load_checkpoint(str(path))
    sha = hashlib.sha256()
    for key, value in state["model"].items():
        sha.update(key.encode() + value.cpu().contiguous().numpy().tobytes())
    return sha.hexdigest()


def test_pins_are_set_in_the_environment_the_steps_inherit():
    environ = {"OMP_NUM_THREADS": "1", "ONEDNN_MAX_CPU_ISA": "AVX2"}   # a user's setting is overridden
    pinned = demo.pin_cpu_numerics(environ)
    assert environ["OMP_NUM_THREADS"] == "2" and environ["MKL_NUM_THREADS"] == "2"
    assert environ["ONEDNN_MAX_CPU_ISA"] == "AVX2"                      # kernel choice: not the demo's
    assert pinned == demo.PINNED_NUMERICS and set(pinned) == {"OMP_NUM_THREADS", "MKL_NUM_THREADS"}


def test_the_demo_asks_for_the_fast_path_that_falls_back_in_one_line(monkeypatch, caplog):
    """amp=True: bf16 autocast on a CPU with native bf16, else full precision with one logged line (once
    per process); an explicit amp='bf16' is honoured, and an emulated one says it is slow."""
    from config import default_config
    from demo.run import CONFIGS
    from experiments.runner import resolved_config
    from util import device as dev
    config = resolved_config(CONFIGS)
    assert config["amp"] is True
    assert default_config()["amp"] is False and resolved_config(["demo"])["amp"] is False  # make demo's only
    cpu = torch.device("cpu")
    for native, dtype in ((True, torch.bfloat16), (False, None)):
        monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda native=native: native)
        dev.say_once.cache_clear()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="lslpn"):
            assert [dev.amp_dtype(cpu, True) for _ in range(3)] == [dtype] * 3
            assert dev.amp_dtype(cpu, "bf16") == torch.bfloat16
        lines = [r.getMessage() for r in caplog.records]
        if native:
            assert lines == []
        else:
            assert len(lines) == 2 and "amp=True: this CPU has no native bf16" in lines[0]
            assert "full precision" in lines[0] and "emulated, slower" in lines[1]
    dev.say_once.cache_clear()


def test_native_bf16_is_read_from_the_cpu_flags(monkeypatch, tmp_path):
    from util import device as dev
    real_open = open
    for flags, native in (("fpu avx2 avx512f avx512_bf16", True), ("fpu avx2 fma", False)):
        info = tmp_path / "cpuinfo"
        info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        monkeypatch.setattr("builtins.open", lambda path, *a, info=info, **k: real_open(
            info if path == "/proc/cpuinfo" else path, *a, **k))
        dev.cpu_has_native_bf16.cache_clear()
        assert dev.cpu_has_native_bf16() is native
    monkeypatch.undo()
    dev.cpu_has_native_bf16.cache_clear()


def test_pinned_training_is_bitwise_the_same_with_2_and_3_threads(tiny_prepared, tmp_path):
    """Separate processes, as the demo's steps (one process per training run), with the demo's speed
    settings."""
    before = os.environ.get("OMP_NUM_THREADS")
    procs = {}
    for threads in ("2", "3"):                                  # both at once: the wall time of one
        env = {**demo.PINNED_NUMERICS, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        procs[threads] = train_cli("n_steps=3", "val_every=0", "save_every=3", "model.resolution=image",
                                   "amp=True", "name=pin",
                                   log_dir=tmp_path / threads, prep_dir=tiny_prepared, env=env, popen=True)
    for proc in procs.values():
        output = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, output[-2000:]
    digests = [digest(tmp_path / threads / "pin" / "1" / "last.pth") for threads in procs]
    assert digests[0] == digests[1]
    assert os.environ.get("OMP_NUM_THREADS") == before               # loading the script pins nothing here


def test_the_demo_reuses_only_runs_of_its_own_config(tmp_path):
    """A finished run left by an older config (other milestones, model options, data) is not reused."""
    from config import default_config
    from demo.run import CONFIGS, training_overrides
    from experiments.runner import finished, resolved_config
    from models.checkpoint import save_checkpoint
    from training.loop import config_hash
    arguments = [*CONFIGS, *training_overrides("LSLPN", 0), f"path.log_dir={tmp_path}"]
    config = resolved_config(arguments)
    run = tmp_path / "lslpn_fold0" / "1"
    run.mkdir(parents=True)
    for digest_ in ("old", config_hash(config, default_config())):
        for name in ("last.pth", "best.pth"):
            save_checkpoint(str(run / name), {"model": {}, "model_config": {}, "step": config["n_steps"],
                                              "config_hash": digest_})
        assert finished(arguments) == (None if digest_ == "old" else run / "best.pth")
    panet = resolved_config([*CONFIGS, "panet", *arguments[len(CONFIGS):]])
    assert config_hash(config, default_config()) != config_hash(panet, default_config())


def test_the_report_states_the_schedule_and_the_numerics(tmp_path, monkeypatch):
    from demo import run
    monkeypatch.setattr(run, "RUN_DIR", tmp_path)
    (tmp_path / "table.md").write_text("| Method | liver |\n")
    text = run.write_report({}, [{"step": "s", "command": "c", "seconds": 1.0}], 60.0).read_text()
    assert "PANet and LSLPN train `with demo make_demo` (config.py): 150 steps of 2 episodes at 128 x 128, " \
           "SGD lr 0.01 x 0.1 at steps 112, validation every 100 steps, channels_last off, amp=True." in text
    assert "SENet runs `with demo make_demo senet senet_demo n_steps=100`" in text
    assert "squeezed into 100 steps of 2 episodes at 64 x 64 slices with lr 0.01" in text
    assert "OMP_NUM_THREADS=" in text and "native bf16" in text and "| Method | liver |" in text
