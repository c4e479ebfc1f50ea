"""CPU proxies of the CUDA code paths, and the same tests on CUDA (marker `cuda`, skipped without a GPU).

The training loop's GPU options run on CPU through the same code (util/device.py, training/loop.py):
bf16 and fp16 autocast (`amp='bf16'|'fp16'`), the fp16 GradScaler (torch.amp.GradScaler('cpu') on CPU),
channels_last, torchrun entering the distributed path (on CPU: tests/test_ddp.py's two gloo ranks; here one
process per GPU with nccl on CUDA), evaluation under autocast (test.py's `amp`) and
scripts/segment_volume.py on the device. What only CUDA can break is listed in tools/gpu_check.sh's header;
`pytest -m cuda` runs the cuda variants there.
"""
from __future__ import annotations

import glob
import json
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pytest
import torch
from conftest import resolve_config, train_in_process

from models.checkpoint import load_checkpoint
from training.loop import run_name
from util.device import amp_dtype, autocast, make_grad_scaler

ROOT = Path(__file__).resolve().parents[1]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


class ConvRecorder:
    """Global forward hook: every Conv2d called, in call order, its output dtype and its weight's memory
    format as (channels_last-contiguous, plain-contiguous) pairs (a 1x1 kernel is both)."""

    def __init__(self):
        self.modules, self.out_dtypes, self.formats = [], set(), set()

    def __enter__(self):
        def hook(module, inputs, output):
            if isinstance(module, torch.nn.Conv2d):
                if module not in self.modules:
                    self.modules.append(module)
                self.out_dtypes.add(output.dtype)
                self.formats.add((module.weight.is_contiguous(memory_format=torch.channels_last),
                                  module.weight.is_contiguous()))
        self.handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def train_tiny(prep, device, run_dir=None, **updates) -> tuple[dict, ConvRecorder]:
    with ConvRecorder() as recorder:
        summary, _ = train_in_process(run_dir, device=device, n_steps=2, val_every=0, save_every=2,
                                      print_every=2, path={"data_dir": str(prep), "log_dir": str(prep)},
                                      **updates)
    return summary, recorder


# ------------------------------------------------------------------------------------ AMP modes
def test_amp_setting_picks_the_autocast_dtype_and_scaler(monkeypatch):
    import util.device
    cpu = torch.device("cpu")
    monkeypatch.setattr(util.device, "cpu_has_native_bf16", lambda: False)   # True: bf16 on such a CPU only
    assert amp_dtype(cpu, False) is None and amp_dtype(cpu, True) is None
    assert amp_dtype(cpu, "bf16") == torch.bfloat16 and amp_dtype(cpu, "fp16") == torch.float16
    assert not make_grad_scaler(cpu, "bf16").is_enabled() and not make_grad_scaler(cpu, False).is_enabled()
    scaler = make_grad_scaler(cpu, "fp16")
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled()
    with autocast(cpu, "bf16"):
        assert torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3)).dtype == torch.bfloat16
    with autocast(cpu, True):                                              # no-op on CPU
        assert torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3)).dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("amp, dtype", [("False", torch.float32), ("bf16", torch.bfloat16),
                                        ("fp16", torch.float16)])
def test_training_step_runs_under_the_requested_autocast(train_prep, device, amp, dtype):
    summary, recorder = train_tiny(train_prep, device, amp=False if amp == "False" else amp)
    assert recorder.out_dtypes == {dtype}          # every conv of the real training step ran in `dtype`
    assert summary["steps"] == 2 and summary["sec_per_step"] > 0
    assert 0.0 <= summary["data_wait_fraction"] <= 1.0
    assert (summary["cuda_peak_mb"] is None) == (device == "cpu")


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_grad_scaler_state_is_saved_and_resumed(train_prep, tmp_path, device):
    common = dict(device=device, amp="fp16", val_every=0, save_every=2,
                  path={"data_dir": str(train_prep), "log_dir": str(tmp_path)})
    name = run_name(resolve_config(**common))
    train_in_process(tmp_path / name / "1", n_steps=2, **common)
    first = load_checkpoint(str(tmp_path / name / "1" / "last.pth"))
    assert first["step"] == 2                                        # run 1 stopped at 2 (resume: run 2)
    assert first["scaler"] and first["scaler"]["scale"] > 0          # the GradScaler's state travels
    _, run = train_in_process(tmp_path / name / "2", n_steps=4, resume=True, **common)
    assert run.info["resumed_from"] == str(tmp_path / name / "1" / "last.pth")
    resumed = load_checkpoint(str(tmp_path / name / "2" / "last.pth"), map_location=device)
    assert resumed["step"] == 4 and resumed["scaler"]


