"""Run folders of train.py: their names, the config digest that identifies a run, and every lookup.

A run is a Sacred FileStorageObserver folder `log_dir/<name>/<id>/` (id 1, 2, ... in start order)
holding config.json, run.json, metrics.json, info.json, cout.txt and the checkpoints last.pth /
best.pth. This module is the repository's one walker of those folders:

  iter_runs(log_dir, name=None)          run folders, oldest first (name None: every name under log_dir)
  latest_run(log_dir, name, accept=None) the newest run folder (that `accept` takes)
  finished_snapshot(log_dir, name, n_steps, snapshot="best.pth", wanted_hash=None)
                                         snapshot of the newest run whose last.pth reached n_steps
  read_run_config(run_dir)               the run's config.json (None when absent or unreadable)
  find_resume_checkpoint / unreadable_resume_error / config_mismatch   what resume=True continues

"Same config" (resume, reuse of finished runs): `config_hash`, the SHA-256 of the keys whose values
differ from the default config, without the keys that leave the trained weights' trajectory unchanged
(HASH_EXCLUDED): resume, n_steps (so a run can be extended), the save / validation / print frequencies,
num_workers, device, eval.* and path.log_dir. Any other difference means another run: resume=True then
starts a new run at step 0 and says which keys differ from the latest run found (`config_mismatch`).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Callable, Iterator, Mapping

from models.checkpoint import load_checkpoint
from util.errors import UserError

HASH_EXCLUDED = ("resume", "n_steps", "save_every", "val_every", "print_every", "num_workers", "device",
                 "eval", "path.log_dir")
ABSENT = "(absent)"
RUN_ID = re.compile(r"[0-9]+")
SHOWN_DIFFERENCES = 6   # a mismatch line names at most this many keys (then "and N more")


def run_name(config: Mapping) -> str:
    """Folder under path.log_dir that holds this set-up's Sacred runs, e.g. 'lslpn_six_organs_fold0'."""
    if config.get("name"):
        return str(config["name"])
    if config["model"].get("method") == "senet":
        method = "senet"
    else:
        method = "panet" if config["model"]["n_grid"] == 1 else "lslpn"
    if config.get("episodes") == "superpixels":  # no organ is seen: one run serves every fold
        return f"{method}_selfsup"
    return f"{method}_{config['class_setting']}_fold{config['fold']}"


def trajectory_config(config: Mapping, defaults: Mapping) -> dict:
    """{'a.b': value} of the keys whose values differ from `defaults` (the default config), without the
    HASH_EXCLUDED keys: what identifies a run's trained weights."""
    default = _flatten(_plain(defaults))
    return {key: value for key, value in _flatten(_plain(config)).items()
            if value != default.get(key, ABSENT) and not any(key == excluded or key.startswith(excluded + ".")
                                                            for excluded in HASH_EXCLUDED)}


