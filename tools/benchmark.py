"""Benchmarks: head speed vs the literal reference, encoder share, scaling, training, inference, memory.

    python tools/benchmark.py [--quick] [--device cpu|cuda] [--size N] --out BENCHMARKS.md [--json FILE]

--device cpu writes the CPU section of the markdown report, cuda the GPU section; an existing --out keeps
the other one. Every figure is the median of timed runs after warm-up, device-synchronised on CUDA; forward
passes run under torch.no_grad (not inference_mode: the head caches geometry per size, and inference-mode
tensors would break a later training step). --quick: reduced sizes and repeats (under 2 minutes on 2 cores).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import io
import json
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from config import default_config, ex  # before sacred: config.py silences its import warning

# isort: split
from sacred.arg_parser import get_config_updates
from sacred.initialize import create_run
from torch.utils.data import default_collate
from torch.utils.flop_counter import FlopCounterMode

from dataloaders.episodes import REDRAWS_KEY, EpisodeDataset
from dataloaders.organs import organ_index
from dataloaders.prepare import Selection, prepare_dataset
from dataloaders.prepared import read_meta
from demo import PINNED_NUMERICS
from demo.run import CONFIGS as DEMO_CONFIGS
from demo.run import METHODS as DEMO_METHODS
from evaluation.inference import run_chunks
from evaluation.protocols import chunk_plan, get_preset, organ_range
from experiments.timing import Timing, measure, synchronize
from models.encoders import build_encoder
from models.fewshot import FewShotSegNet
from models.local_prototypes import LocalPrototypeHead, grid_cells, official_cell_loop
from phantom import generate_phantom, render_subject
from training.config_check import fold_training_classes
from training.loop import train
from training.objective import build_model, build_optimisation, episode_loss
from util.cli import run_cli
from util.device import amp_dtype, autocast, cpu_has_native_bf16, resolve_device, say_once
from util.errors import UserError
from util.io import check_output_file, write_text_atomic
from util.provenance import git_commit

IMAGE_TOLERANCE = 1e-3        # max |logit difference| allowed between the reference and 'image' mode
FEATURE_AGREEMENT = 0.90      # min fraction of pixels where 'feature' mode's argmax equals the reference's,
                              # and every disagreement must lie within one feature cell of a label boundary
ENCODER_SHAPES = {"vgg16": (512, 8), "resnet50_lslpn": (256, 8), "cnn_small": (128, 4)}  # (C, stride)
TITLE = "# Benchmarks\n"
INTRO = ("Made by `tools/benchmark.py` (its command is stated in each section). Every figure is the "
         "median of repeated timed runs after warm-up (spread: fastest - slowest run; in full runs, cheap "
         "head timings repeat for 2 s, up to 25 runs); on CUDA the timers "
         "synchronise the device. Forward passes run under `torch.no_grad`. Times in milliseconds "
         "unless stated. Synthetic data (seeded): 1-way 1-shot 1-query episodes, random-weight encoders "
         "(speed does not depend on the weights).\n")


def dispatch_fraction(fn: Callable[[], object], device: torch.device, repeats: int = 3) -> float:
    """CUDA: (time for Python to return from `fn`) / (time until the GPU finished it); well below 1 means
    GPU-bound, close to 1 launch-bound."""
    fn()
    fractions = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        issued = time.perf_counter() - start
        synchronize(device)
        fractions.append(issued / (time.perf_counter() - start))
    return statistics.median(fractions)


def machine_description(device: torch.device) -> dict:
    """CPU model (/proc/cpuinfo), cores, torch/python versions and the GPU name when on CUDA."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as handle:
        cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {"cpu": cpu, "cores": usable, "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "os": platform.platform()}
    if hasattr(os, "getloadavg"):
        info["load average (1, 5, 15 min) when described"] = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    info["code (git HEAD)"] = git_commit() or "unknown"
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    return info


# ------------------------------------------------------------------------------ synthetic episode
def _ellipse(size: int, centre: tuple[float, float], radii: tuple[float, float]) -> torch.Tensor:
    """size x size float 0/1 mask of an axis-aligned ellipse (centre, radii as fractions of size)."""
    axis = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    rows, cols = axis[:, None], axis[None, :]
    return (((rows - centre[0]) / radii[0]) ** 2 + ((cols - centre[1]) / radii[1]) ** 2 <= 1).float()


def synthetic_episode(size: int, channels: int, stride: int, device: torch.device,
                      seed: int = 0) -> dict[str, torch.Tensor]:
    """A 1-way 1-shot 1-query episode: ellipse masks; features = smooth random field + a fg/bg direction.
    support_features 1 x 1 x 1 x C x h x w, support_fg/bg 1 x 1 x 1 x H x W, query 1 x 1 x C x h x w."""
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


def _time_head(mode: str, n_grid: int, episode: dict, size: int, device, repeats: int,
               min_seconds: float = 0.0) -> tuple[torch.Tensor, Timing]:
    """(logits, Timing) of the vectorised head in `mode` (overlapping, max vote) on `episode`."""
    head = LocalPrototypeHead(n_grid=n_grid, overlap=True, vote="max", resolution=mode)

    def run():
        return head(episode["support_features"], episode["support_fg"], episode["support_bg"],
                    episode["query_features"], (size, size))
    with torch.no_grad():
        return run(), measure(run, device, repeats, min_seconds=min_seconds)


# ------------------------------------------------------------------------------ figures 1 to 3
def near_boundary(labels: torch.Tensor, radius: int) -> torch.Tensor:
    """B x Q x H x W bool: pixels within `radius` pixels (Chebyshev) of a change of label."""
    flat = labels.flatten(0, 1).double()[:, None]                            # M x 1 x H x W
    high = F.max_pool2d(flat, 2 * radius + 1, stride=1, padding=radius)
    low = -F.max_pool2d(-flat, 2 * radius + 1, stride=1, padding=radius)
    return (high != low)[:, 0].unflatten(0, labels.shape[:2])


def head_comparison(reference_fn: Callable, size: int, channels: int, stride: int, n_grid: int,
                    device: torch.device, repeats: int, reference_repeats: int,
                    min_seconds: float = 0.0) -> dict:
    """Reference vs 'image' vs 'feature' head forward on one episode: times and agreement checks.
    reference_fn(*episode, image_size, n_grid, overlap, vote) -> logits B x Q x (1 + N) x H x W."""
    episode = synthetic_episode(size, channels, stride, device)
    result = {"size": size, "channels": channels, "feature_size": size // stride, "n_grid": n_grid}
    with torch.no_grad():
        reference = reference_fn(*episode.values(), (size, size), n_grid, True, "max")
        result["reference"] = measure(lambda: reference_fn(*episode.values(), (size, size), n_grid, True,
                                                           "max"), device, reference_repeats, warmup=0)
        result["reference"].warmup = 1  # the call above, whose output is checked
    outputs = {}
    for mode in ("image", "feature"):
        outputs[mode], result[mode] = _time_head(mode, n_grid, episode, size, device, repeats, min_seconds)
    reference = reference.to(device)
    result["max_abs_diff_image"] = float((outputs["image"].double() - reference).abs().max())
    labels = reference.argmax(2)                                             # B x Q x H x W
    agree = outputs["feature"].argmax(2) == labels
    result["argmax_agreement_feature"] = float(agree.double().mean())
    result["argmax_agreement_image"] = float((outputs["image"].argmax(2) == labels).double().mean())
    result["feature_disagreements"] = int((~agree).sum())
    result["feature_disagreements_off_boundary"] = int((~agree & ~near_boundary(labels, stride)).sum())
    result["image_ok"] = result["max_abs_diff_image"] <= IMAGE_TOLERANCE
    result["feature_ok"] = (result["argmax_agreement_feature"] >= FEATURE_AGREEMENT
                            and result["feature_disagreements_off_boundary"] == 0)
    for mode in ("image", "feature"):
        result[f"speedup_{mode}"] = result["reference"].median / result[mode].median
    return result


def encoder_share(size: int, n_grid: int, device: torch.device, repeats: int, min_seconds: float) -> list:
    """Per encoder: forward time of one episode's 2 images at size x size, and the head time (both modes) on
    features of that encoder's shape; share = head / encoder."""
    rows = []
    images = torch.rand(2, 1, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    for name, (channels, stride) in ENCODER_SHAPES.items():
        with contextlib.redirect_stderr(io.StringIO()):
            encoder = build_encoder(name).to(device).eval()
        episode = synthetic_episode(size, channels, stride, device)
        row = {"encoder": name, "channels": channels, "feature_size": size // stride}
        with torch.no_grad():
            row["encoder_time"] = measure(lambda: encoder(images), device, max(1, repeats - 2))
        for mode in ("image", "feature"):
            row[mode] = _time_head(mode, n_grid, episode, size, device, repeats, min_seconds)[1]
            row[f"share_{mode}"] = row[mode].median / row["encoder_time"].median
        rows.append(row)
    return rows


def head_scaling(sizes: list[int], grids: list[int], device: torch.device, repeats: int,
                 min_seconds: float, channels: int = 256, stride: int = 8) -> list[dict]:
    """Head forward time for every (mode, size, n_grid) with n_grid <= the feature map side."""
    rows = []
    for size in sizes:
        episode = synthetic_episode(size, channels, stride, device)
        for mode in ("image", "feature"):
            for n_grid in (g for g in grids if g <= size // stride):
                timing = _time_head(mode, n_grid, episode, size, device, repeats, min_seconds)[1]
                rows.append({"mode": mode, "size": size, "n_grid": n_grid,
                             "cells": len(grid_cells(size, n_grid, True)) ** 2, "time": timing,
                             "ns_per_pixel": 1e9 * timing.median / size ** 2})
    return rows


# ------------------------------------------------------------------ figures 4 to 6 and the GPU check
def resolve_config(arguments: str | list[str], updates: dict) -> dict:
    """`train.py with <arguments>` (named configs, key=value) plus updates, random-weight encoders (speed
    does not depend on them)."""
    given, named = get_config_updates([arguments] if isinstance(arguments, str) else list(arguments))
    updates = {**given, **updates, "model": {**given.get("model", {}), **updates.get("model", {}),
                                             "pretrained": False}}
    return dict(create_run(ex, "print_config", config_updates=updates, named_configs=named).config)


def _training_config(named: str, workdir: str, device: str, amp: bool, n_steps: int,
                     input_size: int | None) -> dict:
    """The named config for a short run (no validation, no saving) on tiny_prepared(workdir)."""
    updates = {"device": device, "amp": amp, "n_steps": n_steps, "val_every": 0, "save_every": n_steps,
               "print_every": n_steps, "num_workers": 0,
               "path": {"data_dir": os.path.join(workdir, "prep"), "log_dir": os.path.join(workdir, "runs")}}
    config = resolve_config(named, {**updates, **({"input_size": input_size} if input_size else {})})
    tiny_prepared(workdir, config["input_size"])
    return config


def tiny_prepared(workdir: str, size: int) -> str:
    """workdir/prep: a small seeded phantom (2 silver + 2 gold volumes of 64 x 64 x 16) prepared at `size`
    by dataloaders.prepare, as real data is (made once per workdir and size)."""
    prep = os.path.join(workdir, "prep")
    if os.path.isdir(prep) and read_meta(prep).get("prep_size") == size:
        return prep
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        phantom = os.path.join(workdir, "phantom")
        generate_phantom(phantom, n_silver=2, n_gold=2, seed=0, size=64, n_slices=16, workers=1)
        prepare_dataset(phantom, prep, size=size, n_val=0, seed=0, rule=Selection(min_voxels=5), workers=1)
    return prep


def _quiet_train(config: dict) -> dict:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return train(config, defaults=default_config())


def training_throughput(named: str, device: torch.device, amp: bool, n_steps: int, runs: int,
                        input_size: int | None, workdir: str) -> dict:
    """Median over `runs` short runs of training.loop.train of its own s/step timer (steps 2..n, each ended
    by loss.item(), data loading included), on the tiny phantom under `workdir`."""
    config = _training_config(named, workdir, device.type, amp, n_steps, input_size)
    summaries = [_quiet_train(config) for _ in range(runs)]
    per_run = [float(s["sec_per_step"]) for s in summaries]
    sec = statistics.median(per_run)
    return {"config": named, "input_size": config["input_size"], "batch_size": config["batch_size"],
            "encoder": config["model"]["encoder"], "resolution": config["model"]["resolution"],
            "amp": amp, "n_steps": n_steps, "runs": per_run, "sec_per_step": sec,
            "episodes_per_s": config["batch_size"] / sec,
            "data_wait_fraction": statistics.median(float(s["data_wait_fraction"]) for s in summaries)}


def fresh_process(flag: str, payload: dict, what: str, env: dict | None = None, timeout: float = 1800):
    """The BENCH_JSON line of this script run as `flag payload` in a fresh process; a failure is one line."""
    done = subprocess.run([sys.executable, os.path.abspath(__file__), flag, json.dumps(payload)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("BENCH_JSON ")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"{what} failed (exit {done.returncode}): {tail}")
    return json.loads(lines[-1][len("BENCH_JSON "):])


def training_step_memory(named: str, device: torch.device, amp: bool, input_size: int | None) -> dict:
    """Peak memory of ONE training step of `named` in a fresh process (this script with --memory-child)."""
    payload = {"named": named, "device": device.type, "amp": amp, "input_size": input_size}
    return fresh_process("--memory-child", payload, "training-step memory subprocess", timeout=1200)


def _memory_child(args: dict) -> None:
    """One step of training.loop.train; prints the process's peaks (ru_maxrss includes torch)."""
    device = torch.device(args["device"])
    with tempfile.TemporaryDirectory(prefix="lslpn-bench-mem-") as workdir:
        config = _training_config(args["named"], workdir, device.type, args["amp"], 1, args["input_size"])
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        summary = _quiet_train(config)
        out = {"config": args["named"], "input_size": config["input_size"], "amp": args["amp"],
               "batch_size": config["batch_size"], "encoder": config["model"]["encoder"],
               "baseline_rss_mb": baseline,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "step_seconds": summary["sec_per_step"]}
        if device.type == "cuda":
            out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    print("BENCH_JSON " + json.dumps(out), flush=True)


def inference_throughput(named: str, device: torch.device, repeats: int, volume_size: int, n_slices: int,
                         input_size: int | None = None, amp: bool = False) -> dict:
    """Query slices per second of evaluation.inference.run_chunks: two phantom subjects
    (render_subject), support range the liver's (preset 'inclusive'), EVERY axial slice of the query."""
    config = resolve_config(named, {"input_size": input_size} if input_size else {})
    support, support_label, _, _ = render_subject(np.random.default_rng([0, 1]), volume_size, n_slices)
    query, _, _, _ = render_subject(np.random.default_rng([0, 2]), volume_size, n_slices)
    liver = support_label == organ_index("liver")
    preset = get_preset("inclusive")
    support_range = organ_range(liver, min(preset.threshold, int(liver.sum(axis=(0, 1)).max()) - 1))
    torch.manual_seed(0)
    with contextlib.redirect_stderr(io.StringIO()):
        model = FewShotSegNet.from_config(config["model"]).to(device).eval()
    batch_size = config["eval"]["batch_size"]

    def run():
        with autocast(device, amp):
            plan = chunk_plan(support_range, (0, query.shape[2] - 1), preset.n_chunks)
            return run_chunks(model, [(support, liver)], plan, query, config["input_size"],
                              {"mode": "window", "window": [-200, 300]}, device, batch_size)
    timing = measure(run, device, max(1, repeats - 2))
    return {"config": named, "encoder": config["model"]["encoder"], "input_size": config["input_size"],
            "batch_size": batch_size, "volume_shape": list(query.shape), "query_slices": query.shape[2],
            "n_chunks": preset.n_chunks, "amp": amp, "time": timing,
            "slices_per_s": query.shape[2] / timing.median}


def gpu_dispatch(named: str, device: torch.device, input_size: int) -> dict:
    """CUDA: dispatch fraction of a training forward+backward of the named config's model on a synthetic
    batch, and of one inference batch (`model.segment`)."""
    config = resolve_config(named, {"input_size": input_size})
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

    out = {"train_step": dispatch_fraction(step, device)}
    model.eval()
    batch = torch.rand(1, config["eval"]["batch_size"], 1, size, size, generator=g).to(device)
    with torch.no_grad():
        prototypes = model.encode_support(support[:1], fg[:1], 1 - fg[:1])
        out["inference_batch"] = dispatch_fraction(lambda: model.segment(prototypes, batch), device)
    return out


# ------------------------------------------------------------ 7. the training step against the peak
STEP_METHODS = {method: [*DEMO_CONFIGS, *named] for method, named in DEMO_METHODS.items()}  # as make demo
AVX2_CAP = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"}
FP32 = {"amp": False, "channels_last": False}
CANDIDATES = {  # name -> (environment on top of the demo's thread pins, step options); the first is the base
    "the demo's step before: fp32, kernels capped at AVX2, 4 episodes": (AVX2_CAP, {**FP32, "batch_size": 4}),
    "fp32, kernels capped at AVX2": (AVX2_CAP, FP32),
    "fp32": ({}, FP32),
    "fp32, channels_last": ({}, {**FP32, "channels_last": True}),
    "fp32, torch.compile": ({}, {**FP32, "compile": True}),
    "bf16 autocast (amp='bf16'), channels_last": ({}, {"amp": "bf16", "channels_last": True}),
    "make demo's config (amp=True)": ({}, {}),
}
PHASES = ("data", "encoder", "head", "loss", "backward", "optimiser")


def peak_flops(dtype: torch.dtype, quick: bool, repeats: int) -> dict:
    """FLOP/s of a large matmul and a large 3 x 3 convolution in `dtype` on this process's threads."""
    n, (b, c, s) = (512, (2, 64, 32)) if quick else (2048, (8, 128, 64))
    g = torch.Generator().manual_seed(0)
    a, m = (torch.randn(n, n, generator=g).to(dtype) for _ in range(2))
    x, w = torch.randn(b, c, s, s, generator=g).to(dtype), torch.randn(c, c, 3, 3, generator=g).to(dtype)
    with torch.no_grad():
        mm = measure(lambda: a @ m, torch.device("cpu"), repeats)
        conv = measure(lambda: F.conv2d(x, w, padding=1), torch.device("cpu"), repeats)
    out = {"dtype": str(dtype).removeprefix("torch."), "matmul": 2 * n ** 3 / mm.median,
           "conv": 2 * b * c * c * 9 * s * s / conv.median, "matmul_n": n, "conv_shape": [b, c, s, s]}
    out["peak"] = max(out["matmul"], out["conv"])
    return out


def _encoder_clock(model: torch.nn.Module) -> dict:
    """{'seconds': time in model.encoder's forwards since reset}; no encoder (SENet): stays None."""
    clock: dict = {"seconds": None}
    encoder = getattr(model, "encoder", None)
    if encoder is not None:
        encoder.register_forward_pre_hook(lambda *_: clock.update(start=time.perf_counter()))
        encoder.register_forward_hook(lambda *_: clock.update(
            seconds=(clock["seconds"] or 0.0) + time.perf_counter() - clock["start"]))
    return clock


def step_profile(named: list[str], options: dict, data_dir: str, steps: int, warmup: int,
                 input_size: int | None = None) -> dict:
    """The training step of `named` (+ options: amp, channels_last, compile) on episodes of `data_dir`:
    median seconds of each phase over `steps` timed steps (after a FLOP-counting step and `warmup` more),
    and the FLOPs of one forward and one backward (torch.utils.flop_counter, eager)."""
    updates = {key: options[key] for key in ("amp", "channels_last", "batch_size") if key in options}
    if "senet" in named:   # SENet's step has 2 episodes (config `senet`), before and now
        updates.pop("batch_size", None)
    config = resolve_config(named, {**updates, **({"input_size": input_size} if input_size else {}),
                                    "path": {"data_dir": data_dir}})
    device = torch.device("cpu")
    torch.manual_seed(0)
    with contextlib.redirect_stderr(io.StringIO()):
        model = build_model(config)
    if config["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    optimizer, _ = build_optimisation(config, model)
    episodes = EpisodeDataset(data_dir, fold_training_classes(config), config["n_ways"], config["n_shots"],
                              config["n_queries"], config["input_size"], config["augment"], config["seed"])
    B, clock, net = config["batch_size"], _encoder_clock(model), model
    if options.get("compile"):
        net = compiled(model)
    counter = {}

    def step(k: int, count: bool = False) -> dict:
        times, start = {}, time.perf_counter()
        batch = default_collate([episodes[i] for i in range(k * B, (k + 1) * B)])
        batch.pop(REDRAWS_KEY, None)
        times["data"], clock["seconds"] = time.perf_counter() - start, None
        flops = FlopCounterMode(display=False) if count else contextlib.nullcontext()
        start = time.perf_counter()
        with flops, autocast(device, config["amp"]):
            logits, align_loss = (model if count else net)(
                batch["support_images"], batch["support_fg"], batch["support_bg"], batch["query_images"])
        forward = time.perf_counter() - start
        times["encoder"] = clock["seconds"]
        times["head"] = forward - (clock["seconds"] or 0.0)
        if count:
            counter["forward"] = flops.get_total_flops()
        start = time.perf_counter()
        loss = episode_loss(config, logits, batch["query_labels"], align_loss)
        times["loss"], start = time.perf_counter() - start, time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        flops = FlopCounterMode(display=False) if count else contextlib.nullcontext()
        with flops:
            loss.backward()
        times["backward"], start = time.perf_counter() - start, time.perf_counter()
        if count:
            counter["backward"] = flops.get_total_flops()
        optimizer.step()
        loss.item()
        times["optimiser"] = time.perf_counter() - start
        return times

    step(0, count=True)
    if net is not model:
        try:
            step(1)   # compiles the forward and the backward
        except Exception as error:  # noqa: BLE001 (compile fails in many ways: a fallback, not a crash)
            say_once(f"torch.compile failed here ({type(error).__name__}): eager mode")
            net = model
    timed = [step(k) for k in range(1, 1 + warmup + steps)][warmup:]
    phases = {phase: None if timed[0][phase] is None else statistics.median(t[phase] for t in timed)
              for phase in PHASES}
    return {"config": " ".join(named), "input_size": config["input_size"], "batch_size": B,
            "amp": config["amp"], "channels_last": config["channels_last"],
            "autocast_dtype": str(amp_dtype(device, config["amp"]) or torch.float32).removeprefix("torch."),
            "compile": bool(options.get("compile")), "phases": phases,
            "seconds": statistics.median(sum(v or 0.0 for v in t.values()) for t in timed),
            "forward_flops": counter["forward"], "backward_flops": counter["backward"],
            "kernels": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}


def compiled(model: torch.nn.Module) -> torch.nn.Module:
    """torch.compile(model), or `model` with one logged line where torch cannot compile at all (a failure
    at the first call falls back in step_profile)."""
    try:
        return torch.compile(model)
    except Exception as error:  # noqa: BLE001 (compile fails in many ways: a fallback, not a crash)
        say_once(f"torch.compile unavailable here ({type(error).__name__}): eager mode")
        return model


def step_methods(options: dict, data_dir: str, steps: int, warmup: int, input_size: int | None) -> dict:
    """step_profile of every demo method (STEP_METHODS) under `options`."""
    return {method: step_profile(named, options, data_dir, steps, warmup, input_size)
            for method, named in STEP_METHODS.items()}


def candidate_steps(data_dir: str, steps: int, warmup: int, rounds: int, input_size: int | None) -> dict:
    """Each CANDIDATES entry in a fresh process (its environment set before torch loads), the candidates
    interleaved for `rounds` rounds; per candidate and method the median over rounds of the step
    seconds, and the last round's profile."""
    out: dict = {name: {"rounds": {m: [] for m in STEP_METHODS}} for name in CANDIDATES}
    for _ in range(rounds):
        for name, (environ, options) in CANDIDATES.items():
            payload = {"options": options, "data_dir": data_dir, "steps": steps, "warmup": warmup,
                       "input_size": input_size}
            result = fresh_process("--step-child", payload, f"training-step subprocess ({name})",
                                   {**os.environ, **PINNED_NUMERICS, **environ})
            for method, profile in result.items():
                out[name]["rounds"][method].append(profile["seconds"])
                out[name][method] = profile
    for name in CANDIDATES:
        for method in STEP_METHODS:
            out[name][method]["seconds"] = statistics.median(out[name]["rounds"][method])
    return out


# ------------------------------------------------------------------------------------ plan, run
@dataclass
class Plan:
    """What a run measures: full (512 x 512, 5 timed runs, reference 2, candidates 3 rounds) or --quick
    (256 or --size, 2, 1; no step candidates, no memory process)."""
    quick: bool
    size: int

    def __post_init__(self):
        q, size = self.quick, self.size
        self.repeats, self.reference_repeats, self.head_seconds = (2, 1, 0.0) if q else (5, 2, 2.0)
        self.scaling_sizes, self.grids = [size // 4, size // 2, size], [1, 4, 8, 16]
        self.demo_size = None if size >= 128 else size      # None: the demo config's own input_size
        self.demo_steps, self.demo_runs = (3, 1) if q else (6, 3)
        self.volume_size, self.n_slices = min(size, 128 if q else 256), 16 if q else 32 if size < 256 else 64
        # the demo step: timed steps, warm-up steps after the FLOP-counting one, candidate rounds
        self.step_steps, self.step_warmup, self.candidate_rounds = (1, 0, 0) if q else (8, 1, 3)


def run_measurements(plan: Plan, device: torch.device, log: Callable[[str], None] = print) -> dict:
    """All figures of one section (CPU or GPU)."""
    with tempfile.TemporaryDirectory(prefix="lslpn-bench-") as workdir:  # the tiny phantom: sections 4 and 7
        return _measurements(plan, device, log, workdir)


def _measurements(plan: Plan, device: torch.device, log: Callable[[str], None], workdir: str) -> dict:
    torch.manual_seed(0)
    cpu, out = device.type == "cpu", {}
    reference = functools.partial(official_cell_loop, dtype=torch.float32)  # the head's precision
    log("1/7 head: reference vs 'image' vs 'feature'")
    out["head"] = head_comparison(reference, plan.size, 256, 8, 8, device, plan.repeats,
                                  plan.reference_repeats, plan.head_seconds)
    log("2/7 head share of the encoder forward")
    out["encoders"] = encoder_share(plan.size, 8, device, plan.repeats, plan.head_seconds)
    log("3/7 head scaling with n_grid and input size")
    out["scaling"] = head_scaling(plan.scaling_sizes, plan.grids, device, plan.repeats, plan.head_seconds)
    log("4/7 training throughput")
    named, size, amps = ("demo", plan.demo_size, (False,)) if cpu else ("paper", plan.size, (False, True))
    out["training"] = [training_throughput(named, device, amp, plan.demo_steps, plan.demo_runs, size, workdir)
                       for amp in amps]
    if not cpu:  # before inference: run_chunks's inference_mode would fill the head's cache
        out["dispatch"] = gpu_dispatch("paper", device, plan.size)
    log("5/7 volumetric inference throughput")
    out["inference"] = [inference_throughput(named, device, plan.repeats, plan.volume_size, plan.n_slices,
                                             size, amp) for amp in amps]
    if not plan.quick:
        log("6/7 peak memory of one training step (paper config, fresh process)")
        out["memory"] = [training_step_memory("paper", device, amp, plan.size) for amp in amps]
    if cpu:
        log("7/7 the demo's training step against the machine's peak")
        out["peak"] = [peak_flops(dtype, plan.quick, plan.repeats) for dtype in (torch.float32,
                                                                                 torch.bfloat16)]
        data_dir = tiny_prepared(workdir, plan.demo_size or resolve_config(DEMO_CONFIGS, {})["input_size"])
        out["step"] = step_methods({}, data_dir, plan.step_steps, plan.step_warmup, plan.demo_size)
        if plan.candidate_rounds:
            out["candidates"] = candidate_steps(data_dir, plan.step_steps, plan.step_warmup,
                                                plan.candidate_rounds, plan.demo_size)
    return out


# ------------------------------------------------------------------------------------ report
def ms(seconds: float) -> str:
    value = seconds * 1000
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def row(*cells) -> str:
    return "| " + " | ".join(map(str, cells)) + " |"


def table(*header: str) -> list[str]:
    return [row(*header), "|---" * len(header) + "|"]


def render_section(name: str, results: dict, machine: dict, command: str, plan: Plan) -> str:
    """Markdown of one section ('cpu' or 'gpu') from `run_measurements` results."""
    h, gpu = results["head"], name == "gpu"
    share = {r["encoder"]: r for r in results["encoders"]}
    verdict = {True: "met", False: "NOT met"}
    on = {True: "on", False: "off"}
    lines = [f"## {'GPU' if gpu else 'CPU'}{' (quick run)' if plan.quick else ''}", "",
             f"Command: `{command}`  ", f"Date: {datetime.date.today().isoformat()}", "",
             "| machine | |", "|---|---|", *[row(key, value) for key, value in machine.items()]]
    # The load average shows other processes sharing the machine: medians then vary between runs.
    if results.get("max_load", 0) > machine["cores"]:
        lines += ["", f"**Caution:** the 1-minute load average reached {results['max_load']:.1f} (sampled at "
                  f"each stage) on {machine['cores']} cores during this run: other processes shared the CPU, "
                  "so the timings are inflated and noisy (compare the spreads; the scaling table suffers "
                  "most). Rerun on an idle machine for publishable figures."]
    feature_share = max(share["resnet50_lslpn"]["share_feature"], share["vgg16"]["share_feature"])
    lines += ["", "### Targets", "", "| target | measured | |", "|---|---|---|",
              row("'image' mode >= 20x faster than the literal reference", f"{h['speedup_image']:.1f}x",
                  verdict[h["speedup_image"] >= 20]),
              row("'feature' mode >= 100x faster than the literal reference", f"{h['speedup_feature']:.1f}x",
                  verdict[h["speedup_feature"] >= 100]),
              row("'feature' mode < 5% of the encoder forward (resnet50_lslpn, vgg16)",
                  f"{100 * feature_share:.1f}% (worst of the two)", verdict[feature_share < 0.05])]
    if gpu:
        d = results["dispatch"]
        for key, label in (("train_step", "training forward+backward"),
                           ("inference_batch", "inference batch")):
            lines.append(row(f"{label} GPU-bound (dispatch fraction well below 1)", f"{d[key]:.2f}",
                             verdict[d[key] < 0.5]))
        wait = max(r["data_wait_fraction"] for r in results["training"])
        lines.append(row("data loading keeps up: waiting for data < 10% of a training step (worst AMP mode)",
                         f"{100 * wait:.1f}%", verdict[wait < 0.10]))

    def timed(label: str, timing: Timing, speedup: float) -> str:
        return row(label, ms(timing.median), f"{ms(min(timing.runs))} - {ms(max(timing.runs))}",
                   f"{len(timing.runs)} timed after {timing.warmup} warm-up", f"{speedup:.1f}x")
    lines += ["", f"### 1. Head forward per episode ({h['size']} x {h['size']} input, "
              f"{h['channels']}-channel {h['feature_size']} x {h['feature_size']} features, n_grid "
              f"{h['n_grid']}, overlapping, max vote, k=1)", "",
              *table("implementation", "median ms", "spread ms", "runs", "speed-up vs reference"),
              timed("literal reference (`models/local_prototypes.py: official_cell_loop`, float32)",
                    h["reference"], 1.0),
              *[timed(f"LocalPrototypeHead resolution='{mode}'", h[mode], h["speedup_" + mode])
                for mode in ("image", "feature")],
              "", "Agreement checks (computed by the script on this episode):", "",
              f"- reference vs 'image': max |logit difference| = {h['max_abs_diff_image']:.2e} "
              f"(tolerance {IMAGE_TOLERANCE:g}): {'PASS' if h['image_ok'] else 'FAIL'}; "
              f"argmax agreement {100 * h['argmax_agreement_image']:.3f}%",
              f"- reference vs 'feature': argmax agreement = {100 * h['argmax_agreement_feature']:.2f}% of "
              f"pixels (required >= {100 * FEATURE_AGREEMENT:g}%); "
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
              *table("encoder", "features", "encoder ms", "'image' head ms", "share", "'feature' head ms",
                     "share"),
              *[row(r["encoder"], f"{r['channels']} x {r['feature_size']} x {r['feature_size']}",
                    ms(r["encoder_time"].median), ms(r["image"].median), f"{100 * r['share_image']:.1f}%",
                    ms(r["feature"].median), f"{100 * r['share_feature']:.1f}%")
                for r in results["encoders"]],
              "", "The head is timed on features of each encoder's own shape (n_grid 8, overlapping, max "
              "vote).", "",
              "### 3. Scaling of the head with n_grid and input size (256 channels, stride 8)", "",
              "Cost per input pixel (ns) should stay roughly flat across n_grid: the head's work grows with "
              "pixels, not with cells x pixels.", "",
              *table("mode", "input", "n_grid", "cells", "median ms", "ns / pixel"),
              *[row(r["mode"], r["size"], r["n_grid"], r["cells"], ms(r["time"].median),
                    f"{r['ns_per_pixel']:.0f}") for r in results["scaling"]],
              "", "### 4. Training throughput (`training.loop.train`, synthetic prepared data)", "",
              *table("config", "encoder", "input", "episodes / step", "AMP", "s / step", "episodes / s",
                     "data wait", "runs (s / step)"),
              *[row(r["config"], f"{r['encoder']} ({r['resolution']})", r["input_size"], r["batch_size"],
                    on[r["amp"]], f"{r['sec_per_step']:.3f}", f"{r['episodes_per_s']:.2f}",
                    f"{100 * r['data_wait_fraction']:.1f}%", ", ".join(f"{v:.3f}" for v in r["runs"]))
                for r in results["training"]],
              "", "Each run is a fresh `train()` of a few steps (no validation, no checkpoints); s / step is "
              "the loop's own timer (mean of steps 2..n, each ended by `loss.item()`, data loading "
              "included); the table gives the median over runs.", "",
              "### 5. Volumetric inference throughput (`evaluation.inference.run_chunks`)", "",
              *table("config", "encoder", "input", "volume (X x Y x Z)", "batch", "AMP", "median s / volume",
                     "query slices / s"),
              *[row(r["config"], r["encoder"], r["input_size"], " x ".join(map(str, r["volume_shape"])),
                    r["batch_size"], on[r["amp"]], f"{r['time'].median:.3f}", f"{r['slices_per_s']:.1f}")
                for r in results["inference"]],
              "", "Phantom volumes (`phantom.render_subject`); support range = the liver's, "
              f"protocol preset 'inclusive' ({results['inference'][0]['n_chunks']} chunks); every axial "
              "slice of the query volume is segmented.", "",
              "### 6. Peak memory of one training step (`paper` config)", ""]
    if "memory" not in results:
        lines += ["Measured in full runs only (a fresh process)."]
    else:
        lines += [*table("input", "encoder", "episodes / step", "AMP", "process max RSS MB",
                     "RSS before the step MB", "CUDA max allocated MB", "step s"),
              *[row(r["input_size"], r["encoder"], r["batch_size"], on[r["amp"]], f"{r['peak_rss_mb']:.0f}",
                    f"{r['baseline_rss_mb']:.0f}",
                    f"{r['cuda_max_allocated_mb']:.0f}" if "cuda_max_allocated_mb" in r else "-",
                    f"{r['step_seconds']:.1f}") for r in results["memory"]],
              "", "Measured in a fresh Python process that runs exactly one step of `training.loop.train` "
              "(`resource.getrusage` ru_maxrss, so the RSS includes the interpreter and torch; the column "
              "before it is the same process's peak before the step). Step s is that single, cold step."]
    if "step" in results:
        lines += ["", *render_step(results, plan)]
    return "\n".join(lines) + "\n"


def gflops(value: float) -> str:
    return f"{value / 1e9:.1f}"


def render_step(results: dict, plan: Plan) -> list[str]:
    """Section 7: the peak per dtype, the demo step's phases and FLOP/s, the candidates side by side."""
    peak = {p["dtype"]: p["peak"] for p in results["peak"]}
    p0 = results["peak"][0]
    lines = ["### 7. The demo's training step against the machine's peak", "",
             f"Peak: a {p0['matmul_n']} x {p0['matmul_n']} matmul and a 3 x 3 convolution on "
             f"{' x '.join(map(str, p0['conv_shape']))} (B x C x H x W), on this process's "
             f"{torch.get_num_threads()} threads; this CPU {'has' if cpu_has_native_bf16() else 'lacks'} "
             "native bf16 (flags avx512_bf16 / amx_bf16).", "",
             *table("dtype", "matmul GFLOP/s", "convolution GFLOP/s", "peak GFLOP/s"),
             *[row(p["dtype"], gflops(p["matmul"]), gflops(p["conv"]), gflops(p["peak"]))
               for p in results["peak"]], ""]

    def share(profile: dict, phase: str) -> str:
        value = profile["phases"][phase]
        return "-" if value is None else f"{ms(value)} ({100 * value / profile['seconds']:.0f}%)"
    lines += ["The demo config as set in config.py, in this process (episodes of a small prepared phantom; "
              f"median of {plan.step_steps} timed steps after {1 + plan.step_warmup} warm-up steps). FLOPs: "
              "`torch.utils.flop_counter` (matmuls and convolutions) of one forward and one backward; "
              "% of peak against the step's dtype. Times in ms (share of the step).", "",
              *table("method", "input, episodes", "AMP / channels_last", "s / step", "forward GFLOP/s",
                     "backward GFLOP/s", "step % of peak", *PHASES)]
    for method, p in results["step"].items():
        top, forward = peak[p["autocast_dtype"]], (p["phases"]["encoder"] or 0.0) + p["phases"]["head"]
        rates = [p["forward_flops"] / forward, p["backward_flops"] / p["phases"]["backward"],
                 (p["forward_flops"] + p["backward_flops"]) / p["seconds"]]
        lines.append(row(method, f"{p['input_size']}, {p['batch_size']}",
                         f"{p['autocast_dtype']} / {'on' if p['channels_last'] else 'off'}",
                         f"{p['seconds']:.3f}", *[f"{gflops(r)} ({100 * r / top:.0f}%)" for r in rates[:2]],
                         f"{100 * rates[2] / top:.0f}%", *[share(p, phase) for phase in PHASES]))
    if "candidates" not in results:
        return lines + ["", "Candidates side by side: full runs only."]
    names = list(CANDIDATES)
    base = results["candidates"][names[0]]
    pins = ", ".join(f"{key}={value}" for key, value in PINNED_NUMERICS.items())
    lines += ["", f"Candidates side by side: each in a fresh process (the demo's thread pins {pins} plus the "
              "candidate's environment), "
              f"the candidates interleaved for {plan.candidate_rounds} rounds; s / step is the median over "
              "rounds of each process's median step; speed-up against the first row.", "",
              *table("candidate", *[f"{m} s / step (speed-up)" for m in STEP_METHODS], "kernels")]
    for name in names:
        c = results["candidates"][name]
        lines.append(row(name, *[f"{c[m]['seconds']:.3f} ({base[m]['seconds'] / c[m]['seconds']:.2f}x)"
                                 for m in STEP_METHODS], c["LSLPN"]["kernels"]))
    return lines


GPU_NOT_MEASURED = (
    "## GPU\n\nNot measured yet: no GPU was available to the run that wrote this report. On a GPU machine, "
    "`python tools/benchmark.py --device cuda --out BENCHMARKS.md` measures this section (head, encoders, "
    "scaling, `paper` training and 512 x 512 inference with AMP off and on, CUDA peak memory, GPU-bound "
    "check) and replaces it, keeping the CPU section; `tools/gpu_check.sh` runs it with the other GPU checks "
    "(docs/gpu_check.md).\n")


def merge(existing: str | None, name: str, text: str) -> str:
    """The report with section `name` set to `text`; the other section, and any text after the GPU
    section (hand-written notes), kept from `existing`."""
    def block(section: str, body: str) -> str:
        return f"<!-- begin {section} -->\n{body}<!-- end {section} -->\n"
    sections = {"cpu": "## CPU\n\nNot measured yet.\n", "gpu": GPU_NOT_MEASURED}
    for section in sections:
        found = re.search(rf"<!-- begin {section} -->\n(.*?)<!-- end {section} -->", existing or "", re.S)
        if found:
            sections[section] = found.group(1)
    sections[name] = text
    notes = (existing or "").partition("<!-- end gpu -->\n")[2]
    return (TITLE + "\n" + INTRO + "\n" + block("cpu", sections["cpu"]) + "\n" + block("gpu", sections["gpu"])
            + notes)


def plain(value):
    """json.dumps default: a Timing becomes {median_s, runs_s, warmup}, anything else its str."""
    if isinstance(value, Timing):
        return {"median_s": value.median, "runs_s": list(value.runs), "warmup": value.warmup}
    return str(value)


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
    plan = Plan(args.quick, args.size or (256 if args.quick else 512))
    if plan.size < 64 or plan.size % 8:
        raise UserError(f"--size {plan.size}: must be a multiple of 8 and >= 64 (n_grid 8 on stride-8 "
                        "features)")
    machine_before = machine_description(device)
    start, loads = time.perf_counter(), [os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0]

    def log(message: str) -> None:  # progress on stderr; samples the load average at each stage
        loads.append(os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0)
        print(f"benchmark [{time.perf_counter() - start:5.0f} s]: {message}", file=sys.stderr, flush=True)
    results = run_measurements(plan, device, log)
    command = "python tools/benchmark.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                               else sys.argv[1:]))
    machine = machine_description(device)
    log("done")
    results["max_load"] = max(loads)
    load = "load average (1, 5, 15 min) when described"
    if load in machine:
        machine = {**machine, load: f"{machine_before[load]} (start); {machine[load]} (end)"}
    section = "cpu" if device.type == "cpu" else "gpu"
    text = render_section(section, results, machine, command, plan)
    existing = open(args.out).read() if os.path.isfile(args.out) else None
    write_text_atomic(merge(existing, section, text), args.out)
    if args.json:
        raw = {"device": device.type, "size": plan.size, "quick": plan.quick, "machine": machine, **results}
        write_text_atomic(json.dumps(raw, indent=1, default=plain) + "\n", args.json)
    h = results["head"]
    print(f"wrote {args.out}: 'image' {h['speedup_image']:.1f}x, 'feature' {h['speedup_feature']:.1f}x "
          f"faster than the literal reference; checks image {'PASS' if h['image_ok'] else 'FAIL'}, "
          f"feature {'PASS' if h['feature_ok'] else 'FAIL'}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--memory-child"]:   # training_step_memory's fresh process
        _memory_child(json.loads(sys.argv[2]))
    elif sys.argv[1:2] == ["--step-child"]:   # candidate_steps's fresh process
        child = json.loads(sys.argv[2])
        print("BENCH_JSON " + json.dumps(step_methods(child["options"], child["data_dir"], child["steps"],
                                                      child["warmup"], child["input_size"])), flush=True)
    else:
        run_cli(main)