# -------------------------------------------------------------------------------- channels_last
@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_trains_to_the_same_weights_as_contiguous(train_prep, device, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # TF32 convs would differ by ~1e-3
    _, contiguous = train_tiny(train_prep, device, channels_last=False)
    _, last = train_tiny(train_prep, device, channels_last=True)
    assert {plain for _, plain in contiguous.formats} == {True}
    assert {cl for cl, _ in last.formats} == {True} and (True, False) in last.formats
    assert len(contiguous.modules) == len(last.modules) > 0
    for a, b in zip(contiguous.modules, last.modules):      # same convs, same order, after 2 SGD steps
        torch.testing.assert_close(a.weight.contiguous(), b.weight.contiguous(), rtol=1e-4, atol=1e-5)


# -------------------------------------------------------------------------------- torchrun on CUDA
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=pytest.mark.cuda)])
def test_torchrun_uses_the_distributed_path_and_ranks_agree(train_prep, tmp_path, device):
    """One process per GPU (nccl) in bf16 with channels_last, as a paper run. The CPU proxy (gloo: ranks
    agree, run.info's world size and backend) is tests/test_ddp.py's two-rank run."""
    gpus = torch.cuda.device_count()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
           "train.py", "with", "tiny", "val_every=0", "save_every=2", f"path.data_dir={train_prep}",
           f"path.log_dir={tmp_path}", f"device={device}", "n_steps=2", "amp=bf16", "channels_last=True"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    digests = dict(re.findall(r"rank (\d+): final weights sha256 ([0-9a-f]+)", out))  # tqdm may precede it
    assert len(digests) == gpus and len(set(digests.values())) == 1, out[-2000:]
    info = json.loads(Path(glob.glob(str(tmp_path / "*" / "1" / "info.json"))[0]).read_text())  # run.info
    assert info["world_size"] == gpus and info["distributed_backend"] == "nccl"


# --------------------------------------------------- evaluation and segment_volume on the device
@pytest.mark.parametrize("device", DEVICES)
def test_evaluation_and_segment_volume_run_on_the_device_under_autocast(tiny_phantom, tiny_prepared, tmp_path,
                                                                        device):
    """test.py's evaluation under `amp=bf16` (its `with autocast(device, amp)`; test.py itself runs in
    tests/test_evaluate.py) and scripts/segment_volume.py's main in-process, as its command line runs it
    (run_cli; its real process: tests/test_segment_volume.py)."""
    from conftest import load_script

    from evaluation.evaluate import evaluate
    from util.cli import run_cli
    train_in_process(tmp_path / "run", device=device, n_steps=2, val_every=0, save_every=2,
                     path={"data_dir": str(tiny_prepared), "log_dir": str(tmp_path)})
    snapshot = str(tmp_path / "run" / "last.pth")
    with ConvRecorder() as recorder, autocast(torch.device(device), "bf16"):
        results = evaluate({"mask copy": None, "LSLPN": snapshot}, ["liver"], tiny_prepared,
                           out_dir=tmp_path / "eval", device=device, batch_size=8, save_predictions=False,
                           fold=0, progress=False, figures=False)
    assert recorder.out_dtypes == {torch.bfloat16}
    assert results["results"]["LSLPN"]["liver"]["per_volume"]
    rows = (tmp_path / "eval" / "results.csv").read_text().splitlines()
    assert any(row.startswith("LSLPN,") or ",LSLPN," in row for row in rows[1:]), rows[:3]
    gold = tiny_phantom / "GoldCorpus"
    volumes = sorted((gold / "Volumes").glob("*.nii.gz"))
    support_pid = volumes[0].name.split("_")[0]
    liver = sorted((gold / "Segmentations").glob(f"{support_pid}_*_58_*.nii.gz"))[0]   # RadLex 58: liver
    out_file = tmp_path / "pred.nii.gz"
    with pytest.raises(SystemExit) as stop:
        run_cli(load_script("segment_volume").main,
                ["--checkpoint", snapshot, "--support-image", str(volumes[0]), "--support-mask", str(liver),
                 "--query", str(volumes[1]), "--out", str(out_file), "--device", device, "--no-progress"])
    assert stop.value.code == 0
    assert nib.load(str(out_file)).shape == nib.load(str(volumes[1])).shape