def config_hash(config: Mapping, defaults: Mapping) -> str:
    """SHA-256 (16 hex digits) of `trajectory_config`."""
    blob = json.dumps(trajectory_config(config, defaults), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------- the walker
def iter_runs(log_dir: str | Path, name: str | None = None) -> Iterator[Path]:
    """Run folders `log_dir/<name>/<id>/`, oldest (lowest id) first; name None walks every name in
    alphabetical order. Missing folders yield nothing; entries that are not numbered folders are skipped."""
    root = Path(log_dir)
    names = [name] if name is not None else sorted(p.name for p in _subfolders(root))
    for run_set in names:
        runs = [p for p in _subfolders(root / run_set) if RUN_ID.fullmatch(p.name)]
        yield from sorted(runs, key=lambda p: int(p.name))


def _subfolders(folder: Path) -> list[Path]:
    try:
        return [p for p in folder.iterdir() if p.is_dir()]
    except OSError:   # absent or unreadable: no runs there
        return []


def latest_run(log_dir: str | Path, name: str, accept: Callable[[Path], bool] | None = None) -> Path | None:
    """The newest run folder of log_dir/name for which `accept(run_dir)` is true (any when None)."""
    for run_dir in reversed(list(iter_runs(log_dir, name))):
        if accept is None or accept(run_dir):
            return run_dir
    return None


def read_run_config(run_dir: str | Path) -> dict | None:
    """The run's config.json, or None when it is absent or unreadable."""
    try:
        with open(Path(run_dir) / "config.json") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def finished_snapshot(log_dir: str | Path, name: str, n_steps: int, snapshot: str = "best.pth",
                      wanted_hash: str | None = None) -> Path | None:
    """`snapshot` of the newest run of log_dir/name whose last.pth reached n_steps, else None.

    With `wanted_hash`, only a run whose last.pth records that config_hash counts: a run left by an
    older config (other milestones, model options, data) is not reused.
    """
    def finished(run_dir: Path) -> bool:
        if not ((run_dir / "last.pth").is_file() and (run_dir / snapshot).is_file()):
            return False
        state = load_checkpoint(str(run_dir / "last.pth"))
        if wanted_hash is not None and state.get("config_hash") != wanted_hash:
            return False
        return int(state["step"]) >= n_steps

    found = latest_run(log_dir, name, finished)
    return None if found is None else found / snapshot


# ------------------------------------------------------------------------------- resume
def find_resume_checkpoint(log_dir: str, name: str, wanted_hash: str, defaults: Mapping,
                           skip: tuple[str, ...] = ()) -> str | None:
    """last.pth of the latest (highest Sacred id) run under log_dir/name whose config hashes the same
    (runs whose last.pth is in `skip` are passed over)."""
    def same_config(run_dir: Path) -> bool:
        path = os.path.join(str(run_dir), "last.pth")
        config = read_run_config(run_dir)
        return (os.path.isfile(path) and path not in skip and config is not None
                and config_hash(config, defaults) == wanted_hash)

    found = latest_run(log_dir, name, same_config)
    return None if found is None else os.path.join(str(found), "last.pth")


def unreadable_resume_error(path: str, log_dir: str, name: str, wanted_hash: str,
                            defaults: Mapping) -> UserError:
    """The one-line error for a resume from an unreadable (e.g. truncated) last.pth, with the way out."""
    earlier = find_resume_checkpoint(log_dir, name, wanted_hash, defaults, skip=(path,))
    step = None
    if earlier is not None:
        try:
            step = int(load_checkpoint(earlier)["step"])
        except UserError:
            earlier = None
    moved = f"{path}.unreadable"
    if earlier is not None:
        how = (f"move it aside (mv {path} {moved}) and run again with resume=True: it then continues the "
               f"earlier run {earlier} at step {step}")
    else:
        how = (f"no earlier readable last.pth of this config exists; move it aside (mv {path} {moved}) and "
               "run again with resume=False to start fresh")
    return UserError(f"resume: {path} is unreadable (truncated or corrupt): {how}")


def trajectory_differences(stored: Mapping, requested: Mapping, defaults: Mapping) -> list[str]:
    """'key: stored -> requested' (dotted keys) for the trajectory keys whose values differ (a key a
    config lacks has its default value)."""
    old, new = trajectory_config(stored, defaults), trajectory_config(requested, defaults)
    default = _flatten(_plain(defaults))

    def value(flat: dict, key: str):
        return flat.get(key, default.get(key, ABSENT))

    return [f"{key}: {_short(value(old, key))} -> {_short(value(new, key))}"
            for key in sorted(set(old) | set(new)) if value(old, key) != value(new, key)]


def config_mismatch(config: Mapping, log_dir: str, name: str, defaults: Mapping) -> str | None:
    """For resume=True when no run of this config exists: the one line that names the newest run with a
    last.pth under log_dir/name, the keys whose values differ, and that a new run starts; None when
    there is no such run."""
    def resumable(run_dir: Path) -> bool:
        return (run_dir / "last.pth").is_file() and read_run_config(run_dir) is not None

    found = latest_run(log_dir, name, resumable)
    if found is None:
        return None
    differences = trajectory_differences(read_run_config(found), config, defaults)
    shown = "; ".join(differences[:SHOWN_DIFFERENCES])
    if len(differences) > SHOWN_DIFFERENCES:
        shown += f"; and {len(differences) - SHOWN_DIFFERENCES} more"
    return (f"resume: the config differs from the latest run {found} ({shown or 'another config digest'}): "
            "starting a new run at step 0 (set those options back to continue that run)")


def _flatten(node: Mapping, prefix: str = "") -> dict:
    """{'a.b': value} for the leaves of nested dicts (lists are leaves)."""
    flat = {}
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _plain(config: Mapping) -> dict:
    """The config as plain JSON values (a deep copy)."""
    return json.loads(json.dumps(dict(config), default=str))


def _short(value, limit: int = 40) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit - 3] + "..."
