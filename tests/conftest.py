"""Shared fixtures: a tiny VISCERAL-layout phantom (6 silver + 3 gold volumes of 64 x 64 x ~24 slices) and
its prepared folders, built once per session; the ways to run the entry points in-process (train_in_process,
script_output) and train.py / test.py commands in one subprocess (run_sacred_cases).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

# One intra-op thread for the tests and the processes they start (set before torch is imported): their
# tensors are tiny, and on a 2-core machine two OpenMP threads per process mostly wait for each other
# (worst when a training subprocess or another program shares the cores). A test that is about thread
# counts sets its own (tests/test_demo_numerics.py); OMP_NUM_THREADS in the environment wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# The scripts, tools and entry points the tests start import this checkout's packages (before an editable
# install of another checkout).
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])

TINY_PHANTOM = {"n_silver": 6, "n_gold": 3, "seed": 7, "size": 64, "n_slices": 24}
TINY_PREP = {"size": 64, "n_val": 1, "seed": 3, "min_voxels": 5}


def resolve_config(named=("tiny",), **updates) -> dict:
    """The resolved Sacred config of config.py with these named configs and updates, without running
    anything."""
    from sacred.initialize import create_run

    from config import ex
    return dict(create_run(ex, "print_config", config_updates=updates, named_configs=list(named)).config)


def load_script(name: str):
    """Import scripts/<name>.py or tools/<name>.py as a module (neither folder is a package)."""
    path = ROOT / "scripts" / f"{name}.py"
    path = path if path.is_file() else ROOT / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"script_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def script_output(name: str, argv: list, capsys) -> tuple[int, str, str]:
    """Run scripts/<name>.py's main through util.cli.run_cli in-process: (exit code, stdout, stderr)."""
    from util.cli import run_cli
    module = load_script(name)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        run_cli(module.main, [str(a) for a in argv])
    captured = capsys.readouterr()
    return stop.value.code, captured.out, captured.err


def run_script(name: str, argv: list, capsys) -> tuple[int, str]:
    """(exit code, stderr) of scripts/<name>.py run in-process (`script_output`)."""
    code, _, err = script_output(name, argv, capsys)
    return code, err


def assert_one_line_error(code, err: str, *words: str) -> str:
    """Exit code 2, exactly one non-empty stderr line starting 'error:', naming `words`, no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, err)
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


# train.py / test.py commands in ONE process (each `config.run_sacred` once, its output captured), so each
# command costs no extra torch import; a {"python": code} entry runs that code in between, {"entry": name}
# makes the following commands name.py's (neither has a result).
SACRED_DRIVER = textwrap.dedent("""
    import contextlib, importlib, io, json, logging, sys, traceback, warnings
    warnings.filterwarnings("ignore")
    entry, cases = sys.argv[1], json.loads(sys.argv[2])
    module = importlib.import_module(entry)
    from config import run_sacred
    results = []
    for case in cases:
        if isinstance(case, dict) and "entry" in case:
            entry, module = case["entry"], importlib.import_module(case["entry"])
            continue
        if isinstance(case, dict):
            exec(case["python"], {})
            continue
        err, out, code = io.StringIO(), io.StringIO(), None
        # Sacred's log lines: the root logger's handler (made by the first run) writes to this err too
        for handler in logging.getLogger().handlers:
            if type(handler) is logging.StreamHandler:
                handler.setStream(err)
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                run_sacred(module.ex, [entry + ".py", "with", *case])
                code = 0
            except SystemExit as stop:
                code = stop.code
            except BaseException:
                traceback.print_exc()
                code = "exception"
        results.append({"code": code, "err": err.getvalue(), "out": out.getvalue()[-20000:]})
    print("RESULTS" + json.dumps(results))
