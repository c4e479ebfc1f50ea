"""File output and input at the doors: atomic writes, output-location checks (before any compute),
the one-line message of a failed write, weights-only torch.load. docs/DESIGN.md, "Conventions".
"""
from __future__ import annotations

import errno
import os
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterable, Iterator

from util.errors import UserError

# errno values of a write that failed for lack of space or permission (not a bug in our code)
WRITE_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                errno.EFBIG: "the file size limit was reached", errno.EROFS: "the file system is read-only",
                errno.EACCES: "permission denied", errno.EPERM: "operation not permitted"}


# ------------------------------------------------------------------------------ atomic writes
@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path` (parent created) to write; on success it replaces `path`, on error
    it is removed. Writers that pick a format from the file name need a handle or an explicit format."""
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
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)


def write_text_atomic(text: str, path: str | Path) -> None:
    write_bytes_atomic(text.encode(), path)


# ------------------------------------------------------------------------------ output locations
def same_file(a: str | Path, b: str | Path) -> bool:
    """True when `a` and `b` name one file: equal resolved paths, or the same inode (hard/sym links)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:                                            # one of them does not exist
        return False


def _check_writable(label: str, folder: Path, give: str) -> None:
    """`folder`, or its nearest existing ancestor, is a folder where a file can be created (probed by
    creating one: `os.access` says yes to root on read-only mounts)."""
    anchor = folder if folder.exists() else Path(os.path.abspath(folder))
    while not anchor.exists() and anchor != anchor.parent:
        anchor = anchor.parent
    if not anchor.is_dir():
        raise UserError(f"{label}: {anchor} is a file, not a folder: {give}")
    probe = anchor / f".write-probe-{os.getpid()}"
    try:
        open(probe, "wb").close()
    except OSError as error:
        reason = WRITE_ERRNOS.get(error.errno, error.strerror or type(error).__name__)
        raise UserError(f"{label}: cannot write in {anchor} ({reason}): choose a writable location") from None
    with suppress(OSError):
        probe.unlink()


def _check_parent(out: Path, what: str, create: bool) -> None:
    """The folder that will hold `out` exists (or can be created when `create`) and is writable."""
    if not out.parent.exists() and not create:
        raise UserError(f"{what} {out}: folder {out.parent} does not exist: create it first")
    _check_writable(f"{what} {out}", out.parent, "give a path inside a folder")


def _check_not_input(out: Path, inputs: Iterable, what: str, folder: bool) -> None:
    for source in (Path(s) for s in inputs if s is not None):
        if same_file(out, source):
            raise UserError(f"{what} {out} is the input {source}: writing it would destroy the input; "
                            "give another output path")
        real_out, real_source = Path(os.path.realpath(out)), Path(os.path.realpath(source))
        if folder and source.exists() and (real_source == real_out or real_out in real_source.parents):
            raise UserError(f"{what} {out} holds the input {source}: replacing it would delete the input; "
                            "give another output folder")


def check_output_file(out: str | Path, inputs: Iterable = (), what: str = "--out",
                      suffixes: tuple[str, ...] = (), create_parent: bool = False) -> Path:
    """Check a file output before any compute (an existing file is replaced atomically): not a folder, not
    an input, one of `suffixes` (when given), a parent that exists (or `create_parent`) and is writable."""
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
    """Check a folder output (built in `<out>.partial-<pid>`, then renamed) before any compute: not a
    file, not an existing folder without `overwrite`, not (holding) an input, a writable location."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{what} {out}: is a file, not a folder: give a new folder path "
                        "(--overwrite replaces only a folder)")
    _check_not_input(out, inputs, what, folder=True)
    if out.is_dir() and not overwrite:
        raise UserError(f"{out}: already exists: pass --overwrite to replace it, or give a new folder")
    _check_parent(out, what, create_parent)
    return out


def check_writable_folder(folder: str | Path, what: str) -> Path:
    """A folder that receives files: it is a folder (or can be created) and a file can be created in it."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{what} {folder}: is a file, not a folder: give a folder path")
    _check_writable(f"{what} {folder}", folder, "give a folder path")
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


# ------------------------------------------------------------------------------ input
def dicom_fix(folder: str | Path) -> str:
    """The fix for DICOM where NIfTI is read: name a converter that writes into a new folder."""
    return ("NIfTI is read here, not DICOM: convert the series first "
            f"(e.g. dcm2niix -z y -o NEW_FOLDER {folder})")


def looks_dicom(path: str | Path) -> bool:
    """A .dcm file, or a file with the DICOM part 10 magic 'DICM' after its 128-byte preamble."""
    path = Path(path)
    if not path.is_file() or path.name.startswith("."):
        return False
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as file:
            return file.read(132)[128:] == b"DICM"
    except OSError:
        return False


def holds_dcm_files(folder: str | Path) -> bool:
    """`folder` is a folder with .dcm files in it."""
    folder = Path(folder)
    return folder.is_dir() and any(p.suffix.lower() == ".dcm" for p in folder.iterdir())


def check_input_folder(folder: str | Path, what: str, give: str) -> Path:
    """An existing folder of NIfTI data, else a one-line error (not found, a file, DICOM); `give`: the fix."""
    folder = Path(folder)
    if holds_dcm_files(folder):
        raise UserError(f"{what}{folder}: holds DICOM files: {dicom_fix(folder)}")
    if not folder.is_dir():
        found = "is a file, not a folder" if folder.exists() else "data folder not found"
        raise UserError(f"{what}{folder}: {found}: {give}")
    return folder


def safe_torch_load(path: str, map_location="cpu", what: str = "checkpoint"):
    """torch.load with weights_only=True: tensors and plain data only; nothing of the file runs."""
    import torch  # here, not at the top: util/cli.py imports this module and a script's error needs no torch
    if not os.path.isfile(path):
        raise UserError(f"{what} '{path}' does not exist: give the path of a best.pth/last.pth "
                        "written by train.py")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001  (every failure means the same: not plain tensors and data)
        raise UserError(f"{what} '{path}' is unreadable or refused ({type(error).__name__}): cannot read it "
                        "as tensors and plain data only (corrupt, truncated, not a torch file, or it holds "
                        "pickled code, which was not run): use a snapshot written by train.py from a "
                        "source you trust") from None
