"""Several organs in one call (evaluation.segment.segment / segment_queries, scripts/segment_volume.py):
the same labels per organ as one call per organ, no ground-truth range, a support folder reused for
several queries, DICOM queries, the README example, and bad input. Phantoms: tests/test_segment_volume.py."""
from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import test_segment_volume as PHANTOM
from conftest import assert_one_line_error, run_script
from test_dicom import write_series

from util.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
NAMES = {1: "liver", 2: "spleen", 14: "kidney_left", 17: "gallbladder"}


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """A support folder of two multi-label scans (labels.json), two queries (one stored LPS), a checkpoint."""
    root = tmp_path_factory.mktemp("organs")
    supports = root / "supports"
    supports.mkdir()
    for seed in (1, 3):
        image, label = PHANTOM.make_subject(seed)
        label[label == 13] = 0                                  # an organ named nowhere: not in the map
        PHANTOM.save(supports / f"image_{seed}.nii.gz", image)
        PHANTOM.save(supports / f"label_{seed}.nii.gz", label)
    (supports / "labels.json").write_text(json.dumps({"labels": {str(v): n for v, n in NAMES.items()}}))
    query_image, query_label = PHANTOM.make_subject(2)
    files = {"root": root, "supports": supports, "query_label": query_label, "query_image": query_image,
             "query": PHANTOM.save(root / "query.nii.gz", query_image),
             "query_lps": PHANTOM.save(root / "query_lps.nii.gz", query_image, lps=True)}
    files["checkpoint"] = PHANTOM.write_checkpoint(root / "tiny.pth", PHANTOM.train_tiny())
    return files


def run(scans, organs=None, **options):
    from evaluation.segment import segment
    options = {"n_chunks": 6, "device": "cpu", **options}
    return segment(options.pop("query", scans["query"]), scans["supports"], organs, scans["checkpoint"],
                   **options)


def test_several_organs_equal_one_call_per_organ(scans):
    single = {}
    for value, name in NAMES.items():
        alone, alone_names, _ = run(scans, [name])
        assert alone_names == {value: name} and set(np.unique(alone)) <= {0, value}
        single[value] = alone == value
    labels, names, affine = run(scans)
    assert names == NAMES and labels.dtype == np.uint8
    assert np.array_equal(affine, nib.load(str(scans["query"])).affine)
    assert labels.any()
    for value in NAMES:                                   # identical, but where a higher score won
        assert np.array_equal(labels == value, single[value] & (labels == value))
        lost = single[value] & (labels != value)
        assert all(single[other][lost & (labels == other)].all() for other in NAMES if other != value)
        assert not (lost & (labels == 0)).any()


def test_no_range_needed_and_the_sidecar_states_it(scans, tmp_path):
    from evaluation.protocols import dice
    from evaluation.segment import segment_queries
    out = tmp_path / "labels.nii.gz"
    (labels, names, _, ranges), = segment_queries([scans["query_lps"]], scans["supports"], ["liver", 2],
                                                  scans["checkpoint"], [out], n_chunks=6, device="cpu")
    written = nib.load(str(out))
    assert nib.aff2axcodes(written.affine) == ("L", "P", "S")
    assert np.array_equal(np.asarray(written.dataobj), labels)
    sidecar = json.loads(out.with_name("labels.json").read_text())
    assert sidecar["labels"] == {"1": "liver", "2": "spleen"}
    liver = sidecar["organs"]["liver"]
    assert "largest 3D connected component" in liver["method"] and liver["found"] is not None
    z = np.flatnonzero((labels[::-1, ::-1] == 1).any(axis=(0, 1)))
    assert liver["found"] == [int(z[0]), int(z[-1]) + 1]
    assert dice(labels[::-1, ::-1] == 1, scans["query_label"] == 1) > 0.3


def test_support_dir_for_several_queries_computes_prototypes_once(scans, tmp_path, monkeypatch, capsys):
    import evaluation.segment as segment_module
    calls = []
    original = segment_module.support_prototypes
    monkeypatch.setattr(segment_module, "support_prototypes", lambda *a: calls.append(1) or original(*a))
    common = ["--checkpoint", scans["checkpoint"], "--support-dir", scans["supports"], "--n-chunks", "6",
              "--device", "cpu", "--no-progress", "--query", scans["query"]]
    code, err = run_script("segment_volume", common + ["--out", tmp_path / "one.nii.gz"], capsys)
    assert code == 0 and (tmp_path / "one.json").is_file(), err
    once = len(calls)
    out = tmp_path / "many"
    code, err = run_script("segment_volume", common + ["--query", scans["query_lps"], "--out", out], capsys)
    assert code == 0, err
    assert len(calls) == 2 * once
    first, second = (np.asarray(nib.load(str(out / f"{name}_labels.nii.gz")).dataobj)
                     for name in ("query", "query_lps"))
    assert np.array_equal(first[::-1, ::-1], second)
    assert np.array_equal(first, np.asarray(nib.load(str(tmp_path / "one.nii.gz")).dataobj))


