"""Long-run reliability check (not in CI): many demo training steps, RSS sampled every 100 steps.

    python tools/long_run_check.py --steps 2000 --out docs/long_run_check.md

Runs `python train.py with demo n_steps=STEPS print_every=100 ...` and samples the process's VmRSS at
each printed summary line; fails (exit 1) on a NaN/inf loss or a failed process; reports the RSS growth
from the first sample to the last. Linux only (/proc).
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from util.cli import run_cli
from util.errors import UserError
from util.io import write_text_atomic

ROOT = Path(__file__).resolve().parents[1]

STEP_LINE = re.compile(r"step (\d+)/(\d+)\s+loss (\S+)")


def rss_mb(pid: int) -> float | None:
    """Resident set size of process `pid` in MiB (None when it has exited)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_training(steps: int, data_dir: str, log_dir: str, extra: list[str], on_sample=None
                 ) -> tuple[list[dict], int, str, float]:
    """Run train.py; returns (samples [{step, loss, rss_mb, seconds}], exit code, last output, seconds)."""
    cmd = [sys.executable, "train.py", "with", "demo", f"n_steps={steps}", "print_every=100",
           f"path.data_dir={data_dir}", f"path.log_dir={log_dir}", "device=cpu", *extra]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    samples, tail = [], []
    for raw in proc.stdout:
        for line in raw.replace("\r", "\n").splitlines():
            tail = (tail + [line])[-20:]
            match = STEP_LINE.search(line)
            if match:
                sample = {"step": int(match.group(1)), "loss": float(match.group(3)),
                          "rss_mb": rss_mb(proc.pid), "seconds": time.perf_counter() - start}
                samples.append(sample)
                print(f"step {sample['step']:>5}  loss {sample['loss']:.4f}  RSS {sample['rss_mb']:.0f} MiB  "
                      f"{sample['seconds']:.0f} s", flush=True)
                if on_sample is not None:
                    on_sample(samples, "\n".join(tail), time.perf_counter() - start)
    code = proc.wait()
    return samples, code, "\n".join(tail), time.perf_counter() - start


def report(samples: list[dict], code: int, seconds: float, command: str, steps: int,
           tail: str) -> tuple[str, bool]:
    """Markdown report and whether the check passed."""
    finite = all(math.isfinite(s["loss"]) for s in samples)
    complete = code == 0 and bool(samples) and samples[-1]["step"] == steps
    rss = [s["rss_mb"] for s in samples if s["rss_mb"] is not None]
    lines = ["# Long-run check: demo training, memory and loss", "",
             f"Command: `{command}`", "",
             f"Machine: {platform.platform()}, Python {platform.python_version()}, {os.cpu_count()} CPUs "
             "(shared with other work while it ran).", "",
             f"Result: exit code {code}; {samples[-1]['step'] if samples else 0} of {steps} steps in "
             f"{seconds:.0f} s; losses {'all finite' if finite else 'NOT all finite'}.", ""]
    if len(rss) >= 2:
        after_warmup = rss[2:] if len(rss) >= 4 else rss
        lines += [f"RSS (VmRSS of the train.py process, sampled at every 100-step summary line): first "
                  f"{rss[0]:.0f} MiB, last {rss[-1]:.0f} MiB, min {min(rss):.0f}, max {max(rss):.0f}; growth "
                  f"from the {'3rd' if len(rss) >= 4 else '1st'} sample to the last: "
                  f"{after_warmup[-1] - after_warmup[0]:+.0f} MiB.", ""]
    lines += ["| step | mean loss (last 100 steps) | RSS MiB | elapsed s |", "|---:|---:|---:|---:|"]
    lines += [f"| {s['step']} | {s['loss']:.4f} | {s['rss_mb']:.0f} | {s['seconds']:.0f} |" for s in samples]
    if not complete:
        lines += ["", "Last output lines:", "", "```", tail, "```"]
    return "\n".join(lines) + "\n", finite and complete


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--data-dir", default="data/prepared_phantom", help="prepared phantom (make demo)")
    parser.add_argument("--log-dir", default=None, help="run folder root (default: a temporary folder)")
    parser.add_argument("--out", default="docs/long_run_check.md", help="Markdown report")
    parser.add_argument("extra", nargs="*", help="more Sacred updates, e.g. val_every=500")
    args = parser.parse_args(argv)
    if args.steps < 100:
        raise UserError(f"--steps {args.steps}: use at least 100 (RSS is sampled every 100 steps)")
    if not (ROOT / args.data_dir / "meta.json").is_file() and not Path(args.data_dir, "meta.json").is_file():
        raise UserError(f"--data-dir {args.data_dir}: not a prepared folder: run `make demo` (or "
                        "scripts/prepare_visceral.py) first")
    command = "python tools/long_run_check.py " + " ".join(argv)
    out = Path(args.out)

    def partial(samples, tail, seconds):  # the report so far, marked partial, after every sample
        write_text_atomic(report(samples, -1, seconds, command, args.steps, tail)[0].replace(
            "Result: exit code -1", "Result: STILL RUNNING (partial report)"), out)

    with tempfile.TemporaryDirectory() as scratch:
        samples, code, tail, seconds = run_training(args.steps, args.data_dir, args.log_dir or scratch,
                                                    args.extra, partial)
    text, ok = report(samples, code, seconds, command, args.steps, tail)
    write_text_atomic(text, out)
    print(f"wrote {out}: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    run_cli(main)
