"""Atomic file writes: a temp file in the same folder, then os.replace (never a truncated output).

The one temp-file-and-replace writer of the project: text, bytes, checkpoints (torch.save), arrays
(np.savez) and figures (savefig) all go through `atomic_path`.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield the temp path `<path>.tmp-<pid>` (same folder) to write; on success it replaces `path`.

    The parent folder is created when missing. On any error the temp file is removed and `path`
    keeps its old content (or stays absent). Writers that pick a format from the file name
    (np.savez, savefig) must be given an open handle or an explicit format.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        yield temporary
        os.replace(temporary, path)
    except OSError as error:          # e.g. a full disk: name the output in the one-line message
        if error.filename is None:
            error.filename = str(path)
        raise
    finally:
        if temporary.exists():
            temporary.unlink()


def write_bytes_atomic(data: bytes, path: str | Path) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)


def write_text_atomic(text: str, path: str | Path) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    write_bytes_atomic(text.encode(), path)
