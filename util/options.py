"""The generic option checker: `Option` (kind, range, choices) and `check_options` (every key of a config
tree known, else the nearest one named; every value valid). It knows no registry: the owners pass theirs.
Every error is one line, "<key> = <value>: <what is wrong>: <fix>"; a wrong type is said as such.
"""
from __future__ import annotations

import difflib
import json
import math
import numbers
from dataclasses import dataclass
from typing import Any, Mapping

from util.errors import UserError

# Kinds of value
INT, NUMBER, BOOL, CHOICE, PATH, NAME = "int", "number", "bool", "choice", "path", "name"
PAIR, MILESTONES, ORGAN_SETS, ORGANS, SUPPORT, SNAPSHOTS, GRIDS = (
    "pair", "milestones", "organ_sets", "organs", "support", "snapshots", "grids")


@dataclass(frozen=True)
class Option:
    """One config key: `kind`, bounds (`low`/`high`, open ends), `choices`, whether None is allowed."""
    kind: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple = ()
    nullable: bool = False
    example: str = ""          # a valid value for the fix text, e.g. "10000" (choices: the whole fix)


def integer(low=None, high=None, **kw) -> Option:
    return Option(INT, low, high, **kw)


def number(low=None, high=None, **kw) -> Option:
    return Option(NUMBER, low, high, **kw)


def choice(*choices, **kw) -> Option:
    return Option(CHOICE, choices=tuple(choices), **kw)


# ------------------------------------------------------------------------------ messages
def fail(key: str, value: Any, what: str, fix: str, source: str = "") -> UserError:
    """The one message shape: "<key> = <value>: <what is wrong>: <fix>" (after "<source>: " when given)."""
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    return UserError(f"{source + ': ' if source else ''}{key} = {shown}: {what}: {fix}")


def _type_word(value: Any) -> str:
    for kind, word in ((type(None), "None"), (bool, "True/False"), (str, "a string"),
                       ((list, tuple), "a list"), (Mapping, "a mapping")):
        if isinstance(value, kind):
            return word
    return type(value).__name__


def _bounds(option: Option, integral: bool) -> str:
    low, high = option.low, option.high
    if integral and low is not None and high is not None:
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


# ------------------------------------------------------------------------------ one value
def _check_numeric(key: str, value: Any, option: Option) -> None:
    integral = option.kind == INT
    noun = "an integer" if integral else "a number"
    kind = f"{noun} {_bounds(option, integral)}".strip()
    if not _is_number(value):
        if integral and isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            raise fail(key, value, "must be an integer, not a string",
                       f"write {key}={int(value)} (no quotes)")
        raise fail(key, value, f"must be {noun}, not {_type_word(value)}",
                   f"e.g. {key}={option.example}" if option.example else f"use {kind}")
    if integral and not isinstance(value, numbers.Integral):
        if math.isfinite(value) and float(value).is_integer():
            raise fail(key, value, "must be an integer", f"write {int(value)} (no decimal point)")
        raise fail(key, value, "must be an integer", f"use {kind}")
    if not integral and not math.isfinite(value):
        raise fail(key, value, "not a finite number", f"use {kind}")
    if not _in_bounds(value, option):
        raise fail(key, value, "out of range", f"use {kind}")


def _check_choice(key: str, value: Any, option: Option) -> None:
    """Choices are strings, integers (model.input_slices: 1 or 3) or True/False, each matched by its own
    type (True is never 1)."""
    if any(type(value) is type(c) and value == c for c in option.choices):
        return
    if isinstance(value, str) and value in [str(c) for c in option.choices if type(c) is int]:
        raise fail(key, value, "must be an integer, not a string", f"write {key}={value} (no quotes)")
    near = difflib.get_close_matches(str(value), [str(c) for c in option.choices], n=1, cutoff=0.6)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    what = "unknown" if all(isinstance(c, (str, bool)) for c in option.choices) else "not one of the choices"
    raise fail(key, value, what, (option.example or f"use one of {', '.join(map(repr, option.choices))}")
               + hint)


def _check_organ_list(key: str, value: Any) -> None:
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v for v in value):
        raise fail(key, value, "must be a non-empty list of organ names", f"e.g. {key}='[\"liver\"]'")


_SEQUENCES = {MILESTONES: ("must be increasing positive step numbers", "e.g. [2500, 5000, 7500]"),
              GRIDS: ("must be increasing positive grid sizes (cells per side)",
                      "e.g. [4, 8, 16], or [] for model.n_grid alone")}


