"""The experiment runner: train a set-up with train.py unless a finished run of the same config exists.

A run counts when its last.pth reached n_steps and records the config digest (training.loop.config_hash)
that the same train.py arguments resolve to now. Steps run as the subprocesses a user would type.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from config import default_config, ex  # before sacred: config.py silences its import warning

# isort: split
from sacred.arg_parser import get_config_updates
from sacred.initialize import create_run
from sacred.utils import SacredError

from training.loop import config_hash, finished_snapshot, run_name
from util.errors import UserError
from util.io import write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
FAILED = ("step '{title}' failed (exit {code}): fix the message above and run it again; finished steps are "
          "reused")


def python_command(script: str, *args: str, python: str = sys.executable) -> list[str]:
    """The command line that runs one of the repository's entry points (a path from its root)."""
    return [python, str(ROOT / script), *args]


def run_step(title: str, command: list[str], log: list[dict] | None = None, failed: str = FAILED) -> None:
    """Run one command, its output streaming, shown and logged (`log`: step, command, seconds) as a shell
    line that runs when pasted; a failure is the one line `failed` (title, code)."""
    shown = shlex.join(["python", *(os.path.relpath(part, Path.cwd()) if part.startswith(str(ROOT)) else part
                                    for part in command[1:])])
    print(f"\n==> {title}\n$ {shown}", flush=True)
    start = time.perf_counter()
    code = subprocess.run(command).returncode
    if log is not None:
        log.append({"step": title, "command": shown,
                    "seconds": round(time.perf_counter() - start, 1)})
    if code != 0:
        raise UserError(failed.format(title=title, code=code))


def resolved_config(arguments: Sequence[str], what: str = "train.py settings") -> dict:
    """The config `train.py with <arguments>` runs with (nothing is run); a typo is one line."""
    updates, named = get_config_updates(list(arguments))
    try:
        return dict(create_run(ex, "print_config", config_updates=updates, named_configs=named).config)
    except (SacredError, KeyError) as error:
        found = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
        raise UserError(f"{what}: {found or type(error).__name__}: check the spelling against config.py "
                        f"(named configs: {', '.join(sorted(ex.named_configs))}; keys: python train.py "
                        "print_config)") from None


def _finished(config: dict, snapshot: str) -> Path | None:
    return finished_snapshot(config["path"]["log_dir"], run_name(config), int(config["n_steps"]), snapshot,
                             config_hash(config, default_config()))


def finished(arguments: Sequence[str], snapshot: str = "best.pth") -> Path | None:
    """`snapshot` of the newest finished run of `train.py with <arguments>` (the reuse rule), else None."""
    return _finished(resolved_config(arguments), snapshot)


def train_or_reuse(arguments: Sequence[str], *, snapshot: str = "best.pth", redo: bool = False,
                   title: str | None = None, log: list[dict] | None = None, failed: str = FAILED,
                   python: str = sys.executable) -> Path:
    """`snapshot` of a finished run of `train.py with <arguments>` (path.log_dir/<run name>), trained here
    first unless one exists: redo=True trains from step 0, else train.py resumes an unfinished run."""
    config = resolved_config(arguments)
    name = run_name(config)
    title = title or f"train {name}"
    found = None if redo else _finished(config, snapshot)
    if found is not None:
        print(f"==> {title}: reusing {found}", flush=True)
        return found
    run_step(title, python_command("train.py", "with", *arguments, *([] if redo else ["resume=True"]),
                                   python=python), log, failed)
    found = _finished(config, snapshot)
    if found is None:
        raise UserError(f"training {name} ended without {snapshot} at step {config['n_steps']} under "
                        f"{Path(config['path']['log_dir']) / name}: see its cout.txt")
    return found


def replace_between(path: Path, begin: str, end: str, body: str, append: bool = False) -> None:
    """Write `body` between the markers `begin` and `end` of `path` (atomic); absent markers: the block is
    appended when `append`, else one line asks to restore them."""
    text = path.read_text() if path.is_file() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + begin + body + end + rest.split(end, 1)[1]
    elif append:
        text = text.rstrip("\n") + "\n\n" + begin + body + end + "\n"
    else:
        raise UserError(f"{path} has no {begin} ... {end} block: restore the markers")
    write_text_atomic(text, path)
