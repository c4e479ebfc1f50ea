"""Checkpoints: atomic save, load with clear errors, and a compatibility check of model configs.

A training checkpoint is a dict (docs/DESIGN.md):
  model        the model's state_dict
  optimizer    SGD state_dict (momentum buffers)
  scheduler    MultiStepLR state_dict
  scaler       GradScaler state_dict or None (fp16 AMP only)
  step         number of optimisation steps done
  rng          list of `util.device.get_rng_state()` snapshots, one per DDP rank
  model_config the model's config dict (`FewShotSegNet.config` or `SENet.config`, whose
               'method' is 'senet'): rebuilds the network (models/factory.py). Snapshots written
               before the rename call it `config`; `load_checkpoint` accepts both and returns both
               names (`config` is kept as an alias for older callers)
  fold, seed   the fold trained on and the run's seed
  config_hash  hash of the resolved run config that identifies the run for resume
  run_config   the whole resolved Sacred config (for reference)
  best_dice    best validation mean Dice so far (None before any validation)
  input_size   the slice size the model was trained on
  intensity    meta.json's intensity scaling of its training slices
A snapshot describes itself: `model_from_checkpoint` rebuilds the network from `config`, and
`model_input` answers with which input size and intensity scaling it is run. Snapshots written
before input_size/intensity were recorded still load (their run_config gives the size; the
intensity is then unknown and the caller's fallback applies).

Loading never runs code from the file: every `torch.load` of the project goes through
`safe_torch_load` (weights_only=True: tensors, containers, numbers, strings; plus exactly the numpy
types of an RNG state of snapshots written before `save_checkpoint` stored it as plain lists). A file
that holds any other pickled object (a class, a function call) is refused in one line before anything
of it runs. A checkpoint whose weights hold NaN/inf is refused too (it would segment nothing).
"""
from __future__ import annotations

import functools
import io
import logging
import os
import pickle
import re
from collections import Counter, OrderedDict
from typing import Mapping

import numpy as np
import torch

from models.encoders import ResNet50LSLPN
from models.factory import METHOD_NAMES, build_model, check_model_config, method_of
from models.fewshot import OFFICIAL_MODEL_CONFIG, is_official_snapshot
from models.removed_options import refuse_removed_options
from util.atomic import atomic_path
from util.cli import warn
from util.errors import UserError

# Model-config keys that change the network's parameters: a snapshot with other values cannot load.
WEIGHT_KEYS = ("encoder",)
DEFAULT_INPUT_SIZE = 512                  # the paper's input size, for snapshots that do not say
DEFAULT_INTENSITY = {"mode": "minmax"}    # the official per-slice min-max scaling, likewise
MIN_INPUT_SIZE, MAX_INPUT_SIZE = 16, 2048  # model input sizes accepted (2048^2 slices: ~16 MB per image)


