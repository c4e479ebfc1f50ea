"""Checkpoints (keys: docs/DESIGN.md): atomic save, weights-only load with one-line errors (the authors' raw
state dict loads as an official-code snapshot; NaN/inf refused), model_from_checkpoint, model_input."""
from __future__ import annotations

import functools
import io
from collections import Counter, OrderedDict
from typing import Mapping

import numpy as np
import torch

from models.encoders import ResNet50LSLPN, load_official_snapshot
from models.fewshot import METHOD_NAMES, OFFICIAL_MODEL_CONFIG, build_model, check_model_config, method_of
from util.cli import warn
from util.errors import UserError
from util.io import atomic_path, safe_torch_load

DEFAULT_INPUT_SIZE = 512                  # the paper's input size (official-code snapshots, or unrecorded)
DEFAULT_INTENSITY = {"mode": "minmax"}    # the official per-slice min-max scaling, likewise
MIN_INPUT_SIZE, MAX_INPUT_SIZE = 16, 2048  # model input sizes accepted (2048^2 slices: ~16 MB per image)


def plain_data(value):
    """`value` as a weights-only load reads it back: numpy values as lists/numbers, mappings and sequences
    as dict/list/tuple (tensors, Counter and OrderedDict kept)."""
    if isinstance(value, (torch.Tensor, Counter, OrderedDict)):
        return value
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    if isinstance(value, Mapping):
        return {key: plain_data(item) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return (tuple if isinstance(value, tuple) else list)(plain_data(item) for item in value)
    return value


def save_checkpoint(path: str, state: Mapping) -> None:
    """Write `state` to `path` atomically as plain data. Serialised in memory first: a full disk is then
    a plain OSError (one line at the entry points), not torch's opaque RuntimeError."""
    buffer = io.BytesIO()
    torch.save(plain_data(state), buffer)
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as handle:
            handle.write(buffer.getbuffer())


@functools.lru_cache(maxsize=1)
def _official_encoder_keys() -> frozenset:
    """encoder.* parameter keys of the authors' resnet50_lslpn (built on the meta device: no memory)."""
    with torch.device("meta"):
        keys = ResNet50LSLPN().state_dict()
    return frozenset(f"encoder.{key}" for key in keys if not key.endswith("num_batches_tracked"))


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict:
    """A checkpoint written by `save_checkpoint` (or an official-code snapshot); one-line errors."""
    path = str(path)
    state = safe_torch_load(path, map_location)
    if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        keys = {k.removeprefix("module.") for k in state}    # the official code saved DataParallel's keys
        official = _official_encoder_keys()
        if not (all(k.startswith("encoder.") for k in keys) and len(official & keys) >= len(official) // 2):
            raise UserError(f"checkpoint '{path}' is a bare state dict of {len(keys)} tensor(s) (keys "
                            f"{', '.join(sorted(keys)[:3])}, ...): not a train.py checkpoint (a dict with "
                            "'model' and 'model_config'), and not an official-code snapshot (every key of "
                            "the authors' resnet50_lslpn network, encoder.conv1.weight ... "
                            "encoder.layer4.0.weight): pass best.pth/last.pth of train.py, or load the "
                            "weights with path.init_path")
        state = {"model": {k.removeprefix("module."): v for k, v in state.items()},
                 "model_config": dict(OFFICIAL_MODEL_CONFIG), "official_snapshot": True,
                 "input_size": DEFAULT_INPUT_SIZE, "intensity": dict(DEFAULT_INTENSITY)}
    if not (isinstance(state, dict) and isinstance(state.get("model"), Mapping)
            and isinstance(state.get("model_config"), Mapping)):
        found = ", ".join(sorted(map(str, state))[:6]) if isinstance(state, dict) else type(state).__name__
        raise UserError(f"checkpoint '{path}' is not a train.py checkpoint (no model/model_config dicts; "
                        f"found {found or 'nothing'}): pass best.pth/last.pth of train.py")
    bad = [key for key, value in state["model"].items() if isinstance(value, torch.Tensor)
           and value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if bad:
        raise UserError(f"checkpoint '{path}': {len(bad)} weight tensors hold NaN/inf (e.g. {bad[0]}): the "
                        "training diverged; use an earlier snapshot (best.pth) or retrain with a lower lr")
    trained_input(state, path)                                  # a malformed input_size record: one line
    return state


def check_input_size(size, what: str) -> int | None:
    """`size` as an int when it is a whole number in MIN_INPUT_SIZE..MAX_INPUT_SIZE; None stays None."""
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, (int, float, np.integer, np.floating)) \
            or not np.isfinite(float(size)) or float(size) != int(size) \
            or not MIN_INPUT_SIZE <= int(size) <= MAX_INPUT_SIZE:
        raise UserError(f"{what} {size!r} is not a whole number in {MIN_INPUT_SIZE}..{MAX_INPUT_SIZE}: "
                        f"use a slice size such as 128, 256 or 512")
    return int(size)


def check_compatible(stored: Mapping, requested: Mapping, path: str) -> None:
    """UserError when a snapshot's model config does not match the requested one."""
    held, wanted = method_of(stored), method_of(requested)
    if held != wanted:
        name = METHOD_NAMES.get(wanted, wanted)
        raise UserError(f"snapshot '{path}' holds a {METHOD_NAMES.get(held, repr(held))} model, but a {name} "
                        f"model is requested: use a {name} snapshot or model.method={held}")
    diffs = [f"{key}: {stored.get(key)!r} in the snapshot vs {requested.get(key)!r} requested"
             for key in sorted(set(stored) | set(requested)) if stored.get(key) != requested.get(key)]
    if diffs:
        raise UserError(f"snapshot '{path}' was trained with another model config ({'; '.join(diffs)}): "
                        "use a matching snapshot or set model.* to the snapshot's values")


def model_from_checkpoint(path: str, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """(model in eval mode on `device`, checkpoint) from a train.py checkpoint; one-line errors."""
    state = load_checkpoint(str(path))
    config = dict(state["model_config"])
    check_model_config(config, source=f"snapshot {path}")   # the config schema: the model trusts its options
    try:
        model = build_model(config, None)
        if state.get("official_snapshot"):
            load_official_snapshot(model.encoder, state["model"], f"checkpoint {path} (official-code "
                                   "snapshot)")
        else:
            model.load_state_dict(state["model"])
    except (RuntimeError, KeyError, TypeError, ValueError) as error:
        first = " ".join(str(error).split())[:160]
        raise UserError(f"checkpoint {path} does not fit its model config (encoder "
                        f"'{config.get('encoder')}'; {first}): it is from another encoder or code version; "
                        "pass a checkpoint written by this project's train.py") from None
    return model.to(device).eval(), state


def trained_input(state: Mapping, name: str = "snapshot") -> tuple[int | None, dict | None]:
    """(input size, intensity) a snapshot records; None where it does not say."""
    return check_input_size(state.get("input_size"), f"{name}: recorded input_size"), state.get("intensity")


def model_input(state: Mapping, input_size: int | None = None, intensity: dict | None = None,
                fallback_intensity: dict | None = None, name: str = "snapshot") -> tuple[int, dict]:
    """(input size, intensity) to run a snapshot with: the caller's, else its record (else
    `fallback_intensity`, 512, per-slice min-max); a warning when the caller overrides the record."""
    trained_size, trained_intensity = trained_input(state, name)
    input_size = check_input_size(input_size, "input size")
    if input_size and trained_size and int(input_size) != trained_size:
        _warn_once(f"{name}: trained at input size {trained_size}, run at {int(input_size)} as requested "
                   f"(leave the size out to use {trained_size})")
    if intensity and trained_intensity and dict(intensity) != dict(trained_intensity):
        _warn_once(f"{name}: trained on slices scaled {trained_intensity}, run with {intensity} as requested "
                   "(leave the intensity out to use the snapshot's)")
    size = input_size or trained_size or DEFAULT_INPUT_SIZE
    scaling = intensity or trained_intensity or fallback_intensity or dict(DEFAULT_INTENSITY)
    return int(size), scaling


_warn_once = functools.lru_cache(maxsize=None)(warn)   # one line per message (a snapshot is loaded per organ)
