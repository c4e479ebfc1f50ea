"""The volumetric protocol over organs x query volumes x methods of a prepared split (docs/DESIGN.md):
`evaluate` writes results.json / .csv, table.md, figures and NIfTI predictions; `validate` is the same
protocol on the held-out split during training, returning the mean Dice."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dataloaders.nifti import save_nifti_atomic, to_original
from dataloaders.organs import FOLD_ORGANS, canonical_name, organ_index
from dataloaders.prepared import check_volumes, default_support, list_volumes, load_volume, read_meta
from evaluation.figures import make_figures
from evaluation.inference import run_chunks
from evaluation.protocols import (
    aggregate,
    chunk_plan,
    dice,
    get_preset,
    mask_copy,
    preset_range,
    support_slices_for_query,
)
from evaluation.results import write_outputs
from models.checkpoint import DEFAULT_INPUT_SIZE, model_from_checkpoint, model_input, trained_input
from util.cli import warn
from util.device import resolve_device
from util.errors import UserError
from util.io import atomic_path


# ----------------------------------------------------------------------------------------- data
def choose_supports(pids: list[str], support: str | int | list) -> list[str]:
    """Support ids: a given id, 'default' (10000132 when present, else the first), or 'all'."""
    if isinstance(support, (list, tuple)):
        return [str(item) for item in support]
    if str(support) == "all":
        return list(pids)
    return [default_support(pids)] if str(support) == "default" else [str(support)]


def own_split(prep_dir: str | Path) -> dict | None:
    """An SSL-ALPNet-prepared folder's support scan, test scans and test organs; None for other folders."""
    meta = read_meta(prep_dir).get("alpnet")
    if meta is None:
        return None
    return {"support": meta["support"], "queries": list(meta["test"]), "organs": list(meta["test_organs"])}


def organ_names(organs: list[str]) -> list[str]:
    """Canonical organ names (clear error for unknown ones), order kept."""
    return [canonical_name(name) for name in organs if organ_index(name)]