def plain_data(value):
    """`value` with numpy arrays/scalars as lists/Python numbers and mapping/sequence subclasses as
    dict/list/tuple (tensors, Counter and OrderedDict kept): what `safe_torch_load` reads back."""
    if isinstance(value, torch.Tensor) or isinstance(value, (Counter, OrderedDict)):
        return value
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {key: plain_data(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return tuple(plain_data(item) for item in value)
    if isinstance(value, list):
        return [plain_data(item) for item in value]
    return value


def save_checkpoint(path: str, state: Mapping) -> None:
    """Write `state` to `path` atomically (util/atomic.py), as plain data (`plain_data`).

    The model settings are stored as `model_config` (a `config` entry of the caller is renamed).
    Serialised in memory first: torch's own file writer turns a full disk into an opaque RuntimeError
    ("unexpected pos"), a plain write raises OSError (ENOSPC/EFBIG), which the entry points report in
    one line (util.paths.output_error_message); the temp file is removed either way.
    """
    state = dict(state)
    if "config" in state:                      # the old name (or load_checkpoint's alias)
        state.setdefault("model_config", state["config"])
        del state["config"]
    buffer = io.BytesIO()
    torch.save(plain_data(state), buffer)
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as handle:
            handle.write(buffer.getbuffer())


def _old_rng_globals() -> list:
    """The numpy objects a pickled `np.random.get_state()` needs (numpy 1 and 2 names), nothing else."""
    core = np._core if hasattr(np, "_core") else np.core
    reconstruct = core.multiarray._reconstruct
    return [np.ndarray, np.dtype, np.dtypes.UInt32DType, reconstruct,
            (reconstruct, "numpy.core.multiarray._reconstruct"),
            (reconstruct, "numpy._core.multiarray._reconstruct")]


_GLOBAL = re.compile(r"GLOBAL\s+([\w.]+)|but got <class '([\w.]+)'>")   # torch's names for the object


def safe_torch_load(path: str, map_location: str | torch.device = "cpu", what: str = "checkpoint"):
    """torch.load with weights_only=True: tensors and plain data only; pickled code is refused.

    UserError (one line, nothing of the file runs): missing file; a file that holds pickled code
    ("<path>: refused: ..."); an unreadable (corrupt, truncated, not torch) file.
    """
    if not os.path.isfile(path):
        raise UserError(f"{what} '{path}' does not exist: give the path of a best.pth/last.pth "
                        "written by train.py")
    try:
        with torch.serialization.safe_globals(_old_rng_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        found = _GLOBAL.search(" ".join(str(error).split()))    # an object to import or build: code
        if found:
            name = found.group(1) or found.group(2)
            raise UserError(f"{path}: refused: the file holds pickled code ({name}), not only tensors and "
                            "plain data: it was not written by this project's train.py (or was altered); "
                            "nothing of it was run. Use a snapshot from a source you trust") from None
        reason = "UnpicklingError"
    except Exception as error:  # noqa: BLE001  (any other unpickling failure means the same thing)
        reason = type(error).__name__
    raise UserError(f"{what} '{path}' is unreadable ({reason}): cannot read it as a torch checkpoint "
                    "(corrupt, truncated or not a checkpoint); use another snapshot")


@functools.lru_cache(maxsize=1)
def _official_encoder_keys() -> frozenset:
    """Parameter keys of the official code's network (encoder.* of resnet50_lslpn), built on the meta
    device (no memory, no time)."""
    with torch.device("meta"):
        keys = ResNet50LSLPN().state_dict()
    return frozenset(f"encoder.{key}" for key in keys if not key.endswith("num_batches_tracked"))


def _official_layout(keys: set) -> bool:
    """Keys of the official network: most of its encoder.* keys (a few missing ones are reported by the
    encoder's loader, key by key), or the removed torchvision-layout variant's stem/fuse (refused there)."""
    official = _official_encoder_keys()
    variant = {"encoder.stem.0.weight", "encoder.fuse.0.weight"}
    return len(official & keys) >= len(official) // 2 or variant <= keys


def _bare_state_dict(state) -> bool:
    """A dict of tensors only (no train.py entries): a bare state_dict."""
    return isinstance(state, dict) and bool(state) and all(isinstance(v, torch.Tensor)
                                                           for v in state.values())


def _check_finite_weights(weights: Mapping, path: str) -> None:
    """UserError when a floating weight holds NaN or inf (the network would segment nothing)."""
    bad = [key for key, value in weights.items() if isinstance(value, torch.Tensor)
           and value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if bad:
        raise UserError(f"checkpoint '{path}': {len(bad)} weight tensors hold NaN/inf (e.g. {bad[0]}): the "
                        "training diverged; use an earlier snapshot (best.pth) or retrain with a lower lr")


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by `save_checkpoint` (or an official-code snapshot); one-line errors.

    Returns the checkpoint dict with `model_config` (and its alias `config`). Refused: pickled code
    (`safe_torch_load`), a bare state dict that is not of the official layout, a dict without model
    weights and model config, NaN/inf weights.
    """
    path = str(path)
    state = safe_torch_load(path, map_location)
    if _bare_state_dict(state):
        keys = {k.removeprefix("module.") for k in state}
        if is_official_snapshot(state) and _official_layout(keys):    # the authors' code saved it
            state = {"model": {k.removeprefix("module."): v for k, v in state.items()},
                     "model_config": dict(OFFICIAL_MODEL_CONFIG), "official_snapshot": True,
                     "input_size": 512, "intensity": {"mode": "minmax"}}
        else:
            example = ", ".join(sorted(keys)[:3])
            raise UserError(f"checkpoint '{path}' is a bare state dict of {len(keys)} tensor(s) (keys "
                            f"{example}, ...): not a train.py checkpoint (a dict with 'model' and "
                            "'model_config'), and not an official-code snapshot (every key of the authors' "
                            "resnet50_lslpn network, encoder.conv1.weight ... encoder.layer4.0.weight): pass "
                            "best.pth/last.pth of train.py, or load the weights with path.init_path")
    if not isinstance(state, dict) or "model" not in state or not (
            "model_config" in state or "config" in state):
        found = ", ".join(sorted(map(str, state))[:6]) if isinstance(state, dict) else type(state).__name__
        raise UserError(f"checkpoint '{path}' is not a train.py checkpoint (no model/model_config entries; "
                        f"found {found or 'nothing'}): pass best.pth/last.pth of train.py")
    state = dict(state)
    model_config = state.get("model_config", state.get("config"))
    if not isinstance(model_config, Mapping) or not isinstance(state["model"], Mapping):
        raise UserError(f"checkpoint '{path}': 'model_config' and 'model' must be dicts, got "
                        f"{type(model_config).__name__} and {type(state['model']).__name__}: the file is "
                        "not a train.py checkpoint")
    state["model_config"] = state["config"] = dict(model_config)
    _check_finite_weights(state["model"], path)
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


def config_differences(stored: Mapping, requested: Mapping, keys=None) -> list[str]:
    """Human-readable 'key: stored -> requested' for keys whose values differ (all keys by default)."""
    keys = sorted(set(stored) | set(requested)) if keys is None else keys
    return [f"{key}: {stored.get(key)!r} in the snapshot vs {requested.get(key)!r} requested"
            for key in keys if stored.get(key) != requested.get(key)]


def check_compatible(stored: Mapping, requested: Mapping, path: str, strict: bool = True) -> None:
    """Raise UserError when a snapshot's model config does not match the requested one.

    strict=True: every model key must agree (training resume, evaluating "the same" model);
    strict=False: only the keys that change the parameters (WEIGHT_KEYS) must agree, so a snapshot
    can be evaluated with, e.g., another vote or resolution.
    """
    held, wanted = method_of(stored), method_of(requested)
    if held != wanted:
        raise UserError(f"snapshot '{path}' holds a {METHOD_NAMES[held]} model, but a {METHOD_NAMES[wanted]} "
                        f"model is requested: use a {METHOD_NAMES[wanted]} snapshot or model.method={held}")
    diffs = config_differences(stored, requested, None if strict else WEIGHT_KEYS)
    if diffs:
        raise UserError(f"snapshot '{path}' was trained with another model config ({'; '.join(diffs)}): "
                        "use a matching snapshot or set model.* to the snapshot's values")


def load_model_state(model: torch.nn.Module, path: str, requested: Mapping | None = None,
                     strict: bool = True) -> dict:
    """Load a snapshot's weights into `model` after the config check; returns the checkpoint dict."""
    state = load_checkpoint(path)
    refuse_removed_options(state["model_config"], f"snapshot {path}", snapshot=True)
    if requested is not None:
        check_compatible(state["model_config"], requested, path, strict=strict)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise UserError(f"snapshot '{path}' does not fit the model ({first}): use a snapshot of the "
                        "same encoder")
    return state


def model_from_checkpoint(path: str, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild a FewShotSegNet or SENet from a train.py checkpoint: (model in eval mode on `device`,
    checkpoint).

    One-line errors: missing or unreadable file, not a train.py checkpoint, weights that do not fit
    the stored model config (another encoder or code version).
    """
    state = load_checkpoint(str(path))
    config = dict(state["model_config"])
    refuse_removed_options(config, f"snapshot {path}", snapshot=True)
    check_model_config(config, source=f"snapshot {path}")   # the config schema: the model trusts its options
    log = logging.getLogger("lslpn")        # "starting from random initialisation" is moot: weights load next
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        model = build_model(config, None)
        if state.get("official_snapshot"):
            model.load_official_snapshot(state["model"], f"checkpoint {path} (official-code snapshot)")
        else:
            model.load_state_dict(state["model"])
    except UserError:
        raise
    except (RuntimeError, KeyError, TypeError, ValueError) as error:
        first = " ".join(str(error).split())[:160]
        raise UserError(f"checkpoint {path} does not fit its model config (encoder "
                        f"'{config.get('encoder')}'; "
                        f"{first}): it is from another encoder or code version; pass a checkpoint written by "
                        "this project's train.py") from None
    finally:
        log.setLevel(level)
    return model.to(device).eval(), state


def trained_input(state: Mapping, name: str = "snapshot") -> tuple[int | None, dict | None]:
    """(input size, intensity) a snapshot was trained with, as it records them; None where it does not say.

    A recorded size that is not a whole number in MIN_INPUT_SIZE..MAX_INPUT_SIZE is a one-line error.
    """
    run_config = state.get("run_config") or {}
    size = state.get("input_size")
    if size is None and isinstance(run_config, Mapping):
        size = run_config.get("input_size")
    return check_input_size(size, f"{name}: recorded input_size"), state.get("intensity")


def model_input(state: Mapping, input_size: int | None = None, intensity: dict | None = None,
                fallback_intensity: dict | None = None, name: str = "snapshot") -> tuple[int, dict]:
    """The input size and intensity scaling to run a snapshot with (evaluation and segment_volume).

    The snapshot decides: its own record, then `fallback_intensity` (e.g. meta.json of the snapshot's
    training data), then 512 and per-slice min-max. A value the caller gives explicitly wins, and
    when it differs from the snapshot's record a one-line warning names both values.
    """
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


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """One `warning:` line per distinct message and process (evaluation loads a snapshot per organ)."""
    if message not in _WARNED:
        _WARNED.add(message)
        warn(message)
