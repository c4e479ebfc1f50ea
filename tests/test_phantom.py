"""The phantom generator: VISCERAL layout, determinism, anatomy, variation, honesty check, atomic output."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_PHANTOM, load_script
from scipy import ndimage

import phantom
from dataloaders.layouts import find_cases, load_case, parse_mask_name
from dataloaders.nifti import load_nifti
from dataloaders.organs import NAME_TO_INDEX, RADLEX_TO_INDEX, TEST_ORGANS
from evaluation.dataset_check import mask_copy_dice
from evaluation.protocols import dice, organ_range


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def subject128():
    """One subject rendered in memory at 128 x 128 (image, label, affine, parameters)."""
    return phantom.render_subject(np.random.default_rng([5, 0, 0]), 128, 40)


def test_layout_names_test_organs_and_variation(tiny_phantom):
    """VISCERAL names; gold cases hold the test organs and 14+ structures; geometry and storage vary."""
    spacings, slices, orientations = set(), set(), set()
    for corpus, n in (("SilverCorpus", TINY_PHANTOM["n_silver"]), ("GoldCorpus", TINY_PHANTOM["n_gold"])):
        volumes = sorted((tiny_phantom / corpus / "Volumes").iterdir())
        assert len(volumes) == n
        for volume in volumes:
            pid, rest = volume.name.split("_", 1)
            assert len(pid) == 8 and pid.isdigit() and rest == "1_CTce_ThAb.nii.gz"
        for mask in sorted((tiny_phantom / corpus / "Segmentations").iterdir()):
            assert mask.name.split("_")[1:4] == ["1", "CTce", "ThAb"]
            assert parse_mask_name(mask.name)[1] in RADLEX_TO_INDEX
        for case in find_cases(tiny_phantom / corpus):
            volume = load_nifti(case.volume_path)
            assert volume.array.dtype == np.int16 and volume.array.ndim == 3
            spacings.add(round(float(volume.spacing[0]), 3))
            slices.add(volume.array.shape[2])
            orientations.add(volume.original_axcodes)
            if corpus == "GoldCorpus":
                assert {NAME_TO_INDEX[o] for o in TEST_ORGANS} <= set(case.mask_paths)
                assert len(case.mask_paths) >= 14
    assert (tiny_phantom / "GoldCorpus" / "Volumes" / "10000132_1_CTce_ThAb.nii.gz").is_file()
    assert len(spacings) > 3 and len(slices) > 1
    assert orientations <= {"RAS", "LPS"}


def test_same_seed_same_bytes_serial_or_parallel_other_seed_differs(tmp_path):
    kwargs = dict(n_silver=2, n_gold=2, size=40, n_slices=12)
    phantom.generate_phantom(tmp_path / "a", seed=11, workers=1, **kwargs)
    phantom.generate_phantom(tmp_path / "b", seed=11, workers=2, **kwargs)
    phantom.generate_phantom(tmp_path / "c", seed=12, workers=1, **kwargs)
    a, b, c = digest(tmp_path / "a"), digest(tmp_path / "b"), digest(tmp_path / "c")
    assert a == b and len(a) > 20
    assert a != c


def test_hounsfield_units_are_realistic(subject128):
    image, label, _, _ = subject128
    tissue = image.astype(float)

    def core_mean(index):
        in_plane = np.zeros((3, 3, 3), bool)
        in_plane[:, :, 1] = ndimage.generate_binary_structure(2, 1)
        mask = ndimage.binary_erosion(label == index, structure=in_plane)
        assert mask.sum() > 20, index
        return tissue[mask].mean()
    assert 40 < core_mean(NAME_TO_INDEX["liver"]) < 90
    assert 25 < core_mean(NAME_TO_INDEX["spleen"]) < 80
    assert 90 < core_mean(NAME_TO_INDEX["kidney_right"]) < 200
    assert 25 < core_mean(NAME_TO_INDEX["psoas_left"]) < 70
    assert core_mean(NAME_TO_INDEX["aorta"]) > 140
    assert core_mean(NAME_TO_INDEX["lung_right"]) < -600
    assert core_mean(NAME_TO_INDEX["lumbar_vertebra_1"]) > 200
    body = image > -500
    fat = (image > -160) & (image < -60) & body
    assert fat.sum() > 0.05 * body.sum()                      # fat is a real share of the body
    assert image.min() >= -1024 and image.max() <= 3071


def test_paired_organs_differ_only_by_side(subject128):
    image, label, _, _ = subject128
    for left, right in (("kidney_left", "kidney_right"), ("psoas_left", "psoas_right")):
        cl = ndimage.center_of_mass(label == NAME_TO_INDEX[left])
        cr = ndimage.center_of_mass(label == NAME_TO_INDEX[right])
        assert cr[0] > cl[0]                                   # RAS axis 0: patient left -> right
        hl = image[label == NAME_TO_INDEX[left]].mean()
        hr = image[label == NAME_TO_INDEX[right]].mean()
        assert abs(hl - hr) < 25                               # same appearance
    liver = image[label == NAME_TO_INDEX["liver"]]
    spleen = image[label == NAME_TO_INDEX["spleen"]]
    assert abs(np.median(liver) - np.median(spleen)) < 30     # overlapping HU


def test_organs_extend_over_plausible_z_ranges(subject128):
    _, label, _, _ = subject128
    centre = {name: ndimage.center_of_mass(label == NAME_TO_INDEX[name])[2]
              for name in ("liver", "kidney_right", "psoas_right", "urinary_bladder", "lung_right")}
    assert centre["urinary_bladder"] < centre["psoas_right"] < centre["kidney_right"] < centre["liver"]
    assert centre["liver"] < centre["lung_right"]
    psoas = label == NAME_TO_INDEX["psoas_right"]
    counts = psoas.sum(axis=(0, 1))
    z = np.flatnonzero(counts)
    assert counts[z[: len(z) // 3]].mean() > counts[z[-len(z) // 3:]].mean()   # grows caudally


def test_lps_storage_reads_back_to_the_same_canonical_anatomy(tmp_path):
    rng_state = [8, 0, 0]
    image, label, affine, subject = phantom.render_subject(np.random.default_rng(rng_state), 48, 16)
    for lps in (False, True):
        stored, stored_affine = phantom.storage_orientation(image, affine, lps)
        phantom.save_nifti_atomic(stored, stored_affine, tmp_path / f"{lps}.nii.gz")
        volume = load_nifti(tmp_path / f"{lps}.nii.gz")
        assert volume.original_axcodes == ("LPS" if lps else "RAS")
        assert np.array_equal(volume.array, image)
        assert np.allclose(volume.affine, affine)


def test_mask_copy_matches_a_slow_reference():
    rng = np.random.default_rng(0)
    labels = {}
    for pid in ("10000132", "10000133", "10000134"):
        label = np.zeros((20, 20, 30), np.uint8)
        start, stop = rng.integers(2, 8), rng.integers(20, 28)
        x0 = rng.integers(2, 6)
        label[x0:x0 + 12, 4:16, start:stop] = NAME_TO_INDEX["liver"]
        labels[pid] = label
    result = mask_copy_dice(labels, "10000132", "thirds", organs=["liver"])["liver"]
    support = labels["10000132"] == 1
    s0, s1 = organ_range(support, 1)
    for pid in ("10000133", "10000134"):
        query = labels[pid] == 1
        q0, q1 = organ_range(query, 1)
        prediction = np.zeros_like(query)
        for z in range(q0, q1 + 1):                            # 3 chunks by relative position
            chunk = (z - q0) * 3 // (q1 - q0 + 1)
            source = s0 + min(s1 - s0, int((chunk + 0.5) * (s1 - s0 + 1) / 3))
            prediction[..., z] = support[..., source]
        expected = dice(prediction[..., q0:q1 + 1], query[..., q0:q1 + 1])
        assert result["per_query"][pid] == pytest.approx(expected)
    assert mask_copy_dice({"a": labels["10000133"], "b": labels["10000133"]}, "a", "thirds",
                          organs=["liver"])["liver"]["mean"] == 1


def test_mask_copy_does_not_solve_the_phantom():
    labels = {str(i): phantom.render_subject(np.random.default_rng([21, 1, i]), 96, 40)[1] for i in range(4)}
    result = mask_copy_dice(labels, "0", "senet")          # 96 px: the 200-voxel rule of 'lslpn' drops organs
    means = [r["mean"] for r in result.values() if r["n"]]
    assert len(means) == 6 and np.mean(means) < 0.75 and max(means) < 0.9


def test_a_failure_leaves_nothing(tmp_path, monkeypatch):
    def broken(task):
        raise RuntimeError("disk full")
    monkeypatch.setattr(phantom, "write_subject", broken)
    with pytest.raises(RuntimeError):
        phantom.generate_phantom(tmp_path / "new", 1, 2, 0, size=32, n_slices=8, workers=1)
    assert list(tmp_path.iterdir()) == []


def test_script_prints_mask_copy_and_skips_existing(tmp_path, capsys):
    script = load_script("make_phantom")
    out = tmp_path / "ph"
    args = ["--out", str(out), "--n-silver", "1", "--n-gold", "2", "--size", "48", "--slices", "12",
            "--workers", "1"]
    assert script.main(args) == 0
    printed = capsys.readouterr().out
    assert "mask-copy Dice" in printed and "kidney_left" in printed
    assert len(list((out / "GoldCorpus" / "Volumes").iterdir())) == 2
    assert script.main(args + ["--skip-existing"]) == 0
    assert "kept" in capsys.readouterr().out
    case = find_cases(out / "GoldCorpus")[0]
    assert load_case(case).label.max() > 0
