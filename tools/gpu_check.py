"""One prepared GPU check: every CUDA code path once (the suite's `cuda` tests), then the paper-scale timings.

    tools/gpu_check.sh [--dry-run] [--quick] [--out DIR]   # the wrapper installs carried wheels first
    python tools/gpu_check.py [--dry-run] [--quick] [--out DIR] [--budget SECONDS] [--keep]

Steps and outputs: docs/gpu_check.md (each prints PASS / FAIL / SKIP; exit 1 when a check FAILs).
--dry-run: CPU at 64 x 64, a few steps; --quick: no benchmark, no `official` runs.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from training.loop import latest_run
from util.io import write_text_atomic
from util.provenance import git_commit

ROOT = Path(__file__).resolve().parents[1]

PAPER_FOLDS, PAPER_STEPS = 4, 10_000
TARGET_BF16_SPEEDUP, TARGET_GPU_HOURS, TARGET_HEAD_SHARE, MAX_DATA_WAIT = 1.8, 2.0, 0.05, 0.10
AMP_MODES = ("False", "bf16", "fp16")


@dataclass
class Plan:
    """Sizes of one run: the real check on a GPU or the CPU dry-run."""
    dry_run: bool
    quick: bool
    budget: float             # seconds for the whole check
    device: str = "cuda"
    size: int = 512           # input_size and preparation size
    phantom: tuple = (256, 48, 150)   # in-plane pixels and slices of the generated volumes, --min-voxels
    steps: int = 200          # per training run
    overrides: tuple = ()     # extra train.py settings (the dry-run's small model)


def make_plan(dry_run: bool, quick: bool, budget: float | None) -> Plan:
    if dry_run:  # every step's code path, smallest: a small encoder (vgg16 in fp16 crawls on a CPU), 2 steps
        return Plan(True, quick, budget or 600, "cpu", 64, (64, 12, 5), 2,
                    ("model.encoder=cnn_small", "model.resolution=feature", "batch_size=2"))
    return Plan(False, quick, budget or 480)


class Runner:
    """Runs commands under the check's deadline, logs them to log.txt and collects the checks
    ({step, name, status PASS | FAIL | SKIP, figures})."""

    def __init__(self, plan: Plan, out: Path, work: Path):
        self.plan, self.out, self.work, self.runs = plan, out, work, work / "runs"
        self.start, self.checks, self.log = time.perf_counter(), [], open(out / "log.txt", "w")

    def left(self) -> float:
        return self.plan.budget - (time.perf_counter() - self.start)

    def add(self, step: str, name: str, ok: bool | str, figures: str = "") -> None:
        status = ok if isinstance(ok, str) else ("PASS" if ok else "FAIL")
        self.checks.append({"step": step, "name": name, "status": status, "figures": figures})
        line = f"{status:4s} {step} {name}" + (f": {figures}" if figures else "")
        print(line, flush=True)
        self.write(f"### {line}\n")

    def write(self, text: str) -> None:
        self.log.write(text)
        self.log.flush()

    def run(self, cmd: list, cap: float) -> tuple[int, str, float]:
        """(exit status, output, seconds); status 124 when it ran past min(cap, time left - 20 s)."""
        timeout = max(1.0, min(cap, self.left() - 20))
        self.write(f"\n$ {' '.join(shlex.quote(str(c)) for c in cmd)}   (timeout {timeout:.0f} s)\n")
        tic = time.perf_counter()
        try:
            done = subprocess.run([str(c) for c in cmd], cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, timeout=timeout)
            code, output = done.returncode, done.stdout.decode(errors="replace")
        except subprocess.TimeoutExpired as error:
            code = 124
            output = ((error.stdout or b"").decode(errors="replace")
                      + f"\n[gpu_check: killed after {timeout:.0f} s]")
        seconds = time.perf_counter() - tic
        self.write(output + f"\n[exit {code} after {seconds:.1f} s]\n")
        return code, output, seconds

    def enough_time(self, step: str, name: str, need: float) -> bool:
        if self.left() < need:
            self.add(step, name, "SKIP", f"out of time ({self.left():.0f} s left, needs ~{need:.0f} s)")
            return False
        return True


def tail(output: str, lines: int = 3) -> str:
    return " | ".join([line.strip() for line in output.splitlines() if line.strip()][-lines:])[-300:]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


# ----------------------------------------------------------------------------------------- steps
def cuda_tests(r: Runner) -> None:
    """`pytest -m cuda` on the files that mark some (the GPU machine lacks some test-only packages)."""
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                   if "pytest.mark.cuda" in p.read_text())
    code, output, seconds = r.run([sys.executable, "-m", "pytest", "-q", "-rfs", "-m", "cuda",
                                   "-p", "no:cacheprovider", *files], cap=240)
    counts = tail(output, 1)
    failed = [line.split()[1] for line in output.splitlines() if line.startswith("FAILED ")]
    ok = code == 0 and (r.plan.device != "cuda" or " skipped" not in counts)  # on a GPU no CUDA test may skip
    if code == 5 or not files:                                                 # pytest: no tests collected
        ok, counts = False, "no test is marked cuda"
    r.add("1", "CUDA tests (pytest -m cuda)", ok, f"{counts} in {seconds:.0f} s"
          + (f"; failed: {', '.join(failed)}" if failed else ""))


def phantom(r: Runner) -> Path | None:
    """The phantom made and prepared in this process, as make_phantom.py and prepare_visceral.py do."""
    from dataloaders.prepare import Selection, prepare_dataset
    from phantom import generate_phantom
    (pixels, slices, min_voxels), phantom_dir, prep = r.plan.phantom, r.work / "phantom", r.work / "prepared"
    workers, tic = max(1, min(8, (os.cpu_count() or 2) // 2)), time.perf_counter()
    label = f"phantom 6 silver + 3 gold ({pixels} px) prepared at {r.plan.size}"
    try:
        with contextlib.redirect_stdout(r.log), contextlib.redirect_stderr(r.log):
            generate_phantom(phantom_dir, 6, 3, 18, pixels, slices, workers)
            prepare_dataset(phantom_dir, prep, size=r.plan.size, n_val=1, rule=Selection(min_voxels))
    except Exception as error:  # noqa: BLE001 (any failure is this step's FAIL line, the check goes on)
        r.add("2", label, False, f"{type(error).__name__}: {error}"[:300])
        return None
    r.add("2", label, True, f"{time.perf_counter() - tic:.0f} s")
    return prep


def train(r: Runner, prep: Path, setup: str, amp: str, label: str, *extra: str) -> dict | None:
    """One timed train.py run: its result (s/step, ...) with loss trend and wall time, or None (a FAIL
    line)."""
    name = f"gpucheck_{setup}_{amp.lower()}" + "".join(f"_{e.split('=')[1]}" for e in extra)
    steps = r.plan.steps
    code, output, seconds = r.run(
        [sys.executable, "train.py", "with", setup, f"device={r.plan.device}", f"amp={amp}",
         f"input_size={r.plan.size}", f"n_steps={steps}", "val_every=0", f"save_every={steps}",
         f"print_every={max(1, steps // 4)}", "model.pretrained=False", "class_setting=all_structures",
         "fold=0", f"name={name}", f"path.data_dir={prep}", f"path.log_dir={r.runs}", *r.plan.overrides,
         *extra],
        cap=max(60.0, r.plan.budget / 6))
    folder = latest_run(r.runs, name) if code == 0 else None
    result = read_json(folder / "run.json").get("result") or {} if folder else {}
    if not result.get("sec_per_step"):
        r.add("3", label, False, tail(output))
        return None
    losses = read_json(folder / "metrics.json").get("loss", {}).get("values", [])
    quarter = max(1, len(losses) // 4)
    trend = (sum(losses[:quarter]) / quarter, sum(losses[-quarter:]) / quarter) if len(losses) >= 4 else None
    config = read_json(folder / "config.json")
    return {**result, "loss_first_last": trend, "wall_s": seconds, "folder": str(folder),
            "encoder": config.get("model", {}).get("encoder"), "batch_size": config.get("batch_size")}


def describe(result: dict) -> str:
    parts = [f"{result['sec_per_step']:.4f} s/step", f"{result['episodes_per_s']:.1f} episodes/s"]
    if result.get("cuda_peak_mb") is not None:
        parts.append(f"peak CUDA {result['cuda_peak_mb']:.0f} MB")
    if result.get("data_wait_fraction") is not None:
        parts.append(f"data wait {100 * result['data_wait_fraction']:.1f}%")
    if result.get("loss_first_last"):
        parts.append("loss {:.3f} -> {:.3f}".format(*result["loss_first_last"]))
    return ", ".join(parts)


def training(r: Runner, prep: Path, setups: list[str]) -> dict:
    """Every set-up x AMP mode; returns {(setup, amp): result} of the runs that finished."""
    results = {}
    for setup in setups:
        for amp in AMP_MODES:
            mode = "off" if amp == "False" else amp
            label = f"train {setup} amp={mode}, {r.plan.steps} steps at {r.plan.size}"
            if not r.enough_time("3", label, 30) or (result := train(r, prep, setup, amp, label)) is None:
                continue
            trend = result["loss_first_last"]
            falling = trend is not None and trend[1] < trend[0]
            note = "" if falling else (" (loss not falling: expected in a few-step dry-run)" if r.plan.dry_run
                                       else " (loss not falling)")
            results[(setup, amp)] = result
            r.add("3", label, falling or r.plan.dry_run, describe(result) + note)
    starved = [f"{setup} amp={amp}" for (setup, amp), res in results.items()
               if (res.get("data_wait_fraction") or 0) > MAX_DATA_WAIT and not r.plan.dry_run]
    if starved:
        r.add("3", "data loading", False, f"{', '.join(starved)}: over {100 * MAX_DATA_WAIT:.0f}% of the "
              "step waits for data: raise num_workers in the GPU set-ups")
    label = "train paper amp=bf16 num_workers=4 (data loading remedy)"
    if (starved or (r.plan.dry_run and not r.plan.quick)) and r.enough_time("3", label, 30) and (
            res := train(r, prep, "paper", "bf16", label, "num_workers=4")):
        ok = (res.get("data_wait_fraction") or 0.0) <= MAX_DATA_WAIT or r.plan.dry_run
        results[("paper", "bf16, num_workers=4")] = res
        r.add("3", label, ok, describe(res) + ("" if ok else f": still > {100 * MAX_DATA_WAIT:.0f}%"))
    return results


def benchmark(r: Runner) -> dict:
    label = f"benchmark.py --device {r.plan.device}"
    if r.plan.quick:
        r.add("4", label, "SKIP", "--quick")
        return {}
    quick = r.plan.dry_run or r.left() < 300  # the full run repeats cheap timings for 2 s each
    if not r.enough_time("4", label, 60):
        return {}
    report, data_file = r.out / "BENCHMARKS.md", r.out / "benchmark.json"
    shutil.copyfile(ROOT / "BENCHMARKS.md", report)  # keeps the other section
    quick_options = ["--quick", "--size", r.plan.size] if quick else []
    code, output, seconds = r.run([sys.executable, "tools/benchmark.py", "--device", r.plan.device, "--out",
                                   report, "--json", data_file, *quick_options], cap=r.left())
    data = read_json(data_file)
    r.add("4", label + (" --quick" if quick else ""), code == 0 and bool(data),
          f"{seconds:.0f} s; {tail(output, 1)}" if code == 0 and data else tail(output))
    return data


def targets(r: Runner, trained: dict, bench: dict) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) rows; 'dry-run' verdicts on CPU (CPU figures say nothing of an H100)."""
    judge = (lambda ok: "dry-run") if r.plan.dry_run else (lambda ok: "met" if ok else "NOT met")
    fp32, bf16 = trained.get(("paper", "False")), trained.get(("paper", "bf16"))
    encoder = (fp32 or {}).get("encoder") or "vgg16"       # the paper set-up's encoder, as trained
    row = next((row for row in bench.get("encoders", []) if row.get("encoder") == encoder), None)
    rows = [(f"head 'image' < 5% of a paper step at 512 ({encoder})", "not measured", "-"),
            ("paper step bf16 >= 1.8x faster than fp32", "not measured", "-")]
    # the dry-run trains cnn_small: no head-share figure there
    if fp32 and row and bench.get("size") == r.plan.size and not r.plan.overrides:
        batch, head = fp32.get("batch_size") or 4, row["image"]["median_s"]
        share = batch * head / fp32["sec_per_step"]
        rows[0] = (rows[0][0], f"{100 * share:.1f}% ({batch} episodes x {1000 * head:.2f} ms head forward on "
                   f"{encoder}-shaped features / {1000 * fp32['sec_per_step']:.1f} ms fp32 step; backward "
                   "not included)", judge(share < TARGET_HEAD_SHARE))
    if fp32 and bf16:
        speedup = fp32["sec_per_step"] / bf16["sec_per_step"]
        rows[1] = (rows[1][0], f"{speedup:.2f}x", judge(speedup >= TARGET_BF16_SPEEDUP))
    best = min((res["sec_per_step"] for (setup, _), res in trained.items() if setup == "paper"), default=None)
    if best:
        hours = PAPER_FOLDS * PAPER_STEPS * best / 3600
        rows.append(("4 folds x 10,000 steps < 2 GPU-hours", f"{hours:.2f} GPU-hours (fastest paper mode)",
                     judge(hours < TARGET_GPU_HOURS)))
    return rows


