"""The SSL-ALPNet layout reader and its per-fold prepared folders, on synthetic folders in that layout and
on the real CHAOS-T2 folder when present ($CHAOS_T2_DIR or ../shared/data/chaos_mr_t2; else they skip)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import load_script

from dataloaders import layouts as layout
from dataloaders.organs import NAME_TO_INDEX
from dataloaders.prepare import normalised_volume, prepare_alpnet
from util.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
REAL = Path(os.environ.get("CHAOS_T2_DIR") or ROOT.parent / "shared" / "data" / "chaos_mr_t2")
needs_real = pytest.mark.skipif(not (REAL / "classmap_1.json").is_file(),
                                reason=f"CHAOS-T2 in SSL-ALPNet's layout not found at {REAL} "
                                "(set CHAOS_T2_DIR)")
AFFINE = np.diag([-1.25, 1.25, 7.7, 1.0])


def _save(array: np.ndarray, path: Path) -> None:
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=np.float64), AFFINE), str(path))


def write_alpnet_folder(folder: Path, ids, dataset=layout.CHAOS_T2, size: int = 24, depth: int = 12,
                        seed: int = 0, cell: int = 6) -> Path:
    """A folder in SSL-ALPNet's layout: every evaluated organ as a box at its own slices, superpixels in a
    grid of cell x cell squares, classmap_1.json from the labels. Arrays are nibabel X x Y x Z."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    classmap = {name: {} for name in dataset.class_names.values()}
    boxes = {v: (slice(2 + 5 * (i % 4), 6 + 5 * (i % 4)), slice(3 + 8 * (i // 4), 10 + 8 * (i // 4)))
             for i, v in enumerate(dataset.evaluated)}
    for n, sid in enumerate(ids):
        image = rng.uniform(0, 50, (size, size, depth)) + (200.0 if dataset.modality == "MR" else 0.0)
        label = np.zeros((size, size, depth))
        for k, value in enumerate(dataset.evaluated):
            first = 1 + (k + n) % 3
            label[boxes[value][0], boxes[value][1], first:first + 7] = value
        image[label > 0] += 300.0
        per_row = -(-size // cell)                                  # superpixels: a grid of squares
        grid = (np.arange(size)[:, None] // cell) * per_row + np.arange(size)[None, :] // cell + 1
        superpixels = np.repeat(grid[:, :, None], depth, axis=2).astype(float)
        _save(image, folder / f"image_{sid}.nii.gz")
        _save(label, folder / f"label_{sid}.nii.gz")
        _save(superpixels, folder / f"superpix-MIDDLE_{sid}.nii.gz")
        for value, name in dataset.class_names.items():
            zs = (np.flatnonzero((label > 0).any(axis=(0, 1))) if value == 0 else
                  np.flatnonzero((label == value).any(axis=(0, 1))))
            if zs.size:
                classmap[name][str(sid)] = zs.tolist()
    (folder / "classmap_1.json").write_text(json.dumps(classmap))
    return folder


def test_detect_dataset_and_ids_sorted_as_integers(tmp_path):
    chaos = write_alpnet_folder(tmp_path / "chaos", [10, 2, 1, 3, 5, 8])
    assert layout.detect_dataset(chaos) is layout.CHAOS_T2
    assert layout.scan_ids(chaos) == [1, 2, 3, 5, 8, 10]          # not lexicographic (1, 10, 2, ...)
    sabs = write_alpnet_folder(tmp_path / "sabs", range(6), dataset=layout.SABS)
    assert layout.detect_dataset(sabs) is layout.SABS
    (tmp_path / "other").mkdir()
    with pytest.raises(UserError, match="no image_<id>"):
        layout.detect_dataset(tmp_path / "other")
    (chaos / "classmap_1.json").write_text(json.dumps({"BG": {}, "HEART": {}}))
    with pytest.raises(UserError, match="classmap_1.json: class names .* neither"):
        layout.detect_dataset(chaos)


def test_ids_that_do_not_pair_name_the_file(tmp_path):
    folder = write_alpnet_folder(tmp_path / "d", [1, 2, 3])
    (folder / "label_2.nii.gz").unlink()
    with pytest.raises(UserError, match=r"image_2\.nii\.gz: no label_2\.nii\.gz"):
        layout.scan_ids(folder)
    write_alpnet_folder(tmp_path / "e", [1, 2])
    (tmp_path / "e" / "image_1.nii.gz").unlink()
    with pytest.raises(UserError, match=r"label_1\.nii\.gz: no image_1"):
        layout.scan_ids(tmp_path / "e")


def test_reading_follows_simpleitk_order_and_checks_grid_and_classmap(tmp_path):
    folder = write_alpnet_folder(tmp_path / "d", [1, 2])
    stored = np.asarray(nib.load(str(folder / "image_1.nii.gz")).dataobj)                 # X x Y x Z
    scan = layout.load_scan(folder, 1, layout.CHAOS_T2, superpixels=True,
                            classmap=layout.read_classmap(folder))
    assert np.array_equal(scan.image, stored.transpose(1, 0, 2))         # SimpleITK [Z,Y,X] -> [Y,X,Z]
    assert scan.superpixels.dtype == np.int32 and scan.superpixels.max() == 16
    _save(np.zeros((20, 24, 12)), folder / "label_2.nii.gz")
    with pytest.raises(UserError, match=r"label_2\.nii\.gz: on another grid"):
        layout.load_scan(folder, 2, layout.CHAOS_T2)
    classmap = layout.read_classmap(folder)
    classmap["LIVER"]["1"] = classmap["LIVER"]["1"][1:]
    with pytest.raises(UserError, match="classmap_1.json: LIVER of scan 1 lists slices"):
        layout.load_scan(folder, 1, layout.CHAOS_T2, classmap=classmap)


def test_classmap_is_computed_from_the_labels_when_absent(tmp_path):
    folder = write_alpnet_folder(tmp_path / "d", [1, 2, 3, 5, 8, 10])
    shipped = layout.read_classmap(folder)
    assert layout.compute_classmap(folder, layout.CHAOS_T2) == shipped
    with_file = prepare_alpnet(folder, tmp_path / "a", fold=0, setting=2, label_set=0)
    (folder / "classmap_1.json").unlink()
    assert layout.read_classmap(folder) is None and layout.detect_dataset(folder) is layout.CHAOS_T2
    without = prepare_alpnet(folder, tmp_path / "b", fold=0, setting=2, label_set=0)
    assert without["alpnet"] == with_file["alpnet"]
    assert (tmp_path / "a" / "index.json").read_text() == (tmp_path / "b" / "index.json").read_text()
    sabs = write_alpnet_folder(tmp_path / "sabs", range(3), dataset=layout.SABS)
    (sabs / "classmap_1.json").unlink()
    assert layout.detect_dataset(sabs) is layout.SABS                 # told apart by the label values
    assert layout.compute_classmap(sabs, layout.SABS)["BGD"]["0"] == list(range(12))   # every slice


def test_labels_only_folder_prepares_without_superpixels(tmp_path):
    from dataloaders.superpixels import read_superpixel_meta
    folder = write_alpnet_folder(tmp_path / "d", [1, 2, 3, 5, 8, 10, 13])
    for path in [*folder.glob("superpix-MIDDLE_*"), folder / "classmap_1.json"]:
        path.unlink()                                       # only image_<id> and label_<id> are left
    meta = prepare_alpnet(folder, tmp_path / "p", fold=0, setting=2, label_set=0)
    assert meta["alpnet"]["superpixels"] is False and not (tmp_path / "p" / "superpixels").exists()
    assert (tmp_path / "p" / "train" / "10_label.npy").is_file()
    with pytest.raises(UserError, match=r"no superpixels .*superpixels\.py --alpnet .*/d` in the source"):
        read_superpixel_meta(tmp_path / "p")
    from dataloaders.superpixels import make_alpnet_superpixels
    before = sorted(path.name for path in folder.iterdir())
    make_alpnet_superpixels(folder, workers=1, progress=False, out=tmp_path / "sp")   # the data untouched
    assert sorted(path.name for path in folder.iterdir()) == before
    meta = prepare_alpnet(folder, tmp_path / "with", fold=0, setting=2, label_set=0,
                          superpixel_dir=tmp_path / "sp")
    assert meta["alpnet"]["superpixels"] and read_superpixel_meta(tmp_path / "with")["volumes"]
    write_alpnet_folder(tmp_path / "partial", [1, 2, 3, 5, 8, 10, 13])
    (tmp_path / "partial" / "superpix-MIDDLE_13.nii.gz").unlink()
    with pytest.raises(UserError, match=r"superpix-MIDDLE_13\.nii\.gz: missing .*\[13\].*--alpnet"):
        prepare_alpnet(tmp_path / "partial", tmp_path / "q", fold=0, setting=2, label_set=0)
    assert not (tmp_path / "q").exists()


@needs_real
def test_computed_classmap_equals_the_shipped_chaos_t2_one():
    assert layout.compute_classmap(REAL, layout.CHAOS_T2) == layout.read_classmap(REAL)


def test_fold_split_is_circular_with_the_next_scan_as_support():
    chaos = [1, 2, 3, 5, 8, 10, 13, 15, 19, 20, 21, 22, 31, 32, 33, 34, 36, 37, 38, 39]
    assert layout.fold_scans(chaos, 0, layout.CHAOS_T2)[:2] == ([1, 2, 3, 5], 8)
    assert layout.fold_scans(chaos, 2, layout.CHAOS_T2)[:2] == ([19, 20, 21, 22], 31)
    test, support, training = layout.fold_scans(chaos, 4, layout.CHAOS_T2)
    assert (test, support) == ([36, 37, 38, 39], 1) and len(training) == 15 and 1 not in training
    test, support, training = layout.fold_scans(list(range(30)), 4, layout.SABS)
    assert (test, support, len(training)) == ([24, 25, 26, 27, 28, 29], 0, 23)
    for bad in (5, -1, 1.0):
        with pytest.raises(UserError, match="use 0-4"):
            layout.fold_scans(chaos, bad, layout.CHAOS_T2)


def test_or_and_rules_on_the_worked_example():
    label = np.zeros((4, 4, 37), np.uint8)
    label[0, 0, 12:26] = 2                      # RK 12-25
    label[1, 1, 14:30] = 3                      # LK 14-29
    dropped_or = np.flatnonzero(~layout.kept_slices(label, [2, 3], "or"))
    dropped_and = np.flatnonzero(~layout.kept_slices(label, [2, 3], "and"))
    assert dropped_or.tolist() == list(range(12, 30))          # 18 slices
    assert dropped_and.tolist() == list(range(14, 26))         # 12 slices
    assert layout.kept_slices(label, [], "or").all()           # Setting 1


def test_mr_zscore_has_no_eps_and_labels_map_to_the_vocabulary():
    image = np.arange(24, dtype=float).reshape(2, 3, 4)
    expected = (image - image.mean()) / image.std()
    assert np.allclose(normalised_volume(image, {"mode": "zscore"}), expected)
    mapped = layout.to_vocabulary(np.array([0, 1, 2, 3, 4], np.uint8), layout.CHAOS_T2)
    assert mapped.tolist() == [0, NAME_TO_INDEX["liver"], NAME_TO_INDEX["kidney_right"],
                               NAME_TO_INDEX["kidney_left"], NAME_TO_INDEX["spleen"]]
    # esophagus, stomach, IVC -> 0
    sabs = layout.to_vocabulary(np.array([1, 5, 6, 7, 9], np.uint8), layout.SABS)
    assert sabs.tolist() == [NAME_TO_INDEX["spleen"], 0, NAME_TO_INDEX["liver"], 0, 0]


def test_setting2_leaves_no_training_slice_with_a_test_organ(tmp_path):
    folder = write_alpnet_folder(tmp_path / "d", [1, 2, 3, 5, 8, 10, 13])
    for label_set, rule in ((0, "or"), (1, "or"), (1, "and")):
        out = tmp_path / f"prep{label_set}{rule}"
        meta = prepare_alpnet(folder, out, fold=0, setting=2, label_set=label_set, rule=rule)
        assert meta["splits"]["train"] == ["10", "13"] and meta["alpnet"]["support"] == "8"
        test = [NAME_TO_INDEX[o] for o in layout.CHAOS_T2.test_organs(label_set)]
        for sid in meta["splits"]["train"]:
            labels = np.load(out / "train" / f"{sid}_label.npy")                 # N x 256 x 256
            superpixels = np.load(out / "superpixels" / f"{sid}.npy")
            assert superpixels.shape == labels.shape
            holds = np.stack([(labels == t).any(axis=(1, 2)) for t in test])    # T x N
            assert not (holds.any(axis=0) if rule == "or" else holds.all(axis=0)).any()
            assert labels.shape[0] == meta["alpnet"]["kept"][sid]["kept"] \
                < meta["alpnet"]["kept"][sid]["slices"]
    meta = prepare_alpnet(folder, tmp_path / "s1", fold=0, setting=1)
    assert all(v["kept"] == v["slices"] for v in meta["alpnet"]["kept"].values())
    images = np.load(tmp_path / "s1" / "train" / "10_image.npy")
    raw = np.asarray(nib.load(str(folder / "image_10.nii.gz")).dataobj).transpose(1, 0, 2)
    assert np.allclose(images, np.moveaxis((raw - raw.mean()) / raw.std(), 2, 0), atol=1e-5)   # MR z-score


def test_bad_input_leaves_nothing_half_written(tmp_path):
    folder = write_alpnet_folder(tmp_path / "d", [1, 2, 3, 5, 8, 10])
    label = np.asarray(nib.load(str(folder / "label_8.nii.gz")).dataobj).copy()
    label[label == 2] = 0                                       # the support loses its right kidney
    _save(label, folder / "label_8.nii.gz")
    classmap = json.loads((folder / "classmap_1.json").read_text())
    classmap["RK"].pop("8")
    (folder / "classmap_1.json").write_text(json.dumps(classmap))
    with pytest.raises(UserError, match=r"label_8\.nii\.gz: the support scan of fold 0 holds no RK"):
        prepare_alpnet(folder, tmp_path / "out", fold=0, setting=2, label_set=0)
    assert not list(tmp_path.glob("out*"))
    with pytest.raises(UserError, match="setting 3"):
        prepare_alpnet(folder, tmp_path / "out", fold=0, setting=3)
    with pytest.raises(UserError, match="exclusion rule 'xor' is unknown: use 'or'"):
        prepare_alpnet(folder, tmp_path / "out", fold=0, rule="xor")
    small = write_alpnet_folder(tmp_path / "small", [1, 2, 3, 5, 8])       # 4 test + 1 support, none to train
    with pytest.raises(UserError, match="fold 0 of chaos_t2 needs 6 distinct scans"):
        prepare_alpnet(small, tmp_path / "out", fold=0, setting=1)
    assert not list(tmp_path.glob("out*"))


@needs_real
def test_real_scan_1_or_and_counts_and_classmap():
    dataset = layout.detect_dataset(REAL)
    assert dataset is layout.CHAOS_T2 and len(layout.scan_ids(REAL)) == 20
    scan = layout.load_scan(REAL, 1, dataset, superpixels=True, classmap=layout.read_classmap(REAL))
    assert scan.label.shape[2] == 37
    assert np.flatnonzero(~layout.kept_slices(scan.label, [2, 3], "or")).tolist() == list(range(12, 30))
    assert np.flatnonzero(~layout.kept_slices(scan.label, [2, 3], "and")).tolist() == list(range(14, 26))
    assert (~layout.kept_slices(scan.label, [1, 4], "or")).sum() == 24
    assert (~layout.kept_slices(scan.label, [1, 4], "and")).sum() == 14


def test_prepare_script_alpnet_layout_refuses_an_hu_window_on_mr(tmp_path):
    folder = write_alpnet_folder(tmp_path / "d", [1, 2, 3, 5, 8, 10])
    prepare = load_script("prepare_visceral")
    with pytest.raises(UserError, match="HU window on MR"):
        prepare.main(["--visceral-dir", str(folder), "--layout", "alpnet", "--window", "-125", "275",
                      "--out", str(tmp_path / "p")])
    assert not list(tmp_path.glob("p*"))
    assert prepare.main(["--visceral-dir", str(folder), "--layout", "alpnet", "--setting", "2",
                         "--label-set", "1",
                         "--out", str(tmp_path / "p")]) == 0
    meta = json.loads((tmp_path / "p" / "meta.json").read_text())
    assert meta["intensity"] == {"mode": "zscore"} and meta["alpnet"]["test_organs"] == ["liver", "spleen"]
    check = load_script("check_dataset")
    assert check.main([str(tmp_path / "p")]) in (0, None)        # the checker accepts the folder


def test_ct_training_and_test_scans_use_the_training_scans_pooled_statistics(tmp_path):
    """Three training scans with different statistics (and test scans with others): every training slice
    and every evaluation volume is scaled by the mean and std pooled over the training scans' voxels,
    not by its own volume's, nor by statistics that include test scans."""
    folder = write_alpnet_folder(tmp_path / "sabs", range(10), dataset=layout.SABS)
    for sid in range(10):                                       # each scan scaled and shifted its own way
        path = folder / f"image_{sid}.nii.gz"
        scale, shift = 1 + (5 * sid) % 7, 400 * ((3 * sid) % 5) - 800
        _save(np.asarray(nib.load(str(path)).dataobj) * scale + shift, path)
    meta = prepare_alpnet(folder, tmp_path / "p", fold=0, setting=1)
    assert meta["splits"]["train"] == ["7", "8", "9"]           # 0-5 test, 6 support
    raws = {sid: np.asarray(nib.load(str(folder / f"image_{sid}.nii.gz")).dataobj).transpose(1, 0, 2)
            for sid in range(10)}                               # Y x X x Z
    pooled = np.concatenate([raws[sid].ravel() for sid in (7, 8, 9)])
    mean, std = pooled.mean(), pooled.std()
    assert (meta["intensity"]["mean"], meta["intensity"]["std"]) == pytest.approx((mean, std), rel=1e-9)
    for sid in (7, 8, 9):
        stored = np.load(tmp_path / "p" / "train" / f"{sid}_image.npy")               # Z x Y x X
        own = (raws[sid] - raws[sid].mean()) / raws[sid].std()
        assert not np.allclose(np.moveaxis(own, 2, 0), stored, atol=0.1)             # the rules differ here
        np.testing.assert_allclose(stored, np.moveaxis((raws[sid] - mean) / std, 2, 0), atol=1e-5)
    for sid in (0, 6):                                          # a test scan and the support
        gold = np.load(tmp_path / "p" / "volumes" / "gold" / f"{sid}.npz")["image"]
        np.testing.assert_allclose(gold, raws[sid], atol=1e-3)                      # stored as read
        np.testing.assert_allclose(normalised_volume(gold, meta["intensity"]), (raws[sid] - mean) / std,
                                   atol=1e-4)
    sizes = [np.arange(10.0), np.arange(30.0) * 3 + 7]          # unequal sizes: pooled != mean of means
    both = np.concatenate(sizes)
    assert layout.ct_statistics(sizes) == pytest.approx((both.mean(), both.std()), rel=1e-12)
