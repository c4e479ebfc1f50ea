"""Episode sampling (dataloaders/episodes.py) on a tiny prepared folder built here.

`make_train_prep` writes a PREP folder following docs/DESIGN.md (train slices, index.json, meta.json,
held-out val volumes); the training tests reuse it (`from test_episodes import make_train_prep`).
Every training slice carries its identity in pixel [0, 0] (image value = ID_BASE + code / 1000), so
the tests can tell which slices an episode used.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dataloaders.episodes import REDRAWS_KEY, EpisodeDataset, StepBatchSampler
from util.errors import UserError

S = 32                                     # prep_size
# label index -> box (rows, cols) in a training slice
BOXES = {1: ((2, 14), (2, 14)), 2: ((18, 28), (4, 12)), 3: ((4, 10), (18, 30)), 13: ((20, 26), (16, 22)),
         14: ((20, 26), (24, 30)), 17: ((12, 16), (16, 20)), 18: ((12, 16), (24, 28))}
PIDS = ("10000100", "10000101", "10000102")


def slice_code(volume: int, row: int) -> int:
    return volume * 100 + row + 1


def make_val_volume(shift: int, shape=(2 * S, 2 * S, 12)) -> dict:
    """Canonical X x Y x Z volume: the training boxes at twice the size (organ slices > 200 voxels)."""
    label = np.zeros(shape, dtype=np.uint8)
    for index, ((r0, r1), (c0, c1)) in BOXES.items():
        label[2 * r0:2 * r1, 2 * c0:2 * c1, 2 + shift % 2:10] = index
    image = np.full(shape, -400, dtype=np.int16)
    image[label > 0] = 60 + 10 * label[label > 0].astype(np.int16)
    image[0, 0, :], image[-1, -1, :] = -1000, 400
    return {"image": image, "label": label, "affine": np.eye(4), "original_affine": np.eye(4),
            "original_shape": np.array(shape), "original_axcodes": np.array("RAS"),
            "spacing": np.array([1.0, 1.0, 1.0])}


def make_train_prep(root: Path, classes=tuple(BOXES), n_slices: int = 6, val_pids=("10000200", "10000201"),
                    pids=PIDS) -> Path:
    """A prepared folder: train/<pid>_{image,label}.npy (n_slices x S x S), index.json, meta.json,
    volumes/val."""
    prep = Path(root) / "prep"
    (prep / "train").mkdir(parents=True)
    index: dict[str, list] = {}
    for v, pid in enumerate(pids):
        labels = np.zeros((n_slices, S, S), dtype=np.uint8)
        for row in range(n_slices):
            for k, index_value in enumerate(classes):
                if (row + k + v) % 3:                 # each slice holds about two thirds of the classes
                    (r0, r1), (c0, c1) = BOXES[index_value]
                    labels[row, r0:r1, c0:c1] = index_value
                    index.setdefault(str(index_value), []).append([pid, row, 40 + row])
        images = np.where(labels > 0, 0.3 + labels / 50.0, 0.1).astype(np.float32)
        images[:, 0, 0] = [0.5 + slice_code(v, row) / 1000 for row in range(n_slices)]
        np.save(prep / "train" / f"{pid}_image.npy", images)
        np.save(prep / "train" / f"{pid}_label.npy", labels)
    (prep / "index.json").write_text(json.dumps({"slices": index}))
    (prep / "volumes" / "val").mkdir(parents=True)
    for shift, pid in enumerate(val_pids):
        np.savez(prep / "volumes" / "val" / f"{pid}.npz", **make_val_volume(shift))
    meta = {"format_version": 1, "prep_size": S, "intensity": {"mode": "minmax"}, "seed": 0,
            "splits": {"train": list(pids), "val": list(val_pids), "gold": []}}
    (prep / "meta.json").write_text(json.dumps(meta))
    return prep


def decode(image: torch.Tensor) -> int:
    """Slice code stored in pixel [0, 0] of an unaugmented image at prep size."""
    return int(round((float(image[..., 0, 0]) - 0.5) * 1000))


@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    return make_train_prep(tmp_path_factory.mktemp("episodes"))


def raw_label(code: int, classes=tuple(BOXES)) -> np.ndarray:
    """The label slice `make_train_prep` wrote for a slice code (same rule, rebuilt)."""
    v, row = divmod(code - 1, 100)
    label = np.zeros((S, S), dtype=np.uint8)
    for k, index_value in enumerate(classes):
        if (row + k + v) % 3:
            (r0, r1), (c0, c1) = BOXES[index_value]
            label[r0:r1, c0:c1] = index_value
    return label


def test_item_shapes_and_masks_match_the_slices_labels(prep):
    ds = EpisodeDataset(str(prep), [1, 2, 3], n_ways=2, n_shots=2, n_queries=3, input_size=S, augment=None,
                        seed=3)
    item = ds[5]
    assert item["support_images"].shape == (2, 2, 1, S, S) and item["support_images"].dtype == torch.float32
    assert item["support_fg"].shape == (2, 2, S, S) and item["support_bg"].shape == (2, 2, S, S)
    assert item["query_images"].shape == (3, 1, S, S)
    assert item["query_labels"].shape == (3, S, S) and item["query_labels"].dtype == torch.int64
    seen = set()
    for i in range(8):
        item = ds[i]
        classes = item["classes"].numpy()
        seen |= set(classes.tolist())
        for n in range(2):
            for k in range(2):
                raw = raw_label(decode(item["support_images"][n, k, 0]))
                np.testing.assert_array_equal(item["support_fg"][n, k].numpy(), raw == classes[n])
                np.testing.assert_array_equal(item["support_bg"][n, k].numpy(), ~np.isin(raw, classes))
        for q in range(3):
            raw = raw_label(decode(item["query_images"][q, 0]))
            expected = np.select([raw == classes[0], raw == classes[1]], [1, 2], 0)
            np.testing.assert_array_equal(item["query_labels"][q].numpy(), expected)
            assert (raw == classes[q % 2]).any()                     # query q comes from way q mod N
        for n in range(2):  # a way's supports and queries are all different slices
            codes = [decode(item["support_images"][n, k, 0]) for k in range(2)]
            codes += [decode(item["query_images"][q, 0]) for q in range(n, 3, 2)]
            assert len(set(codes)) == len(codes)
    assert seen == {1, 2, 3}                                         # every class given is drawn, no other


def test_loader_batches_do_not_depend_on_workers_or_ranks(prep):
    ds = EpisodeDataset(str(prep), [1, 2, 3, 13], n_ways=1, n_shots=1, n_queries=1, input_size=S,
                        augment={"p": 0.5, "gamma": [0.5, 2.0]}, seed=2)

    def batches(workers, start=0, rank=0, world=1):
        loader = DataLoader(ds, batch_sampler=StepBatchSampler(start, 4, 4, rank, world), num_workers=workers)
        return [b["query_images"] for b in loader]

    single = batches(0)
    assert len(single) == 4 and single[0].shape == (4, 1, 1, S, S)
    for x, y in zip(single, batches(2)):
        assert torch.equal(x, y)
    for x, y in zip(single[2:], batches(0, start=2)):           # resume at step 2
        assert torch.equal(x, y)
    rank0, rank1 = batches(0, rank=0, world=2), batches(0, rank=1, world=2)
    for x, r0, r1 in zip(single, rank0, rank1):                  # rank r takes episodes r, r + W, ...
        assert torch.equal(x[0::2], r0) and torch.equal(x[1::2], r1)


def test_uneven_shards_are_refused_by_the_config_check(monkeypatch):
    from sacred.initialize import create_run

    from config import ex
    from training.config_check import check_world_size
    config = create_run(ex, "print_config", config_updates={"batch_size": 3}, named_configs=["tiny"]).config
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match=r"^batch_size = 3: not divisible by the 2 processes: use a multiple "
                                        r"of 2"):
        check_world_size(config)
    monkeypatch.setenv("WORLD_SIZE", "3")
    check_world_size(config)
    with pytest.raises(AssertionError):     # the sampler trusts its input
        StepBatchSampler(0, 10, 3, 0, 2)


def test_clear_errors_for_missing_or_classless_data(tmp_path, prep):
    with pytest.raises(UserError, match="prepare_visceral.py"):
        EpisodeDataset(str(tmp_path), [1], 1, 1, 1, S, None, 0)
    with pytest.raises(UserError, match="only 0 of the training classes"):
        EpisodeDataset(str(prep), [9, 10], 1, 1, 1, S, None, 0)      # bladder, L1: no slices
    with pytest.raises(UserError, match="2-way"):
        EpisodeDataset(str(prep), [1, 9], 2, 1, 1, S, None, 0)
    broken = make_train_prep(tmp_path / "broken")
    (broken / "train" / f"{PIDS[1]}_label.npy").unlink()
    with pytest.raises(UserError, match="missing"):
        EpisodeDataset(str(broken), [1], 1, 1, 1, S, None, 0)


def _episode_hash(dataset: EpisodeDataset, items=range(6)) -> str:
    digest = hashlib.sha256()
    for i in items:
        for key, value in sorted(dataset[i].items()):
            if key != REDRAWS_KEY:                      # the episode's tensors, as before the count existed
                digest.update(key.encode())
                digest.update(value.numpy().tobytes())
    return digest.hexdigest()[:16]


def test_items_are_a_function_of_seed_and_index_unchanged_when_no_class_vanishes(prep):
    """Hashes taken before vanishing classes were redrawn: data where nothing vanishes draws the same."""
    kwargs = dict(classes=[1, 2, 3, 13, 14, 17, 18], n_ways=2, n_shots=2, n_queries=2,
                  augment={"p": 0.5, "brightness": [0.9, 1.1]})
    for size, expected in ((S, "e66f4658f739ac06"), (S // 2, "198e404f01577abc")):
        dataset = EpisodeDataset(str(prep), input_size=size, seed=7, **kwargs)
        assert dataset.vanished == {} and _episode_hash(dataset) == expected
        assert all(int(dataset[i][REDRAWS_KEY]) == 0 for i in range(6))
    assert dataset[0]["query_images"].shape[-1] == S // 2
    assert not torch.equal(dataset[1]["query_images"], dataset[2]["query_images"])
    assert _episode_hash(EpisodeDataset(str(prep), input_size=S // 2, seed=8, **kwargs)) != expected


def make_tiny_structure_prep(root: Path, size: int = 256) -> Path:
    """Two volumes of 4 slices at 256 px: liver a large box in every slice; psoas_right and psoas_left
    2 x 2 pixels in a corner that 64 px sampling never hits, except psoas_right's 16 x 16 box in the
    first two slices of volume b."""
    prep = Path(root) / "tiny"
    (prep / "train").mkdir(parents=True)
    index: dict[str, list] = {"1": [], "17": [], "18": []}
    for v, pid in enumerate(("a", "b")):
        labels = np.zeros((4, size, size), np.uint8)
        labels[:, 64:192, 64:192] = 1
        labels[:, 0:2, 0:2] = 17
        labels[:, 0:2, 250:252] = 18
        if v == 1:
            labels[0:2, 200:216, 200:216] = 17
        np.save(prep / "train" / f"{pid}_image.npy", np.where(labels > 0, 0.8, 0.1).astype(np.float32))
        np.save(prep / "train" / f"{pid}_label.npy", labels)
        for key in index:
            index[key] += [[pid, row, row] for row in range(4)]
    (prep / "index.json").write_text(json.dumps({"slices": index}))
    meta = {"format_version": 1, "prep_size": size, "intensity": {"mode": "minmax"}, "seed": 0,
            "splits": {"train": ["a", "b"], "val": [], "gold": []}}
    (prep / "meta.json").write_text(json.dumps(meta))
    return prep


def test_a_class_that_vanishes_at_input_size_is_dropped_from_the_episode(tmp_path):
    prep = make_tiny_structure_prep(tmp_path)
    full = EpisodeDataset(str(prep), [1, 17, 18], n_ways=1, n_shots=1, n_queries=1, input_size=256,
                          augment=None, seed=3)
    assert full.classes == [1, 17, 18] and full.vanished == {}
    small = EpisodeDataset(str(prep), [1, 17, 18], n_ways=1, n_shots=1, n_queries=1, input_size=64,
                           augment=None, seed=3)
    # psoas_right keeps 2 of its 8 slices at 64 px; psoas_left none, so it leaves every draw
    assert small.vanished == {"psoas_right": 6, "psoas_left": 8} and small.dropped == ["psoas_left"]
    assert small.classes == [1, 17] and "psoas_right 6 slices" in small.vanish_report()
    redraws = 0
    for i in range(30):
        episode = small[i]
        assert episode["support_fg"].flatten(2).sum(-1).min() > 0          # never a way with an empty mask
        redraws += int(episode[REDRAWS_KEY])
        if int(episode[REDRAWS_KEY]):
            assert episode["classes"].tolist() == [1]                       # psoas_right dropped, liver drawn
    assert redraws > 0
    assert _episode_hash(small, range(8)) == _episode_hash(
        EpisodeDataset(str(prep), [1, 17, 18], 1, 1, 1, 64, None, seed=3), range(8))   # deterministic
    alone = EpisodeDataset(str(prep), [17], n_ways=1, n_shots=1, n_queries=1, input_size=64, augment=None,
                           seed=3)               # no other class: the way draws from the slices keeping it
    assert alone.visible[17] == [("b", 0, 0), ("b", 1, 1)]
    assert all(alone[i]["support_fg"].sum() > 0 for i in range(10))
    with pytest.raises(UserError, match=r"at input_size 64: psoas_left 8 slices; classes left out"):
        EpisodeDataset(str(prep), [18], 1, 1, 1, 64, None, seed=3)


def test_an_index_naming_slices_without_their_class_is_one_line(tmp_path):
    prep = make_tiny_structure_prep(tmp_path)
    index = json.loads((prep / "index.json").read_text())
    index["slices"]["2"] = index["slices"]["1"]                 # spleen listed where there is none
    (prep / "index.json").write_text(json.dumps(index))
    dataset = EpisodeDataset(str(prep), [2], 1, 1, 1, 256, None, seed=0)
    with pytest.raises(UserError, match="index.json lists slices without spleen: re-prepare"):
        dataset[0]
