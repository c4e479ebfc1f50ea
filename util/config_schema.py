"""The one declarative description of the run configuration (config.py) and its one-pass check.

`SCHEMA` maps every dotted config key to an `Option`: its kind (type), range or choices, and the
methods it applies to ('lslpn', 'panet', 'senet'; 'selfsup' for the superpixel episodes).
`check_run_config(config)` walks a resolved config once: every key must be known (an unknown key is
named with the nearest known one), every value of the right type and in range, then the cross-key
`RULES` of the methods the run uses. Each error is one line, "<key> = <value>: <what is wrong>: <fix>".
`check_model_config(model, prefix)` checks a model section alone (a snapshot's stored config).
The value checks and the message shape live in util/config_values.py.

File-system facts (does path.data_dir hold prepared data, does a snapshot exist) are not here: the
entry points check them right after this pass (training/config_check.py). Choices that come from a
registry of a higher package (encoders, presets) are literal here; tests/test_config_schema.py asserts
that they equal the registries.
"""
from __future__ import annotations

import difflib
from typing import Any, Callable, Mapping

from util.config_values import (
    AMP,
    BOOL,
    CHOICE,
    FILE,
    GRIDS,
    INT,
    LSLPN,
    MILESTONES,
    NAME,
    NUMBER,
    ORGAN_SETS,
    ORGANS,
    PAIR,
    PANET,
    SELFSUP,
    SENET,
    SNAPSHOTS,
    SUPPORT,
    TEXT,
    Option,
    check_value,
    fail,
)
from util.errors import UserError

PROTOTYPE_METHODS = frozenset({LSLPN, PANET})

# Literal copies of registries (tests/test_config_schema.py compares them with their sources).
ENCODERS = ("vgg16", "resnet50_lslpn", "deeplabv3_resnet101", "cnn_small")            # models/encoders.py
ENCODER_STRIDES = {"vgg16": 8, "resnet50_lslpn": 8, "deeplabv3_resnet101": 8, "cnn_small": 4}
# pretrained weights: models/encoders.py
IMAGENET_ENCODERS = ("vgg16", "resnet50_lslpn", "deeplabv3_resnet101")
HEADS = ("local", "panet", "alpnet")                                                  # models/fewshot.py
SELFSUP_RECIPES = ("project", "alpnet")                                 # dataloaders/selfsup_episodes.py
MODEL_METHODS = ("prototype", "senet")                                                # models/factory.py
PRESETS = ("inclusive", "official", "senet", "alpnet", "thirds")                      # evaluation/protocol.py
INPUT_SLICES = (1, 3)                                   # models/fewshot.py, dataloaders/neighbours.py


def _int(low=None, high=None, **kw) -> Option:
    return Option(INT, low, high, **kw)


def _num(low=None, high=None, **kw) -> Option:
    return Option(NUMBER, low, high, **kw)


_BOOL = Option(BOOL)
_SELFSUP = frozenset({SELFSUP})

