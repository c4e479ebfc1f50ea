"""Evaluate snapshots beside mask copy on the fold's test organs (or eval.organs), volumetric protocol.

    python test.py with fold=0 'eval.snapshots={"LSLPN": "runs/train/1/best.pth"}'
    python test.py with demo fold=2 eval.preset=senet eval.support=all

Outputs in path.log_dir/test/<id>/: results.json / .csv, table.md, figures, predictions/ (docs/usage.md).
"""
from __future__ import annotations

import time
from pathlib import Path

# first: config.py silences Sacred's pkg_resources warning before Sacred loads
from config import differences_from_default, ex, run_sacred

# isort: split
from sacred.observers import FileStorageObserver

from evaluation.adaptation import test_time_head_options, test_time_model
from evaluation.evaluate import evaluate, own_split
from training.config_check import check_config
from util.device import autocast, resolve_device


@ex.config_hook
def attach_test_observer(config, command_name, logger):
    """Check the config once (before Sacred's own key checks: eval.snapshot is refused naming
    eval.snapshots), then store runs in path.log_dir/test."""
    ex.observers[:] = [o for o in ex.observers if not getattr(o, "lslpn_test", False)]
    if command_name == "evaluate_snapshots":
        check_config(config, "test")
        observer = FileStorageObserver(str(Path(config["path"]["log_dir"]) / "test"))
        observer.lslpn_test = True
        ex.observers.append(observer)
    return {}


@ex.main
def evaluate_snapshots(_config, _run, fold, label_sets, input_size, device, amp, path, eval):  # noqa: A002
    """Mask copy and every eval.snapshots entry (`amp`: under autocast). `eval` is captured so that Sacred
    accepts the new keys inside eval.snapshots."""
    settings = eval
    # the snapshot's input size unless the user set input_size (models.checkpoint.model_input warns)
    requested_size = input_size if "input_size" in _run.config_modifications.modified else None
    _run.info["differs_from_default"] = differences_from_default(_config)  # -> info.json
    own = own_split(path["data_dir"])   # an SSL-ALPNet folder: its own test organs, support and queries
    organs = settings.get("organs") or (own["organs"] if own else label_sets[fold])
    run_dirs = [o.dir for o in _run.observers if getattr(o, "dir", None)]
    out_dir = Path(run_dirs[0]) if run_dirs else Path(path["log_dir"]) / "test" / "unobserved"
    methods = {"mask copy": None, **dict(settings["snapshots"])}
    head_options = test_time_head_options(settings)

    def model_transform(model):   # LSLPN+ at test time (docs/lslpn_plus.md); identity by default
        return test_time_model(model, head_options, settings["adapt_steps"], settings["adapt_lr"])
    tic = time.perf_counter()
    with autocast(resolve_device(device), amp):
        results = evaluate(methods, organs, path["data_dir"], preset=settings["preset"], out_dir=out_dir,
                           split=settings["split"], support=settings["support"], n_shots=settings["n_shots"],
                           input_size=requested_size, device=device, batch_size=settings["batch_size"],
                           save_predictions=settings["save_predictions"], fold=fold, config=dict(_config),
                           model_transform=model_transform)
    _run.info["evaluate_seconds"] = time.perf_counter() - tic  # loading, mask copy and outputs included
    print((out_dir / "table.md").read_text())
    print(f"outputs: {out_dir}")
    return {method: row["mean"] for method, row in results["table"]["range"].items()}


if __name__ == "__main__":
    run_sacred(ex)
