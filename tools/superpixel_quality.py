"""How well do superpixels fit organs? Best single-superpixel Dice per organ slice, 2D vs 3D.

    python tools/superpixel_quality.py --phantom data/phantom --volumes 2

Per test organ and slice of the gold phantom volumes (> 200 organ voxels), the Dice of the ONE superpixel
that best matches the organ (an upper bound for a pseudo-label), for 2D felzenszwalb, 2D slic and 3D slic
supervoxels; also the seconds per volume.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from dataloaders.layouts import find_cases, load_case
from dataloaders.organs import NAME_TO_INDEX, TEST_ORGANS
from dataloaders.superpixels import SuperpixelParams, body_mask, stack_superpixels
from dataloaders.transforms import resize_image, resize_label, scale_intensity
from util.cli import run_cli

WINDOW = {"mode": "window", "window": [-125.0, 275.0]}


def best_dice(organ: np.ndarray, segments: np.ndarray) -> float:
    """Dice of the single segment id (> 0) that best matches the binary `organ` (same shape)."""
    ids, overlap = np.unique(segments[organ & (segments > 0)], return_counts=True)
    if ids.size == 0:
        return 0.0
    sizes = np.bincount(segments.ravel().astype(np.int64))[ids]
    return float((2 * overlap / (sizes + organ.sum())).max())


def supervoxels_3d(images: np.ndarray, n_per_slice: int, params: SuperpixelParams) -> np.ndarray:
    """3D slic on a stack N x S x S (body only), ids > 0; about n_per_slice supervoxels per slice."""
    from skimage.segmentation import slic  # deferred: the 3D variant is only measured here
    body = np.stack([body_mask(image, params.body_threshold) for image in images])
    return slic(images.astype(np.float64), n_segments=n_per_slice * images.shape[0],
                compactness=params.compactness,
                sigma=params.sigma, channel_axis=None, mask=body, start_label=1)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phantom", default="data/phantom")
    parser.add_argument("--volumes", type=int, default=2, help="gold volumes measured")
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args(argv)
    methods = {"felzenszwalb 2D": SuperpixelParams(), "slic 2D": SuperpixelParams(method="slic"),
               "slic 3D": None}
    scores = {m: {o: [] for o in TEST_ORGANS} for m in methods}
    seconds = {m: 0.0 for m in methods}
    cases = find_cases(Path(args.phantom) / "GoldCorpus")[:args.volumes]
    for case in cases:
        volume = load_case(case)
        zs = np.arange(volume.label.shape[2])
        images = resize_image(scale_intensity(np.moveaxis(volume.image.array, 2, 0), WINDOW), args.size)
        labels = resize_label(np.moveaxis(volume.label, 2, 0), args.size)                  # N x S x S
        segments = {}
        for method, params in methods.items():
            start = time.perf_counter()
            segments[method] = stack_superpixels(images, params) if params else \
                supervoxels_3d(images, SuperpixelParams().n_segments, SuperpixelParams(method="slic"))
            seconds[method] += time.perf_counter() - start
        for organ in TEST_ORGANS:
            mask = labels == NAME_TO_INDEX[organ]
            for z in zs[mask.sum(axis=(1, 2)) > 200]:
                for method in methods:
                    scores[method][organ].append(best_dice(mask[z], segments[method][z]))
    print(f"best single-superpixel Dice (%) per organ slice (> 200 voxels), {len(cases)} gold phantom "
          f"volumes, {args.size} px")
    print("| method | " + " | ".join(TEST_ORGANS) + " | mean | s/volume |")
    print("|---" * (len(TEST_ORGANS) + 3) + "|")
    for method in methods:
        values = [100 * np.mean(scores[method][o]) for o in TEST_ORGANS]
        print(f"| {method} | " + " | ".join(f"{v:.1f}" for v in values)
              + f" | {np.mean(values):.1f} | {seconds[method] / len(cases):.1f} |")
    return 0


if __name__ == "__main__":
    run_cli(main)