SCHEMA: dict[str, Option] = {
    "name": Option(NAME, nullable=True),
    "seed": _int(0, example="1234"),
    "device": Option(CHOICE, choices=("auto", "cpu", "cuda")),
    "amp": Option(AMP),
    "channels_last": _BOOL,
    "num_workers": _int(0, example="0"),
    "fold": _int(0, 3, example="0"),
    "label_sets": Option(ORGAN_SETS),
    "class_setting": Option(CHOICE, choices=("six_organs", "all_structures")),
    "input_size": _int(16, example="512"),
    "n_ways": _int(1, example="1"),
    "n_shots": _int(1, example="1"),
    "n_queries": _int(1, example="1"),
    "batch_size": _int(1, example="4"),
    "n_steps": _int(1, example="10000"),
    "lr": _num(0, low_open=True, example="1e-3"),
    "momentum": _num(0, 1, example="0.9"),
    "weight_decay": _num(0, example="5e-4"),
    "lr_milestones": Option(MILESTONES, applies=PROTOTYPE_METHODS),
    "lr_gamma": _num(0, 1, low_open=True, applies=PROTOTYPE_METHODS, example="0.1"),
    "grad_clip": _num(0, example="0.0"),
    "boundary_weight": _num(0, applies=PROTOTYPE_METHODS, example="0.5"),
    "augment.p": _num(0, 1, example="0.5"),
    "augment.brightness": Option(PAIR, 0, low_open=True),
    "augment.contrast": Option(PAIR, 0, low_open=True),
    "augment.gamma": Option(PAIR, 0, low_open=True),
    "episodes": Option(CHOICE, choices=("labels", "superpixels")),
    "selfsup.episodes": Option(CHOICE, choices=SELFSUP_RECIPES, applies=_SELFSUP),
    "selfsup.min_pixels": _int(1, applies=_SELFSUP, example="400"),
    "selfsup.warp.rotate": _num(0, 90, high_open=True, applies=_SELFSUP, example="10.0"),
    "selfsup.warp.scale": Option(PAIR, 0, low_open=True, applies=_SELFSUP),
    "selfsup.warp.shear": _num(0, 45, high_open=True, applies=_SELFSUP, example="5.0"),
    "selfsup.warp.translate": _num(0, 0.5, high_open=True, applies=_SELFSUP, example="0.05"),
    "selfsup.warp.elastic_alpha": _num(0, applies=_SELFSUP, example="30.0"),
    "selfsup.warp.elastic_sigma": _num(0, low_open=True, applies=_SELFSUP, example="5.0"),
    "model.method": Option(CHOICE, choices=MODEL_METHODS),
    "model.encoder": Option(CHOICE, choices=ENCODERS, applies=PROTOTYPE_METHODS),
    "model.n_grid": _int(1, applies=PROTOTYPE_METHODS, example="8"),
    "model.overlap": Option(BOOL, applies=frozenset({LSLPN})),
    "model.vote": Option(CHOICE, choices=("max", "mean", "cover"), applies=frozenset({LSLPN})),
    "model.resolution": Option(CHOICE, choices=("image", "feature"), applies=frozenset({LSLPN})),
    "model.min_pixels": _num(0, applies=frozenset({LSLPN}), example="10"),
    "model.scale": _num(0, low_open=True, applies=PROTOTYPE_METHODS, example="20.0"),
    "model.align": Option(BOOL, applies=PROTOTYPE_METHODS),
    "model.align_weight": _num(0, applies=PROTOTYPE_METHODS, example="1.0"),
    "model.head": Option(CHOICE, choices=HEADS, applies=PROTOTYPE_METHODS),
    "model.pretrained": Option(BOOL, applies=PROTOTYPE_METHODS),
    # 2.5D input (beyond the paper; dataloaders/neighbours.py): slices z - 1, z, z + 1 as the 3 channels
    "model.input_slices": Option(CHOICE, choices=INPUT_SLICES, applies=PROTOTYPE_METHODS),
    # LSLPN+ (models/lslpn_plus.py)
    "model.grids": Option(GRIDS, applies=frozenset({LSLPN})),
    "model.grid_fusion": Option(CHOICE, choices=("mean", "max"), applies=frozenset({LSLPN})),
    "model.query_rounds": _int(0, applies=frozenset({LSLPN}), example="1"),
    "model.query_weight": _num(0, 1, applies=frozenset({LSLPN}), example="0.5"),
    "model.query_confidence": _num(0, 1, applies=frozenset({LSLPN}), example="0.0"),
    "senet.official_bug": Option(BOOL, applies=frozenset({SENET})),
    "senet.double_softmax": Option(BOOL, applies=frozenset({SENET})),
    "senet.epochs": _int(1, applies=frozenset({SENET}), example="20"),
    "senet.lr_step_epochs": _int(1, applies=frozenset({SENET}), example="10"),
    "senet.gamma_segmenter": _num(0, 1, low_open=True, applies=frozenset({SENET}), example="0.1"),
    "senet.gamma_conditioner": _num(0, 1, low_open=True, applies=frozenset({SENET}), example="0.001"),
    "path.data_dir": Option(TEXT),
    "path.init_path": Option(FILE, nullable=True, applies=PROTOTYPE_METHODS),
    "path.init_from": Option(FILE, nullable=True),
    "path.log_dir": Option(TEXT),
    "save_every": _int(1, example="1000"),
    "val_every": _int(0, example="1000"),
    "val_split": Option(CHOICE, choices=("val", "gold")),
    "print_every": _int(1, example="100"),
    "resume": _BOOL,
    "eval.preset": Option(CHOICE, choices=PRESETS),
    "eval.support": Option(SUPPORT),
    "eval.n_shots": _int(1, example="1"),
    "eval.snapshots": Option(SNAPSHOTS),
    "eval.organs": Option(ORGANS, nullable=True),
    "eval.split": Option(CHOICE, choices=("gold", "val")),
    "eval.batch_size": _int(1, example="16"),
    "eval.save_predictions": _BOOL,
    "eval.adapt_steps": _int(0, example="20"),
    "eval.adapt_lr": _num(0, low_open=True, example="1e-2"),
}
# eval.head_options: the LSLPN+ head options (models/lslpn_plus.py) set at test time only, each checked as
# the model.* key of the same name; their defaults are the plain head's (models.fewshot.PLUS_DEFAULTS)
HEAD_OPTIONS = ("grids", "grid_fusion", "query_rounds", "query_weight", "query_confidence")
SCHEMA.update({f"eval.head_options.{name}": SCHEMA[f"model.{name}"] for name in HEAD_OPTIONS})
# Mappings whose entries the user names (method name -> checkpoint): their keys are not config keys.
OPEN_MAPPINGS = ("eval.snapshots",)
# Sections: mappings of further keys (an empty `augment` means no augmentation).
SECTIONS = sorted({key.rsplit(".", 1)[0] for key in SCHEMA if "." in key}
                  | {"selfsup"})