# -------------------------------------------------------------------------------------- methods
def load_snapshot(path: str | Path, device: str | torch.device = "cpu", input_size: int | None = None,
                  intensity: dict | None = None) -> tuple[torch.nn.Module, dict]:
    """(model in eval mode, info) of a checkpoint. info['input']: the input size and intensity it is run
    with (models.checkpoint.model_input); info['input_size'] / ['intensity']: its training's."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"snapshot {path} does not exist: pass the best.pth or last.pth of a training run")
    model, state = model_from_checkpoint(str(path), resolve_device(device))
    trained_size, trained_intensity = trained_input(state)
    # the data's intensity is a fallback here, not an override: a snapshot trained otherwise is refused
    # by check_intensity with one line (no warning first)
    run_size, run_intensity = model_input(state, input_size, None, intensity, name=f"snapshot {path}")
    fold = state.get("fold")
    fold_sets = (state.get("run_config") or {}).get("label_sets", FOLD_ORGANS)   # the run's test organs
    own = list(fold_sets[fold]) if isinstance(fold, int) and fold in range(len(fold_sets)) else None
    info = {"snapshot": str(path), "snapshot_fold": fold, "model_config": dict(state["model_config"]),
            "snapshot_organs": own, "step": state.get("step"), "input_size": trained_size,
            "intensity": trained_intensity, "input": {"input_size": run_size, "intensity": run_intensity}}
    return model, info


def check_intensity(prepared: dict, intensity: dict) -> None:
    """A snapshot must see slices scaled as in its training (checkpoints record meta.json's intensity)."""
    for name, per_organ in prepared.items():
        for _, info in per_organ.values():
            trained = info.get("intensity")
            if trained is not None and trained != intensity:
                raise UserError(f"snapshot {info['snapshot']} ({name}) was trained on slices scaled "
                                f"{trained} but the prepared data uses {intensity}: evaluate on data "
                                "prepared the same way (scripts/prepare_visceral.py --window / default "
                                "min-max)")


def prepare_method(spec, organs: list[str], device, input_size: int | None = None,
                   intensity: dict | None = None) -> dict[str, tuple[Any, dict]]:
    """organ -> (model or None for mask copy, info). spec: None, a path, a module, or {organ: spec};
    input_size, intensity: what the evaluation runs snapshots with (see `load_snapshot`)."""
    if isinstance(spec, dict):
        unknown = [organ for organ in organs if canonical_name(organ) not in
                   {canonical_name(key) for key in spec}]
        if unknown:
            raise UserError(f"method snapshots given per organ lack {', '.join(unknown)}: add them")
        by_name = {canonical_name(key): value for key, value in spec.items()}
        return {organ: prepare_method(by_name[organ], [organ], device, input_size, intensity)[organ]
                for organ in organs}
    if spec is None:
        entry = (None, {"snapshot": None})
    elif isinstance(spec, torch.nn.Module):
        entry = (spec, {"snapshot": "<in memory>"})
    else:   # a snapshot may only be tested on its own fold's organs (others were training classes)
        entry = load_snapshot(spec, device, input_size, intensity)
        fold, own = entry[1]["snapshot_fold"], entry[1]["snapshot_organs"]
        leaked = [organ for organ in organs if own is not None and organ not in own]
        if leaked:
            raise UserError(f"snapshot {entry[1]['snapshot']} was trained for fold {fold} and may have seen "
                            f"{', '.join(leaked)} in training: evaluate it with fold={fold} "
                            f"({', '.join(own)}) or pass that organ's fold snapshot")
    return {organ: entry for organ in organs}


# ------------------------------------------------------------------------------------ protocol
def run_protocol(methods: dict[str, dict], organs: list[str], prep_dir, split: str, supports: list[str],
                 preset, input_size: int, device, batch_size: int, n_shots: int, intensity: dict,
                 on_prediction=None, progress: bool = False, queries: list[str] | None = None) -> list[dict]:
    """Records {method, organ, support, query, dice_range, dice_volume, ranges, skipped} of every case.
    methods: name -> organ -> (model or None, info); on_prediction(record, support, query, prediction) is
    called for every scored prediction; queries: the query ids (None: the split's volumes but the support)."""
    pids = list_volumes(prep_dir, split) if queries is None else list(queries)
    records = []
    cases = [(sid, qid) for sid in supports for qid in pids if qid != sid]
    if not cases:
        raise UserError(f"split '{split}' has only the support volume {supports[0]}: "
                        "it needs at least two volumes (one support, one query)")
    check_volumes(prep_dir, split, sorted({pid for case in cases for pid in case}))
    bar = tqdm(total=len(cases) * len(organs) * len(methods), desc=f"evaluate ({preset.name})",
               disable=not progress, leave=False)
    support = None
    for sid, qid in cases:
        if support is None or support["pid"] != sid:
            support = load_volume(prep_dir, split, sid)
        query = load_volume(prep_dir, split, qid)
        for organ in organs:
            label = organ_index(organ)
            support_range = preset_range(support["label"] == label, preset)
            query_range = preset_range(query["label"] == label, preset, role="query")
            reason = None
            if support_range is None:
                reason = f"{organ} absent from support {sid} (no slice with > {preset.threshold} voxels)"
            elif query_range is None:
                reason = f"{organ} absent from query {qid} (no slice with > {preset.threshold} voxels)"
            for name, per_organ in methods.items():
                bar.update(1)
                record = {"method": name, "organ": organ, "support": sid, "query": qid,
                          "preset": preset.name, "support_range": support_range,
                          "query_range": query_range, "dice_range": None, "dice_volume": None,
                          "skipped": reason}
                records.append(record)
                if reason is not None:
                    continue
                model, info = per_organ[organ]
                run = info.get("input", {"input_size": input_size or DEFAULT_INPUT_SIZE,
                                         "intensity": intensity})
                support_mask = support["label"] == label
                if model is None:
                    prediction = mask_copy(support_mask, support_range, query["label"].shape, query_range,
                                           preset.n_chunks, preset.rule)
                else:
                    plan = chunk_plan(support_range, query_range, preset.n_chunks, n_shots, preset.rule,
                                      support_mask)
                    prediction = run_chunks(model, [(support["image"], support_mask)] * n_shots, plan,
                                            query["image"], run["input_size"], run["intensity"], device,
                                            batch_size)
                target = query["label"] == label
                lo, hi = query_range
                record["dice_range"] = dice(prediction[:, :, lo:hi + 1], target[:, :, lo:hi + 1],
                                            preset.dice_smooth, preset.dice_eps)
                record["dice_volume"] = dice(prediction, target)
                record["empty"] = not prediction.any()
                if on_prediction is not None:
                    on_prediction(record, support, query, prediction)
    bar.close()
    return records


# --------------------------------------------------------------------------------- validation
def validate(model: torch.nn.Module, prep_dir: str | Path, split: str = "val", organs: list | None = None,
             preset: str = "inclusive", input_size: int = 512, device="cpu", batch_size: int = 16,
             n_shots: int = 1) -> dict:
    """{'mean_dice', 'per_organ', 'preset'} of `model` on a prepared split, for model selection: support
    the split's first volume ('gold': 10000132 when present), queries the others; mean over organs of the
    preset's aggregate of range Dice, NaN organs left out. Mode restored after."""
    organs = organ_names(organs)
    protocol = get_preset(preset)
    intensity = read_meta(prep_dir)["intensity"]
    volumes = list_volumes(prep_dir, split)
    supports = [default_support(volumes)] if split == "gold" and volumes else volumes[:1]
    was_training = model.training
    model.eval()
    try:
        records = run_protocol({"model": {organ: (model, {}) for organ in organs}}, organs, prep_dir, split,
                               supports, protocol, input_size, resolve_device(device), batch_size, n_shots,
                               intensity)
    finally:
        model.train(was_training)
    per_organ = {}
    for organ in organs:
        values = [r["dice_range"] for r in records if r["organ"] == organ and r["dice_range"] is not None]
        per_organ[organ] = aggregate(values, protocol.aggregate)
    finite = [value for value in per_organ.values() if np.isfinite(value)]
    mean = float(np.mean(finite)) if finite else float("nan")
    return {"mean_dice": mean, "per_organ": per_organ, "preset": protocol.name}


# ---------------------------------------------------------------------------------- evaluation
def _slug(name: str) -> str:
    """A file-system friendly form of a method name ('PANet global' -> 'panet_global')."""
    return "".join(ch if ch.isalnum() else "_" for ch in name.strip().lower()).strip("_") or "method"


def save_prediction(folder: Path, record: dict, query: dict, prediction: np.ndarray) -> None:
    """One prediction as <folder>/<query>_<organ>.nii.gz in the query's original geometry."""
    for key in ("original_affine", "original_axcodes"):
        if key not in query:
            raise UserError(f"prepared volume {query['pid']} lacks '{key}': re-run "
                            "scripts/prepare_visceral.py, or set eval.save_predictions=False")
    folder.mkdir(parents=True, exist_ok=True)
    axcodes, labels = str(query["original_axcodes"]), prediction.astype(np.uint8)
    # 'as stored': an SSL-ALPNet-layout volume, held in SSL-ALPNet's Y x X x Z transpose of the file's
    # array: transposed back, it lies on the file's grid again
    array = labels.transpose(1, 0, 2) if axcodes == "as stored" else to_original(labels, axcodes)
    save_nifti_atomic(array, query["original_affine"], folder / f"{record['query']}_{record['organ']}.nii.gz")


def keep_slice(figure: dict, record: dict, support: dict, query: dict, prediction: np.ndarray) -> None:
    """For results.png: the middle query slice of each organ's first scored (support, query) pair."""
    organ, label = record["organ"], organ_index(record["organ"])
    entry = figure.get(organ)
    if entry is None:
        lo, hi = record["query_range"]
        z = (lo + hi) // 2
        preset = get_preset(record["preset"])
        sources = support_slices_for_query(record["support_range"], record["query_range"], preset.n_chunks,
                                           preset.rule, support["label"] == label)
        support_z = int(sources[z - lo])
        entry = figure[organ] = {
            "support": record["support"], "query": record["query"], "query_z": z, "support_z": support_z,
            "support_image": support["image"][:, :, support_z],
            "support_mask": support["label"][:, :, support_z] == label,
            "query_image": query["image"][:, :, z], "query_mask": query["label"][:, :, z] == label,
            "predictions": {}}
    if (record["support"], record["query"]) == (entry["support"], entry["query"]):
        entry["predictions"][record["method"]] = prediction[:, :, entry["query_z"]]


def warn_empty_predictions(records: list[dict]) -> None:
    """One warning line per method and organ whose prediction came out empty on some query volume."""
    empty: dict[tuple[str, str], list[str]] = {}
    scored: dict[tuple[str, str], int] = {}
    for record in records:
        if record["skipped"] is None and record["method"] != "mask copy":
            key = (record["method"], record["organ"])
            scored[key] = scored.get(key, 0) + 1
            if record.get("empty"):
                empty.setdefault(key, []).append(str(record["query"]))
    for (method, organ), queries in empty.items():
        warn(f"{method} predicted no {organ} voxel in {len(queries)} of {scored[(method, organ)]} "
             f"query volumes ({', '.join(sorted(set(queries))[:4])}): Dice 0 there; "
             "check the snapshot's fold and input")


def evaluate(methods: dict, organs: list[str], prep_dir: str | Path, preset: str = "inclusive",
             out_dir: str | Path | None = None, split: str = "gold", support="default", n_shots: int = 1,
             input_size: int | None = None, device="auto", batch_size: int = 16, save_predictions=True,
             fold: int | None = None, config: dict | None = None, progress: bool = True, figures: bool = True,
             model_transform=None, queries: list[str] | None = None, on_prediction=None) -> dict:
    """Run the protocol for every method (name -> None for mask copy, a snapshot path, a model, or {organ:
    either}) and organ; returns results.json's content, written with table.md, figures and predictions
    under out_dir when given. support: an id, 'default' (10000132, else the first) or 'all'; an SSL-ALPNet
    folder uses its own split (`own_split`). n_shots: k slices per chunk for models (mask copy: 1);
    model_transform: applied to every loaded model; on_prediction(record, support, query, prediction)."""
    if not methods:
        raise UserError("evaluate: no methods given: pass e.g. "
                        "{'mask copy': None, 'LSLPN': 'runs/.../best.pth'}")
    organs = organ_names(organs)
    protocol = get_preset(preset)
    intensity = read_meta(prep_dir)["intensity"]
    pids = list_volumes(prep_dir, split)
    own = own_split(prep_dir) if split == "gold" else None
    if own is not None:
        foreign = [organ for organ in organs if organ not in own["organs"]]
        if foreign:
            raise UserError(f"{', '.join(foreign)} is not a test organ of the SSL-ALPNet folder {prep_dir} "
                            f"(it may be in its training slices): evaluate {', '.join(own['organs'])}")
        support = own["support"] if str(support) == "default" else support
        queries = own["queries"] if queries is None else queries
    supports = choose_supports(pids, support)
    device = resolve_device(device)
    prepared = {name: prepare_method(spec, organs, device, input_size, intensity)
                for name, spec in methods.items()}
    if model_transform is not None:   # e.g. LSLPN+ test-time options (evaluation/adaptation.test_time_model)
        prepared = {name: {organ: (model if model is None else model_transform(model), info)
                           for organ, (model, info) in per_organ.items()}
                    for name, per_organ in prepared.items()}
    check_intensity(prepared, intensity)
    out = Path(out_dir) if out_dir is not None else None
    figure: dict[str, dict] = {}

    def collect(record: dict, support: dict, query: dict, prediction: np.ndarray) -> None:
        if save_predictions and out is not None:
            folder = out / "predictions" / _slug(record["method"])
            save_prediction(folder / f"support_{record['support']}" if len(supports) > 1 else folder, record,
                            query, prediction)
        keep_slice(figure, record, support, query, prediction)
        if on_prediction is not None:
            on_prediction(record, support, query, prediction)

    records = run_protocol(prepared, organs, prep_dir, split, supports, protocol, input_size, device,
                           batch_size, n_shots, intensity, collect, progress, queries)
    warn_empty_predictions(records)
    header = {"fold": fold, "split": split, "supports": supports, "n_shots": n_shots, "organs": organs,
              "input_size": input_size, "prep_dir": str(prep_dir),
              "methods": {name: {organ: info for organ, (_, info) in per_organ.items()}
                          for name, per_organ in prepared.items()},
              "config": config or {}}
    results = write_outputs(out, records, protocol, header)
    if out is None:
        return results
    save_figure_data(figure, out / "figure_data.npz")
    if figures:
        make_figures(out)
    return results


def save_figure_data(figure: dict[str, dict], path: Path) -> None:
    """Slices kept for results.png as one npz ('<organ>|<field>' keys), written atomically."""
    arrays = {}
    for organ, entry in figure.items():
        for key, value in entry.items():
            if key == "predictions":
                for method, mask in value.items():
                    arrays[f"{organ}|prediction|{method}"] = mask
            else:
                arrays[f"{organ}|{key}"] = np.asarray(value)
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:   # a handle: no '.npz' appended
        np.savez_compressed(handle, **arrays)
