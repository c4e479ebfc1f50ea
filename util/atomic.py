"""Atomic file writes: a temp file in the same folder, then os.replace (never a truncated output)."""
from __future__ import annotations

import os
from pathlib import Path


def write_bytes_atomic(data: bytes, path: str | Path) -> None:
    """Write `data` to `path` via `<path>.tmp-<pid>` in the same folder and os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def write_text_atomic(text: str, path: str | Path) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    write_bytes_atomic(text.encode(), path)
