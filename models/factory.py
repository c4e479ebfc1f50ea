"""The one place that builds a few-shot model from a model config dict (config.py's `model`, or the
`model_config` a checkpoint stores): a prototype network (FewShotSegNet: LSLPN, PANet) or SENet.

`model.method` says which: 'prototype' (the default; configs and checkpoints without the key) or
'senet'. Both models share one interface (forward, encode_support, segment, config), so the
training loop and the evaluation call them the same way. `MODEL_OPTIONS` declares the model.* options
(checked once: `check_model_config`, and training/config_check.py for a run's config).
"""
from __future__ import annotations

from typing import Mapping

from torch import nn

from models.encoders import ENCODER_CLASSES, ENCODERS, IMAGENET_WEIGHTS
from models.fewshot import HEADS, INPUT_SLICES, FewShotSegNet
from models.local_prototypes import RESOLUTIONS, VOTES
from models.lslpn_plus import FUSIONS
from models.senet import SENet
from util.errors import UserError
from util.options import BOOL, GRIDS, Option, check_options, choice, fail, integer, number

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


def with_head_options(model: nn.Module, options: Mapping) -> nn.Module:
    """A copy of a trained prototype model whose head is rebuilt with other head options (e.g. the LSLPN+
    options of models/lslpn_plus.py, which have no parameters); the encoder weights are the model's."""
    config = {**model.config, **dict(options)}
    rebuilt = build_model(config)
    rebuilt.load_state_dict(model.state_dict())
    device = next(model.parameters()).device
    return rebuilt.to(device).train(model.training)


# ------------------------------------------------------------------------------ the model's options
# config.py's model.* keys (checked once, before anything is built: training/config_check.py; a
# snapshot's stored config when it is loaded); the models trust what passed.
MODEL_OPTIONS = {
    "method": choice(*METHODS),
    "encoder": choice(*ENCODERS),
    "n_grid": integer(1, example="8"),
    "overlap": Option(BOOL),
    "vote": choice(*VOTES),
    "resolution": choice(*RESOLUTIONS),
    "min_pixels": number(0, example="10"),
    "scale": number(0, low_open=True, example="20.0"),
    "align": Option(BOOL),
    "align_weight": number(0, example="1.0"),
    "head": choice(*HEADS),
    "pretrained": Option(BOOL),
    "input_slices": choice(*INPUT_SLICES),
    # LSLPN+ (models/lslpn_plus.py; defaults models.fewshot.PLUS_DEFAULTS)
    "grids": Option(GRIDS),
    "grid_fusion": choice(*FUSIONS),
    "query_rounds": integer(0, example="1"),
    "query_weight": number(0, 1, example="0.5"),
    "query_confidence": number(0, 1, example="0.0"),
}
SNAPSHOT_OPTIONS = {"official_bug": Option(BOOL)}   # SENet's switch, in a snapshot's model config


def check_model_rules(model: Mapping, prefix: str = "model", input_size: int | None = None) -> None:
    """The rules between the model's keys (values already checked; missing keys mean the defaults):
    SENet takes one slice, the 'panet' head one cell, LSLPN+ options need the local head, pretrained
    weights exist, and with `input_size` every grid fits the encoder's feature map."""
    if model.get("method") == SENET:
        if model.get("input_slices", 1) != 1:
            raise fail(f"{prefix}.input_slices", model["input_slices"], "SENet takes one slice per image "
                       "(2.5D input is an option of the prototype methods)",
                       f"set {prefix}.input_slices=1, or {prefix}.method=prototype")
        return
    head, encoder, n_grid = model.get("head", "local"), model.get("encoder", "vgg16"), model.get("n_grid", 8)
    if head == "panet" and model.get("n_grid", 1) != 1:
        raise fail(f"{prefix}.n_grid", model["n_grid"], "the 'panet' head has global prototypes",
                   f"set {prefix}.n_grid=1")
    if model.get("pretrained", False) and encoder not in IMAGENET_WEIGHTS:
        raise fail(f"{prefix}.pretrained", True, f"encoder {encoder} has no ImageNet weights",
                   f"set {prefix}.pretrained=False")
    if isinstance(input_size, int):
        side = input_size // ENCODER_CLASSES[encoder].output_stride
        if n_grid > side:
            raise fail(f"{prefix}.n_grid", n_grid, f"larger than the {side} x {side} feature map of encoder "
                       f"{encoder} at input_size {input_size}",
                       f"use {prefix}.n_grid <= {side} or a larger input_size")
        grids = model.get("grids") or []
        if grids and max(grids) > side:
            raise fail(f"{prefix}.grids", list(grids), f"grid {max(grids)} is larger than the {side} x "
                       f"{side} feature map of encoder {encoder} at input_size {input_size}",
                       f"use grids <= {side} or a larger input_size")
    for key in ("grids", "query_rounds"):
        if head != "local" and model.get(key):
            raise fail(f"{prefix}.{key}", model[key], f"an LSLPN+ option of the local head, not of the "
                       f"'{head}' head", f"set {prefix}.head=local or {prefix}.{key}="
                       f"{'[]' if key == 'grids' else '0'}")


def check_model_config(model: Mapping, prefix: str = "model", input_size: int | None = None,
                       source: str = "") -> None:
    """Check a model section alone, e.g. the config a snapshot stores: its keys and values, then
    `check_model_rules`. Messages name `prefix`.<key>, after "`source`: " when given."""
    if not isinstance(model, Mapping):
        raise fail(prefix, model, "must be a mapping of model options", "use a snapshot written by train.py",
                   source)
    schema = {f"{prefix}.{key}": option for key, option in {**MODEL_OPTIONS, **SNAPSHOT_OPTIONS}.items()}
    try:
        check_options(model, schema, "config.py", prefix=f"{prefix}.")
        check_model_rules(model, prefix, input_size)
    except UserError as error:
        if not source:
            raise
        raise UserError(f"{source}: {error}") from None
