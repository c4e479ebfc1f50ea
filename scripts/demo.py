"""The end-to-end demo on the synthetic phantom (what `make demo` runs).

    python scripts/demo.py                    # run, reusing finished steps
    python scripts/demo.py --redo train       # retrain (also: phantom, prepare)
    python scripts/demo.py --publish          # copy the finished table/figures into README.md, docs/
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # demo_steps.py beside this script

import demo_steps as demo  # noqa: E402
from util.cli import run_cli  # noqa: E402


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redo", nargs="*", default=[], choices=["phantom", "prepare", "train"],
                        help="steps to run again instead of reusing their outputs")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--publish", action="store_true", help="copy the finished demo into README.md/docs")
    parser.add_argument("overrides", nargs="*", help="extra Sacred overrides for train.py, e.g. n_steps=100")
    args = parser.parse_args(argv)
    if args.publish:
        demo.publish()
        return 0
    demo.run_demo(set(args.redo), args.overrides, args.device)
    print("\n" + (demo.RUN_DIR / "report.md").read_text())
    return 0


if __name__ == "__main__":
    run_cli(main)