def projection(r: Runner, trained: dict) -> list[str]:
    lines = [f"- {setup}, amp={'off' if amp == 'False' else amp}: {res['sec_per_step']:.4f} s/step -> "
             f"{PAPER_FOLDS} folds x {PAPER_STEPS:,} steps = "
             f"{PAPER_FOLDS * PAPER_STEPS * res['sec_per_step'] / 3600:.2f} "
             "GPU-hours (training steps only)" for (setup, amp), res in sorted(trained.items())]
    return lines + (["- (dry-run: CPU at 64 px; these hours say nothing about a GPU)"]
                    if r.plan.dry_run and lines else [])


# --------------------------------------------------------------------------------------- summary
def machine(plan: Plan) -> str:
    import torch  # here, not at the top: --help and the wrapper's checks stay fast
    where = (torch.cuda.get_device_name(0) if plan.device == "cuda" and torch.cuda.is_available()
             else platform.processor() or platform.machine())
    return (f"{where}; torch {torch.__version__} (CUDA {torch.version.cuda}); python "
            f"{platform.python_version()}; {os.cpu_count()} CPUs; code {(git_commit() or 'unknown')[:7]}")


def summary(r: Runner, rows: list, projected: list[str], description: str) -> str:
    mode = ("dry-run on CPU" if r.plan.dry_run else "GPU") + (", quick" if r.plan.quick else "")
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    models = f" ({', '.join(r.plan.overrides)})" if r.plan.overrides else ""
    lines = [f"# GPU check ({mode}), {when}", "", f"Machine: {description}  ",
             f"Command: `tools/gpu_check.sh {' '.join(sys.argv[1:])}`  ",
             f"Wall time: {time.perf_counter() - r.start:.0f} s of a {r.plan.budget:.0f} s budget; input "
             f"{r.plan.size} px, {r.plan.steps} steps per training run{models}", "",
             "| step | check | status | figures |", "|---|---|---|---|"]
    lines += [f"| {c['step']} | {c['name']} | {c['status']} | {c['figures']} |" for c in r.checks]
    lines += ["", "| target (one H100) | measured | |", "|---|---|---|"] + [f"| {a} | {b} | {c} |"
                                                                            for a, b, c in rows]
    lines += ["", "Projection (measured s/step x 4 folds x 10,000 steps; validation not "
              "included):"] + projected
    fails = [c for c in r.checks if c["status"] == "FAIL"]
    lines += ["", f"{len(fails)} FAIL" + ("" if fails else " (all checks passed or skipped)")]
    return "\n".join(lines + [f"FAIL {c['step']} {c['name']}: {c['figures']}" for c in fails]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, 64 x 64, a few steps (CI)")
    parser.add_argument("--quick", action="store_true", help="leave out the benchmark and the official runs")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "runs" / "gpu_check"))
    parser.add_argument("--budget", type=float, default=None, help="seconds (default 480; dry-run 600)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (phantom, runs)")
    args = parser.parse_args(argv)
    plan = make_plan(args.dry_run, args.quick, args.budget)
    import torch  # after argparse: --help stays fast
    if plan.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here: run `tools/gpu_check.sh --dry-run` on a CPU machine",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="lslpn-gpu-check-"))
    r = Runner(plan, out, work)
    description = machine(plan)
    print(f"gpu_check: {'dry-run on CPU' if plan.dry_run else 'GPU'}; {description}; work {work}; out {out}",
          flush=True)
    try:
        cuda_tests(r)
        prep, trained = phantom(r), {}
        if prep is not None:
            trained = training(r, prep, ["paper"] if plan.quick else ["paper", "official"])
            if plan.quick:
                r.add("3", "train official", "SKIP", "--quick")
        bench = benchmark(r)
        rows, projected = targets(r, trained, bench), projection(r, trained)
        text = summary(r, rows, projected, description)
        write_text_atomic(text, out / "summary.md")
        write_text_atomic(json.dumps(
            {"plan": asdict(plan), "machine": description, "checks": r.checks,
             "training": {f"{s} amp={a}": v for (s, a), v in trained.items()}, "targets": rows,
             "projection": projected}, indent=1, default=str), out / "results.json")
        print("\n" + text, flush=True)
        return 1 if any(c["status"] == "FAIL" for c in r.checks) else 0
    finally:
        r.log.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
