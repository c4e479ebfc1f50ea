"""Segment an organ in your own CT or MR volume from a few annotated support volumes or slices.

    python scripts/segment_volume.py --checkpoint CKPT \
        --support-image S.nii.gz --support-mask M.nii.gz [--support-label N] \
        [--support-image S2.nii.gz --support-mask M2.nii.gz ...] \
        --query Q.nii.gz --out PRED.nii.gz [--query-range Z0:Z1] [--n-chunks N] [--device auto|cpu|cuda]

Library: evaluation/segment.py (`segment_volume`). See README.md, section "Segment your own scan".
"""
from __future__ import annotations

import argparse

from evaluation.segment import segment_volume
from util.cli import run_cli
from util.errors import UserError

EPILOG = """\
Query range: --query-range Z0:Z1 gives the organ's axial slices in the query (half-open, like a
Python slice: Z0 .. Z1-1, indices along the query file's axial array axis as stored). Without it
the range is transferred from the supports: by physical z position when the query is part of a
support's scan (a crop of it, or the scan itself); otherwise the organ's relative position inside
the support's body extent (slices with voxels > -500 HU) is placed in the query's body extent.
That needs CT in Hounsfield units and scans of the same body region: for MR (or other non-HU
volumes), and when the body extents differ by more than 25% in mm, it is refused (give
--query-range); more than 10% apart gives a warning. Slices outside the range are 0 in the output.

Intensity: the checkpoint's scaling unless --intensity is given. A CT window (window:LO,HI) needs CT
in HU: a volume without air voxels (float CT in [0, 1], uint16 stored without rescale, int8, MR) is
refused; --intensity minmax scales each slice by its own range (any modality), --intensity zscore
each volume by its mean and standard deviation (SSL-ALPNet's MR rule).

Supports: a full annotated volume or a volume with only a few annotated slices (its annotated
slices are the ones holding the organ; each chunk uses the nearest annotated slice). With several
--support-image/--support-mask pairs every chunk averages the supports' prototypes (k-shot).
A query range shorter than --n-chunks gives each query slice the support chunk covering its centre.
"""


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
    parser.add_argument("--query", required=True, metavar="Q.nii.gz", help="CT or MR volume to segment")
    parser.add_argument("--out", required=True, metavar="PRED.nii.gz",
                        help="output mask (uint8, the query's shape, affine and orientation)")
    parser.add_argument("--query-range", default=None, metavar="Z0:Z1",
                        help="axial slices of the organ in the query (Z1 excluded); default: see below")
    parser.add_argument("--n-chunks", type=int, default=12, help="chunks of the protocol (default 12, LSLPN)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
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
    if len(args.support_image) != len(args.support_mask) or not args.support_image:
        raise UserError(f"got {len(args.support_image)} --support-image and {len(args.support_mask)} "
                        "--support-mask: give them in pairs, at least one pair")
    array, _ = segment_volume(args.checkpoint, list(zip(args.support_image, args.support_mask)), args.query,
                              out=args.out, support_label=args.support_label, label_map=args.label_map,
                              query_range=args.query_range, n_chunks=args.n_chunks, device=args.device,
                              batch_size=args.batch_size, progress=not args.no_progress,
                              intensity=args.intensity, input_size=args.input_size,
                              min_voxels=args.min_voxels, vocabulary=args.vocabulary)
    print(f"wrote {args.out}: {int(array.sum())} foreground voxels, shape {array.shape}")
    return 0


if __name__ == "__main__":
    run_cli(main)
