"""Train a few-shot segmentation model on one fold into path.log_dir/<name>/<id>/ (training/loop.py).

    python train.py with demo fold=2
    python train.py with paper fold=0 resume=True            # continue the latest run of this config
    torchrun --nproc_per_node=2 train.py with paper fold=0  # DistributedDataParallel, one GPU per rank
"""
from __future__ import annotations

import importlib.metadata
import os

# first: config.py silences Sacred's pkg_resources warning before Sacred loads
from config import default_config, differences_from_default, ex, run_sacred

# isort: split
from sacred.observers import FileStorageObserver
from sacred.utils import apply_backspaces_and_linefeeds

from training.config_check import check_config
from training.loop import run_name, train

ex.captured_out_filter = apply_backspaces_and_linefeeds  # tqdm redraws collapse to their last state
for _package in ("torch", "torchvision", "numpy", "scipy", "nibabel", "tqdm"):  # versions into run.json
    try:
        ex.add_package_dependency(_package, importlib.metadata.version(_package))
    except importlib.metadata.PackageNotFoundError:
        pass


@ex.config_hook
def check_and_observe(config, command_name, logger):
    """Training only: check the resolved config once, then attach the run folder's observer (rank 0)."""
    ex.observers[:] = [o for o in ex.observers if not getattr(o, "lslpn_train", False)]
    if command_name != "main":  # print_config etc.: nothing to check, nothing to record
        return {}
    check_config(config, "train")
    if int(os.environ.get("RANK", 0)) == 0:
        observer = FileStorageObserver(os.path.join(config["path"]["log_dir"], run_name(config)))
        observer.lslpn_train = True
        ex.observers.append(observer)
    return {}


@ex.main
def main(_config, _run):
    """Train one fold; returns the summary (steps, best validation Dice, seconds per step, ...)."""
    _run.info["differs_from_default"] = differences_from_default(_config)  # -> info.json
    if _run.observers:   # rank 0 (Sacred logs no 'Started run' line: config.install_log_filters)
        print(f"run folder {_run.observers[0].dir}", flush=True)
    return train(_config, _run, defaults=default_config(), checked=True)   # checked by check_and_observe


if __name__ == "__main__":
    run_sacred(ex)
