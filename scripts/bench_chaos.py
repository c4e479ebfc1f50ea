"""SSL-ALPNet's protocol on a folder of its layout (CHAOS-T2 MRI, SABS CT): 5 folds, Settings 1 and 2.

    python scripts/bench_chaos.py --publish             # the committed docs/bench_chaos.md (make bench-chaos)
    python scripts/bench_chaos.py --data DIR --folds 0  # your folder: OUT/bench_chaos.md and .png
    python scripts/bench_chaos.py --full --device cuda  # the published settings (100k iterations, 256 x 256)
    python scripts/bench_chaos.py --report-only         # rewrite the report from OUT/results.json
    python scripts/bench_chaos.py --lslpn-plus --publish  # the LSLPN+ sweep, docs/lslpn_plus.md
    python scripts/bench_chaos.py --speed A.pth B.pth     # s per scan, 4 organs (CT: phantom): BENCHMARKS.md
Steps (finished ones reused): experiments/chaos.py, lslpn_plus.py.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import time
from pathlib import Path

from util.cli import run_cli
from util.errors import UserError
from util.io import check_output_file, check_writable_folder, write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "BENCHMARKS.md"
PUBLISHED_DOC = ROOT / "docs" / "bench_chaos.md"
PUBLISHED_PLUS = ROOT / "docs" / "lslpn_plus.md"
PINNED_NUMERICS = {"ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}


def command_line(argv: list[str]) -> str:
    """The command line as the report records it: a shell line that runs when pasted (from this cwd)."""
    script = Path(__file__).resolve()
    try:
        shown = str(script.relative_to(Path.cwd().resolve()))
    except ValueError:
        shown = str(script)
    return shlex.join(["python", shown, *argv])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None,
                        help="SSL-ALPNet-layout folder (default $CHAOS_T2_DIR "
                        "or ../shared/data/chaos_mr_t2 beside the repository)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_chaos"),
                        help="prepared folders, runs, results")
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--settings", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--label-sets", type=int, nargs="+", default=[0, 1], choices=[0, 1],
                        help="0: kidneys tested, 1: liver and spleen tested")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="table rows to train (default all), e.g. LSLPN 'PANet head'; "
                        "mask copy always runs")
    parser.add_argument("--rules", choices=["or", "and"], nargs="+", default=["or", "and"],
                        help="Setting 2 exclusion rules, the first for the main tables: 'or' (SSL-ALPNet: "
                        "any test organ), 'and' (Q-Net lineage: all of them); the others are trained and "
                        "scored again beside it (default: or and)")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps per run (CPU default 100, the committed table)")
    parser.add_argument("--input-size", type=int, default=64, help="model input size of the CPU budget")
    parser.add_argument("--batch-size", type=int, default=2, help="episodes per step of the CPU budget")
    parser.add_argument("--full", action="store_true", help="SSL-ALPNet's published settings (GPU)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--publish", action="store_true",
                        help=f"write the committed report docs/{PUBLISHED_DOC.name} and its .png "
                        "(default: OUT/bench_chaos.md)")
    parser.add_argument("--doc", type=Path, default=None, help="write the report here instead (a .md file)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from OUT/results.json")
    parser.add_argument("--lslpn-plus", action="store_true",
                        help="the LSLPN+ option sweep on the LSLPN runs (with --data, --out, --folds, "
                        "--device)")
    parser.add_argument("--retime", action="store_true",
                        help="--lslpn-plus: measure the timing pass again, on a quiet machine (nothing else "
                        "on the cores: the report says the timings are quiet)")
    parser.add_argument("--speed", type=Path, nargs="+", default=None, metavar="CHECKPOINT",
                        help="seconds per query scan and peak memory of scripts/segment_volume.py (4 organs, "
                        "2 threads) for each checkpoint, on scans of its kind (a CT window: the CT phantom, "
                        "`make demo`'s or generated; else --data): the 'segment' section of BENCHMARKS.md "
                        "(or --doc)")
    args = parser.parse_args(argv)
    bad = [f for f in args.folds if f not in range(5)]
    if bad:
        raise UserError(f"--folds {bad[0]}: SSL-ALPNet has folds 0-4: pick among them")
    bad = [s for s in args.settings if s not in (1, 2)]
    if bad:
        raise UserError(f"--settings {bad[0]}: use 1 and/or 2")
    if min(args.steps or 1, args.batch_size) < 1:
        raise UserError(f"--steps {args.steps} / --batch-size {args.batch_size}: give whole numbers from 1")
    if args.publish and args.doc is not None:
        raise UserError(f"--publish writes docs/{PUBLISHED_DOC.name}: give --publish or --doc, "
                        "not both")
    if args.speed:
        return speed(args, command_line(argv))
    published, name = (PUBLISHED_PLUS, "lslpn_plus") if args.lslpn_plus else (PUBLISHED_DOC, "bench_chaos")
    doc = published if args.publish else args.doc or args.out / f"{name}.md"
    results_path = args.out / ("lslpn_plus_results.json" if args.lslpn_plus else "results.json")
    os.environ.update(PINNED_NUMERICS)
    from experiments import chaos as steps  # after the pins: torch loads here
    from models.checkpoint import check_input_size
    from training.config_check import MAX_BATCH_SIZE
    from util.provenance import git_commit
    # every output location before any compute: never inside the data folder (checked before any write
    # probe), then --out (--doc defaults to a file inside it)
    data = args.data or steps.default_data()
    source = os.path.realpath(data)
    for what, path in (("--out", args.out), ("--doc", doc)):
        if not args.report_only and (os.path.realpath(path) + os.sep).startswith(source + os.sep):
            raise UserError(f"{what} {path} is inside the data folder {source}: give a location outside it")
    if not args.report_only:
        check_writable_folder(args.out, "--out")
    check_output_file(doc, what="--doc", suffixes=(".md",), create_parent=True)
    check_output_file(doc.with_suffix(".png"), what="--doc", create_parent=True)
    if args.report_only:
        if not results_path.is_file():
            raise UserError(f"{results_path}: no results yet: "
                            "run the benchmark first (without --report-only)")
    else:
        for folder in ("prepared", "train", "evaluations"):
            check_writable_folder(args.out / folder, "--out")
        check_output_file(results_path, what="--out", create_parent=True)
    check_input_size(args.input_size, "--input-size")
    if args.batch_size > MAX_BATCH_SIZE:
        raise UserError(f"--batch-size {args.batch_size}: at most {MAX_BATCH_SIZE} episodes per step")
    command = command_line(argv)
    if args.lslpn_plus:
        from experiments import lslpn_plus as plus
        if args.report_only:
            results = json.loads(results_path.read_text())
        else:
            results = plus.run_sweep(data, args.out, args.folds, args.device, args.retime, command)
            write_text_atomic(json.dumps(results, indent=1), results_path)
        plus.write_report(results, doc)
        print(f"wrote {doc} ({results['seconds'] / 60:.1f} min)")
        return 0
    if args.report_only:
        steps.write_report(json.loads(results_path.read_text()), doc, doc.with_suffix(".png"))
        print(f"wrote {doc}")
        return 0
    steps.layout.detect_dataset(data)       # one line for a folder that is not in the layout
    budget = {"steps": args.steps if args.steps is not None else (100000 if args.full else 100),
              "input_size": 256 if args.full else args.input_size,
              "batch_size": 1 if args.full else args.batch_size, "full": args.full}
    start = time.perf_counter()
    collector = steps.OverlayCollector(setting=2 if 2 in args.settings else 1)
    exclusion = steps.exclusion_counts(data, args.folds) if 2 in args.settings else None
    environment = steps.environment_note()

    def publish(results: dict, final: bool = False) -> None:
        """results.json and the report (after every cell: a stopped run still leaves its finished part)."""
        seconds = time.perf_counter() - start
        figure = collector.draw(doc.with_suffix(".png"))
        results.update({"seconds": seconds, "command": command, "exclusion": exclusion, "complete": final,
                        "commit": git_commit(), "environment": environment})
        write_text_atomic(json.dumps(results, indent=1), results_path)
        steps.write_report(results, doc, figure)

    rules = list(dict.fromkeys(args.rules))
    results = steps.run_bench(data, args.out, args.folds, sorted(args.settings), rules, budget, args.device,
                              figure_hook=collector, progress=publish,
                              label_sets=args.label_sets, only=args.methods)
    publish(results, final=True)
    print(f"\nwrote {doc} ({results['seconds'] / 60:.1f} min)")
    print(doc.read_text())
    return 0


def speed(args, command: str) -> int:
    """--speed: measure each checkpoint (experiments/chaos.py), write its BENCHMARKS.md section."""
    doc = check_output_file(args.doc or BENCHMARKS, what="--doc", suffixes=(".md",))
    for checkpoint in args.speed:
        if not checkpoint.is_file():
            raise UserError(f"--speed {checkpoint}: no such checkpoint file: give a train.py best.pth or "
                            "last.pth")
    check_writable_folder(args.out / "speed", "--out")
    os.environ.update(PINNED_NUMERICS)
    from experiments import chaos
    from experiments.runner import replace_between
    section = chaos.speed_section(args.speed, args.data, args.out / "speed", command)
    replace_between(doc, *chaos.SPEED_MARKERS, section, append=True)
    print(section)
    return 0


if __name__ == "__main__":
    run_cli(main)
