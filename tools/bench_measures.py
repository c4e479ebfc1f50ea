"""Benchmark measurements for tools/benchmark.py (BENCHMARKS.md); timers are in tools/bench_timing.py.

Every figure is the median of `repeats` timed calls after `warmup` untimed ones; on CUDA the
timer synchronises the device before starting and before stopping. Forward passes run under
`torch.no_grad` (not inference_mode: the head caches geometry tensors per size, and tensors made in
inference mode would break a later training step of the same size in this process). Nothing here imports
tests or entry points: the slow literal reference of the head (models/local_prototypes.py:
official_cell_loop) is passed in by the script as `reference_fn`.

Synthetic data (seeded, same seed -> same tensors): an episode is 1-way 1-shot 1-query; support and
query foreground are ellipses, and features are a smooth random field plus a foreground/background
direction, so that argmax maps are meaningful. Training throughput runs the real training loop
(`training.loop.train`) on a small phantom prepared by `dataloaders.prepare` (`make_phantom_prep`); inference
throughput runs
`evaluation.inference.segment_query_volume` on phantom volumes (`dataloaders.phantom.render_subject`).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from bench_timing import dispatch_fraction, measure

from config import default_config, ex  # before sacred: config.py silences its import warning

# isort: split
from sacred.initialize import create_run

from dataloaders.organs import organ_index
from dataloaders.phantom import generate_phantom, render_subject
from dataloaders.prepare import Selection, prepare_dataset
from evaluation.inference import segment_query_volume
from evaluation.protocol import get_preset, organ_range
from models.encoders import build_encoder
from models.fewshot import FewShotSegNet
from models.local_prototypes import LocalPrototypeHead, grid_cells
from training.loop import train
from util.device import autocast
from util.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_TOLERANCE = 1e-3        # max |logit difference| allowed between the reference and 'image' mode
FEATURE_AGREEMENT = 0.90      # min fraction of pixels where 'feature' mode's argmax equals the reference's,
                              # and every disagreement must lie within one feature cell of a label boundary
ENCODER_SHAPES = {"vgg16": (512, 8), "resnet50_lslpn": (256, 8), "cnn_small": (128, 4)}  # (C, stride)


# ------------------------------------------------------------------------------ synthetic episode
def _ellipse(size: int, centre: tuple[float, float], radii: tuple[float, float]) -> torch.Tensor:
    """size x size float 0/1 mask of an axis-aligned ellipse (centre, radii as fractions of size)."""
    axis = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    rows, cols = axis[:, None], axis[None, :]
    inside = ((rows - centre[0]) / radii[0]) ** 2 + ((cols - centre[1]) / radii[1]) ** 2 <= 1
    return inside.float()


def synthetic_episode(size: int, channels: int, stride: int, device: torch.device,
                      seed: int = 0) -> dict[str, torch.Tensor]:
    """One 1-way 1-shot 1-query episode with features of `channels` x size/stride x size/stride.

    Returns support_features 1 x 1 x 1 x C x h x w, support_fg / support_bg 1 x 1 x 1 x H x W,
    query_features 1 x 1 x C x h x w (shapes of LocalPrototypeHead.forward).
    """
    g = torch.Generator().manual_seed(seed)
    h = size // stride
    direction = torch.randn(2, channels, 1, 1, generator=g)            # bg, fg directions: 2 x C x 1 x 1

    def features(mask: torch.Tensor) -> torch.Tensor:                   # H x W -> C x h x w
        soft = F.interpolate(mask[None, None], size=(h, h), mode="area")[0]  # 1 x h x w
        coarse = torch.randn(1, channels, max(2, h // 4), max(2, h // 4), generator=g)
        field_ = F.interpolate(coarse, size=(h, h), mode="bilinear", align_corners=False)[0]
        return field_ + 1.5 * (soft * direction[1] + (1 - soft) * direction[0])

    support_fg = _ellipse(size, (0.45, 0.5), (0.22, 0.28))
    query_fg = _ellipse(size, (0.5, 0.53), (0.2, 0.3))
    return {"support_features": features(support_fg)[None, None, None].to(device),
            "support_fg": support_fg[None, None, None].to(device),
            "support_bg": (1 - support_fg)[None, None, None].to(device),
            "query_features": features(query_fg)[None, None].to(device)}


def _head(mode: str, n_grid: int):
    return LocalPrototypeHead(n_grid=n_grid, overlap=True, vote="max", resolution=mode)


def _run_head(head, episode: dict, size: int) -> torch.Tensor:
    return head(episode["support_features"], episode["support_fg"], episode["support_bg"],
                episode["query_features"], (size, size))


# --------------------------------------------------------------------------------- figure 1
def near_boundary(labels: torch.Tensor, radius: int) -> torch.Tensor:
    """B x Q x H x W bool: pixels within `radius` pixels (Chebyshev) of a change of label."""
    flat = labels.flatten(0, 1).double()[:, None]                            # M x 1 x H x W
    high = F.max_pool2d(flat, 2 * radius + 1, stride=1, padding=radius)
    low = -F.max_pool2d(-flat, 2 * radius + 1, stride=1, padding=radius)
    return (high != low)[:, 0].unflatten(0, labels.shape[:2])


def head_comparison(reference_fn: Callable, size: int, channels: int, stride: int, n_grid: int,
                    device: torch.device, repeats: int, reference_repeats: int,
                    min_seconds: float = 0.0) -> dict:
    """Reference vs 'image' vs 'feature' head forward on one episode; times and agreement checks.

    reference_fn(support_features, support_fg, support_bg, query_features, image_size, n_grid,
    overlap, vote) -> logits B x Q x (1 + N) x H x W (the tests' cell-loop reference).
    """
    episode = synthetic_episode(size, channels, stride, device)
    result = {"size": size, "channels": channels, "feature_size": size // stride, "n_grid": n_grid}
    with torch.no_grad():
        reference = reference_fn(*episode.values(), (size, size), n_grid, True, "max")
        result["reference"] = measure(lambda: reference_fn(*episode.values(), (size, size), n_grid, True,
                                                           "max"), device, reference_repeats, warmup=0)
        result["reference"].warmup = 1  # the call above, whose output is checked
        outputs = {}
        for mode in ("image", "feature"):
            head = _head(mode, n_grid)
            outputs[mode] = _run_head(head, episode, size)
            result[mode] = measure(lambda: _run_head(head, episode, size), device, repeats,
                                   min_seconds=min_seconds)
    reference = reference.to(device)
    result["max_abs_diff_image"] = float((outputs["image"].double() - reference).abs().max())
    labels = reference.argmax(2)                                             # B x Q x H x W
    agree = outputs["feature"].argmax(2) == labels
    result["argmax_agreement_feature"] = float(agree.double().mean())
    result["argmax_agreement_image"] = float((outputs["image"].argmax(2) == labels).double().mean())
    band = near_boundary(labels, stride)
    result["feature_disagreements"] = int((~agree).sum())
    result["feature_disagreements_off_boundary"] = int((~agree & ~band).sum())
    result["image_ok"] = result["max_abs_diff_image"] <= IMAGE_TOLERANCE
    result["feature_ok"] = (result["argmax_agreement_feature"] >= FEATURE_AGREEMENT
                            and result["feature_disagreements_off_boundary"] == 0)
    for mode in ("image", "feature"):
        result[f"speedup_{mode}"] = result["reference"].median / result[mode].median
    return result


# --------------------------------------------------------------------------------- figure 2
def encoder_share(encoders: list[str], size: int, n_grid: int, device: torch.device,
                  repeats: int, min_seconds: float = 0.0) -> list[dict]:
    """Per encoder: forward time of one episode's 2 images (support + query) at size x size and the
    head time (both modes) on features of that encoder's shape; head share = head / encoder."""
    rows = []
    images = torch.rand(2, 1, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    for name in encoders:
        channels, stride = ENCODER_SHAPES[name]
        with contextlib.redirect_stderr(io.StringIO()):
            encoder = build_encoder(name).to(device).eval()
        episode = synthetic_episode(size, channels, stride, device)
        row = {"encoder": name, "channels": channels, "feature_size": size // stride}
        with torch.no_grad():
            # F821 is a false alarm (pyflakes sees `del encoder` below): measure() runs the lambda here
            row["encoder_time"] = measure(lambda: encoder(images), device, max(1, repeats - 2))  # noqa: F821
            for mode in ("image", "feature"):
                head = _head(mode, n_grid)
                row[mode] = measure(lambda: _run_head(head, episode, size), device, repeats,
                                    min_seconds=min_seconds)
                row[f"share_{mode}"] = row[mode].median / row["encoder_time"].median
        rows.append(row)
        del encoder
    return rows


# --------------------------------------------------------------------------------- figure 3
def head_scaling(sizes: list[int], grids: list[int], modes: list[str], device: torch.device,
                 repeats: int, channels: int = 256, stride: int = 8, min_seconds: float = 0.0) -> list[dict]:
    """Head forward time for every (mode, size, n_grid) with n_grid <= the feature map side."""
    rows = []
    for size in sizes:
        episode = synthetic_episode(size, channels, stride, device)
        for mode in modes:
            for n_grid in grids:
                if n_grid > size // stride:
                    continue
                head = _head(mode, n_grid)
                with torch.no_grad():
                    timing = measure(lambda: _run_head(head, episode, size), device, repeats,
                                     min_seconds=min_seconds)
                cells = len(grid_cells(size, n_grid, True)) ** 2
                rows.append({"mode": mode, "size": size, "n_grid": n_grid, "cells": cells, "time": timing,
                             "ns_per_pixel": 1e9 * timing.median / size ** 2})
    return rows


# ------------------------------------------------------------------------------ configs, data
def resolve_config(named: str, updates: dict) -> dict:
    """The resolved Sacred config of config.py for a named config plus updates (nothing is run).

    Random-weight encoders (model.pretrained=False): speed does not depend on the weights, and a GPU
    machine without network has no ImageNet weights to load.
    """
    updates = {**updates, "model": {**updates.get("model", {}), "pretrained": False}}

    return dict(create_run(ex, "print_config", config_updates=updates, named_configs=[named]).config)


def make_phantom_prep(folder: str, size: int, seed: int = 0) -> str:
    """A prepared folder written the library's way: a small seeded phantom (2 silver + 2 gold volumes of
    64 x 64 x 16, dataloaders.phantom) through dataloaders.prepare.prepare_dataset at `size` (no validation
    volumes; a slice qualifies with more than 5 organ voxels). Training reads it as it reads real data."""
    phantom = os.path.join(os.path.dirname(os.path.abspath(folder)), "phantom")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        generate_phantom(phantom, n_silver=2, n_gold=2, seed=seed, size=64, n_slices=16, workers=1)
        prepare_dataset(phantom, folder, size=size, n_val=0, seed=seed, rule=Selection(min_voxels=5),
                        workers=1)
    return folder


def _training_config(named: str, workdir: str, device: str, amp: bool, n_steps: int,
                     input_size: int | None) -> dict:
    """The named config for a short run on a small prepared phantom under `workdir` (no validation, no
    saving)."""
    updates = {"device": device, "amp": amp, "n_steps": n_steps, "val_every": 0, "save_every": n_steps,
               "print_every": n_steps, "num_workers": 0,
               "path": {"data_dir": os.path.join(workdir, "prep"), "log_dir": os.path.join(workdir, "runs")}}
    if input_size:
        updates["input_size"] = input_size
    config = resolve_config(named, updates)
    make_phantom_prep(config["path"]["data_dir"], config["input_size"])
    return config


# --------------------------------------------------------------------------------- figure 4
def training_throughput(named: str, device: torch.device, amp: bool, n_steps: int, runs: int,
                        input_size: int | None = None) -> dict:
    """Median over `runs` short runs of training.loop.train of its seconds per step (the loop's own
    timer: the mean over steps 2..n_steps, each ended by loss.item(), data loading included)."""
    per_run, waits = [], []
    with tempfile.TemporaryDirectory(prefix="lslpn-bench-") as workdir:
        config = _training_config(named, workdir, device.type, amp, n_steps, input_size)
        for _ in range(runs):
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                summary = train(config, defaults=default_config())
            per_run.append(float(summary["sec_per_step"]))
            waits.append(float(summary["data_wait_fraction"]))
    sec = statistics.median(per_run)
    return {"config": named, "input_size": config["input_size"], "batch_size": config["batch_size"],
            "encoder": config["model"]["encoder"], "resolution": config["model"]["resolution"],
            "amp": amp, "n_steps": n_steps, "runs": per_run, "sec_per_step": sec,
            "episodes_per_s": config["batch_size"] / sec, "data_wait_fraction": statistics.median(waits)}


# --------------------------------------------------------------------------------- figure 6
def training_step_memory(named: str, device: torch.device, amp: bool = False,
                         input_size: int | None = None, timeout: float = 1200) -> dict:
    """Peak memory of ONE training step of `named` in a fresh Python process.

    Returns baseline_rss_mb (after imports and data set-up), peak_rss_mb (ru_maxrss of the process
    at the end of the step), cuda_max_allocated_mb (CUDA only) and the step's seconds.
    """
    args = json.dumps({"named": named, "device": device.type, "amp": amp, "input_size": input_size})
    code = (f"import sys; sys.path[:0] = [{ROOT!r}, {os.path.join(ROOT, 'tools')!r}]; "
            "from bench_measures import _memory_child; _memory_child()")
    done = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("BENCH_JSON ")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"training-step memory subprocess failed (exit {done.returncode}): {tail}")
    return json.loads(lines[-1][len("BENCH_JSON "):])


def _memory_child() -> None:
    """Subprocess body of `training_step_memory`: one step of training.loop.train, then peaks."""
    args = json.loads(sys.argv[1])
    device = torch.device(args["device"])
    with tempfile.TemporaryDirectory(prefix="lslpn-bench-mem-") as workdir:
        config = _training_config(args["named"], workdir, device.type, args["amp"], 1, args["input_size"])
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            summary = train(config, defaults=default_config())
        out = {"config": args["named"], "input_size": config["input_size"],
               "batch_size": config["batch_size"],
               "encoder": config["model"]["encoder"], "amp": args["amp"],
               "baseline_rss_mb": baseline,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "step_seconds": summary["sec_per_step"]}
        if device.type == "cuda":
            out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    print("BENCH_JSON " + json.dumps(out), flush=True)


# --------------------------------------------------------------------------------- figure 5
def inference_throughput(named: str, device: torch.device, repeats: int, volume_size: int = 256,
                         n_slices: int = 64, input_size: int | None = None, amp: bool = False) -> dict:
    """Query slices per second of evaluation.inference.segment_query_volume on phantom volumes.

    Support and query are two phantom subjects (`render_subject`, volume_size x volume_size x ~n_slices);
    the support range is the liver's (protocol preset 'inclusive'), the query range is EVERY axial slice.
    The model is the named config's (random weights: speed does not depend on them).
    """

    config = resolve_config(named, {"input_size": input_size} if input_size else {})
    support, support_label, _, _ = render_subject(np.random.default_rng([0, 1]), volume_size, n_slices)
    query, _, _, _ = render_subject(np.random.default_rng([0, 2]), volume_size, n_slices)
    liver = support_label == organ_index("liver")
    preset = get_preset("inclusive")
    support_range = organ_range(liver, min(preset.threshold, int(liver.sum(axis=(0, 1)).max()) - 1))
    query_range = (0, query.shape[2] - 1)
    torch.manual_seed(0)
    with contextlib.redirect_stderr(io.StringIO()):
        model = FewShotSegNet.from_config(config["model"]).to(device).eval()
    batch_size = config["eval"]["batch_size"]

    def run():
        with autocast(device, amp):
            return segment_query_volume(model, support, liver, query, support_range, query_range,
                                        preset.n_chunks, config["input_size"], {"mode": "window",
                                        "window": [-200, 300]}, device, batch_size)
    timing = measure(run, device, max(1, repeats - 2))
    n_query = query.shape[2]
    return {"config": named, "encoder": config["model"]["encoder"], "input_size": config["input_size"],
            "batch_size": batch_size, "volume_shape": list(query.shape), "query_slices": n_query,
            "n_chunks": preset.n_chunks, "amp": amp, "time": timing, "slices_per_s": n_query / timing.median}


def gpu_dispatch(named: str, device: torch.device, input_size: int | None = None) -> dict:
    """CUDA only: dispatch fraction (see `dispatch_fraction`) of a training forward+backward of the
    named config's model on a synthetic batch, and of one inference batch (`model.segment`)."""
    config = resolve_config(named, {"input_size": input_size} if input_size else {})
    size, B = config["input_size"], config["batch_size"]
    with contextlib.redirect_stderr(io.StringIO()):
        model = FewShotSegNet.from_config(config["model"]).to(device)
    g = torch.Generator().manual_seed(0)
    fg = _ellipse(size, (0.45, 0.5), (0.22, 0.28)).expand(B, 1, 1, size, size).contiguous().to(device)
    support = torch.rand(B, 1, 1, 1, size, size, generator=g).to(device)
    query = torch.rand(B, 1, 1, size, size, generator=g).to(device)
    labels = (_ellipse(size, (0.5, 0.53), (0.2, 0.3)).long().expand(B, 1, size, size)).to(device)

    def step():
        logits, _ = model(support, fg, 1 - fg, query)
        F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(0, 1)).backward()

    model.train()
    out = {"train_step": dispatch_fraction(step, device)}
    model.eval()
    batch = torch.rand(1, config["eval"]["batch_size"], 1, size, size, generator=g).to(device)
    with torch.no_grad():
        prototypes = model.encode_support(support[:1], fg[:1], 1 - fg[:1])
        out["inference_batch"] = dispatch_fraction(lambda: model.segment(prototypes, batch), device)
    return out


# ------------------------------------------------------------------------------ plan and report
@dataclass
class Plan:
    """What a run measures: full (default) or --quick (reduced sizes and repeats)."""
    quick: bool
    size: int
    repeats: int
    reference_repeats: int
    head_seconds: float         # cheap head timings repeat until this many seconds (25 runs at most)
    scaling_sizes: list[int]
    grids: list[int]
    demo_size: int | None       # None: the demo config's own input_size
    demo_steps: int
    demo_runs: int
    volume_size: int
    n_slices: int


def make_plan(quick: bool, size: int | None) -> Plan:
    """Full: 512 x 512, 5 timed runs (reference 2); quick: 256 x 256 (or --size), 2 runs (reference 1)."""
    size = size or (256 if quick else 512)
    if size < 64 or size % 8:
        raise UserError(f"--size {size}: must be a multiple of 8 and >= 64 (n_grid 8 on stride-8 features)")
    return Plan(quick=quick, size=size, repeats=2 if quick else 5, reference_repeats=1 if quick else 2,
                head_seconds=0.0 if quick else 2.0,
                scaling_sizes=[size // 4, size // 2, size], grids=[1, 4, 8, 16],
                demo_size=None if size >= 128 else size, demo_steps=3 if quick else 6,
                demo_runs=1 if quick else 3, volume_size=min(size, 128 if quick else 256),
                n_slices=32 if (quick or size < 256) else 64)


def run_measurements(reference_fn: Callable, plan: Plan, device: torch.device,
                     log: Callable[[str], None] = lambda message: None) -> dict:
    """All figures of one section (CPU or GPU); see the module docstring and BENCHMARKS.md."""
    torch.manual_seed(0)
    cpu, out = device.type == "cpu", {}
    log("1/6 head: reference vs 'image' vs 'feature'")
    out["head"] = head_comparison(reference_fn, plan.size, 256, 8, 8, device, plan.repeats,
                                  plan.reference_repeats,
                                  plan.head_seconds)
    log("2/6 head share of the encoder forward")
    out["encoders"] = encoder_share(list(ENCODER_SHAPES), plan.size, 8, device, plan.repeats,
                                    plan.head_seconds)
    log("3/6 head scaling with n_grid and input size")
    out["scaling"] = head_scaling(plan.scaling_sizes, plan.grids, ["image", "feature"], device, plan.repeats,
                                  min_seconds=plan.head_seconds)
    log("4/6 training throughput")
    if cpu:
        out["training"] = [training_throughput("demo", device, False, plan.demo_steps, plan.demo_runs,
                                               plan.demo_size)]
    else:
        out["training"] = [training_throughput("paper", device, amp, plan.demo_steps, plan.demo_runs,
                                               plan.size)
                           for amp in (False, True)]
    if not cpu:  # before inference: segment_query_volume's inference_mode would fill the head's cache
        out["dispatch"] = gpu_dispatch("paper", device, plan.size)
    log("5/6 volumetric inference throughput")
    if cpu:
        out["inference"] = [inference_throughput("demo", device, plan.repeats, plan.volume_size,
                                                 plan.n_slices,
                                                 plan.demo_size)]
    else:
        out["inference"] = [inference_throughput("paper", device, plan.repeats, plan.volume_size,
                                                 plan.n_slices,
                                                 plan.size, amp) for amp in (False, True)]
    log("6/6 peak memory of one training step (paper config, fresh process)")
    out["memory"] = [training_step_memory("paper", device, amp, plan.size) for amp in ((False,) if cpu
                                                                                       else (False, True))]
    return out
