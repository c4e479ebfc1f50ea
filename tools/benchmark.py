"""Benchmarks: head speed vs the literal reference, encoder share, scaling, training, inference, memory.

    python tools/benchmark.py [--quick] [--device cpu|cuda] [--size N] --out BENCHMARKS.md

Writes a markdown report. The CPU run (--device cpu) writes the CPU section; a GPU run
(--device cuda) writes the GPU section. An existing --out file keeps the other section, so running
both on their machines yields one report. Measurements live in tools/bench_measures.py; this file parses
options and renders the tables. --quick: reduced sizes and repeats (under 2 minutes on 2 cores).
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import re
import shlex
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))  # bench_measures.py, bench_timing.py beside this script

import bench_measures as bench  # noqa: E402
import bench_timing as timing  # noqa: E402
import torch  # noqa: E402

from models.local_prototypes import official_cell_loop  # noqa: E402
from util.atomic import write_text_atomic  # noqa: E402
from util.cli import run_cli  # noqa: E402
from util.device import resolve_device  # noqa: E402
from util.errors import UserError  # noqa: E402
from util.paths import check_output_file  # noqa: E402

TITLE = "# Benchmarks\n"
INTRO = ("Made by `tools/benchmark.py` (its command is stated in each section). Every figure is the "
         "median of repeated timed runs after warm-up (spread: fastest - slowest run; in full runs, cheap "
         "head timings repeat for 2 s, up to 25 runs); on CUDA the timers "
         "synchronise the device. Forward passes run under `torch.no_grad`. Times in milliseconds "
         "unless stated. Synthetic data (seeded): 1-way 1-shot 1-query episodes, random-weight encoders "
         "(speed does not depend on the weights).\n")


def ms(seconds: float) -> str:
    value = seconds * 1000
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def spread(timing) -> str:
    return f"{ms(min(timing.runs))} - {ms(max(timing.runs))}"


def runs_note(timing) -> str:
    return f"{len(timing.runs)} timed after {timing.warmup} warm-up"


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def render_section(name: str, results: dict, machine: dict, command: str, plan) -> str:
    """Markdown of one section ('cpu' or 'gpu') from `bench.run_measurements` results."""
    h, gpu = results["head"], name == "gpu"
    share = {row["encoder"]: row for row in results["encoders"]}
    lines = [f"## {'GPU' if gpu else 'CPU'}{' (quick run)' if plan.quick else ''}", "",
             f"Command: `{command}`  ", f"Date: {datetime.date.today().isoformat()}", "",
             "| machine | |", "|---|---|"]
    # The load average shows other processes sharing the machine: medians then vary between runs.
    lines += [f"| {key} | {value} |" for key, value in machine.items()]
    if results.get("max_load", 0) > machine["cores"]:
        lines += ["", f"**Caution:** the 1-minute load average reached {results['max_load']:.1f} (sampled at "
                  f"each stage) on {machine['cores']} cores during this run: other processes shared the CPU, "
                  "so the timings are inflated and noisy (compare the spreads; the scaling table suffers "
                  "most). Rerun on an idle machine for publishable figures."]
    feature_share = max(share["resnet50_lslpn"]["share_feature"], share["vgg16"]["share_feature"])
    lines += ["", "### Targets", "", "| target | measured | |", "|---|---|---|",
              f"| 'image' mode >= 20x faster than the literal reference | {h['speedup_image']:.1f}x | "
              f"{verdict(h['speedup_image'] >= 20)} |",
              f"| 'feature' mode >= 100x faster than the literal reference | {h['speedup_feature']:.1f}x | "
              f"{verdict(h['speedup_feature'] >= 100)} |",
              "| 'feature' mode < 5% of the encoder forward (resnet50_lslpn, vgg16) | "
              f"{100 * feature_share:.1f}% (worst of the two) | {verdict(feature_share < 0.05)} |"]
    if gpu:
        d = results["dispatch"]
        for key, label in (("train_step", "training forward+backward"), ("inference_batch",
                                                                         "inference batch")):
            lines.append(f"| {label} GPU-bound (dispatch fraction well below 1) | {d[key]:.2f} | "
                         f"{verdict(d[key] < 0.5)} |")
        wait = max(row["data_wait_fraction"] for row in results["training"])
        lines.append(f"| data loading keeps up: waiting for data < 10% of a training step (worst AMP mode) | "
                     f"{100 * wait:.1f}% | {verdict(wait < 0.10)} |")
    lines += ["", f"### 1. Head forward per episode ({h['size']} x {h['size']} input, "
              f"{h['channels']}-channel {h['feature_size']} x {h['feature_size']} features, n_grid "
              f"{h['n_grid']}, overlapping, max vote, k=1)",
              "", "| implementation | median ms | spread ms | runs | speed-up vs reference |",
              "|---|---|---|---|---|",
              f"| literal reference (`models/local_prototypes.py: official_cell_loop`, float32) | "
              f"{ms(h['reference'].median)} | "
              f"{spread(h['reference'])} | {runs_note(h['reference'])} | 1.0x |"]
    for mode in ("image", "feature"):
        lines.append(f"| LocalPrototypeHead resolution='{mode}' | {ms(h[mode].median)} | {spread(h[mode])} | "
                     f"{runs_note(h[mode])} | {h['speedup_' + mode]:.1f}x |")
    lines += ["", "Agreement checks (computed by the script on this episode):", "",
              f"- reference vs 'image': max |logit difference| = {h['max_abs_diff_image']:.2e} "
              f"(tolerance {bench.IMAGE_TOLERANCE:g}): {'PASS' if h['image_ok'] else 'FAIL'}; "
              f"argmax agreement {100 * h['argmax_agreement_image']:.3f}%",
              f"- reference vs 'feature': argmax agreement = {100 * h['argmax_agreement_feature']:.2f}% of "
              f"pixels (required >= {100 * bench.FEATURE_AGREEMENT:g}%); "
              f"{h['feature_disagreements_off_boundary']} of the {h['feature_disagreements']} disagreeing "
              f"pixels lie farther than one feature cell ({h['size'] // h['feature_size']} px) from a "
              f"boundary of the reference's argmax map (required 0): {'PASS' if h['feature_ok'] else 'FAIL'}",
              "", "The literal reference is this project's plain loop implementation of the head "
              "(`models/local_prototypes.py: official_cell_loop`), with the rules and the structure of the "
              "official code (features upsampled to the full image, then a Python loop over grid cells); it "
              "is not the official code itself. It runs in float32, as the head (the tests use it in "
              "float64). It is run few times (see runs).", "",
              f"### 2. Head time as a share of the encoder forward ({plan.size} x {plan.size}, one episode = "
              "support + query image)", "",
              "| encoder | features | encoder ms | 'image' head ms | share | 'feature' head ms | share |",
              "|---|---|---|---|---|---|---|"]
    for row in results["encoders"]:
        f = row["feature_size"]
        lines.append(f"| {row['encoder']} | {row['channels']} x {f} x {f} | {ms(row['encoder_time'].median)} "
                     f"| {ms(row['image'].median)} | {100 * row['share_image']:.1f}% | "
                     f"{ms(row['feature'].median)} | {100 * row['share_feature']:.1f}% |")
    lines += ["", "The head is timed on features of each encoder's own shape (n_grid 8, overlapping, max "
              "vote).",
              "", "### 3. Scaling of the head with n_grid and input size (256 channels, stride 8)", "",
              "Cost per input pixel (ns) should stay roughly flat across n_grid: the head's work grows with "
              "pixels, not with cells x pixels.", "",
              "| mode | input | n_grid | cells | median ms | ns / pixel |", "|---|---|---|---|---|---|"]
    for row in results["scaling"]:
        lines.append(f"| {row['mode']} | {row['size']} | {row['n_grid']} | {row['cells']} | "
                     f"{ms(row['time'].median)} | {row['ns_per_pixel']:.0f} |")
    lines += ["", "### 4. Training throughput (`training.loop.train`, synthetic prepared data)", "",
              "| config | encoder | input | episodes / step | AMP | s / step | episodes / s | data wait | "
              "runs (s / step) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for row in results["training"]:
        lines.append(f"| {row['config']} | {row['encoder']} ({row['resolution']}) | {row['input_size']} | "
                     f"{row['batch_size']} | {'on' if row['amp'] else 'off'} | {row['sec_per_step']:.3f} | "
                     f"{row['episodes_per_s']:.2f} | {100 * row['data_wait_fraction']:.1f}% | "
                     f"{', '.join(f'{v:.3f}' for v in row['runs'])} |")
    lines += ["", "Each run is a fresh `train()` of a few steps (no validation, no checkpoints); s / step is "
              "the loop's own timer (mean of steps 2..n, each ended by `loss.item()`, data loading "
              "included); the table gives the median over runs.", "",
              "### 5. Volumetric inference throughput (`evaluation.inference.run_chunks`)", "",
              "| config | encoder | input | volume (X x Y x Z) | batch | AMP | median s / volume | query "
              "slices / s |",
              "|---|---|---|---|---|---|---|---|"]
    for row in results["inference"]:
        shape = " x ".join(str(v) for v in row["volume_shape"])
        lines.append(f"| {row['config']} | {row['encoder']} | {row['input_size']} | {shape} | "
                     f"{row['batch_size']} | {'on' if row['amp'] else 'off'} | {row['time'].median:.3f} | "
                     f"{row['slices_per_s']:.1f} |")
    lines += ["", "Phantom volumes (`dataloaders.phantom.render_subject`); support range = the liver's, "
              f"protocol preset 'inclusive' ({results['inference'][0]['n_chunks']} chunks); every axial "
              "slice of the query volume is segmented.", "", "### 6. Peak memory of one training step "
              "(`paper` config)", "",
              "| input | encoder | episodes / step | AMP | process max RSS MB | RSS before the step MB | "
              "CUDA max allocated MB | step s |", "|---|---|---|---|---|---|---|---|"]
    for row in results["memory"]:
        cuda = f"{row['cuda_max_allocated_mb']:.0f}" if "cuda_max_allocated_mb" in row else "-"
        lines.append(f"| {row['input_size']} | {row['encoder']} | {row['batch_size']} | "
                     f"{'on' if row['amp'] else 'off'} | {row['peak_rss_mb']:.0f} | "
                     f"{row['baseline_rss_mb']:.0f} | {cuda} | {row['step_seconds']:.1f} |")
    lines += ["", "Measured in a fresh Python process that runs exactly one step of `training.loop.train` "
              "(`resource.getrusage` ru_maxrss, so the RSS includes the interpreter and torch; the column "
              "before it is the same process's peak before the step). Step s is that single, cold step."]
    return "\n".join(lines) + "\n"


def gpu_not_measured() -> str:
    return ("## GPU\n\nNot measured yet: no GPU was available to the run that wrote this report. On a GPU "
            "machine, `python tools/benchmark.py --device cuda --out BENCHMARKS.md` measures this section "
            "(head, encoders, scaling, `paper` training and 512 x 512 inference with AMP off and on, CUDA "
            "peak memory, GPU-bound check) and replaces it, keeping the CPU section; `tools/gpu_check.sh` "
            "runs it with the other GPU checks (docs/gpu_check.md).\n")


def merge(existing: str | None, name: str, text: str) -> str:
    """The report with section `name` set to `text`; the other section kept from `existing`."""
    def block(section: str, body: str) -> str:
        return f"<!-- begin {section} -->\n{body}<!-- end {section} -->\n"
    sections = {"cpu": "## CPU\n\nNot measured yet.\n", "gpu": gpu_not_measured()}
    for section in sections:
        found = re.search(rf"<!-- begin {section} -->\n(.*?)<!-- end {section} -->", existing or "", re.S)
        if found:
            sections[section] = found.group(1)
    sections[name] = text
    return TITLE + "\n" + INTRO + "\n" + block("cpu", sections["cpu"]) + "\n" + block("gpu", sections["gpu"])


def plain(value):
    """Measurement results as JSON types: a Timing becomes {median_s, runs_s, warmup}."""
    if isinstance(value, timing.Timing):
        return {"median_s": value.median, "runs_s": list(value.runs), "warmup": value.warmup}
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="reduced set (under 2 minutes on 2 CPU cores)")
    parser.add_argument("--device", default="cpu", help="cpu (writes the CPU section) or cuda (the GPU "
                        "section)")
    parser.add_argument("--size", type=int, default=None, help="input size (default 512, 256 with --quick)")
    parser.add_argument("--out", required=True, help="markdown report to write, e.g. BENCHMARKS.md")
    parser.add_argument("--json", default=None, help="also write the raw figures (seconds) as JSON here")
    args = parser.parse_args(argv)
    if args.device not in ("cpu", "cuda"):  # a section per kind of device: 'auto' would not say which
        raise UserError(f"--device {args.device!r}: unknown: use cpu or cuda")
    check_output_file(args.out, [], "--out")   # before minutes of measuring: a file, in a writable folder
    if args.json:
        check_output_file(args.json, [args.out], "--json")
    device = resolve_device(args.device)
    plan = bench.make_plan(args.quick, args.size)
    machine_before = timing.machine_description(device)
    machine_before_load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    reference = functools.partial(official_cell_loop, dtype=torch.float32)  # the head's precision
    start, loads = time.perf_counter(), [machine_before_load]

    def log(message: str) -> None:  # progress on stderr; samples the load average at each stage
        loads.append(os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0)
        print(f"benchmark [{time.perf_counter() - start:5.0f} s]: {message}", file=sys.stderr, flush=True)
    results = bench.run_measurements(reference, plan, device, log=log)
    command = "python tools/benchmark.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                               else sys.argv[1:]))
    machine = timing.machine_description(device)
    log("done")
    results["max_load"] = max(loads)
    load = "load average (1, 5, 15 min) when described"
    if load in machine:
        machine = {**machine, load: f"{machine_before[load]} (start); {machine[load]} (end)"}
    text = render_section(device.type if device.type == "cpu" else "gpu", results, machine, command, plan)
    existing = open(args.out).read() if os.path.isfile(args.out) else None
    write_text_atomic(merge(existing, "cpu" if device.type == "cpu" else "gpu", text), args.out)
    if args.json:
        write_text_atomic(json.dumps({"device": device.type, "size": plan.size, "quick": plan.quick,
                                      "machine": machine, **plain(results)}, indent=1) + "\n", args.json)
    h = results["head"]
    print(f"wrote {args.out}: 'image' {h['speedup_image']:.1f}x, 'feature' {h['speedup_feature']:.1f}x "
          f"faster than the literal reference; checks image {'PASS' if h['image_ok'] else 'FAIL'}, "
          f"feature {'PASS' if h['feature_ok'] else 'FAIL'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
