"""Checkpoints: atomic save, load with clear errors, and a compatibility check of model configs.

A training checkpoint is a dict (docs/DESIGN.md):
  model        the model's state_dict
  optimizer    SGD state_dict (momentum buffers)
  scheduler    MultiStepLR state_dict
  scaler       GradScaler state_dict or None (fp16 AMP only)
  step         number of optimisation steps done
  rng          list of `util.device.get_rng_state()` snapshots, one per DDP rank
  config       the model's config dict (`FewShotSegNet.config` or `SENet.config`, whose
               'method' is 'senet'): rebuilds the network (models/factory.py)
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
"""
from __future__ import annotations

import io
import logging
import os
from typing import Mapping

import torch

from models.factory import METHOD_NAMES, build_model, method_of
from models.fewshot import OFFICIAL_MODEL_CONFIG, is_official_snapshot
from util.atomic import atomic_path
from util.cli import warn
from util.errors import UserError

# Model-config keys that change the network's parameters: a snapshot with other values cannot load.
WEIGHT_KEYS = ("encoder",)
DEFAULT_INPUT_SIZE = 512                  # the paper's input size, for snapshots that do not say
DEFAULT_INTENSITY = {"mode": "minmax"}    # the official per-slice min-max scaling, likewise


def save_checkpoint(path: str, state: Mapping) -> None:
    """Write `state` to `path` atomically (util/atomic.py).

    Serialised in memory first: torch's own file writer turns a full disk into an opaque RuntimeError
    ("unexpected pos"), a plain write raises OSError (ENOSPC/EFBIG), which the entry points report in
    one line (util.paths.output_error_message); the temp file is removed either way.
    """
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as handle:
            handle.write(buffer.getbuffer())


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by `save_checkpoint`; one-line errors for missing/corrupt files."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint '{path}' does not exist: give the path of a best.pth/last.pth "
                        "written by train.py")
    try:
        # Our checkpoints hold numpy RNG states and plain Python objects besides tensors.
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # noqa: BLE001  (any unpickling failure means the same thing)
        raise UserError(f"checkpoint '{path}' is unreadable ({type(error).__name__}): it is corrupt or "
                        "not a train.py checkpoint; use another snapshot")
    if is_official_snapshot(state):  # saved by the authors' code: run with their model and input
        return {"model": {k.removeprefix("module."): v for k, v in state.items()},
                "config": dict(OFFICIAL_MODEL_CONFIG), "official_snapshot": True, "input_size": 512,
                "intensity": {"mode": "minmax"}}
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise UserError(f"checkpoint '{path}' is not a train.py checkpoint (no model/config entries)")
    return state


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
    if requested is not None:
        check_compatible(state["config"], requested, path, strict=strict)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise UserError(f"snapshot '{path}' does not fit the model ({first}): use a snapshot of the "
                        "same encoder")
    return state


def model_from_checkpoint(path: str, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild a FewShotSegNet or SENet from a train.py checkpoint: (model in eval mode on `device`, checkpoint).

    One-line errors: missing or unreadable file, not a train.py checkpoint, weights that do not fit
    the stored model config (another encoder or code version).
    """
    state = load_checkpoint(str(path))
    config = dict(state["config"])
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
        raise UserError(f"checkpoint {path} does not fit its model config (encoder '{config.get('encoder')}'; "
                        f"{first}): it is from another encoder or code version; pass a checkpoint written by "
                        "this project's train.py") from None
    finally:
        log.setLevel(level)
    return model.to(device).eval(), state


def trained_input(state: Mapping) -> tuple[int | None, dict | None]:
    """(input size, intensity) a snapshot was trained with, as it records them; None where it does not say."""
    run_config = state.get("run_config") or {}
    size = state.get("input_size") or run_config.get("input_size")
    return (int(size) if size else None), state.get("intensity")


def model_input(state: Mapping, input_size: int | None = None, intensity: dict | None = None,
                fallback_intensity: dict | None = None, name: str = "snapshot") -> tuple[int, dict]:
    """The input size and intensity scaling to run a snapshot with (evaluation and segment_volume).

    The snapshot decides: its own record, then `fallback_intensity` (e.g. meta.json of the snapshot's
    training data), then 512 and per-slice min-max. A value the caller gives explicitly wins, and
    when it differs from the snapshot's record a one-line warning names both values.
    """
    trained_size, trained_intensity = trained_input(state)
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
