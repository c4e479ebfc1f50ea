"""Segment your own scan (evaluation/segment.py, scripts/segment_volume.py).

Phantoms here are tiny hand-made CT-like volumes (air, a soft-tissue body, organs of distinct HU
at subject-specific positions), so mask copy is imperfect while the appearance tells the organ.
A cnn_small model is trained for a few dozen episodes in the test on OTHER classes than the one
segmented (liver), as few-shot training does.
"""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_script

from evaluation.protocols import dice
from util.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
REAL_CT = ROOT.parent / "shared/data/real_ct"
SHAPE = (40, 36, 18)                       # X x Y x Z canonical
SPACING = (2.0, 2.0, 4.0)
INPUT_SIZE = 48
# label -> (HU, centre x, centre y, radii x y z (voxels), first z); liver (1) is never trained on.
ORGANS = {1: (130, 11, 18, (6, 7, 4.5), 6), 2: (200, 29, 14, (4, 5, 3.0), 7),
          13: (-60, 12, 10, (3, 3, 3.0), 3),
          14: (260, 28, 26, (3, 4, 3.0), 4), 17: (10, 20, 7, (4, 2, 5.0), 2)}
TRAIN_CLASSES = (2, 13, 14, 17)


# ------------------------------------------------------------------------------ helpers
def make_subject(seed: int, n_slices: int = SHAPE[2]) -> tuple[np.ndarray, np.ndarray]:
    """Canonical (image int16 HU, label uint8) X x Y x Z; organs move by up to +-4 voxels per subject."""
    rng = np.random.default_rng(seed)
    shape = SHAPE[:2] + (n_slices,)
    x, y, z = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    image = np.full(shape, -1000.0, dtype=np.float32)
    body = ((x - 20) / 18.5) ** 2 + ((y - 18) / 16.5) ** 2 < 1
    image[body] = -90.0
    label = np.zeros(shape, dtype=np.uint8)
    for value, (hu, cx, cy, radii, z0) in ORGANS.items():
        dx, dy = rng.integers(-4, 5, size=2)
        scale = rng.uniform(0.8, 1.2, size=3)
        rx, ry, rz = (r * s for r, s in zip(radii, scale))
        blob = ((x - cx - dx) / rx) ** 2 + ((y - cy - dy) / ry) ** 2 + ((z - z0 - rz) / rz) ** 2 < 1
        image[blob & body] = hu
        label[blob & body] = value
    image += rng.normal(0, 12, shape).astype(np.float32)
    return np.rint(image).astype(np.int16), label


def save(path: Path, canonical: np.ndarray, lps: bool = False, flip_z: bool = False) -> Path:
    """Write a canonical array as NIfTI, stored RAS, LPS (axes 0 and 1 flipped) or with z reversed."""
    affine = np.diag([*SPACING, 1.0])
    array = canonical
    flips = [0, 1] if lps else []
    flips += [2] if flip_z else []
    for axis in flips:
        array = np.flip(array, axis)
        flip = np.eye(4)
        flip[axis, axis], flip[axis, 3] = -1.0, canonical.shape[axis] - 1
        affine = affine @ flip
    nib.save(nib.Nifti1Image(np.ascontiguousarray(array), affine), str(path))
    return path


def organ_slices(mask: np.ndarray) -> tuple[int, int]:
    z = np.flatnonzero(mask.any(axis=(0, 1)))
    return int(z[0]), int(z[-1])


