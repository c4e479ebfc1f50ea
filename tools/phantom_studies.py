"""Studies on the synthetic phantom, each training through experiments/runner.py (finished runs reused):

    python tools/phantom_studies.py ablation --folds 0 1 2 3 -- demo   # docs/ablation_phantom.md
    python tools/phantom_studies.py ablation --folds 0 1 2 3 -- paper class_setting=all_structures
    python tools/phantom_studies.py compare --folds 0 --data data/prepared_phantom --out runs/compare
    python tools/phantom_studies.py lslpn-plus                         # after `make demo`, in its folder

compare: docs/fidelity_phantom.md; lslpn-plus: docs/lslpn_plus_phantom.md.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from dataloaders.organs import FOLD_ORGANS
from util.cli import run_cli
from util.errors import UserError
from util.io import write_text_atomic

ABLATION = """Ablation of the paper (docs/method.md, "VISCERAL data, folds and the paper's figures"): n_grid
16, 8, 4, 1, non-overlapping cells, mean vote, and SENet. The overrides after `--` go to train.py (finished
runs under OUT/<variant>/fold<F>/ reused); every variant is evaluated beside mask copy (OUT/eval/), each at
its training size; OUT/ablation.md is the table."""
COMPARE = """Measured effect of the fidelity options (REPRODUCTION.md's difference table): variants on top of
`demo` shortened for 2 CPU cores (cnn_small 200 steps; vgg16 from random weights at 64 x 64, 100 steps), each
evaluated beside mask copy under preset 'inclusive' and 'official' (OUT/eval_<preset>/); OUT/compare.md."""
LSLPN_PLUS_DOC = Path(__file__).resolve().parents[1] / "docs" / "lslpn_plus_phantom.md"
ORGANS = ["liver", "spleen", "kidney", "psoas"]
COLUMNS = [*ORGANS, "mean"]
# ablation: variant name -> model overrides
ABLATION_VARIANTS: dict[str, dict] = {
    "n_grid 16": {"n_grid": 16, "overlap": True, "vote": "max"},
    "n_grid 8": {"n_grid": 8, "overlap": True, "vote": "max"},
    "n_grid 4": {"n_grid": 4, "overlap": True, "vote": "max"},
    "n_grid 1 (global)": {"n_grid": 1, "overlap": True, "vote": "max"},
    "n_grid 8 non-overlapping": {"n_grid": 8, "overlap": False, "vote": "max"},
    "n_grid 8 mean vote": {"n_grid": 8, "overlap": True, "vote": "mean"},
    "SENet": {},
}
# variant name -> named configs after the overrides (and extra ones when the overrides name `demo`)
VARIANT_CONFIGS: dict[str, list[str]] = {"SENet": ["senet"]}
DEMO_CONFIGS: dict[str, list[str]] = {"SENet": ["senet_demo"]}
VGG_SMALL = ["model.encoder=vgg16", "model.pretrained=False", "input_size=64", "n_steps=100", "lr=1e-3",
             "lr_milestones=[80]", "val_every=50", "save_every=50", "eval.batch_size=16"]
CNN_SHORT = ["n_steps=200", "lr_milestones=[150]", "val_every=50", "save_every=50"]
COMPARE_VARIANTS: dict[str, list[str]] = {
    "cnn_small (200 steps)": CNN_SHORT,
    "vgg16 (64 px, 100 steps)": VGG_SMALL,
}
PRESETS = ("inclusive", "official")


def slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name).strip("_")


def fold_snapshots(folds: list[int], train_fold) -> dict[str, str]:
    """organ -> snapshot of the fold that held it out (train_fold(fold), fold by fold)."""
    snapshots = {fold: str(train_fold(fold)) for fold in folds}
    return {organ: snapshots[fold] for fold in folds for organ in FOLD_ORGANS[fold]}


def dice_cells(row: dict, columns: list[str]) -> str:
    """Table cells of one Dice row (%, '–' where an organ was not evaluated)."""
    return " | ".join("–" if row[c] is None else f"{row[c]:.1f}" for c in columns)


def train_variant(variant: str, fold: int, overrides: list[str], out: Path, python: str) -> Path:
    """Train one variant on one fold with train.py (skipped when a finished run of the same config exists)."""
    model = [f"model.{key}={value}" for key, value in ABLATION_VARIANTS[variant].items()]
    named = VARIANT_CONFIGS.get(variant, []) + (DEMO_CONFIGS.get(variant, []) if "demo" in overrides else [])
    from experiments.runner import train_or_reuse
    return train_or_reuse([*overrides, *named, f"fold={fold}", *model,
                           f"path.log_dir={out / slug(variant) / f'fold{fold}'}"],
                          title=f"train {variant}, fold {fold}", python=python)


def ablation_markdown(results: dict) -> str:
    """The ablation table: variants as rows, Table 1 columns, Dice % over the organ range."""
    rows, columns = results["table"]["range"], COLUMNS
    preset = results["preset"]
    lines = [f"Ablation, Dice (%) over the organ slice range (preset '{preset['name']}').", "",
             "| Variant | n_grid | overlap | vote | " + " | ".join(columns) + " |",
             "|---" * (len(columns) + 4) + "|"]
    for method, row in rows.items():
        spec = ABLATION_VARIANTS.get(method, {})
        lines.append(f"| {method} | {spec.get('n_grid', '–')} | {spec.get('overlap', '–')} | "
                     f"{spec.get('vote', '–')} | {dice_cells(row, columns)} |")
    return "\n".join(lines) + "\n"


def ablation(argv: list[str]) -> int:
    if "--" in argv:
        split = argv.index("--")
        argv, overrides = argv[:split], argv[split + 1:]
    else:
        overrides = []
    from evaluation.evaluate import evaluate
    from experiments.runner import resolved_config
    parser = argparse.ArgumentParser(prog="phantom_studies.py ablation", description=ABLATION)
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--variants", nargs="+", default=list(ABLATION_VARIANTS),
                        choices=list(ABLATION_VARIANTS))
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs train.py")
    args = parser.parse_args(argv)
    if shutil.which(args.python) is None:
        raise UserError(f"--python {args.python}: no such executable: pass the interpreter that has this "
                        "project's requirements (e.g. .venv/bin/python)")
    bad = [fold for fold in args.folds if fold not in range(len(FOLD_ORGANS))]
    if bad:
        raise UserError(f"--folds {bad} do not exist: use 0 (liver), 1 (spleen), 2 (kidneys), 3 (psoas)")
    config = resolved_config(overrides, "overrides after --")
    snapshots = {variant: fold_snapshots(args.folds, lambda fold: train_variant(
        variant, fold, overrides, args.out.resolve(), args.python)) for variant in args.variants}
    organs = [organ for fold in args.folds for organ in FOLD_ORGANS[fold]]
    settings = config["eval"]
    results = evaluate({"mask copy": None, **snapshots}, organs, config["path"]["data_dir"],
                       preset=settings["preset"], out_dir=args.out / "eval", split=settings["split"],
                       support=settings["support"], device=config["device"],
                       input_size=None if "SENet" in args.variants else config["input_size"],
                       # SENet: its own
                       batch_size=settings["batch_size"], save_predictions=False,
                       config={"overrides": overrides, "folds": args.folds})
    table = ablation_markdown(results)
    write_text_atomic(table, args.out / "ablation.md")
    print(table)
    print(f"wrote {args.out / 'ablation.md'}")
    return 0


def train_compared(variant: str, fold: int, data: str, out: Path, python: str) -> Path:
    from experiments.runner import train_or_reuse
    return train_or_reuse(["demo", *COMPARE_VARIANTS[variant], f"fold={fold}", f"path.data_dir={data}",
                           f"path.log_dir={out / slug(variant) / f'fold{fold}'}"],
                          title=f"train {variant}, fold {fold}", python=python)


def compare_table(results: dict, preset: str) -> str:
    columns = COLUMNS
    lines = [f"Preset '{preset}', Dice (%) over the organ slice range.", "",
             "| Variant | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for method, row in results["table"]["range"].items():
        lines.append(f"| {method} | {dice_cells(row, columns)} |")
    return "\n".join(lines) + "\n"


def compare(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="phantom_studies.py compare", description=COMPARE)
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--variants", nargs="+", default=list(COMPARE_VARIANTS),
                        choices=list(COMPARE_VARIANTS))
    parser.add_argument("--data", default="data/prepared_phantom", help="prepared phantom folder")
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args(argv)
    snapshots = {variant: fold_snapshots(args.folds, lambda fold: train_compared(
        variant, fold, args.data, args.out.resolve(), args.python)) for variant in args.variants}
    if args.train_only:
        return 0
    from evaluation.evaluate import evaluate
    organs = [organ for fold in args.folds for organ in FOLD_ORGANS[fold]]
    blocks = [f"Command: python tools/phantom_studies.py compare {' '.join(argv)}", ""]

    def run(preset: str, name: str, spec, size: int) -> dict:
        out = args.out / f"eval_{preset}" / slug(name)
        result = evaluate({name: spec}, organs, args.data, preset=preset, out_dir=out, split="gold",
                          support="default", input_size=size, device="cpu", batch_size=32,
                          save_predictions=False, config={"argv": argv}, figures=False)
        return result["table"]["range"][name]

    def size_of(variant: str) -> int:
        return 64 if variant.startswith("vgg16") else 128   # each variant at its training size

    for preset in PRESETS:  # the same snapshots under this project's and the authors' evaluation
        rows = {"mask copy": run(preset, "mask copy", None, 128)}
        for variant, by_organ in snapshots.items():
            rows[variant] = run(preset, variant, by_organ, size_of(variant))
        blocks.append(compare_table({"table": {"range": rows}}, preset))
    text = "\n".join(blocks)
    write_text_atomic(text, args.out / "compare.md")
    print(text)
    return 0


def lslpn_plus(argv: list[str]) -> int:
    from demo.__main__ import pin_cpu_numerics
    pin_cpu_numerics()  # the demo's pins, set before torch loads
    from dataloaders.organs import TEST_ORGANS
    from demo import run as steps
    from evaluation.adaptation import test_time_head_options, test_time_model
    from evaluation.evaluate import evaluate
    from evaluation.results import table_rows
    from experiments.runner import resolved_config
    from util.provenance import git_commit
    start, log = time.perf_counter(), []
    if not (steps.RUN_DIR / "train" / "lslpn_fold0").is_dir():
        raise UserError(f"no demo runs under {steps.RUN_DIR / 'train'}: run `make demo` first")
    plain = steps.train_all(log, False, [], {"LSLPN": []})["LSLPN"]            # reused: the demo's runs
    plus = steps.train_all(log, False, [], {"LSLPN_plus": ["lslpn_plus"]})["LSLPN_plus"]
    config = resolved_config(["demo", "lslpn_plus"])
    settings = config["eval"]
    head = test_time_head_options(settings)

    def test_time(model):
        return test_time_model(model, head, settings["adapt_steps"], settings["adapt_lr"])
    variants = {"LSLPN (the demo's runs)": (plain, None),
                "LSLPN+ at test time (the demo's LSLPN runs)": (plain, test_time),
                "LSLPN+ (trained with the boundary loss)": (plus, test_time)}
    rows, seconds = {}, {}
    for label, (snapshots, transform) in variants.items():
        tic = time.perf_counter()
        results = evaluate({label: snapshots}, TEST_ORGANS, steps.PREP_DIR, preset="inclusive",
                           out_dir=None, split="gold", support="default", device="cpu",
                           batch_size=settings["batch_size"], save_predictions=False, figures=False,
                           progress=False, model_transform=transform)
        seconds[label] = time.perf_counter() - tic
        rows[label] = table_rows(results["results"], "range")[label]
        print(f"    {label}: {rows[label]}", flush=True)
    trained = [entry for entry in log if entry["step"].startswith("train")]
    n_plus_runs = len(set(map(str, plus.values())))                     # one per fold
    options = ", ".join(f"{k}={v}" for k, v in sorted(head.items()))
    lines = ["# LSLPN+ on the phantom demo", "",
             "Generated by `python tools/phantom_studies.py lslpn-plus` after `make demo`, at commit "
             f"{git_commit()} "
             f"({(time.perf_counter() - start) / 60:.1f} min on 2 CPU cores for this invocation, which "
             f"trained {len(trained)} of the {n_plus_runs} lslpn_plus runs and reused the others). "
             "Synthetic phantom, not patients: gold volumes, preset inclusive, support 10000132, Dice (%) "
             "over the organ slice range, as the demo's table. The LSLPN+ options are those of the "
             "`lslpn_plus` config, chosen on CHAOS-T2 validation scans (docs/lslpn_plus.md), not on the "
             f"phantom: training with boundary_weight={config['boundary_weight']} (the demo's schedule "
             f"otherwise); at test time the head options {options} and test-time adaptation "
             f"({settings['adapt_steps']} steps at lr {settings['adapt_lr']} per support slice).", "",
             "| Method | " + " | ".join(ORGANS) + " | mean | evaluation seconds |", "|---" * 7 + "|"]
    for label, row in rows.items():
        values = " | ".join("-" if row.get(o) is None else f"{row[o]:.1f}" for o in ORGANS)
        lines.append(f"| {label} | {values} | {row['mean']:.1f} | {seconds[label]:.0f} |")
    write_text_atomic("\n".join(lines) + "\n", LSLPN_PLUS_DOC)
    print("\n".join(lines))
    return 0


STUDIES = {"ablation": ablation, "compare": compare, "lslpn-plus": lslpn_plus}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in STUDIES:
        raise UserError(f"{argv[0] if argv else 'no study'}: unknown: use {', '.join(STUDIES)} "
                        "(python tools/phantom_studies.py STUDY --help)")
    return STUDIES[argv[0]](argv[1:])


if __name__ == "__main__":
    run_cli(main)
