"""Superpixel pseudo-labels for self-supervised training (docs/usage.md, docs/DESIGN.md).

    python scripts/make_superpixels.py --images PREP                       # a prepared folder
    python scripts/make_superpixels.py --images MY_CT_DIR --out PREP       # NIfTI volumes: images-only first
    python scripts/make_superpixels.py --images PREP --figure-only --figure overlay.png  # judge them
    python scripts/make_superpixels.py --alpnet DATA       # SSL-ALPNet's own files, written into DATA
"""
from __future__ import annotations

import argparse
import io
import os
import time
from dataclasses import asdict
from pathlib import Path

import util.interrupt  # noqa: F401  (first: a Ctrl-C during the imports below is one line, exit 130)

# isort: split
import numpy as np

from dataloaders.prepare import prepare_dataset
from dataloaders.prepared import open_training_images
from dataloaders.superpixels import (
    SuperpixelParams,
    make_alpnet_superpixels,
    make_superpixels,
    open_superpixels,
    read_superpixel_meta,
)
from evaluation.figures import display
from util.cli import run_cli
from util.errors import UserError
from util.io import check_input_folder, check_output_file, write_bytes_atomic


def overlay_figure(prep_dir: Path, out: Path, n: int) -> None:
    """A grid of `n` training slices with superpixel borders (radiological view, figures.display)."""
    import matplotlib  # deferred: only the --figure option draws
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.segmentation import find_boundaries
    params = read_superpixel_meta(prep_dir)["params"]
    pids = sorted(read_superpixel_meta(prep_dir)["volumes"])
    slices = []                               # n slices: volumes in turn, rows spread evenly
    for k in range(n):
        pid = pids[k % len(pids)]
        images, labels = open_training_images(prep_dir, pid), open_superpixels(prep_dir, pid)  # N x S x S
        row = min(images.shape[0] - 1, int(images.shape[0] * (k + 1) / (n + 1)))
        slices.append((pid, row, np.asarray(images[row]), np.asarray(labels[row])))
    columns = min(4, n)
    rows = -(-n // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.2 * rows), squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    for axis, (pid, row, image, labels) in zip(axes.ravel(), slices):
        rgb = np.repeat(display(image)[..., None], 3, axis=2)          # radiological view
        rgb[find_boundaries(display(labels).astype(np.int64), mode="inner")] = (1.0, 0.85, 0.0)
        axis.imshow(rgb, interpolation="nearest")
        axis.set_title(f"{pid} row {row}: {int(labels.max())} superpixels", fontsize=7)
    figure.suptitle(f"superpixels of {prep_dir.name}: {params}", fontsize=7)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    write_bytes_atomic(buffer.getvalue(), out)


def check_options(args: argparse.Namespace) -> SuperpixelParams:
    """Every option checked before any compute (a bad one never leaves a half-made folder); returns the
    superpixel parameters."""
    params = SuperpixelParams(args.method, args.scale, args.sigma, args.min_size, args.n_segments,
                              args.compactness, args.body_threshold)
    params.check()
    if args.figure_slices < 1:
        raise UserError(f"--figure-slices {args.figure_slices}: give at least 1 slice")
    if args.figure_only and not args.figure:
        raise UserError("--figure-only needs --figure overlay.png")
    if args.figure:
        # the overlay may go into the prepared folder this run creates (--out): its folder appears then
        new_folder = bool(args.out) and not Path(args.out).is_dir() \
            and Path(os.path.realpath(args.out)) in Path(os.path.realpath(args.figure)).parents
        check_output_file(args.figure, [], "--figure", suffixes=(".png",), create_parent=new_folder)
    return params


def alpnet_folder(args: argparse.Namespace, params: SuperpixelParams) -> int:
    """--alpnet DATA: SSL-ALPNet's own superpixels and classmap, written beside the scans."""
    if params != SuperpixelParams() or args.out or args.figure or args.window or args.size != 256:
        raise UserError("--alpnet uses SSL-ALPNet's own parameters and writes into DATA: leave out --out, "
                        "--figure, --window, --size and the superpixel parameters")
    folder = Path(args.alpnet)
    if not folder.is_dir() or not any(folder.glob("image_*.nii.gz")):
        raise UserError(f"--alpnet {folder}: not a folder with image_<id>.nii.gz files: give a folder in "
                        "SSL-ALPNet's layout (image_<id>.nii.gz, label_<id>.nii.gz)")
    if not os.access(folder, os.W_OK):
        raise UserError(f"--alpnet {folder}: not writable, the superpixel files go beside the scans: make it "
                        "writable or work on a copy")
    start = time.perf_counter()
    done = make_alpnet_superpixels(folder, args.overwrite, args.workers)
    print(f"{args.alpnet} ({done['dataset']}): wrote {len(done['written'])} superpixel files in "
          f"{time.perf_counter() - start:.1f} s, kept {done['kept']} existing"
          + (f"; wrote {done['classmap']}" if done["classmap"] else ""))
    return 0


def main(argv: list[str]) -> int:
    defaults = SuperpixelParams()
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="a prepared folder, or a folder of NIfTI CT volumes")
    source.add_argument("--alpnet", metavar="DATA",
                        help="an SSL-ALPNet-layout folder: add its superpix-MIDDLE files and classmap_1.json")
    parser.add_argument("--out",
                        help="prepared folder to create from --images NIfTI volumes (default: --images)")
    parser.add_argument("--method", default=defaults.method, choices=["felzenszwalb", "slic"])
    parser.add_argument("--scale", type=float, default=defaults.scale, help="felzenszwalb scale")
    parser.add_argument("--sigma", type=float, default=defaults.sigma, help="Gaussian pre-smoothing (pixels)")
    parser.add_argument("--min-size", type=int, default=defaults.min_size,
                        help="felzenszwalb smallest segment (px)")
    parser.add_argument("--n-segments", type=int, default=defaults.n_segments, help="slic segments per slice")
    parser.add_argument("--compactness", type=float, default=defaults.compactness, help="slic compactness")
    parser.add_argument("--body-threshold", type=float, default=defaults.body_threshold,
                        help="scaled intensity above which a pixel may be body (0-1)")
    parser.add_argument("--size", type=int, default=256, help="NIfTI input: preparation size S")
    parser.add_argument("--window", type=float, nargs=2, metavar=("LO", "HI"),
                        help="NIfTI input: HU window instead of per-slice min-max scaling, e.g. -125 275")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--overwrite", action="store_true", help="replace existing superpixels")
    parser.add_argument("--figure", help="also write an overlay PNG of a few slices here")
    parser.add_argument("--figure-slices", type=int, default=8)
    parser.add_argument("--figure-only", action="store_true",
                        help="only draw --figure from existing superpixels")
    args = parser.parse_args(argv)
    params = check_options(args)
    if args.alpnet:
        return alpnet_folder(args, params)
    source = prep = Path(args.images)
    if args.figure_only:
        overlay_figure(prep, Path(args.figure), args.figure_slices)
        print(f"overlay figure: {args.figure}")
        return 0
    check_input_folder(source, "--images ", "give a prepared folder or a folder of NIfTI CT volumes")
    start = time.perf_counter()
    if not (source / "meta.json").is_file():  # raw NIfTI volumes: prepare them first (images only)
        if not args.out:
            raise UserError(f"--images {source} is not a prepared folder: add --out PREP to prepare its "
                            "NIfTI volumes there (images only) first")
        prep = Path(args.out)
        intensity = {"mode": "window", "window": list(args.window)} if args.window else {"mode": "minmax"}
        meta = prepare_dataset(source, prep, "images-only", size=args.size, intensity=intensity,
                               workers=args.workers, overwrite=args.overwrite)
        print(f"prepared {len(meta['splits']['train'])} volumes (images only) into {prep}")
    elif args.out and Path(args.out).resolve() != source.resolve():
        raise UserError(f"--out {args.out}: superpixels are stored inside the prepared folder {source}: "
                        "leave --out out")
    meta = make_superpixels(prep, params, args.workers, args.overwrite)
    counts = [c for v in meta["volumes"].values() for c in v["superpixels_per_slice"]]
    print(f"wrote {prep}/superpixels in {time.perf_counter() - start:.1f} s: {len(meta['volumes'])} volumes, "
          f"{len(counts)} slices, median {sorted(counts)[len(counts) // 2]} superpixels per slice; "
          f"{asdict(params)}")
    if args.figure:
        overlay_figure(prep, Path(args.figure), args.figure_slices)
        print(f"overlay figure: {args.figure}")
    return 0


if __name__ == "__main__":
    run_cli(main)
