"""One prepared GPU check: every CUDA code path once, and the paper-scale figures (issue 18).

    tools/gpu_check.sh [--dry-run] [--quick] [--out DIR]   # the wrapper installs carried wheels first
    python tools/gpu_check.py [--dry-run] [--quick] [--out DIR] [--budget SECONDS]

Steps, in order; none stops the run, each prints PASS / FAIL / SKIP / INFO lines:
  1. the suite's CUDA tests (`pytest -m cuda` on the files that mark some; they skip without CUDA)
  2. a phantom (6 silver + 3 gold, scripts/make_phantom.py) prepared at SIZE (scripts/prepare_visceral.py)
  3. train.py with `paper` (and `official` when config.py has it) x AMP off / bf16 / fp16, STEPS steps
     each, random init: s/step, episodes/s, peak CUDA memory, data-wait fraction, loss first vs last
  4. resume the paper bf16 run from its last.pth for a few more steps
  5. torchrun on every GPU (nccl; one process on CPU with gloo in --dry-run), channels_last on
  6. test.py on the gold phantom with AMP: query slices/s
  7. scripts/segment_volume.py on one gold volume
  8. tools/benchmark.py --device cuda: OUT/BENCHMARKS.md (the GPU section) and OUT/benchmark.json
  9. targets and the projection of the paper's 4 folds x 10,000 steps in GPU-hours
Outputs under --out (default $OUT, else runs/gpu_check): summary.md (also printed), results.json,
log.txt (every command and its output), BENCHMARKS.md, benchmark.json. Exit status 1 when a check FAILs.
--dry-run: on CPU at 64 x 64, a few steps: the same steps and summary (tests/test_gpu_check.py runs it);
--quick (with --dry-run) leaves out the benchmark and the `official` runs.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import glob
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAPER_FOLDS, PAPER_STEPS = 4, 10_000
TARGET_BF16_SPEEDUP, TARGET_GPU_HOURS, TARGET_HEAD_SHARE, MAX_DATA_WAIT = 1.8, 2.0, 0.05, 0.10


@dataclass
class Plan:
    """Sizes of one run: the real check on a GPU or the CPU dry-run."""
    dry_run: bool
    quick: bool
    device: str
    size: int                 # input_size and preparation size
    phantom_size: int         # in-plane pixels of the generated volumes (prepare resizes to `size`)
    phantom_slices: int
    min_voxels: int           # prepare_visceral --min-voxels
    steps: int                # per training run
    resume_steps: int
    ddp_steps: int
    budget: float             # seconds for the whole check
    overrides: tuple = ()     # extra train.py settings (the dry-run's small model)

    @classmethod
    def make(cls, dry_run: bool, quick: bool, budget: float | None) -> "Plan":
        if dry_run:  # the set-ups' code paths with a small encoder: vgg16 in fp16 crawls on a CPU
            return cls(True, quick, "cpu", 64, 64, 24, 5, 3, 2, 2, budget or 600,
                       ("model.encoder=cnn_small", "model.resolution=feature", "batch_size=2"))
        return cls(False, quick, "cuda", 512, 256, 48, 150, 200, 20, 30, budget or 480)


@dataclass
class Check:
    step: str
    name: str
    status: str               # PASS, FAIL, SKIP or INFO
    figures: str = ""
    data: dict = field(default_factory=dict)


class Runner:
    """Runs commands under the check's deadline, logs them to log.txt and collects Checks."""

    def __init__(self, plan: Plan, out: Path, work: Path):
        self.plan, self.out, self.work = plan, out, work
        self.start = time.perf_counter()
        self.checks: list[Check] = []
        self.log = open(out / "log.txt", "w")

    def left(self) -> float:
        return self.plan.budget - (time.perf_counter() - self.start)

    def add(self, check: Check) -> Check:
        self.checks.append(check)
        line = f"{check.status:4s} {check.step} {check.name}" + (f": {check.figures}" if check.figures else "")
        print(line, flush=True)
        self.log.write(f"### {line}\n")
        self.log.flush()
        return check

    def run(self, cmd: list[str], cap: float, env: dict | None = None) -> tuple[int, str, float]:
        """(exit status, output, seconds); status 124 when it ran past min(cap, time left - 20 s)."""
        timeout = max(1.0, min(cap, self.left() - 20))
        self.log.write(f"\n$ {' '.join(shlex.quote(str(c)) for c in cmd)}   (timeout {timeout:.0f} s)\n")
        self.log.flush()
        tic = time.perf_counter()
        try:
            done = subprocess.run([str(c) for c in cmd], cwd=ROOT, env={**os.environ, **(env or {})},
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
            code, output = done.returncode, done.stdout
        except subprocess.TimeoutExpired as error:
            code = 124
            output = (error.stdout.decode(errors="replace") if isinstance(error.stdout, bytes) else error.stdout or "")
            output += f"\n[gpu_check: killed after {timeout:.0f} s]"
        seconds = time.perf_counter() - tic
        self.log.write(output + f"\n[exit {code} after {seconds:.1f} s]\n")
        self.log.flush()
        return code, output, seconds

    def enough_time(self, step: str, name: str, need: float) -> bool:
        if self.left() < need:
            self.add(Check(step, name, "SKIP", f"out of time ({self.left():.0f} s left, needs ~{need:.0f} s)"))
            return False
        return True


def tail(output: str, lines: int = 3) -> str:
    kept = [line.strip() for line in output.strip().splitlines() if line.strip()][-lines:]
    return " | ".join(kept)[-300:]


# ----------------------------------------------------------------------------------------- steps
def cuda_tests(r: Runner) -> None:
    # Only the files that mark tests `cuda`: the GPU machine lacks some test-only packages (nbformat, ...).
    files = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "tests").glob("test_*.py")
                   if re.search(r"pytest\.mark\.cuda", path.read_text()))
    if not files:
        r.add(Check("1", "CUDA tests (pytest -m cuda)", "FAIL", "no test file marks a test `cuda`"))
        return
    code, output, seconds = r.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                                   *files], cap=180)
    counts = tail(output, 1)
    cuda = r.plan.device == "cuda"
    ok = code == 0 and (not cuda or " skipped" not in counts)  # on a GPU no CUDA test may skip
    if code == 5:                                             # pytest: no tests collected
        ok, counts = False, "no test is marked cuda"
    r.add(Check("1", "CUDA tests (pytest -m cuda)", "PASS" if ok else "FAIL", f"{counts} in {seconds:.0f} s"))