""")


def run_sacred_cases(entry: str, cases: list) -> list[dict]:
    """{code, out, err} of each command (the words after `with`) of `entry`.py, one after the other in one
    process; each err holds what that command's own process would print on stderr (Sacred's log lines
    included)."""
    done = subprocess.run([sys.executable, "-c", SACRED_DRIVER, entry, json.dumps(cases)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert "RESULTS" in done.stdout, done.stderr[-3000:]
    return json.loads(done.stdout.split("RESULTS", 1)[1])


@pytest.fixture(scope="session")
def tiny_phantom(tmp_path_factory) -> Path:
    """ROOT of a tiny phantom: ROOT/{SilverCorpus,GoldCorpus}/{Volumes,Segmentations}/."""
    from phantom import generate_phantom
    root = tmp_path_factory.mktemp("tiny_phantom") / "phantom"
    generate_phantom(root, TINY_PHANTOM["n_silver"], TINY_PHANTOM["n_gold"], TINY_PHANTOM["seed"],
                     TINY_PHANTOM["size"], TINY_PHANTOM["n_slices"], workers=1)
    return root


@pytest.fixture(scope="session")
def tiny_prepared(tiny_phantom, tmp_path_factory) -> Path:
    """PREP of the tiny phantom (DESIGN.md layout), prepared at 64 x 64 with min-max scaling."""
    from dataloaders.prepare import Selection, prepare_dataset
    prep = tmp_path_factory.mktemp("tiny_prepared") / "prepared"
    prepare_dataset(tiny_phantom, prep, size=TINY_PREP["size"], n_val=TINY_PREP["n_val"],
                    seed=TINY_PREP["seed"],
                    rule=Selection(min_voxels=TINY_PREP["min_voxels"]), workers=1)
    return prep


@pytest.fixture(scope="session")
def unlabeled_prep(tiny_phantom, tmp_path_factory) -> Path:
    """The tiny phantom's silver volumes, images only, 64 px, window [-125, 275], with superpixels (min_size
    30): the self-supervised episodes' folder (tests/test_selfsup_*.py, tests/test_alpnet_episodes.py;
    read only)."""
    from dataloaders.prepare import prepare_dataset
    from dataloaders.superpixels import SuperpixelParams, make_superpixels
    prep = tmp_path_factory.mktemp("selfsup") / "prep"
    prepare_dataset(tiny_phantom / "SilverCorpus" / "Volumes", prep, "images-only", size=64,
                    intensity={"mode": "window", "window": [-125, 275]}, workers=1)
    make_superpixels(prep, SuperpixelParams(min_size=30), workers=1, progress=False)
    return prep


@pytest.fixture(scope="session")
def train_prep(tmp_path_factory) -> Path:
    """tests/test_episodes.make_train_prep's folder (4 training volumes, 2 validation volumes; read only)."""
    from test_episodes import make_train_prep
    return make_train_prep(tmp_path_factory.mktemp("train_prep"))


class RecordingRun:
    """The parts of a Sacred Run that training.loop.train uses: one observer's folder (with config.json as
    Sacred writes it), info and the logged scalars."""

    def __init__(self, run_dir: Path, config: dict):
        from types import SimpleNamespace
        run_dir.mkdir(parents=True)
        (run_dir / "config.json").write_text(json.dumps(config, default=str))
        self.observers, self.info, self.scalars = [SimpleNamespace(dir=str(run_dir))], {}, []

    def log_scalar(self, name, value, step):
        self.scalars.append((name, value, step))

    def logged(self, name: str) -> list:
        return [value for key, value, _ in self.scalars if key == name]


def train_in_process(run_dir: Path | None = None, **updates) -> tuple[dict, RecordingRun | None]:
    """training.loop.train on the `tiny` config plus `updates` (nested dicts merge), recorded in `run_dir`
    (None: no file is written): (its summary, the run)."""
    from config import default_config
    from training.loop import train
    config = resolve_config(**updates)
    run = RecordingRun(run_dir, config) if run_dir is not None else None
    return train(config, run, defaults=default_config()), run


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` skip without a CUDA GPU (tools/gpu_check.sh runs them with `pytest -m cuda`)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marker cuda)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
