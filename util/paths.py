"""Output locations, checked before any compute: never an input, writable, the right kind of path.

Every entry point that writes calls one of these BEFORE it reads data or builds a model, so a bad
output location costs nothing and destroys nothing:

- `check_output_file(out, inputs)`: a file to be written (replaced atomically, util/atomic.py).
- `check_output_folder(out, inputs, overwrite)`: a folder built in `<out>.partial-<pid>` and renamed.
- `check_writable_folder(folder)`: a folder that will receive files (created when missing), e.g.
  Sacred's `path.log_dir`.

"The same file as an input" means the same path, a symlink to it, or a hard link to it
(`os.path.samefile`: same device and inode), and for folders also an output folder that holds an
input (replacing it with --overwrite would delete the input). Writability is probed by creating and
removing a file, because `os.access` says yes to root even where writing fails (read-only mounts,
/proc, /sys).

`output_error_message(error, path)` turns an OSError raised while writing (disk full, quota,
read-only file system, permission) into the one-line text of a UserError; entry points use it so a
failed write ends as `error: ...` and the atomic writers leave no partial file behind.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Iterable

from util.errors import UserError

# errno values of a write that failed for lack of space or permission (not a bug in our code)
WRITE_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                errno.EFBIG: "the file size limit was reached", errno.EROFS: "the file system is read-only",
                errno.EACCES: "permission denied", errno.EPERM: "operation not permitted"}


def same_file(a: str | Path, b: str | Path) -> bool:
    """True when `a` and `b` name one file: equal resolved paths, or the same inode (hard/sym links)."""
    a, b = Path(a), Path(b)
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:                                            # one of them does not exist
        return False


def _inside(inner: Path, outer: Path) -> bool:
    """True when `inner` (resolved) is `outer` or lies below it."""
    inner, outer = Path(os.path.realpath(inner)), Path(os.path.realpath(outer))
    return inner == outer or outer in inner.parents


def _probe_writable(folder: Path) -> str | None:
    """None when a file can be created in `folder`; else the reason (e.g. 'permission denied')."""
    probe = folder / f".write-probe-{os.getpid()}"
    try:
        with open(probe, "wb"):
            pass
    except OSError as error:
        return WRITE_ERRNOS.get(error.errno, error.strerror or type(error).__name__)
    try:
        probe.unlink()
    except OSError:
        pass
    return None


def _existing_ancestor(path: Path) -> Path:
    """The nearest ancestor of `path` (or itself) that exists."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_parent(out: Path, what: str, create: bool) -> None:
    """The folder that will hold `out` exists (or can be created when `create`) and is writable."""
    parent = out.parent if str(out.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise UserError(f"{what} {out}: {parent} is a file, not a folder: give a path inside a folder")
    if not parent.exists():
        if not create:
            raise UserError(f"{what} {out}: folder {parent} does not exist: create it first")
        anchor = _existing_ancestor(parent)
        if not anchor.is_dir():
            raise UserError(f"{what} {out}: {anchor} is a file, not a folder: give a path inside a folder")
        parent = anchor
    reason = _probe_writable(parent)
    if reason is not None:
        raise UserError(f"{what} {out}: cannot write in {parent} ({reason}): choose a writable location")


def _check_not_input(out: Path, inputs: Iterable, what: str, folder: bool) -> None:
    for source in inputs:
        if source is None:
            continue
        source = Path(source)
        if same_file(out, source):
            raise UserError(f"{what} {out} is the input {source}: writing it would destroy the input; "
                            "give another output path")
        if folder and source.exists() and _inside(source, out):
            raise UserError(f"{what} {out} holds the input {source}: replacing it would delete the input; "
                            "give another output folder")


def check_output_file(out: str | Path, inputs: Iterable = (), what: str = "--out",
                      suffixes: tuple[str, ...] = (),
                      create_parent: bool = False) -> Path:
    """Check a file output before any compute; returns it as a Path.

    Refused (one-line UserError): an existing folder, the same file as any of `inputs` (path, symlink
    or hard link), a name without one of `suffixes` (when given), a parent that is missing (unless
    `create_parent`), not a folder, or not writable. An existing file is fine (replaced atomically).
    """
    out = Path(out)
    if out.is_dir():
        raise UserError(f"{what} {out}: is a folder: give a file path"
                        + (f" ending in {suffixes[0]}" if suffixes else ""))
    _check_not_input(out, inputs, what, folder=False)
    if suffixes and not out.name.endswith(tuple(suffixes)):
        raise UserError(f"{what} {out}: give a path ending in {' or '.join(suffixes)}")
    _check_parent(out, what, create_parent)
    return out


def check_output_folder(out: str | Path, inputs: Iterable = (), what: str = "--out", overwrite: bool = False,
                        create_parent: bool = True) -> Path:
    """Check a folder output (built elsewhere and renamed into place) before any compute.

    Refused: an existing FILE at `out` (even with `overwrite`: only a folder is ever replaced), an
    existing folder without `overwrite`, an output that is or holds one of `inputs`, and a location
    that cannot be written.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{what} {out}: is a file, not a folder: give a new folder path "
                        "(--overwrite replaces only a folder)")
    _check_not_input(out, inputs, what, folder=True)
    if out.is_dir() and not overwrite:
        raise UserError(f"{out}: already exists: pass --overwrite to replace it (or --skip-existing to keep "
                        "it)")
    _check_parent(out, what, create_parent)
    return out


def check_writable_folder(folder: str | Path, what: str) -> Path:
    """A folder that receives files: it is a folder (or can be created) and a file can be created in it."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{what} {folder}: is a file, not a folder: give a folder path")
    anchor = folder if folder.is_dir() else _existing_ancestor(folder)
    if not anchor.is_dir():
        raise UserError(f"{what} {folder}: {anchor} is a file, not a folder: give a folder path")
    reason = _probe_writable(anchor)
    if reason is not None:
        raise UserError(f"{what} {folder}: cannot write in {anchor} ({reason}): choose a writable location")
    return folder


def output_error_message(error: OSError, path: str | Path | None = None) -> str | None:
    """One-line text for an OSError of a full disk or a denied access; None for any other OSError."""
    reason = WRITE_ERRNOS.get(error.errno)
    if reason is None:
        return None
    where = path or error.filename or "the output"
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return (f"{where}: writing failed ({reason}): free space or choose another location, then run again; "
                "no partial output was kept")
    return f"{where}: {reason}: check its permissions or choose a writable location"