def phantom(r: Runner) -> Path | None:
    p, phantom_dir, prep = r.plan, r.work / "phantom", r.work / "prepared"
    workers = str(max(1, min(8, (os.cpu_count() or 2) // 2)))
    code, output, seconds = r.run([sys.executable, "scripts/make_phantom.py", "--out", phantom_dir, "--n-silver", 6,
                                   "--n-gold", 3, "--size", p.phantom_size, "--slices", p.phantom_slices,
                                   "--workers", workers, "--seed", 18], cap=180)
    if code == 0:
        code, output, more = r.run([sys.executable, "scripts/prepare_visceral.py", "--visceral-dir", phantom_dir,
                                    "--out", prep, "--size", p.size, "--n-val", 1, "--min-voxels", p.min_voxels],
                                   cap=180)
        seconds += more
    ok = code == 0 and (prep / "meta.json").is_file()
    r.add(Check("2", f"phantom 6 silver + 3 gold ({p.phantom_size} px) prepared at {p.size}",
                "PASS" if ok else "FAIL", f"{seconds:.0f} s" if ok else tail(output)))
    return prep if ok else None


def named_configs() -> list[str]:
    """The set-ups to train: `paper`, and `official` when config.py defines it."""
    code = "from config import ex; print(' '.join(ex.named_configs))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    names = done.stdout.split()
    return ["paper"] + (["official"] if "official" in names else [])


def train_command(r: Runner, prep: Path, setup: str, name: str, amp: str, steps: int, *extra: str) -> list[str]:
    return ["train.py", "with", setup, f"device={r.plan.device}", f"amp={amp}", f"input_size={r.plan.size}",
            f"n_steps={steps}", "val_every=0", f"save_every={steps}", f"print_every={max(1, steps // 4)}",
            "model.pretrained=False", "class_setting=all_structures", "fold=0", f"name={name}", f"path.data_dir={prep}",
            f"path.log_dir={r.work / 'runs'}", *r.plan.overrides, *extra]


def read_run(r: Runner, name: str) -> dict:
    """The latest Sacred run of `name`: its result, info and loss series."""
    folders = sorted(glob.glob(str(r.work / "runs" / name / "[0-9]*")), key=lambda f: int(Path(f).name))
    if not folders:
        return {}
    run = json.loads(Path(folders[-1], "run.json").read_text())
    metrics_path, info_path = Path(folders[-1], "metrics.json"), Path(folders[-1], "info.json")
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}   # Sacred's run.info
    config_path = Path(folders[-1], "config.json")
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    return {"folder": folders[-1], "result": run.get("result") or {}, "info": info, "config": config,
            "loss": metrics.get("loss", {}).get("values", [])}


def loss_trend(losses: list[float]) -> tuple[float, float] | None:
    """Mean loss of the first and of the last quarter of the steps."""
    if len(losses) < 4:
        return None
    q = max(1, len(losses) // 4)
    return sum(losses[:q]) / q, sum(losses[-q:]) / q


def describe_training(result: dict, loss: tuple[float, float] | None) -> str:
    parts = [f"{result['sec_per_step']:.4f} s/step", f"{result['episodes_per_s']:.1f} episodes/s"]
    if result.get("cuda_peak_mb") is not None:
        parts.append(f"peak CUDA {result['cuda_peak_mb']:.0f} MB")
    if result.get("data_wait_fraction") is not None:
        parts.append(f"data wait {100 * result['data_wait_fraction']:.1f}%")
    if loss:
        parts.append(f"loss {loss[0]:.3f} -> {loss[1]:.3f}")
    return ", ".join(parts)


def training(r: Runner, prep: Path, setups: list[str]) -> dict:
    """Every set-up x AMP mode; returns {(setup, amp): result} of the runs that finished."""
    results = {}
    for setup in setups:
        for amp in ("False", "bf16", "fp16"):
            label = f"train {setup} amp={'off' if amp == 'False' else amp}, {r.plan.steps} steps at {r.plan.size}"
            if not r.enough_time("3", label, 30):
                continue
            name = f"gpucheck_{setup}_{amp.lower()}"
            code, output, seconds = r.run([sys.executable, *train_command(r, prep, setup, name, amp, r.plan.steps)],
                                          cap=max(60.0, r.plan.budget / 6))
            run = read_run(r, name) if code == 0 else {}
            result = run.get("result", {})
            if code != 0 or not result.get("sec_per_step"):
                r.add(Check("3", label, "FAIL", tail(output)))
                continue
            trend = loss_trend(run["loss"])
            falling = trend is not None and trend[1] < trend[0]
            status = "PASS" if falling or r.plan.dry_run else "FAIL"
            note = "" if falling else (" (loss not falling: expected in a few-step dry-run)" if r.plan.dry_run
                                       else " (loss not falling)")
            result = {**result, "loss_first_last": trend, "wall_s": seconds,
                      "encoder": run["config"].get("model", {}).get("encoder"), "batch_size": run["config"].get("batch_size")}
            results[(setup, amp)] = result
            r.add(Check("3", label, status, describe_training(result, trend) + note, result))
            wait = result.get("data_wait_fraction")
            if wait is not None and wait > MAX_DATA_WAIT and not r.plan.dry_run:
                r.add(Check("3", f"data loading of {setup} amp={amp}", "FAIL",
                            f"{100 * wait:.0f}% of the step waits for data (> {100 * MAX_DATA_WAIT:.0f}%): raise "
                            "num_workers in the GPU set-ups"))
    starved = any((res.get("data_wait_fraction") or 0) > MAX_DATA_WAIT for res in results.values())
    if starved or (r.plan.dry_run and not r.plan.quick):  # the remedy, measured (the dry-run exercises it)
        workers_run(r, prep, results)
    return results


def workers_run(r: Runner, prep: Path, results: dict, workers: int = 4) -> None:
    """paper bf16 again with `workers` loader processes: does the data-wait fraction drop below 10%?"""
    label = f"train paper amp=bf16 num_workers={workers} (data loading remedy)"
    if not r.enough_time("3", label, 30):
        return
    name = f"gpucheck_paper_bf16_w{workers}"
    code, output, seconds = r.run([sys.executable, *train_command(r, prep, "paper", name, "bf16", r.plan.steps,
                                                                  f"num_workers={workers}")],
                                  cap=max(60.0, r.plan.budget / 6))
    result = read_run(r, name).get("result", {}) if code == 0 else {}
    if not result.get("sec_per_step"):
        r.add(Check("3", label, "FAIL", tail(output)))
        return
    wait = result.get("data_wait_fraction") or 0.0
    ok = wait <= MAX_DATA_WAIT or r.plan.dry_run
    result = {**result, "wall_s": seconds}
    results[("paper", f"bf16, num_workers={workers}")] = result
    r.add(Check("3", label, "PASS" if ok else "FAIL", describe_training(result, None)
                + ("" if ok else f": still > {100 * MAX_DATA_WAIT:.0f}%"), result))


def resume(r: Runner, prep: Path) -> None:
    label = f"resume paper bf16 from last.pth on {r.plan.device} (+{r.plan.resume_steps} steps)"
    if not r.enough_time("4", label, 25):
        return
    name, total = "gpucheck_paper_bf16", r.plan.steps + r.plan.resume_steps
    if not read_run(r, name):
        r.add(Check("4", label, "SKIP", "the paper bf16 run did not finish"))
        return
    code, output, _ = r.run([sys.executable, *train_command(r, prep, "paper", name, "bf16", total, "resume=True")],
                            cap=90)
    run = read_run(r, name)
    ok = (code == 0 and f"at step {r.plan.steps}" in output and run.get("result", {}).get("steps") == total
          and "resumed_from" in run.get("info", {}))
    r.add(Check("4", label, "PASS" if ok else "FAIL",
                f"continued at step {r.plan.steps}, ended at {total}" if ok else tail(output)))


def torchrun(r: Runner, prep: Path) -> None:
    import torch
    gpus = torch.cuda.device_count() if r.plan.device == "cuda" else 1
    backend = "nccl" if r.plan.device == "cuda" else "gloo"
    label = f"torchrun {gpus} process(es), {backend}, bf16, channels_last, {r.plan.ddp_steps} steps"
    if not r.enough_time("5", label, 30):
        return
    name = "gpucheck_ddp"
    code, output, _ = r.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
                             *train_command(r, prep, "paper", name, "bf16", r.plan.ddp_steps, "channels_last=True")],
                            cap=120, env={"OMP_NUM_THREADS": "1"} if r.plan.dry_run else None)
    digests = dict(re.findall(r"rank (\d+): final weights sha256 ([0-9a-f]+)", output))  # tqdm may precede it
    run = read_run(r, name)
    info = run.get("info", {})
    ok = (code == 0 and len(digests) == gpus and len(set(digests.values())) == 1
          and info.get("distributed_backend") == backend)
    figures = (f"backend {info.get('distributed_backend')}, world size {info.get('world_size')}, identical weights on "
               f"{len(digests)} rank(s), {run['result']['sec_per_step']:.4f} s/step") if ok else tail(output)
    r.add(Check("5", label, "PASS" if ok else "FAIL", figures, run.get("result", {})))


def evaluation(r: Runner, prep: Path) -> None:
    label = f"test.py on the gold phantom at {r.plan.size}, amp=bf16"
    if not r.enough_time("6", label, 25):
        return
    run = read_run(r, "gpucheck_paper_bf16")
    if not run:
        r.add(Check("6", label, "SKIP", "no trained snapshot (the paper bf16 run did not finish)"))
        return
    snapshot = json.dumps({"LSLPN": str(Path(run["folder"]) / "last.pth")})
    code, output, seconds = r.run([sys.executable, "test.py", "with", "fold=0", f"input_size={r.plan.size}",
                                   f"device={r.plan.device}", "amp=bf16", f"eval.snapshots={snapshot}",
                                   "eval.save_predictions=False", f"path.data_dir={prep}",
                                   f"path.log_dir={r.work / 'runs'}"], cap=120)
    found = sorted(glob.glob(str(r.work / "runs" / "test" / "[0-9]*")), key=lambda f: int(Path(f).name))
    ok = code == 0 and bool(found) and Path(found[-1], "results.csv").is_file()
    speed = {}
    if ok:
        info_path = Path(found[-1], "info.json")
        seconds_in = json.loads(info_path.read_text()).get("evaluate_seconds") if info_path.is_file() else None
        slices = 0
        with open(Path(found[-1], "results.csv")) as handle:
            for row in csv.DictReader(handle):
                if row["method"] == "LSLPN" and row["dice_range"] and row["query_range"]:
                    lo, hi = (int(v) for v in row["query_range"].split("-"))
                    slices += hi - lo + 1
        if seconds_in:
            speed = {"query_slices": slices, "evaluate_seconds": seconds_in, "query_slices_per_s": slices / seconds_in}
    figures = (f"{speed['query_slices_per_s']:.1f} query slices/s ({speed['query_slices']} slices segmented by the "
               f"model in {speed['evaluate_seconds']:.2f} s of evaluate(), loading and mask copy included)"
               if speed else f"process {seconds:.1f} s")
    r.add(Check("6", label, "PASS" if ok else "FAIL", figures if ok else tail(output), speed))


def segment(r: Runner) -> None:
    label = "segment_volume.py on one gold volume"
    if not r.enough_time("7", label, 20):
        return
    run = read_run(r, "gpucheck_paper_bf16")
    gold = r.work / "phantom" / "GoldCorpus"
    volumes = sorted(glob.glob(str(gold / "Volumes" / "*.nii.gz")))
    if not run or len(volumes) < 2:
        r.add(Check("7", label, "SKIP", "no trained snapshot or fewer than 2 gold volumes"))
        return
    support_pid = Path(volumes[0]).name.split("_")[0]
    masks = glob.glob(str(gold / "Segmentations" / f"{support_pid}_*_58_*.nii.gz"))  # RadLex 58: liver
    out_file = r.work / "segment" / "pred.nii.gz"
    out_file.parent.mkdir(exist_ok=True)
    code, output, seconds = r.run([sys.executable, "scripts/segment_volume.py", "--checkpoint",
                                   Path(run["folder"]) / "last.pth", "--support-image", volumes[0], "--support-mask",
                                   masks[0] if masks else "missing", "--query", volumes[1], "--out", out_file,
                                   "--device", r.plan.device, "--no-progress"], cap=90)
    ok = code == 0 and out_file.is_file()
    r.add(Check("7", label, "PASS" if ok else "FAIL", f"{seconds:.1f} s (process)" if ok else tail(output)))


def benchmark(r: Runner) -> dict:
    label = f"benchmark.py --device {r.plan.device}"
    if r.plan.quick:
        r.add(Check("8", label, "SKIP", "--quick"))
        return {}
    quick = r.plan.dry_run or r.left() < 300  # the full run repeats cheap timings for 2 s each
    if not r.enough_time("8", label, 60):
        return {}
    report = r.out / "BENCHMARKS.md"
    shutil.copyfile(ROOT / "BENCHMARKS.md", report)  # keeps the other section
    cmd = [sys.executable, "tools/benchmark.py", "--device", r.plan.device, "--out", report,
           "--json", r.out / "benchmark.json"]
    if quick:
        cmd += ["--quick", "--size", str(r.plan.size)]
    code, output, seconds = r.run(cmd, cap=r.left())
    data = json.loads((r.out / "benchmark.json").read_text()) if (r.out / "benchmark.json").is_file() else {}
    ok = code == 0 and bool(data)
    r.add(Check("8", label + (" --quick" if quick else ""), "PASS" if ok else "FAIL",
                f"{seconds:.0f} s; {tail(output, 1)}" if ok else tail(output)))
    return data


def targets(r: Runner, trained: dict, bench: dict) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) rows; 'n/a' on the dry-run (CPU figures say nothing of an H100)."""
    rows = []
    judge = (lambda ok: "dry-run") if r.plan.dry_run else (lambda ok: "met" if ok else "NOT met")
    fp32, bf16 = trained.get(("paper", "False")), trained.get(("paper", "bf16"))
    encoder = (fp32 or {}).get("encoder") or "vgg16"       # the paper set-up's encoder, as trained
    row = next((row for row in bench.get("encoders", []) if row.get("encoder") == encoder), None)
    target = f"head 'image' < 5% of a paper step at 512 ({encoder})"
    if fp32 and row and bench.get("size") == r.plan.size and not r.plan.overrides:  # the dry-run trains cnn_small
        batch, head = fp32.get("batch_size") or 4, row["image"]["median_s"]
        share = batch * head / fp32["sec_per_step"]
        rows.append((target, f"{100 * share:.1f}% ({batch} episodes x {1000 * head:.2f} ms head forward on "
                             f"{encoder}-shaped features / {1000 * fp32['sec_per_step']:.1f} ms fp32 step; backward "
                             "not included)", judge(share < TARGET_HEAD_SHARE)))
    else:
        rows.append((target, "not measured", "-"))
    if fp32 and bf16:
        speedup = fp32["sec_per_step"] / bf16["sec_per_step"]
        rows.append(("paper step bf16 >= 1.8x faster than fp32", f"{speedup:.2f}x", judge(speedup >= TARGET_BF16_SPEEDUP)))
    else:
        rows.append(("paper step bf16 >= 1.8x faster than fp32", "not measured", "-"))
    best = min((res["sec_per_step"] for (setup, _), res in trained.items() if setup == "paper"), default=None)
    if best:
        hours = PAPER_FOLDS * PAPER_STEPS * best / 3600
        rows.append(("4 folds x 10,000 steps < 2 GPU-hours", f"{hours:.2f} GPU-hours (fastest paper mode)",
                     judge(hours < TARGET_GPU_HOURS)))
    return rows


def projection(r: Runner, trained: dict) -> list[str]:
    lines = []
    for (setup, amp), res in sorted(trained.items()):
        hours = PAPER_FOLDS * PAPER_STEPS * res["sec_per_step"] / 3600
        lines.append(f"- {setup}, amp={'off' if amp == 'False' else amp}: {res['sec_per_step']:.4f} s/step -> "
                     f"{PAPER_FOLDS} folds x {PAPER_STEPS:,} steps = {hours:.2f} GPU-hours (training steps only)")
    if r.plan.dry_run and lines:
        lines.append("- (dry-run: CPU at 64 px; these hours say nothing about a GPU)")
    return lines


# --------------------------------------------------------------------------------------- summary
def machine(plan: Plan) -> str:
    import torch
    where = (torch.cuda.get_device_name(0) if plan.device == "cuda" and torch.cuda.is_available()
             else platform.processor() or platform.machine())
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    return (f"{where}; torch {torch.__version__} (CUDA {torch.version.cuda}); python {platform.python_version()}; "
            f"{os.cpu_count()} CPUs; code {head.strip() or 'unknown'}")


def summary(r: Runner, rows: list, projected: list[str], description: str) -> str:
    mode = "dry-run on CPU" if r.plan.dry_run else "GPU"
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# GPU check ({mode}{', quick' if r.plan.quick else ''}), {when}", "",
             f"Machine: {description}  ", f"Command: `tools/gpu_check.sh {' '.join(sys.argv[1:])}`  ",
             f"Wall time: {time.perf_counter() - r.start:.0f} s of a {r.plan.budget:.0f} s budget; input {r.plan.size} px, "
             f"{r.plan.steps} steps per training run"
             + (f" ({', '.join(r.plan.overrides)})" if r.plan.overrides else ""), "",
             "| step | check | status | figures |", "|---|---|---|---|"]
    lines += [f"| {c.step} | {c.name} | {c.status} | {c.figures} |" for c in r.checks]
    lines += ["", "| target (one H100) | measured | |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines += ["", "Projection (measured s/step x 4 folds x 10,000 steps; validation not included):"] + projected
    fails = [c for c in r.checks if c.status == "FAIL"]
    lines += ["", f"{len(fails)} FAIL" + ("" if fails else " (all checks passed or skipped)")]
    lines += [f"FAIL {c.step} {c.name}: {c.figures}" for c in fails]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, 64 x 64, a few steps (CI)")
    parser.add_argument("--quick", action="store_true", help="leave out the benchmark and the official runs")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "runs" / "gpu_check"))
    parser.add_argument("--budget", type=float, default=None, help="seconds (default 480; dry-run 600)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (phantom, runs)")
    args = parser.parse_args(argv)
    plan = Plan.make(args.dry_run, args.quick, args.budget)
    import torch
    if plan.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here: run `tools/gpu_check.sh --dry-run` on a CPU machine", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="lslpn-gpu-check-"))
    runner = Runner(plan, out, work)
    description = machine(plan)
    print(f"gpu_check: {'dry-run on CPU' if plan.dry_run else 'GPU'}; {description}; work {work}; out {out}", flush=True)
    try:
        cuda_tests(runner)
        prep = phantom(runner)
        trained, bench = {}, {}
        if prep is not None:
            setups = ["paper"] if plan.quick else named_configs()
            if "official" not in setups:
                runner.add(Check("3", "train official", "SKIP", "--quick" if plan.quick
                                 else "config.py has no `official` named config"))
            trained = training(runner, prep, setups)
            resume(runner, prep)
            torchrun(runner, prep)
            evaluation(runner, prep)
            segment(runner)
        bench = benchmark(runner)
        rows, projected = targets(runner, trained, bench), projection(runner, trained)
        text = summary(runner, rows, projected, description)
        (out / "summary.md").write_text(text)
        (out / "results.json").write_text(json.dumps(
            {"plan": asdict(plan), "machine": description, "checks": [asdict(c) for c in runner.checks],
             "training": {f"{s} amp={a}": v for (s, a), v in trained.items()}, "targets": rows,
             "projection": projected}, indent=1, default=str))
        print("\n" + text, flush=True)
        return 1 if any(c.status == "FAIL" for c in runner.checks) else 0
    finally:
        runner.log.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