def test_dicom_query_gives_the_nifti_result_in_the_series_geometry(scans, tmp_path):
    affine = nib.load(str(scans["query"])).affine
    folder = tmp_path / "series"
    write_series(folder, scans["query_image"].astype(np.float32), affine)
    from_nifti, _, _ = run(scans)
    labels, _, dicom_affine = run(scans, query=folder)
    assert np.allclose(dicom_affine, affine, atol=1e-4) and np.array_equal(labels, from_nifti)
    supports = tmp_path / "supports"                                 # a support scan as a DICOM series
    supports.mkdir()
    image = nib.load(str(scans["supports"] / "image_1.nii.gz"))
    write_series(supports / "image_1", np.asarray(image.dataobj, np.float32), image.affine)
    for name in ("label_1.nii.gz", "labels.json"):
        (supports / name).symlink_to(scans["supports"] / name)
    from evaluation.segment import segment, segment_volume
    nifti_support = tmp_path / "nifti_support"
    nifti_support.mkdir()
    for name in ("image_1.nii.gz", "label_1.nii.gz", "labels.json"):
        (nifti_support / name).symlink_to(scans["supports"] / name)
    from_dicom = segment(folder, supports, None, scans["checkpoint"], n_chunks=6, device="cpu")[0]
    assert np.array_equal(from_dicom, segment(scans["query"], nifti_support, None, scans["checkpoint"],
                                              n_chunks=6, device="cpu")[0])
    one = dict(support_label="liver", label_map=scans["supports"] / "labels.json", n_chunks=6, device="cpu",
               progress=False)                                      # the one-organ call reads DICOM too
    pair = [(supports / "image_1", scans["supports"] / "label_1.nii.gz")]
    assert np.array_equal(segment_volume(scans["checkpoint"], pair, folder, **one)[0],
                          segment_volume(scans["checkpoint"], pair, scans["query"], **one)[0])
    write_series(folder, scans["query_image"].astype(np.float32), affine, prefix="B")   # 2nd series
    with pytest.raises(UserError, match="series"):
        run(scans, query=folder)


def test_bad_input(scans, tmp_path, monkeypatch, capsys):
    with pytest.raises(UserError, match="in no support label map"):
        run(scans, ["pancreas"])
    other = tmp_path / "other"
    other.mkdir()
    for name in ("image_1.nii.gz", "label_1.nii.gz", "image_3.nii.gz", "label_3.nii.gz"):
        (other / name).symlink_to(scans["supports"] / name)
    (other / "label_1.json").write_text(json.dumps({"liver": 1, "spleen": 2}))
    (other / "label_3.json").write_text(json.dumps({"liver": 2, "spleen": 1}))
    from evaluation.segment import segment
    with pytest.raises(UserError, match="disagree"):
        segment(scans["query"], other, None, scans["checkpoint"], device="cpu")
    mr = tmp_path / "mr.nii.gz"
    PHANTOM.save(mr, (scans["query_image"].astype(np.float32) + 1000) / 3)
    out = tmp_path / "x.nii.gz"
    with pytest.raises(UserError, match="the query is MR but the supports are CT"):
        run(scans, query=mr, out=out)
    assert not out.exists()
    many = tmp_path / "many"                                          # the command line: one line, no output
    assert_one_line_error(*run_script("segment_volume", [
        "--checkpoint", scans["checkpoint"], "--support-dir", scans["supports"], "--organs", "liver,pancreas",
        "--query", scans["query"], "--query", mr, "--out", many, "--device", "cpu"], capsys), "pancreas")
    assert not many.exists()
    import evaluation.segment as segment_module
    monkeypatch.setattr(segment_module, "score_organs", lambda model, plans, image, *a: {
        v: (0, np.full(image.shape, -1.0, np.float32)) for v in plans})
    labels, _, _ = run(scans, ["liver"])
    assert not labels.any() and re.search(r"warning: query.nii.gz: no liver found", capsys.readouterr().err)


def test_readme_example_runs(scans, tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Segment your own scan"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    (tmp_path / "supports").symlink_to(scans["supports"])
    (tmp_path / "query.nii.gz").symlink_to(scans["query"])
    (tmp_path / "best.pth").symlink_to(scans["checkpoint"])
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README example", "exec"), namespace)
    assert namespace["names"] == {1: "liver", 2: "spleen"} and (tmp_path / "organs.nii.gz").is_file()


def test_query_range_overrides_for_every_organ(scans):
    from evaluation.segment import segment_queries
    (labels, _, _, ranges), = segment_queries([scans["query"]], scans["supports"], ["liver", "spleen"],
                                              scans["checkpoint"], query_range="6:12", n_chunks=6,
                                              device="cpu")
    assert labels[..., 6:12].any() and not labels[..., :6].any() and not labels[..., 12:].any()
    assert all(entry["method"] == "given by --query-range" and entry["scored"] == [6, 12]
               for entry in ranges.values())


def test_mask_copy_scores_the_support_masks_along_the_plan():
    """score_organs without a model (the CHAOS benchmark's no-oracle mask copy): each planned query slice
    gets the majority of its chunk's support masks, nearest-resized to the query's grid."""
    from evaluation.protocols import resize_nearest
    from evaluation.segment import Support, score_organs
    rng = np.random.default_rng(0)
    masks = [rng.random((8, 6, 5)) < 0.5 for _ in range(3)]
    supports = [Support(np.zeros((8, 6, 5), np.float32), mask, np.arange(5), f"s{i}")
                for i, mask in enumerate(masks)]
    plan = [(np.array([0, 1, 2]), np.array([3, 4])), (np.array([4, 4, 3]), np.array([5]))]
    (z0, score), = score_organs(None, {1: (supports, plan)}, np.zeros((16, 12, 9), np.float32), 0, None,
                                "cpu", 4, {}).values()
    assert z0 == 3 and score.shape == (16, 12, 3)
    for columns, (support_z, _) in zip(([0, 1], [2]), plan):
        votes = sum(resize_nearest(mask[:, :, z], (16, 12)).astype(int) for mask, z in zip(masks, support_z))
        assert all(np.array_equal(score[:, :, c] > 0, votes >= 2) for c in columns)
