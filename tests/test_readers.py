"""Readers: NIfTI validation and reorientation, the VISCERAL layout and the multi-label layout."""
from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import axcodes2ornt, ornt_transform
from scipy import ndimage

from dataloaders import layouts
from dataloaders.label_map import read_label_map
from dataloaders.nifti import load_nifti, save_nifti_atomic, to_original
from dataloaders.organs import NAME_TO_INDEX
from util.errors import UserError

REAL_CT = Path(__file__).resolve().parents[1].parent / "shared/data/real_ct"
AFFINE = np.diag([1.5, 1.5, 4.0, 1.0])


def write(path: Path, array, affine=AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    return path


def small_corpus(root: Path, pid: str = "10000100") -> Path:
    """A VISCERAL corpus with one 8 x 8 x 4 volume and liver + kidney_right masks."""
    image = np.arange(256, dtype=np.int16).reshape(8, 8, 4)
    write(root / "Volumes" / layouts.volume_filename(pid), image)
    liver = np.zeros((8, 8, 4), np.uint8)
    liver[:4] = 1
    kidney = np.zeros((8, 8, 4), np.uint8)
    kidney[6:, 6:] = 1
    write(root / "Segmentations" / layouts.mask_filename(pid, 58), liver)
    write(root / "Segmentations" / layouts.mask_filename(pid, 29662), kidney)
    return root


# ---------------------------------------------------------------- NIfTI
@pytest.mark.parametrize("codes", ["RAS", "LPS", "LAS", "PSR", "ILA", "SRP"])
def test_reorientation_round_trip(tmp_path, codes):
    canonical = np.random.default_rng(0).integers(0, 100, (5, 6, 7)).astype(np.int16)
    image = nib.Nifti1Image(canonical, AFFINE)
    stored = image.as_reoriented(ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(tuple(codes))))
    nib.save(stored, str(tmp_path / "v.nii.gz"))
    volume = load_nifti(tmp_path / "v.nii.gz")
    assert volume.original_axcodes == codes
    assert np.array_equal(volume.array, canonical)
    assert np.allclose(volume.affine, AFFINE)
    assert np.array_equal(to_original(volume.array, volume.original_axcodes), np.asarray(stored.dataobj))
    assert np.allclose(volume.spacing, [1.5, 1.5, 4.0])


def test_save_nifti_atomic_is_deterministic_and_leaves_no_temporary(tmp_path):
    array = np.random.default_rng(1).integers(-5, 5, (4, 5, 6)).astype(np.int16)
    save_nifti_atomic(array, AFFINE, tmp_path / "a.nii.gz")
    first = (tmp_path / "a.nii.gz").read_bytes()
    save_nifti_atomic(array, AFFINE, tmp_path / "a.nii.gz")
    assert (tmp_path / "a.nii.gz").read_bytes() == first
    assert [p.name for p in tmp_path.iterdir()] == ["a.nii.gz"]
    loaded = nib.load(str(tmp_path / "a.nii.gz"))
    assert np.array_equal(np.asarray(loaded.dataobj), array) and np.allclose(loaded.affine, AFFINE)


def test_unreadable_files_and_images_that_are_not_3d(tmp_path):
    """Beyond the error table's rows (a missing, truncated, NaN/inf, 2D or 4D image through the scripts):
    bytes that are no NIfTI, a gzip stream cut inside the header, and a 4D image of one frame (read)."""
    (tmp_path / "junk.nii.gz").write_bytes(b"this is not a nifti file")
    with pytest.raises(UserError, match="junk.nii.gz.*corrupt or truncated"):
        load_nifti(tmp_path / "junk.nii.gz")
    data = write(tmp_path / "good.nii.gz", np.zeros((20, 20, 20), np.float32)).read_bytes()
    (tmp_path / "plain.nii.gz").write_bytes(gzip.compress(gzip.decompress(data)[:200]))
    with pytest.raises(UserError, match="plain.nii.gz"):
        load_nifti(tmp_path / "plain.nii.gz")
    assert (load_nifti(write(tmp_path / "single.nii.gz", np.zeros((4, 4, 4, 1), np.int16))).array.shape
            == (4, 4, 4))


# ---------------------------------------------------------------- VISCERAL
@pytest.mark.parametrize("name, expected", [
    ("10000100_1_CTce_ThAb_58_6.nii.gz", ("10000100", 58)),
    ("10000100_58_6.nii.gz", ("10000100", 58)),
    ("10000100_1_CTce_ThAb_29662_1.nii", ("10000100", 29662)),
    ("10000100_1_CTce_ThAb.nii.gz", None),
    ("notes.txt", None)])
def test_mask_names_parse_both_variants(name, expected):
    assert layouts.parse_mask_name(name) == expected


def test_visceral_case_loads_and_merges(tmp_path):
    corpus = small_corpus(tmp_path / "Silver")
    (case,) = layouts.find_cases(corpus)
    assert set(case.mask_paths) == {NAME_TO_INDEX["liver"], NAME_TO_INDEX["kidney_right"]}
    volume = layouts.load_case(case)
    assert volume.image.array.dtype == np.int16
    assert (volume.label == 1).sum() == 4 * 8 * 4 and (volume.label == 13).sum() == 2 * 2 * 4
    assert volume.overlap_voxels == 0


