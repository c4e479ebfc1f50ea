"""Time the local prototype head against the literal loop reference, and the encoders.

    python scripts/bench_head.py [--size 512] [--repeats 5] [--pixel-literal] [--threads N]

One 1-way 1-shot episode with one query: random 256-channel features at size/8, an ellipse support
mask, n_grid 8, overlapping cells, max vote. Prints the median wall time (and the process CPU
time) of repeated runs after a warm-up run for: the cell-loop reference (`cellwise_reference`:
Python loop over cells, the official code's structure), the head in 'image' and 'feature' mode,
and the encoders' forward pass (batch 1, no_grad, eval). `--pixel-literal` also times the
per-pixel `literal_reference` once (minutes at 512). Both references run in float32 here, as the head.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from models.encoders import build_encoder  # noqa: E402
from models.local_prototypes import LocalPrototypeHead  # noqa: E402
from tests.literal_reference import cellwise_reference, literal_reference  # noqa: E402
from util.errors import UserError, run_cli  # noqa: E402


def timed(fn, repeats: int, warmup: int = 1) -> tuple[float, float, object]:
    """(median wall seconds, median CPU seconds, last result) of `repeats` runs after `warmup`."""
    result = None
    for _ in range(warmup):
        result = fn()
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus), result


def episode(size: int, channels: int, stride: int, seed: int = 0):
    """Support features 1x1x1xCxhxw, fg/bg masks 1x1x1xSxS, query features 1x1xCxhxw."""
    g = torch.Generator().manual_seed(seed)
    h = size // stride
    support = torch.randn(1, 1, 1, channels, h, h, generator=g)
    query = torch.randn(1, 1, channels, h, h, generator=g)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    fg = (((yy - 0.45 * size) / (0.22 * size)) ** 2 + ((xx - 0.55 * size) / (0.15 * size)) ** 2 < 1)
    fg = fg.float().view(1, 1, 1, size, size)
    return support, fg, 1 - fg, query


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=512, help="input size S (S x S)")
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs after one warm-up")
    parser.add_argument("--reference-repeats", type=int, default=3)
    parser.add_argument("--pixel-literal", action="store_true", help="also time the per-pixel loop once")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--encoders", default="vgg16,resnet50_lslpn,cnn_small")
    args = parser.parse_args(argv)
    if args.size < 64 or args.size % 8:
        raise UserError(f"--size {args.size}: use a multiple of 8, at least 64")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    size, n_grid = args.size, 8
    sf, fg, bg, qf = episode(size, args.channels, 8)
    print(f"head: {size} x {size} input, {args.channels}-channel {size // 8} x {size // 8} features, "
          f"n_grid {n_grid}, overlap, max vote, 1-way 1-shot, 1 query; torch threads "
          f"{torch.get_num_threads()}; median of {args.repeats} runs after 1 warm-up (wall / CPU)")
    rows = {}
    with torch.no_grad():
        ref = lambda: cellwise_reference(sf, fg, bg, qf, (size, size), n_grid, True, "max",  # noqa: E731
                                         dtype=torch.float32)
        rows["cell-loop reference"] = timed(ref, args.reference_repeats)
        for resolution in ("image", "feature"):
            head = LocalPrototypeHead(n_grid, True, "max", resolution)
            rows[f"head, '{resolution}' mode"] = timed(lambda: head(sf, fg, bg, qf, (size, size)),
                                                       args.repeats)
        if args.pixel_literal:
            lit = lambda: literal_reference(sf, fg, bg, qf, (size, size), n_grid, True, "max",  # noqa: E731
                                            dtype=torch.float32)
            rows["per-pixel literal reference (1 run)"] = timed(lit, 1, warmup=0)
    reference = rows["cell-loop reference"]
    image_out = rows["head, 'image' mode"][2]
    gap = (image_out - reference[2]).abs().max().item()
    for name, (wall, cpu, _) in rows.items():
        print(f"  {name:40s} {wall * 1000:10.1f} ms wall {cpu * 1000:10.1f} ms CPU   "
              f"speed-up vs cell-loop {reference[0] / wall:7.1f}x wall {reference[1] / cpu:7.1f}x CPU")
    print(f"  max |image mode - reference| = {gap:.2e}")
    encoder_times = {}
    with torch.no_grad():
        for name in [n for n in args.encoders.split(",") if n]:
            encoder = build_encoder(name).eval()
            image = torch.rand(1, 1, size, size)
            encoder_times[name] = timed(lambda: encoder(image), max(args.repeats // 2, 2))
    feature_wall = rows["head, 'feature' mode"][0]
    print(f"encoders, forward of one {size} x {size} slice (median wall / CPU):")
    for name, (wall, cpu, _) in encoder_times.items():
        print(f"  {name:40s} {wall * 1000:10.1f} ms wall {cpu * 1000:10.1f} ms CPU   "
              f"'feature' head = {100 * feature_wall / wall:.2f}% of it")
    return 0


if __name__ == "__main__":
    run_cli(main)
