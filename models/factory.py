"""The one place that builds a few-shot model from a model config dict (config.py's `model`, or the
`model_config` a checkpoint stores): a prototype network (FewShotSegNet: LSLPN, PANet) or SENet.

`model.method` says which: 'prototype' (the default; configs and checkpoints without the key) or
'senet'. Both models share one interface (forward, encode_support, segment, config), so the
training loop and the evaluation call them the same way.
"""
from __future__ import annotations

from typing import Mapping

from torch import nn

from models.fewshot import FewShotSegNet
from models.senet import SENet
from util.errors import UserError

PROTOTYPE, SENET = "prototype", "senet"
METHODS = (PROTOTYPE, SENET)
METHOD_NAMES = {PROTOTYPE: "prototype (LSLPN/PANet)", SENET: "SENet"}


def method_of(model_config: Mapping) -> str:
    """'prototype' or 'senet' of a model config (a missing key means 'prototype')."""
    method = model_config.get("method") or PROTOTYPE
    if method not in METHODS:
        raise UserError(f"model.method = {method!r}: unknown method: use one of {', '.join(METHODS)}")
    return method


def build_model(model_config: Mapping, init_path: str | None = None) -> nn.Module:
    """A FewShotSegNet or SENet from a model config dict (keys the model does not use are ignored)."""
    if method_of(model_config) == SENET:
        return SENet.from_config(dict(model_config))
    return FewShotSegNet.from_config(dict(model_config), init_path)


def model_input_slices(model) -> int:
    """Slices per image a model takes (model.input_slices): its config's, 1 where absent (SENet, test
    doubles without a config)."""
    return int((getattr(model, "config", None) or {}).get("input_slices", 1))


def check_method(stored: Mapping, expected: str, snapshot: str) -> None:
    """One-line error when a snapshot holds another method than the one expected."""
    held = method_of(stored)
    if held != expected:
        raise UserError(f"snapshot {snapshot} holds a {METHOD_NAMES[held]} model, but a "
                        f"{METHOD_NAMES[expected]} model is expected here: pass a {METHOD_NAMES[expected]} "
                        "snapshot (or list it under its own method name)")


def with_head_options(model: nn.Module, options: Mapping) -> nn.Module:
    """A copy of a trained prototype model whose head is rebuilt with other head options (e.g. the LSLPN+
    options of models/lslpn_plus.py, which have no parameters); the encoder weights are the model's."""
    config = {**model.config, **dict(options)}
    rebuilt = build_model(config)
    rebuilt.load_state_dict(model.state_dict())
    device = next(model.parameters()).device
    return rebuilt.to(device).train(model.training)