# Keys a snapshot's stored model config may hold besides the model.* keys (SENet's switch).
SNAPSHOT_MODEL_EXTRA = {"official_bug": _BOOL}


# ------------------------------------------------------------------------------ unknown keys
def nearest_key(key: str, known: list[str] | None = None) -> str | None:
    """The known dotted key closest to `key`: a sibling with a similar name, else any key whose last
    part is similar (difflib); None when nothing is close."""
    known = sorted(SCHEMA) + SECTIONS if known is None else known
    section, _, leaf = key.rpartition(".")
    siblings = [k.rsplit(".", 1)[-1] for k in known if k.rpartition(".")[0] == section]
    match = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)
    if match:
        return f"{section}.{match[0]}" if section else match[0]
    leaves = {k.rsplit(".", 1)[-1]: k for k in reversed(known)}
    match = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.75)
    return leaves[match[0]] if match else None


def _unknown(key: str, value: Any, known: list[str], source: str = "") -> UserError:
    near = nearest_key(key, known)
    section = key.rpartition(".")[0]
    listed = sorted(k.rsplit(".", 1)[-1] for k in known if k.rpartition(".")[0] == section)
    fix = f"did you mean {near}?" if near else \
        f"the known {section or 'top-level'} keys are {', '.join(listed)}"
    return fail(key, value, "unknown key", fix + " (config.py lists every key)", source)


def _walk(tree: Mapping, prefix: str, schema: Mapping[str, Option], sections: list[str]) -> None:
    known = sorted(schema) + sections
    for name, value in tree.items():
        key = f"{prefix}{name}"
        if key in schema:
            check_value(key, value, schema[key])
        elif key in sections:
            if value is None and key == "augment":
                continue
            if not isinstance(value, Mapping):
                raise fail(key, value, f"must be a mapping of {key}.* options", "see config.py")
            _walk(value, f"{key}.", schema, sections)
        else:
            raise _unknown(key, value, known)


# ------------------------------------------------------------------------------ cross-key rules
def methods_of(config: Mapping) -> frozenset:
    """The methods a run config uses: one of lslpn / panet / senet, plus selfsup for superpixel episodes."""
    model = config.get("model") or {}
    method = SENET if model.get("method") == "senet" else PANET if model.get("head") == "panet" else LSLPN
    return frozenset({method} | ({SELFSUP} if config.get("episodes") == "superpixels" else set()))


def _panet_global(config: Mapping, prefix: str) -> None:
    model = config.get("model") or {}
    if model.get("head") == "panet" and model.get("n_grid", 1) != 1:
        raise fail(f"{prefix}.n_grid", model["n_grid"], "the 'panet' head has global prototypes",
                   f"set {prefix}.n_grid=1")


def _grid_fits(config: Mapping, prefix: str) -> None:
    model, size = config.get("model") or {}, config.get("input_size")
    encoder, n_grid = model.get("encoder", "vgg16"), model.get("n_grid", 8)
    if not isinstance(size, int) or encoder not in ENCODER_STRIDES:
        return
    side = size // ENCODER_STRIDES[encoder]
    if n_grid > side:
        raise fail(f"{prefix}.n_grid", n_grid, f"larger than the {side} x {side} feature map of encoder "
                   f"{encoder} at input_size {size}", f"use {prefix}.n_grid <= {side} or a larger input_size")
    grids = model.get("grids") or []
    if isinstance(grids, (list, tuple)) and grids and max(grids) > side:
        raise fail(f"{prefix}.grids", list(grids), f"grid {max(grids)} is larger than the {side} x {side} "
                   f"feature map of encoder {encoder} at input_size {size}",
                   f"use grids <= {side} or a larger input_size")


