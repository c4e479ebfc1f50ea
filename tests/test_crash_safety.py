"""Crash safety: SIGKILL at a random moment never leaves a truncated output, and training resumes exactly.

Already covered in tests/test_training.py: kill -9 right after the step-2 checkpoint, resume, bitwise
identical final weights and momentum. Added here:
- training killed at a RANDOM moment (not aligned with a checkpoint write: possibly inside one),
  resumed with resume=True, ends with weights identical to an uninterrupted run;
- scripts/prepare_visceral.py killed at a random moment while it builds its folder, over an OLD
  output (--overwrite) and with no output: PREP is then exactly the old folder, or absent, or complete
  (never partial), and the next run cleans the dead run's `.partial-<pid>` folder;
- scripts/segment_volume.py killed while its output file is being written (the write is slowed down
  in the subprocess so the kill lands inside it): the old output stays byte-identical.
The random kill moments come from a seed printed in the assertion message.
"""
from __future__ import annotations

import glob
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch
from test_training import train_cli, train_then_resume

from models.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("LSLPN_CRASH_SEED", time.time_ns() % 100_000))


def wait_for(predicate, proc, timeout: float = 240.0) -> bool:
    """Poll `predicate` until true, `proc` exits or `timeout`; returns predicate()."""
    deadline = time.time() + timeout
    while not predicate() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    return predicate()


def kill(proc) -> bool:
    """SIGKILL `proc`; True when it was still running (the kill interrupted it)."""
    running = proc.poll() is None
    if running:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    return running


# ------------------------------------------------------------------------------- training
def test_training_killed_at_a_random_moment_resumes_to_identical_weights(tmp_path, tiny_prepared):
    rng = random.Random(SEED)
    settings = ["n_steps=6", "save_every=1", "val_every=0", "print_every=1"]
    log_dir = tmp_path / "killed"
    # Each step pauses 0.3 s after its checkpoint, so the 5 steps after the first checkpoint outlast
    # the random delay below even on a fast, idle machine: the kill lands inside the run.
    proc = train_cli(*settings, log_dir=log_dir, prep_dir=tiny_prepared, popen=True, pause_after_save=0.3)
    pattern = str(log_dir / "*" / "1" / "last.pth")
    assert wait_for(lambda: glob.glob(pattern), proc), f"seed {SEED}: no checkpoint before the run ended"
    time.sleep(rng.uniform(0.0, 1.2))                         # anywhere in the following steps
    interrupted = kill(proc)
    killed = load_checkpoint(glob.glob(pattern)[0])           # never truncated: atomic replace
    assert 1 <= killed["step"] <= 6, SEED

    # the uninterrupted reference run, then the resume (one process, one after the other)
    ref, resumed = train_then_resume(tmp_path / "ref", log_dir, tiny_prepared, *settings)
    assert ref["code"] == 0, ref["err"][-2000:]
    reference = load_checkpoint(glob.glob(str(tmp_path / "ref" / "*" / "1" / "last.pth"))[0])
    assert resumed["code"] == 0, resumed["err"][-2000:]
    runs = sorted(glob.glob(str(log_dir / "*" / "*" / "last.pth")),
                  key=lambda path: int(Path(path).parent.name))
    final = load_checkpoint(runs[-1])                         # the resumed run (or run 1 if it had finished)
    assert final["step"] == reference["step"] == 6
    message = f"seed {SEED}: killed at step {killed['step']} (interrupted: {interrupted})"
    assert final["model"].keys() == reference["model"].keys(), message
    assert all(torch.equal(final["model"][k], reference["model"][k]) for k in reference["model"]), message


