"""util/io.py: the one pre-compute check of every output (never an input, writable, right kind)."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from util.errors import UserError
from util.io import (
    check_output_file,
    check_output_folder,
    check_writable_folder,
    output_error_message,
    same_file,
)


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder this process cannot create files in (chmod 555; /sys as root); skip when there is none."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, Path("/sys/kernel"), Path("/proc")):
        try:
            probe = candidate / f".t-{os.getpid()}"
            open(probe, "wb").close()
            probe.unlink()
        except OSError:
            return candidate
    pytest.skip("no unwritable folder on this machine")


@pytest.fixture
def files(tmp_path):
    ct = tmp_path / "q.nii.gz"
    ct.write_bytes(b"ct")
    (tmp_path / "link.nii.gz").symlink_to(ct)
    os.link(ct, tmp_path / "hard.nii.gz")
    return tmp_path, ct


@pytest.mark.parametrize("out", ["q.nii.gz", "link.nii.gz", "hard.nii.gz", "sub/../q.nii.gz"])
def test_an_output_that_is_an_input_is_refused_by_path_symlink_or_hard_link(files, out):
    folder, ct = files
    (folder / "sub").mkdir(exist_ok=True)
    with pytest.raises(UserError, match="is the input .*destroy the input"):
        check_output_file(folder / out, inputs=[Path("elsewhere.nii.gz"), ct])
    assert ct.read_bytes() == b"ct"
    assert same_file(folder / out, ct)


def test_a_new_file_next_to_the_input_is_fine_and_nothing_is_left(files):
    folder, ct = files
    before = sorted(os.listdir(folder))
    assert (check_output_file(folder / "mask.nii.gz", inputs=[ct], suffixes=(".nii.gz",))
            == folder / "mask.nii.gz")
    assert sorted(os.listdir(folder)) == before                         # the write probe is removed


@pytest.mark.parametrize("case, words", [
    ("folder", "is a folder"), ("missing parent", "does not exist"),
    ("parent is a file", "is a file, not a folder"),
    ("suffix", "ending in .nii.gz"),
])
def test_file_output_kinds(tmp_path, case, words):
    (tmp_path / "dir.nii.gz").mkdir()
    (tmp_path / "plain").write_text("x")
    out = {"folder": tmp_path / "dir.nii.gz", "missing parent": tmp_path / "no" / "m.nii.gz",
           "parent is a file": tmp_path / "plain" / "m.nii.gz", "suffix": tmp_path / "m.nrrd"}[case]
    with pytest.raises(UserError, match=words):
        check_output_file(out, suffixes=(".nii.gz",))


def test_unwritable_locations_are_refused_for_files_folders_and_log_dirs(tmp_path):
    locked = unwritable_folder(tmp_path)
    with pytest.raises(UserError, match="cannot write in"):
        check_output_file(locked / "m.nii.gz")
    with pytest.raises(UserError, match="cannot write in"):
        check_output_folder(locked / "phantom")
    with pytest.raises(UserError, match="cannot write in"):
        check_writable_folder(locked / "runs" / "deeper", "path.log_dir")


def test_folder_output_refuses_a_file_even_with_overwrite_and_an_input_inside_it(tmp_path):
    (tmp_path / "file").write_text("keep")
    with pytest.raises(UserError, match="is a file, not a folder"):
        check_output_folder(tmp_path / "file", overwrite=True)
    source = tmp_path / "data" / "visceral"
    source.mkdir(parents=True)
    for out in (source, tmp_path / "data"):
        with pytest.raises(UserError, match="input"):
            check_output_folder(out, inputs=[source], overwrite=True)
    with pytest.raises(UserError, match="--overwrite"):
        check_output_folder(source)
    assert check_output_folder(tmp_path / "new" / "prep", inputs=[source]) == tmp_path / "new" / "prep"
    assert (tmp_path / "file").read_text() == "keep"


def test_log_dir_that_is_a_file_is_refused_and_a_missing_one_is_fine(tmp_path):
    (tmp_path / "runs").write_text("x")
    with pytest.raises(UserError, match="path.log_dir .*is a file"):
        check_writable_folder(tmp_path / "runs", "path.log_dir")
    assert check_writable_folder(tmp_path / "new" / "runs", "path.log_dir") == tmp_path / "new" / "runs"
    assert not (tmp_path / "new").exists()                                 # checking creates nothing


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "disk is full"), (errno.EROFS, "read-only"),
                                         (errno.EFBIG, "size limit")])
def test_write_failures_become_one_line_messages(code, words):
    message = output_error_message(OSError(code, os.strerror(code), "out.nii.gz"))
    assert words in message and "out.nii.gz" in message and "\n" not in message
    assert output_error_message(OSError(errno.ENOENT, "x")) is None          # not a write failure: a bug