def test_merge_overlap_rule_matches_reference():
    rng = np.random.default_rng(3)
    masks = {index: rng.random((6, 7, 5)) < p for index, p in ((1, 0.5), (2, 0.3), (13, 0.3), (17, 0.1))}
    label, overlaps = layouts.merge_masks(masks)
    counts = {index: int(mask.sum()) for index, mask in masks.items()}
    expected = np.zeros((6, 7, 5), np.uint8)
    n_overlap = 0
    for voxel in np.ndindex(6, 7, 5):                              # slow, obviously correct
        covering = [index for index in masks if masks[index][voxel]]
        n_overlap += len(covering) > 1
        if covering:
            expected[voxel] = min(covering, key=lambda index: (counts[index], -index))
    assert np.array_equal(label, expected) and overlaps == n_overlap


def test_unknown_radlex_id_is_skipped_with_a_warning(tmp_path):
    corpus = small_corpus(tmp_path / "Silver")
    write(corpus / "Segmentations" / "10000100_1_CTce_ThAb_99999_1.nii.gz", np.ones((8, 8, 4), np.uint8))
    with pytest.warns(UserWarning, match="RadLex id 99999 is not one of the 20"):
        (case,) = layouts.find_cases(corpus)
    assert len(case.mask_paths) == 2


def test_volume_without_masks(tmp_path):
    corpus = small_corpus(tmp_path / "Gold")
    write(corpus / "Volumes" / layouts.volume_filename("10000101"), np.zeros((8, 8, 4), np.int16))
    with pytest.raises(UserError, match="10000101_1_CTce_ThAb.nii.gz: no masks"):
        layouts.find_cases(corpus)


# ---------------------------------------------------------------- multi-label
def multilabel_case(folder: Path, values=(0, 5, 7, 9)) -> tuple[Path, Path]:
    label = np.zeros((6, 6, 3), np.uint8)
    for i, value in enumerate(values):
        label[i] = value
    image = write(folder / "ct.nii.gz", np.full((6, 6, 3), 40, np.int16))
    return image, write(folder / "labels.nii.gz", label)


def test_multilabel_values_map_onto_the_vocabulary(tmp_path):
    image, label = multilabel_case(tmp_path / "case")
    volume = layouts.load_multilabel_case(image, label, {5: "liver", 7: "iliopsoas_left", 9: "stomach"}, "c")
    assert (volume.label[1].max() == NAME_TO_INDEX["liver"]
            and volume.label[2].max() == NAME_TO_INDEX["psoas_left"])
    assert volume.label[3].max() == 0                              # stomach is not one of the 20


def test_label_map_naming_absent_labels_is_refused(tmp_path):
    image, label = multilabel_case(tmp_path / "case", values=(0, 5, 0, 0))
    names = {5: "liver", 7: "spleen"}
    with pytest.raises(UserError, match=r"labels.nii.gz: label map names values absent from this volume: 7 "
                                        r"\(spleen\)"):
        layouts.load_multilabel_case(image, label, names, "c")
    volume = layouts.load_multilabel_case(image, label, names, "c", allow_missing=True)
    assert set(np.unique(volume.label)) == {0, 1}


def test_multilabel_folder_layouts(tmp_path):
    multilabel_case(tmp_path / "train" / "case01")
    multilabel_case(tmp_path / "train" / "case02")
    cases = layouts.find_multilabel_cases(tmp_path, "silver")
    assert [c[0] for c in cases] == ["case01", "case02"]
    for name in ("a", "b"):
        image, label = multilabel_case(tmp_path / "flat" / name)
        (tmp_path / "test" / "images").mkdir(parents=True, exist_ok=True)
        (tmp_path / "test" / "labels").mkdir(parents=True, exist_ok=True)
        shutil.copy(image, tmp_path / "test" / "images" / f"{name}.nii.gz")
        shutil.copy(label, tmp_path / "test" / "labels" / f"{name}.nii.gz")
    cases = layouts.find_multilabel_cases(tmp_path, "gold")
    assert [c[0] for c in cases] == ["a", "b"]
    (tmp_path / "test" / "labels" / "b.nii.gz").unlink()
    with pytest.raises(UserError, match="b.nii.gz: no label file"):
        layouts.find_multilabel_cases(tmp_path, "gold")


@pytest.mark.skipif(not REAL_CT.is_dir(), reason=f"real CT sample not present at {REAL_CT}")
def test_real_scan_loads_with_correct_left_and_right():
    names = read_label_map(REAL_CT / "labels.json")
    volume = layouts.load_multilabel_case(REAL_CT / "ct.nii.gz", REAL_CT / "labels.nii.gz", names, "ct")
    assert volume.image.array.dtype == np.int16 and volume.image.original_axcodes == "RAS"
    x = {name: ndimage.center_of_mass(volume.label == NAME_TO_INDEX[name])[0]
         for name in ("kidney_right", "kidney_left", "psoas_right", "psoas_left", "liver", "spleen")}
    assert x["kidney_right"] > x["kidney_left"] and x["psoas_right"] > x["psoas_left"]
    assert x["liver"] > x["spleen"]
    liver_hu = volume.image.array[volume.label == NAME_TO_INDEX["liver"]].mean()
    assert 20 < liver_hu < 90
