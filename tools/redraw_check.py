"""Which superpixels the self-supervised episodes' redraw discards (docs/usage.md, "Self-supervised").

    python tools/redraw_check.py RUN/config.json --items 1000

Replays a self-supervised run's first episodes (its data, input_size, recipe, warp, augment, seed). Per size
band of the superpixel at input_size: how often a draw keeps it, its share of first draws and of kept items;
and whether re-warping a discarded superpixel (50 tries) would have kept it. Reads only.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from dataloaders.selfsup_episodes import MAX_DRAWS, REDRAW_REASONS, SelfSupEpisodeDataset
from util.cli import run_cli

BANDS = [0, 1, 2, 4, 8, 16, 64, np.inf]   # superpixel size in pixels at input_size


def draws_of(data: SelfSupEpisodeDataset, i: int) -> list[tuple[tuple, float, int | None]]:
    """Item i's draws as the dataset makes them: [((pid, row, superpixel), size at input_size, reason)]."""
    rng, out = np.random.default_rng([data.seed, i]), []
    for _ in range(MAX_DRAWS):
        state = rng.bit_generator.state                      # replay the draw's own choice of superpixel
        pid, row, ids = data.candidates[int(rng.integers(len(data.candidates)))]
        superpixel = int(ids[int(rng.integers(ids.size))])
        rng.bit_generator.state = state
        reason = data.draw(rng)[1]
        share = (np.asarray(data._volume(pid)[1][row]) == superpixel).mean()   # of the slice's area
        out.append(((pid, row, superpixel), share * data.input_size ** 2, reason))
        if reason is None:
            return out
    return out


def kept_by_rewarping(data: SelfSupEpisodeDataset, pick: tuple, i: int) -> bool:
    """Whether one of MAX_DRAWS fresh views of the same superpixel keeps it in the support."""
    pid, row, superpixel = pick
    candidates, data.candidates = data.candidates, [(pid, row, np.array([superpixel]))]
    try:
        rng = np.random.default_rng([data.seed, i, 1])
        return any(data.draw(rng)[1] is None for _ in range(MAX_DRAWS))
    finally:
        data.candidates = candidates


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="a self-supervised run's config.json (train.py with ... selfsup)")
    parser.add_argument("--items", type=int, default=1000, help="its first episodes to replay")
    args = parser.parse_args(argv)
    cfg = json.loads(Path(args.config).read_text())
    data = SelfSupEpisodeDataset(cfg["path"]["data_dir"], 1, cfg["n_shots"], cfg["n_queries"],
                                 cfg["input_size"], cfg["augment"], cfg["selfsup"]["warp"],
                                 cfg["selfsup"]["min_pixels"], cfg["seed"], recipe=cfg["selfsup"]["episodes"],
                                 input_slices=cfg["model"].get("input_slices", 1))
    prepared_size = np.asarray(data._volume(data.candidates[0][0])[1]).shape[-1]
    items = [draws_of(data, i) for i in range(args.items)]
    draws = [d for item in items for d in item]
    redrawn = [i for i, item in enumerate(items) if len(item) > 1]
    rescued = sum(kept_by_rewarping(data, items[i][0][0], i) for i in redrawn)
    reasons = np.bincount([r for _, _, r in draws if r is not None], minlength=len(REDRAW_REASONS))
    print(f"{cfg['path']['data_dir']}: {args.items} items ({data.recipe} recipe, {prepared_size} px -> "
          f"{data.input_size} px), {len(draws)} draws; items redrawn {len(redrawn)} "
          f"({100 * len(redrawn) / args.items:.1f}%); discarded draws: "
          + ", ".join(f"{reason} {n}" for reason, n in zip(REDRAW_REASONS, reasons)))
    print(f"redrawn items whose first superpixel one of {MAX_DRAWS} re-warps would have kept: {rescued}\n")
    print("| size at input_size (px) | draws kept | share of first draws | share of kept items |")
    print("|---|---:|---:|---:|")
    first = np.array([item[0][1] for item in items])
    kept = np.array([item[-1][1] for item in items if item[-1][2] is None])
    sizes, ok = np.array([d[1] for d in draws]), np.array([d[2] is None for d in draws])
    for low, high in zip(BANDS[:-1], BANDS[1:]):
        band = (sizes >= low) & (sizes < high)
        rate = f"{ok[band].mean():.3f} of {band.sum()}" if band.any() else "-"
        share = [f"{np.mean((x >= low) & (x < high)):.3f}" for x in (first, kept)]
        print(f"| {low:g} - {high:g} | {rate} | {share[0]} | {share[1]} |")
    return 0


if __name__ == "__main__":
    run_cli(main)