def _weights_exist(config: Mapping, prefix: str) -> None:
    model = config.get("model") or {}
    encoder = model.get("encoder", "vgg16")
    if model.get("pretrained", False) and encoder not in IMAGENET_ENCODERS:
        raise fail(f"{prefix}.pretrained", True, f"encoder {encoder} has no ImageNet weights",
                   f"set {prefix}.pretrained=False")
    init_path = (config.get("path") or {}).get("init_path")
    if init_path is not None and encoder not in IMAGENET_ENCODERS:
        raise fail("path.init_path", init_path, f"encoder {encoder} has no ImageNet layout to load",
                   "set path.init_path=None, or use vgg16 / resnet50_lslpn")


def _senet_shape(config: Mapping, prefix: str) -> None:
    if config.get("n_ways", 1) != 1:
        raise fail("n_ways", config.get("n_ways"), "SENet segments one class at a time", "set n_ways=1")
    size = config.get("input_size")
    if isinstance(size, int) and size % 16:
        raise fail("input_size", size, "SENet needs a multiple of 16 (4 poolings)",
                   f"e.g. input_size={max(16, size // 16 * 16)}")


def _senet_one_slice(config: Mapping, prefix: str) -> None:
    model = config.get("model") or {}
    if model.get("input_slices", 1) != 1:
        raise fail(f"{prefix}.input_slices", model["input_slices"], "SENet takes one slice per image (2.5D "
                   "input is an option of the prototype methods)",
                   f"set {prefix}.input_slices=1, or {prefix}.method=prototype")


def _selfsup_one_way(config: Mapping, prefix: str) -> None:
    if config.get("n_ways", 1) != 1:
        raise fail("n_ways", config.get("n_ways"),
                   "self-supervised episodes have one pseudo-class (a superpixel)", "set n_ways=1")


def _plus_on_local(config: Mapping, prefix: str) -> None:
    model = config.get("model") or {}
    head = model.get("head", "local")
    for key in ("grids", "query_rounds"):
        if head != "local" and model.get(key):
            raise fail(f"{prefix}.{key}", model[key], f"an LSLPN+ option of the local head, not of the "
                       f"'{head}' head", f"set {prefix}.head=local or {prefix}.{key}="
                       f"{'[]' if key == 'grids' else '0'}")


# (rule, the methods it applies to); run in this order after every single value passed
RULES: list[tuple[Callable[[Mapping, str], None], frozenset]] = [
    (_panet_global, frozenset({PANET})),
    (_weights_exist, PROTOTYPE_METHODS),
    (_grid_fits, PROTOTYPE_METHODS),
    (_plus_on_local, PROTOTYPE_METHODS),
    (_senet_shape, frozenset({SENET})),
    (_senet_one_slice, frozenset({SENET})),
    (_selfsup_one_way, _SELFSUP),
]


# ------------------------------------------------------------------------------ entry points
def check_run_config(config: Mapping) -> None:
    """The one pass over a resolved run config: known keys, types, ranges, then the cross-key rules."""
    _walk(config, "", SCHEMA, SECTIONS)
    used = methods_of(config)
    for rule, applies in RULES:
        if used & applies:
            rule(config, "model")


def check_model_config(model: Mapping, prefix: str = "model", input_size: int | None = None,
                       source: str = "") -> None:
    """Check a model section alone, e.g. the config a snapshot stores (missing keys are allowed: they
    mean the model's defaults). Messages name `prefix`.<key>, after "`source`: " when given (the
    snapshot's path). With `input_size`, n_grid must fit the encoder's feature map."""
    if not isinstance(model, Mapping):
        raise fail(prefix, model, "must be a mapping of model options", "use a snapshot written by train.py",
                   source)
    schema = {f"{prefix}.{key.split('.', 1)[1]}": option for key, option in SCHEMA.items()
              if key.startswith("model.")}
    schema.update({f"{prefix}.{key}": option for key, option in SNAPSHOT_MODEL_EXTRA.items()})
    known = sorted(schema)
    try:
        for name, value in model.items():
            key = f"{prefix}.{name}"
            if key not in schema:
                raise _unknown(key, value, known)
            check_value(key, value, schema[key])
        config = {"model": model, "input_size": input_size}
        if methods_of(config) & PROTOTYPE_METHODS:
            _panet_global(config, prefix)
            _grid_fits(config, prefix)
            _plus_on_local(config, prefix)
        else:
            _senet_one_slice(config, prefix)
    except UserError as error:
        if not source:
            raise
        raise UserError(f"{source}: {error}") from None


def keys_for(methods: frozenset) -> list[str]:
    """The config keys that matter to a run of `methods` (e.g. methods_of(config)), in SCHEMA order."""
    return [key for key, option in SCHEMA.items() if option.applies & methods]
