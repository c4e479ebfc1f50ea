"""One config value against its `Option` (kind, range or choices): the checks and the one message shape
"<key> = <value>: <what is wrong>: <fix>" of util/config_schema.py, which declares the options.

A wrong type is said as such ("must be an integer, not a string"), never as "out of range".
"""
from __future__ import annotations

import difflib
import math
import numbers
from dataclasses import dataclass
from typing import Any, Mapping

from util.errors import UserError

LSLPN, PANET, SENET, SELFSUP = "lslpn", "panet", "senet", "selfsup"
ALL_METHODS = frozenset({LSLPN, PANET, SENET})

# Kinds of value
INT, NUMBER, BOOL, CHOICE, TEXT, NAME, FILE = "int", "number", "bool", "choice", "text", "name", "file"
PAIR, MILESTONES, ORGAN_SETS, ORGANS, AMP, SUPPORT, SNAPSHOTS, GRIDS = (
    "pair", "milestones", "organ_sets", "organs", "amp", "support", "snapshots", "grids")


@dataclass(frozen=True)
class Option:
    """One config key: `kind`, bounds (`low`/`high`, open ends), `choices`, the methods it applies to."""
    kind: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple = ()
    nullable: bool = False
    applies: frozenset = ALL_METHODS
    example: str = ""          # a valid value for the fix text, e.g. "10000"


# ------------------------------------------------------------------------------ messages
def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def fail(key: str, value: Any, what: str, fix: str, source: str = "") -> UserError:
    """The one message shape: "<key> = <value>: <what is wrong>: <fix>" (after "<source>: " when given)."""
    return UserError(f"{source + ': ' if source else ''}{key} = {_show(value)}: {what}: {fix}")


def _type_word(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, bool):
        return "True/False"
    for kind, word in ((str, "a string"), ((list, tuple), "a list"), (Mapping, "a mapping")):
        if isinstance(value, kind):
            return word
    return type(value).__name__


def _bounds(option: Option, integer: bool) -> str:
    low, high = option.low, option.high
    if integer and low is not None and high is not None:
        return f"in {low}..{high}"
    if low is not None and high is not None:
        return f"in {'(' if option.low_open else '['}{low}, {high}{')' if option.high_open else ']'}"
    if low is not None:
        return f"{'>' if option.low_open else '>='} {low}"
    if high is not None:
        return f"{'<' if option.high_open else '<='} {high}"
    return ""


def _in_bounds(value: float, option: Option) -> bool:
    if option.low is not None and not (value > option.low if option.low_open else value >= option.low):
        return False
    return option.high is None or (value < option.high if option.high_open else value <= option.high)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _example(key: str, option: Option, fallback: str) -> str:
    return f"e.g. {key}={option.example}" if option.example else fallback


# ------------------------------------------------------------------------------ one value
def _check_integer(key: str, value: Any, option: Option) -> None:
    kind = f"an integer {_bounds(option, True)}".strip()
    if not _is_number(value):
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            raise fail(key, value, "must be an integer, not a string",
                       f"write {key}={int(value)} (no quotes)")
        raise fail(key, value, f"must be an integer, not {_type_word(value)}",
                   _example(key, option, f"use {kind}"))
    if not isinstance(value, numbers.Integral):
        if math.isfinite(value) and float(value).is_integer():
            raise fail(key, value, "must be an integer", f"write {int(value)} (no decimal point)")
        raise fail(key, value, "must be an integer", f"use {kind}")
    if not _in_bounds(value, option):
        raise fail(key, value, "out of range", f"use {kind}")


def _check_number(key: str, value: Any, option: Option) -> None:
    kind = f"a number {_bounds(option, False)}".strip()
    if not _is_number(value):
        raise fail(key, value, f"must be a number, not {_type_word(value)}",
                   _example(key, option, f"use {kind}"))
    if not math.isfinite(value):
        raise fail(key, value, "not a finite number", f"use {kind}")
    if not _in_bounds(value, option):
        raise fail(key, value, "out of range", f"use {kind}")