def check_value(key: str, value: Any, option: Option) -> None:
    """UserError (one line) when `value` is not valid for `option`."""
    if value is None and option.nullable:
        return
    kind = option.kind
    if kind in (INT, NUMBER):
        _check_numeric(key, value, option)
    elif kind == BOOL:
        if not isinstance(value, bool):
            raise fail(key, value, "must be True or False", f"write {key}=True or {key}=False")
    elif kind == CHOICE:
        _check_choice(key, value, option)
    elif kind == PATH:
        if not isinstance(value, str) or not value:
            raise fail(key, value, "must name a path", f"give a path{' or None' if option.nullable else ''}")
    elif kind == NAME:
        if not isinstance(value, str) or not value or "/" in value or value in (".", ".."):
            raise fail(key, value, "must be a folder name", "use a name without '/', or None")
    elif kind == PAIR:
        if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_number(v) for v in value)
                and value[0] <= value[1] and _in_bounds(value[0], option) and math.isfinite(value[1])):
            raise fail(key, value, "not a range [low, high]",
                       "use two numbers with 0 < low <= high, e.g. [0.5, 2.0]")
    elif kind in (MILESTONES, GRIDS):   # increasing positive integers
        if not (isinstance(value, (list, tuple)) and list(value) == sorted(set(value))
                and not any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)):
            raise fail(key, value, *_SEQUENCES[kind])
    elif kind == ORGAN_SETS:
        if not isinstance(value, (list, tuple)) or len(value) != 4:
            raise fail(key, value, "must be four lists of organ names (fold 0-3)",
                       "e.g. [['liver'], ['spleen'], ['kidney_right', 'kidney_left'], "
                       "['psoas_right', 'psoas_left']]")
        for fold, organs in enumerate(value):
            _check_organ_list(f"{key}[{fold}]", organs)
    elif kind == ORGANS:
        _check_organ_list(key, value)
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
    else:  # pragma: no cover  (an Option of a kind without a check)
        raise AssertionError(f"no check for kind {kind!r}")


# ------------------------------------------------------------------------------ a tree of options
def sections_of(schema: Mapping[str, Option]) -> list[str]:
    """The sections of dotted keys: every proper prefix ('a' and 'a.b' of 'a.b.c')."""
    parts = [key.split(".")[:-1] for key in schema]
    return sorted({".".join(part[:i]) for part in parts for i in range(1, len(part) + 1)})


def nearest_key(key: str, known: list[str]) -> str | None:
    """The known dotted key closest to `key`: a sibling with a similar name, else any key whose last
    part is similar (difflib); None when nothing is close."""
    section, _, leaf = key.rpartition(".")
    siblings = [k.rsplit(".", 1)[-1] for k in known if k.rpartition(".")[0] == section]
    match = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)
    if match:
        return f"{section}.{match[0]}" if section else match[0]
    leaves = {k.rsplit(".", 1)[-1]: k for k in reversed(known)}
    match = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.75)
    return leaves[match[0]] if match else None


def check_options(tree: Mapping, schema: Mapping[str, Option], listed_in: str, prefix: str = "",
                  nullable_sections: tuple = ()) -> None:
    """Every key of `tree` (under `prefix`) is a dotted key of `schema` or one of its sections, every
    value valid for its Option; `listed_in` names where the keys are listed (for the fix text)."""
    sections = sections_of(schema)
    known = sorted(schema) + sections

    def walk(node: Mapping, at: str) -> None:
        for name, value in node.items():
            key = f"{at}{name}"
            if key in schema:
                check_value(key, value, schema[key])
            elif key in sections:
                if value is None and key in nullable_sections:
                    continue
                if not isinstance(value, Mapping):
                    raise fail(key, value, f"must be a mapping of {key}.* options", f"see {listed_in}")
                walk(value, f"{key}.")
            else:   # "unknown key: did you mean <nearest>?", else the keys of its section
                near, section = nearest_key(key, known), key.rpartition(".")[0]
                listed = sorted(k.rsplit(".", 1)[-1] for k in known if k.rpartition(".")[0] == section)
                fix = f"did you mean {near}?" if near else \
                    f"the known {section or 'top-level'} keys are {', '.join(listed)}"
                raise fail(key, value, "unknown key", f"{fix} ({listed_in} lists every key)")
    walk(tree, prefix)


def flatten(tree: Mapping) -> dict:
    """{'a.b': value} (plain JSON values) for the leaves of a nested config (lists, empty dicts: leaves)."""
    def leaves(node: dict, prefix: str):
        for key, value in node.items():
            if isinstance(value, dict) and value:
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value
    return dict(leaves(json.loads(json.dumps(dict(tree), default=str)), ""))

