"""Options dataclasses built from config mappings: unknown keys are one-line errors."""
from __future__ import annotations

from dataclasses import fields
from typing import Any, Mapping, TypeVar

from util.errors import UserError

Options = TypeVar("Options")


def options_from_mapping(cls: type[Options], values: Mapping[str, Any], name: str) -> Options:
    """`cls(**values)` for a dataclass `cls`; UserError naming `name` and the known keys on an unknown key."""
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise UserError(f"{name} has unknown keys {sorted(unknown)}: use {sorted(known)}")
    return cls(**values)