def train_tiny(steps: int = 40, seed: int = 0):
    """cnn_small trained on 1-way 1-shot episodes of TRAIN_CLASSES from 4 subjects (never liver)."""
    from evaluation.inference import images_to_input, masks_to_input
    from models.fewshot import FewShotSegNet
    subjects = [make_subject(100 + i) for i in range(4)]
    pool = {c: [(s, z) for s, (_, lab) in enumerate(subjects)
                for z in np.flatnonzero(((lab == c).sum(axis=(0, 1))) > 4)] for c in TRAIN_CLASSES}
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = FewShotSegNet(encoder="cnn_small", resolution="feature", n_grid=4)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    cpu = torch.device("cpu")

    def pair(entry, c):
        image, lab = subjects[entry[0]]
        return (images_to_input(image[:, :, entry[1]][None], {"mode": "minmax"}, INPUT_SIZE, cpu)[0],
                masks_to_input(lab[:, :, entry[1]][None] == c, INPUT_SIZE, cpu)[0])

    model.train()
    for _ in range(steps):
        episodes = []
        for _ in range(4):
            c = TRAIN_CLASSES[rng.integers(len(TRAIN_CLASSES))]
            a, b = rng.choice(len(pool[c]), size=2, replace=False)
            episodes.append(pair(pool[c][a], c) + pair(pool[c][b], c))
        s_img, s_fg, q_img, q_fg = (torch.stack(part) for part in zip(*episodes))
        logits, _ = model(s_img[:, None, None], s_fg[:, None, None], 1 - s_fg[:, None, None],
                          q_img[:, None])                              # B x 1 x 2 x S x S
        loss = F.cross_entropy(logits[:, 0], q_fg.long())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def write_checkpoint(path: Path, model, **extra) -> Path:
    torch.save({"model": model.state_dict(), "model_config": model.config, "step": 0, "fold": 0,
                "input_size": INPUT_SIZE, **extra}, path)
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Support subject (RAS, multi-label), query subject stored LPS, and a trained tiny checkpoint."""
    root = tmp_path_factory.mktemp("segment")
    support_image, support_label = make_subject(1)
    query_image, query_label = make_subject(2)
    files = {"root": root, "support_label": support_label, "query_label": query_label,
             "support_image_array": support_image, "query_image_array": query_image,
             "support": save(root / "support.nii.gz", support_image),
             "support_mask": save(root / "support_labels.nii.gz", support_label),
             "liver_mask": save(root / "support_liver.nii.gz", (support_label == 1).astype(np.uint8)),
             "query_lps": save(root / "query_lps.nii.gz", query_image, lps=True),
             "query_ras": save(root / "query_ras.nii.gz", query_image)}
    files["checkpoint"] = write_checkpoint(root / "tiny.pth", train_tiny())
    return files


# --------------------------------------------------------------------- behaviour on phantoms
def test_phantom_beats_mask_copy_and_keeps_query_geometry(work):
    from evaluation.protocols import mask_copy
    from evaluation.segment import segment_volume
    liver_s, liver_q = work["support_label"] == 1, work["query_label"] == 1
    q0, q1 = organ_slices(liver_q)
    out = work["root"] / "pred_phantom.nii.gz"
    array, image = segment_volume(work["checkpoint"], [(work["support"], work["liver_mask"])],
                                  work["query_lps"], out=out, query_range=(q0, q1 + 1),
                                  n_chunks=6, device="cpu", progress=False)
    written, stored = nib.load(str(out)), nib.load(str(work["query_lps"]))
    assert written.shape == stored.shape and written.get_data_dtype() == np.uint8
    assert (np.array_equal(written.affine, stored.affine)
            and nib.aff2axcodes(written.affine) == ("L", "P", "S"))
    assert np.array_equal(np.asarray(written.dataobj), array) and np.array_equal(image.affine, stored.affine)
    predicted = array[::-1, ::-1, :].astype(bool)                     # LPS storage -> canonical
    assert not predicted[..., :q0].any() and not predicted[..., q1 + 1:].any()
    baseline = mask_copy(liver_s, organ_slices(liver_s), liver_q.shape, (q0, q1), 6)
    model_dice, copy_dice = dice(predicted, liver_q), dice(baseline, liver_q)
    assert model_dice > copy_dice + 0.1, (model_dice, copy_dice)


def test_lps_query_comes_back_lps_and_matches_the_ras_result(work):
    from evaluation.segment import segment_volume
    common = dict(supports=[(work["support"], work["liver_mask"])], n_chunks=6, device="cpu", progress=False)
    ras, _ = segment_volume(work["checkpoint"], query=work["query_ras"], **common)
    lps, _ = segment_volume(work["checkpoint"], query=work["query_lps"], **common)
    assert ras.any()
    assert np.array_equal(lps, ras[::-1, ::-1, :])                   # same anatomy, stored flipped


def test_multilabel_support_by_value_by_name_and_by_label_map(work, tmp_path):
    from evaluation.segment import load_support, segment_volume
    label_map = tmp_path / "map.json"
    label_map.write_text(json.dumps({"labels": {"1": "Liver", "2": "spleen"}}))
    pairs = {"binary": (work["liver_mask"], None, None, None), "value": (work["support_mask"], 1, None, None),
             "text value": (work["support_mask"], "1", None, None),
             "vocabulary": (work["support_mask"], "liver", None, "visceral"),
             "label map": (work["support_mask"], "liver", label_map, None)}
    for name, (mask, label, mapping, vocabulary) in pairs.items():
        support = load_support(work["support"], mask, label, mapping, min_voxels=0, vocabulary=vocabulary)
        assert np.array_equal(support.mask, work["support_label"] == 1), name
    spleen = load_support(work["support"], work["support_mask"], "spleen", label_map, 0)
    assert np.array_equal(spleen.mask, work["support_label"] == 2)     # segmenting by map: test_errors.py
    with pytest.raises(UserError, match="multi-label"):
        segment_volume(work["checkpoint"], [(work["support"], work["support_mask"])], work["query_ras"],
                       n_chunks=6, device="cpu", progress=False)


def test_cli_multilabel_support_label_writes_lps(work, tmp_path, capsys):
    out = tmp_path / "pred.nii.gz"
    code, err = run_script("segment_volume", [
        "--checkpoint", work["checkpoint"], "--support-image", work["support"], "--support-label", "1",
        "--support-mask", work["support_mask"], "--query", work["query_lps"], "--out", out, "--n-chunks", "6",
        "--device", "cpu", "--no-progress"], capsys)
    assert code == 0, err
    written = nib.load(str(out))
    assert nib.aff2axcodes(written.affine) == ("L", "P", "S") and written.shape == SHAPE
    assert written.get_data_dtype() == np.uint8 and set(np.unique(np.asarray(written.dataobj))) <= {0, 1}


def test_sparse_support_uses_only_annotated_slices():
    from evaluation.segment import Support, nearest_annotated, segment_plan
    annotated = np.array([4, 9, 10, 20])
    targets = np.arange(0, 25)
    slow = np.array([min(annotated, key=lambda a: (abs(a - t), a)) for t in targets])
    assert np.array_equal(nearest_annotated(annotated, targets), slow)
    mask = np.zeros((4, 4, 24), dtype=bool)
    mask[:, :, annotated] = True
    support = Support(image=np.zeros(mask.shape, np.float32), mask=mask, annotated=annotated, name="s")
    plan = segment_plan([support, support], (30, 52), n_chunks=5)
    assert [len(z) for _, z in plan] == [5, 5, 4, 5, 4]              # the chunk rule on 23 query slices
    assert np.array_equal(np.concatenate([z for _, z in plan]), np.arange(30, 53))
    for support_z, _ in plan:
        assert support_z.shape == (2,) and set(support_z) <= set(annotated.tolist())


def test_sparse_support_volume_runs_with_k_shots(work, tmp_path):
    from evaluation.segment import segment_volume
    liver = work["support_label"] == 1
    z0, z1 = organ_slices(liver)
    sparse = np.zeros_like(liver, dtype=np.uint8)
    for z in (z0 + 1, (z0 + z1) // 2, z1 - 1):                      # three annotated slices only
        sparse[:, :, z] = liver[:, :, z]
    sparse_path = save(tmp_path / "sparse.nii.gz", sparse)
    q0, q1 = organ_slices(work["query_label"] == 1)
    array, _ = segment_volume(work["checkpoint"], [(work["support"], sparse_path),
                                                   (work["support"], work["liver_mask"])],
                              work["query_ras"], query_range=f"{q0}:{q1 + 1}", n_chunks=6,
                              device="cpu", progress=False)
    assert dice(array, work["query_label"] == 1) > 0.3
    assert not array[..., :q0].any() and not array[..., q1 + 1:].any()


def test_query_range_is_in_stored_slice_indices(work, tmp_path):
    from evaluation.segment import segment_volume
    flipped = save(tmp_path / "query_zflip.nii.gz", work["query_image_array"], flip_z=True)  # stored S -> I
    array, _ = segment_volume(work["checkpoint"], [(work["support"], work["liver_mask"])], flipped,
                              query_range="2:9", n_chunks=6, device="cpu", progress=False)
    assert array[..., 2:9].any() and not array[..., :2].any() and not array[..., 9:].any()


def test_default_query_range_follows_the_body_extent():
    from evaluation.segment import Support, body_extent, default_query_range
    image, label = make_subject(1)
    annotated = np.flatnonzero((label == 1).any(axis=(0, 1)))
    support = Support(image=image.astype(np.float32), mask=label == 1, annotated=annotated, name="s")
    assert body_extent(image) == (0, SHAPE[2] - 1)
    assert default_query_range([support], image.astype(np.float32)) == support.organ_range
    padded = np.full(SHAPE[:2] + (SHAPE[2] + 10,), -1000, dtype=np.float32)   # 4 air slices below, 6 above
    padded[:, :, 4:4 + SHAPE[2]] = image
    start, stop = support.organ_range
    assert default_query_range([support], padded) == (start + 4, stop + 4)
    twice = np.repeat(image, 2, axis=2).astype(np.float32)                   # same body, half the slice gap
    assert default_query_range([support], twice) == (2 * start, 2 * stop + 1)


# ------------------------------------------------------------------------------ the real scan
@pytest.mark.skipif(not (REAL_CT / "ct.nii.gz").is_file(), reason=f"real CT sample not found in {REAL_CT}")
def test_real_scan_end_to_end_with_a_few_liver_slices(tmp_path):
    from evaluation.segment import segment_volume
    from models.fewshot import FewShotSegNet
    labels_image = nib.load(str(REAL_CT / "labels.nii.gz"))
    labels = np.asarray(labels_image.dataobj)
    liver_value = int(next(k for k, v in json.loads((REAL_CT / "labels.json").read_text())["labels"].items()
                           if v == "liver"))
    liver = labels == liver_value
    few = np.zeros(labels.shape, dtype=np.uint8)
    annotated = np.flatnonzero(liver.sum(axis=(0, 1)) > 50)[::5]                 # every 5th liver slice
    few[:, :, annotated] = labels[:, :, annotated]                               # multi-label, a few slices
    mask_path = tmp_path / "few_liver_slices.nii.gz"
    nib.save(nib.Nifti1Image(few, labels_image.affine), str(mask_path))
    torch.manual_seed(0)
    checkpoint = write_checkpoint(tmp_path / "random.pth", FewShotSegNet(encoder="cnn_small",
                                                                         resolution="feature"))
    out = tmp_path / "liver.nii.gz"
    array, _ = segment_volume(checkpoint, [(REAL_CT / "ct.nii.gz", mask_path)], REAL_CT / "ct.nii.gz",
                              out=out,
                              support_label="liver", label_map=REAL_CT / "labels.json", device="cpu",
                              progress=False, input_size=64)
    query, written = nib.load(str(REAL_CT / "ct.nii.gz")), nib.load(str(out))
    assert written.shape == query.shape and np.allclose(written.affine, query.affine)
    assert nib.aff2axcodes(written.affine) == nib.aff2axcodes(query.affine)
    # left/right: the prediction overlaps the liver (patient's right) far more than its mirror image
    assert dice(array, liver) > 0.5 and dice(array, liver) > dice(array, liver[::-1]) + 0.3
    x_axis_right = nib.aff2axcodes(query.affine)[0] == "R"
    centre_x = np.argwhere(array)[:, 0].mean()
    assert (centre_x > query.shape[0] / 2) == x_axis_right
