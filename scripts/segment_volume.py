"""Segment organs in your own CT or MR volume from a few annotated support volumes or slices.

    python scripts/segment_volume.py --checkpoint CKPT \
        --support-image S.nii.gz --support-mask M.nii.gz [--support-label N] \
        [--support-image S2.nii.gz --support-mask M2.nii.gz ...] \
        --query Q.nii.gz --out PRED.nii.gz [--query-range Z0:Z1] [--n-chunks N] [--device auto|cpu|cuda]
    python scripts/segment_volume.py --checkpoint CKPT --support-dir SUPPORTS [--organs liver,spleen] \
        --query Q.nii.gz|DICOM_FOLDER [--query Q2 ...] --out LABELS.nii.gz|OUT_FOLDER [--series UID]

Library: evaluation/segment.py (`segment_volume`, `segment`). See README.md, section "Segment your own scan".
"""
from __future__ import annotations

import argparse
from pathlib import Path

import util.interrupt  # noqa: F401  (first: a Ctrl-C during the imports below is one line, exit 130)

# isort: split
from evaluation.segment import segment_queries, segment_volume
from util.cli import run_cli
from util.device import DEVICES
from util.errors import UserError

EPILOG = ("Query range, intensity, supports, several organs and every error: docs/usage.md, section "
          "\"Segmenting a scan\".")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="best.pth / last.pth written by train.py")
    parser.add_argument("--support-image", action="append", default=[], metavar="S.nii.gz",
                        help="support CT or MR volume (repeat for k-shot, paired in order with "
                             "--support-mask)")
    parser.add_argument("--support-mask", action="append", default=[], metavar="M.nii.gz",
                        help="its mask: binary or multi-label, same grid as the support image")
    parser.add_argument("--support-label", default=None,
                        help="organ in a multi-label mask: a label value, or an organ name; a name needs the "
                             "mask's labels: --label-map, a sidecar <mask>.json, --vocabulary visceral, or a "
                             "VISCERAL mask file name")
    parser.add_argument("--label-map", default=None, metavar="JSON",
                        help='JSON {"organ name": value}, {"value": "name"} or {"labels": {...}} '
                             'for --support-label')
    parser.add_argument("--vocabulary", default=None, choices=("visceral",),
                        help="the mask uses the project's label values 1-20 (liver=1, spleen=2, ...; "
                             "dataloaders/organs.py)")
    parser.add_argument("--query", required=True, action="append", metavar="Q.nii.gz",
                        help="CT or MR volume to segment (NIfTI or a DICOM series folder; several organs: "
                             "repeat it, or give a folder of .nii.gz)")
    parser.add_argument("--out", required=True, metavar="PRED.nii.gz",
                        help="output mask (uint8, the query's shape, affine and orientation); a folder for "
                             "several queries")
    parser.add_argument("--support-dir", default=None, metavar="SUPPORTS",
                        help="annotated scans image_<id> + label_<id>.nii.gz (+ labels.json): several organs")
    parser.add_argument("--organs", default=None, metavar="liver,spleen",
                        help="organs to segment (names or values, comma-separated; default: all)")
    parser.add_argument("--series", default=None, metavar="UID", help="series of a query DICOM folder")
    parser.add_argument("--query-range", default=None, metavar="Z0:Z1",
                        help="axial slices of the organ in the query (Z1 excluded); default: see below")
    parser.add_argument("--n-chunks", type=int, default=12, help="chunks of the protocol (default 12, LSLPN)")
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument("--batch-size", type=int, default=16, help="query slices per forward pass")
    parser.add_argument("--intensity", default=None, metavar="minmax|zscore|window:LO,HI",
                        help="intensity scaling (default: the checkpoint's training data, else "
                             "per-slice min-max)")
    parser.add_argument("--input-size", type=int, default=None,
                        help="model input size (default: the checkpoint's training input_size)")
    parser.add_argument("--min-voxels", type=int, default=0,
                        help="a support slice counts as annotated with more than this many organ voxels")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.support_dir is not None or args.organs is not None:
        return several_organs(args)
    if len(args.query) > 1:
        raise UserError("several --query: give --support-dir or --organs (several organs mode)")
    args.query = args.query[0]
    if len(args.support_image) != len(args.support_mask) or not args.support_image:
        raise UserError(f"got {len(args.support_image)} --support-image and {len(args.support_mask)} "
                        "--support-mask: give them in pairs, at least one pair")
    array, _ = segment_volume(args.checkpoint, list(zip(args.support_image, args.support_mask)), args.query,
                              out=args.out, support_label=args.support_label, label_map=args.label_map,
                              query_range=args.query_range, n_chunks=args.n_chunks, device=args.device,
                              batch_size=args.batch_size, progress=not args.no_progress,
                              intensity=args.intensity, input_size=args.input_size,
                              min_voxels=args.min_voxels, vocabulary=args.vocabulary, series=args.series)
    print(f"wrote {args.out}: {int(array.sum())} foreground voxels, shape {array.shape}")
    return 0


def several_organs(args) -> int:
    """--support-dir / --organs: every organ asked for in one pass per query."""
    supports = args.support_dir if args.support_dir is not None else list(zip(args.support_image,
                                                                             args.support_mask))
    if args.support_dir is None and (len(args.support_image) != len(args.support_mask) or not supports):
        raise UserError("several organs: give --support-dir, or --support-image/--support-mask pairs")
    queries = []
    for query in map(Path, args.query):
        from_folder = sorted(query.glob("*.nii.gz")) if query.is_dir() else []
        queries += from_folder if from_folder else [query]
    if len(queries) == 1 and args.out.endswith(".nii.gz"):
        outs = [Path(args.out)]
    else:
        folder = Path(args.out)
        if folder.exists() and not folder.is_dir():
            raise UserError(f"--out {folder}: several queries need a folder, not a file")
        outs = [folder / (q.name.removesuffix(".nii.gz").removesuffix(".nii") + "_labels.nii.gz")
                for q in queries]
    organs = None if args.organs is None else [name for name in args.organs.split(",") if name.strip()]
    results = segment_queries(queries, supports, organs, args.checkpoint, outs, label_map=args.label_map,
                              query_range=args.query_range, series=args.series, n_chunks=args.n_chunks,
                              device=args.device, batch_size=args.batch_size, intensity=args.intensity,
                              input_size=args.input_size, min_voxels=args.min_voxels,
                              progress=not args.no_progress)
    for out, (array, names, _, _) in zip(outs, results):
        print(f"wrote {out}: {', '.join(f'{n} {int((array == v).sum())}' for v, n in names.items())} voxels")
    return 0


if __name__ == "__main__":
    run_cli(main)
