"""The end-to-end demo on the synthetic phantom (what `make demo` runs; the steps are in demo/run.py).

    python -m demo                    # run, reusing finished steps
    python -m demo --redo train       # retrain (also: phantom, prepare)
    python -m demo --publish          # copy the finished table/figures into README.md, docs/

Threads are pinned for every step (PINNED_NUMERICS, inherited by the step subprocesses).
"""
from __future__ import annotations

import argparse

from demo import pin_cpu_numerics
from util.cli import run_cli


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redo", nargs="*", default=[], choices=["phantom", "prepare", "train"],
                        help="steps to run again instead of reusing their outputs")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--publish", action="store_true", help="copy the finished demo into README.md/docs")
    parser.add_argument("overrides", nargs="*", help="extra Sacred overrides for train.py, e.g. n_steps=100")
    args = parser.parse_args(argv)
    pinned = pin_cpu_numerics()
    # after pin_cpu_numerics: oneDNN/OpenMP read these variables when torch loads
    from demo import run as demo
    if args.publish:
        demo.publish()
        return 0
    print("demo: threads pinned for bit-reproducible runs: "
          + ", ".join(f"{key}={value}" for key, value in pinned.items()), flush=True)
    demo.run_demo(set(args.redo), args.overrides, args.device)
    print("\n" + (demo.RUN_DIR / "report.md").read_text())
    return 0


if __name__ == "__main__":
    run_cli(main)