def _check_choice(key: str, value: Any, option: Option) -> None:
    """Choices are strings or integers (e.g. model.input_slices: 1 or 3); True/False is never an integer."""
    integer = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if (isinstance(value, str) or integer) and value in option.choices:
        return
    if isinstance(value, str) and value in [str(c) for c in option.choices if not isinstance(c, str)]:
        raise fail(key, value, "must be an integer, not a string", f"write {key}={value} (no quotes)")
    near = difflib.get_close_matches(str(value), [str(c) for c in option.choices], n=1, cutoff=0.6)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    what = "unknown" if all(isinstance(c, str) for c in option.choices) else "not one of the choices"
    raise fail(key, value, what, f"use one of {', '.join(map(repr, option.choices))}{hint}")


def _check_pair(key: str, value: Any, option: Option) -> None:
    ok = (isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_number(v) for v in value)
          and value[0] <= value[1] and _in_bounds(value[0], option) and math.isfinite(value[1]))
    if not ok:
        raise fail(key, value, "not a range [low, high]",
                   "use two numbers with 0 < low <= high, e.g. [0.5, 2.0]")


def _check_organ_list(key: str, value: Any) -> None:
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v for v in value):
        raise fail(key, value, "must be a non-empty list of organ names", f"e.g. {key}='[\"liver\"]'")


def check_value(key: str, value: Any, option: Option) -> None:
    """UserError (one line) when `value` is not valid for `option`."""
    if value is None and option.nullable:
        return
    kind = option.kind
    if kind == INT:
        _check_integer(key, value, option)
    elif kind == NUMBER:
        _check_number(key, value, option)
    elif kind == BOOL:
        if not isinstance(value, bool):
            raise fail(key, value, "must be True or False", f"write {key}=True or {key}=False")
    elif kind == CHOICE:
        _check_choice(key, value, option)
    elif kind in (TEXT, FILE):
        if not isinstance(value, str) or not value:
            raise fail(key, value, "must name a path", f"give a path{' or None' if option.nullable else ''}")
    elif kind == NAME:
        if not isinstance(value, str) or not value or "/" in value or value in (".", ".."):
            raise fail(key, value, "must be a folder name", "use a name without '/', or None")
    elif kind == PAIR:
        _check_pair(key, value, option)
    elif kind == MILESTONES:
        if not isinstance(value, (list, tuple)) or any(isinstance(m, bool) or not isinstance(m, int) or m < 1
                                                       for m in value) or list(value) != sorted(set(value)):
            raise fail(key, value, "must be increasing positive step numbers", "e.g. [2500, 5000, 7500]")
    elif kind == GRIDS:
        if not isinstance(value, (list, tuple)) or any(isinstance(g, bool) or not isinstance(g, int) or g < 1
                                                       for g in value) or list(value) != sorted(set(value)):
            raise fail(key, value, "must be increasing positive grid sizes (cells per side)",
                       "e.g. [4, 8, 16], or [] for model.n_grid alone")
    elif kind == ORGAN_SETS:
        if not isinstance(value, (list, tuple)) or len(value) != 4:
            raise fail(key, value, "must be four lists of organ names (fold 0-3)",
                       "e.g. [['liver'], ['spleen'], ['kidney_right', 'kidney_left'], "
                       "['psoas_right', 'psoas_left']]")
        for fold, organs in enumerate(value):
            _check_organ_list(f"{key}[{fold}]", organs)
    elif kind == ORGANS:
        _check_organ_list(key, value)
    elif kind == AMP:
        if not (isinstance(value, bool) or value in ("bf16", "fp16")):
            raise fail(key, value, "unknown", "use False, True (bf16 on GPUs that support it, else fp16; "
                       "off on CPU), 'bf16' or 'fp16' (these two on CPU too)")
    elif kind == SUPPORT:
        items = value if isinstance(value, (list, tuple)) else [value]
        if not items or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in items):
            raise fail(key, value, "must be a patient id, a list of them, 'default' or 'all'",
                       f"e.g. {key}=default")
    elif kind == SNAPSHOTS:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str) and v
                                                     for k, v in value.items()):
            raise fail(key, value, "must map method names to checkpoint paths",
                       f"e.g. '{key}={{\"LSLPN\": \"runs/.../best.pth\"}}'")
    else:  # pragma: no cover  (a kind added to SCHEMA without a check)
        raise AssertionError(f"no check for kind {kind!r}")
