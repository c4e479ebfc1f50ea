"""CHAOS-T2 abdominal MRI under SSL-ALPNet's protocol: 5 folds, Settings 1 and 2, every method, one command.

    python scripts/bench_chaos.py                       # the committed CPU-budget table (make bench-chaos)
    python scripts/bench_chaos.py --folds 0             # one fold (about 20 minutes on 2 cores)
    python scripts/bench_chaos.py --data DIR            # your own copy (SSL-ALPNet's chaos_MR_T2_normalized
                                                        # layout; SABS's sabs_CT_normalized works too)
    python scripts/bench_chaos.py --full --device cuda  # the published settings (100k iterations, 256 x 256)
    python scripts/bench_chaos.py --rule and            # Setting 2 with the Q-Net lineage's AND rule
    python scripts/bench_chaos.py --report-only         # rewrite docs/bench_chaos.md from OUT/results.json

Trains and evaluates everything (scripts/bench_chaos_steps.py), reusing finished runs, then writes
docs/bench_chaos.md (per-organ tables per Setting, per fold and over the folds, the published SSL-ALPNet
numbers beside them, the wall time of every step) and docs/bench_chaos.png (overlays). CPU numerics are
pinned as in scripts/demo.py.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # helpers beside this script

from util.atomic import write_text_atomic  # noqa: E402
from util.cli import run_cli  # noqa: E402
from util.errors import UserError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA_ENV = "CHAOS_T2_DIR"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "chaos_mr_t2"   # a checkout next to the shared data folder
PINNED_NUMERICS = {"ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}


def default_data() -> Path:
    """$CHAOS_T2_DIR, else ../shared/data/chaos_mr_t2 beside the repository."""
    return Path(os.environ.get(DATA_ENV) or DEFAULT_DATA)


def display_command(argv: list[str]) -> str:
    """The command line as the report shows it: no machine paths (--data DIR, --out relative when inside
    cwd)."""
    shown = list(argv)
    for flag in ("--data", "--out", "--doc"):
        if flag in shown[:-1]:
            value = Path(shown[shown.index(flag) + 1]).resolve()
            try:
                text = str(value.relative_to(Path.cwd().resolve()))
            except ValueError:
                text = {"--data": "DIR", "--out": "OUT", "--doc": "DOC"}[flag]
            shown[shown.index(flag) + 1] = text
    return " ".join(["python scripts/bench_chaos.py", *shown])


def compared(path: Path | None) -> dict | None:
    """The other rule's results.json (--compare), or None."""
    if path is None:
        return None
    if not path.is_file():
        raise UserError(f"--compare {path}: not found: run the benchmark with the other --rule first")
    return json.loads(path.read_text())


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None,
                        help=f"SSL-ALPNet-layout folder (default ${DATA_ENV} "
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
    parser.add_argument("--rule", choices=["or", "and"], default="or",
                        help="Setting 2 exclusion: 'or' (SSL-ALPNet: any test organ) "
                        "or 'and' (Q-Net lineage)")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps per run (CPU default 100, the committed table)")
    parser.add_argument("--input-size", type=int, default=64, help="model input size of the CPU budget")
    parser.add_argument("--batch-size", type=int, default=2, help="episodes per step of the CPU budget")
    parser.add_argument("--full", action="store_true", help="SSL-ALPNet's published settings (GPU)")
    parser.add_argument("--no-alpnet-head", action="store_true", help="leave the ALPNet head row out")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "bench_chaos.md")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from OUT/results.json")
    parser.add_argument("--compare", type=Path, default=None,
                        help="results.json of a run with the other --rule: "
                        "the report adds the Dice of both rules")
    args = parser.parse_args(argv)
    bad = [f for f in args.folds if f not in range(5)]
    if bad:
        raise UserError(f"--folds {bad[0]}: SSL-ALPNet has folds 0-4: pick among them")
    bad = [s for s in args.settings if s not in (1, 2)]
    if bad:
        raise UserError(f"--settings {bad[0]}: use 1 and/or 2")
    data = args.data or default_data()
    os.environ.update(PINNED_NUMERICS)
    import bench_chaos_report as report  # after the pins: torch loads below
    import bench_chaos_steps as steps

    from dataloaders.layouts import detect_dataset
    from util.provenance import git_commit
    command = display_command(argv)
    results_path = args.out / "results.json"
    if args.report_only:
        if not results_path.is_file():
            raise UserError(f"{results_path}: no results yet: "
                            "run the benchmark first (without --report-only)")
        saved = json.loads(results_path.read_text())
        figure = args.doc.with_suffix(".png")
        report.write_report(saved, args.doc, figure, saved.get("seconds", 0.0), saved.get("command", command),
                            saved.get("exclusion"), saved.get("environment", ""), compared(args.compare))
        print(f"wrote {args.doc}")
        return 0
    dataset = detect_dataset(data)          # one line for a folder that is not in the layout
    budget = {"steps": args.steps if args.steps is not None else (100000 if args.full else 100),
              "input_size": 256 if args.full else args.input_size,
              "batch_size": 1 if args.full else args.batch_size, "full": args.full}
    other = compared(args.compare)
    start = time.perf_counter()
    collector = report.OverlayCollector(setting=2 if 2 in args.settings else 1)
    exclusion = steps.exclusion_counts(data, args.folds) if 2 in args.settings else None
    environment = steps.environment_note()

    def publish(results: dict, final: bool = False) -> None:
        """results.json and the report (after every cell: a stopped run still leaves its finished part)."""
        seconds = time.perf_counter() - start
        figure = collector.draw(args.doc.with_suffix(".png"))
        results.update({"seconds": seconds, "command": command, "exclusion": exclusion, "complete": final,
                        "commit": git_commit(),
                        "environment": environment, "dataset": dataset.name})
        write_text_atomic(json.dumps(results, indent=1), results_path)
        report.write_report(results, args.doc, figure, seconds, command, exclusion, environment, other)

    results = steps.run_bench(data, args.out, args.folds, sorted(args.settings), args.rule, budget,
                              args.device,
                              include_alpnet=not args.no_alpnet_head, figure_hook=collector, progress=publish,
                              label_sets=args.label_sets, only=args.methods)
    publish(results, final=True)
    seconds = results["seconds"]
    print(f"\nwrote {args.doc} ({seconds / 60:.1f} min)")
    print(args.doc.read_text())
    return 0


if __name__ == "__main__":
    run_cli(main)