# -------------------------------------------------------------------------------- prepare
def prepare_popen(source: Path, out: Path, size: int, *extra: str):
    return subprocess.Popen([sys.executable, "scripts/prepare_visceral.py", "--visceral-dir", str(source),
                             "--out", str(out), "--size", str(size), "--n-val", "1", "--min-voxels", "5",
                             "--workers", "1", *extra], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_killed_prepare_leaves_the_old_output_or_none_never_a_partial_one(tiny_phantom, tmp_path):
    from dataloaders.prepare import Selection, prepare_dataset
    from evaluation.dataset_check import check_prepared
    rng = random.Random(SEED + 1)
    old_out, new_out = tmp_path / "old" / "prep", tmp_path / "new" / "prep"
    prepare_dataset(tiny_phantom, old_out, size=32, n_val=1, rule=Selection(min_voxels=5), workers=1)
    old = snapshot(old_out)
    for out, extra in ((old_out, ("--overwrite",)), (new_out, ())):
        out.parent.mkdir(exist_ok=True)
        proc = prepare_popen(tiny_phantom, out, 48, *extra)
        partial = lambda: any(p.name.startswith("prep.partial-") for p in out.parent.iterdir())  # noqa: E731
        wait_for(partial, proc)
        time.sleep(rng.uniform(0.0, 0.8))
        interrupted = kill(proc)
        message = f"seed {SEED}: {out} (interrupted: {interrupted})"
        if out.exists() and snapshot(out) != old:
            assert check_prepared(out)["prep_size"] == 48, message      # complete new folder
        elif not out.exists() and out == old_out:
            # killed between the two renames: the old folder waits as prep.old-<pid> (restored next run)
            assert any(p.name.startswith("prep.old-") for p in out.parent.iterdir()), message
        # the next run removes the dead run's partial folder and writes a complete output
        prepare_dataset(tiny_phantom, out, size=48, n_val=1, rule=Selection(min_voxels=5), workers=1,
                        overwrite=True)
        assert sorted(p.name for p in out.parent.iterdir()) == ["prep"], message
        assert check_prepared(out)["prep_size"] == 48


# -------------------------------------------------------------------------------- segment
SLOW_WRITE_DRIVER = textwrap.dedent("""
    import pathlib, sys, time
    original = pathlib.Path.write_bytes
    def slow_write_bytes(self, data):
        if ".tmp-" not in self.name:
            return original(self, data)
        with open(self, "wb") as handle:                 # half the file, then a long pause
            handle.write(data[: len(data) // 2])
            handle.flush()
            print("HALF-WRITTEN", flush=True)
            time.sleep(120)
            handle.write(data[len(data) // 2:])
        return len(data)
    pathlib.Path.write_bytes = slow_write_bytes
    from util.cli import run_cli
    import importlib.util
    spec = importlib.util.spec_from_file_location("segment_volume", "scripts/segment_volume.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    run_cli(module.main, sys.argv[1:])
""")


def test_segment_killed_while_writing_keeps_the_old_output(tiny_phantom, tmp_path):
    from models.checkpoint import save_checkpoint
    from models.fewshot import FewShotSegNet
    volume = sorted((tiny_phantom / "GoldCorpus" / "Volumes").iterdir())[0]
    mask = (tiny_phantom / "GoldCorpus" / "Segmentations"
            / f"{volume.name.split('_')[0]}_1_CTce_ThAb_58_1.nii.gz")
    model = FewShotSegNet(encoder="cnn_small", resolution="feature", n_grid=2)
    save_checkpoint(str(tmp_path / "m.pth"), {"model": model.state_dict(), "model_config": model.config})
    out = tmp_path / "out" / "pred.nii.gz"
    out.parent.mkdir()
    out.write_bytes(b"old prediction")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITE_DRIVER, "--checkpoint", str(tmp_path / "m.pth"),
                             "--support-image", str(volume), "--support-mask", str(mask), "--query",
                             str(volume),
                             "--out", str(out), "--input-size", "32", "--device", "cpu", "--no-progress"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()                          # blocks until the write is half done
    while line.startswith("support organ:"):               # segment_volume's line on the label and range used
        line = proc.stdout.readline()
    assert line.strip() == "HALF-WRITTEN", proc.stderr.read()[-2000:]
    temporaries = [p for p in out.parent.iterdir() if ".tmp-" in p.name]
    assert len(temporaries) == 1 and temporaries[0].stat().st_size > 0
    assert kill(proc)
    assert out.read_bytes() == b"old prediction"            # the output path never held a partial file
