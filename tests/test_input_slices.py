"""2.5D input (`model.input_slices` = 3): each model image is a slice and its neighbours z - 1, z + 1.

The neighbour rule against a slow construction, what both writers store, episodes (the centre channel IS
the 1-slice item), the model, the evaluation paths, a 2-step training run, the config check and errors.
"""
from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import resolve_config, train_in_process
from test_alpnet_layout import write_alpnet_folder

from dataloaders import layouts as layout
from dataloaders.episodes import EpisodeDataset
from dataloaders.prepare import prepare_alpnet
from dataloaders.prepared import open_training_images, open_training_neighbours, open_training_volume
from dataloaders.selfsup_episodes import SelfSupEpisodeDataset, WarpParams, alpnet_view, random_grid, warp
from dataloaders.transforms import augment_intensity, neighbour_indices, neighbour_stack
from models.encoders import build_encoder
from models.fewshot import FewShotSegNet
from util.errors import UserError

AUGMENT = {"p": 0.5, "brightness": [0.5, 2.0], "contrast": [0.5, 2.0], "gamma": [0.5, 2.0]}
CLASSES = [2, 3, 11, 12, 13, 14]     # training classes of fold 0 present in the tiny phantom


def slow_stack(volume: np.ndarray, z: int, available=None) -> np.ndarray:
    """3 x X x Y: slices z - 1, z, z + 1 of `volume`, written out; a neighbour outside the volume or not
    available is the centre slice."""
    def usable(k):
        return 0 <= k < volume.shape[2] and (available is None or bool(available[k]))
    below = volume[:, :, z - 1] if usable(z - 1) else volume[:, :, z]
    above = volume[:, :, z + 1] if usable(z + 1) else volume[:, :, z]
    return np.stack([below, volume[:, :, z], above])


@pytest.fixture(scope="module")
def without_neighbours(tiny_prepared, tmp_path_factory):
    """tiny_prepared as a folder prepared before neighbours were stored (no train/*_neighbours.npy)."""
    old = tmp_path_factory.mktemp("old_prep") / "prep"
    shutil.copytree(tiny_prepared, old)
    for path in (old / "train").glob("*_neighbours.npy"):
        path.unlink()
    return old


# ------------------------------------------------------------------ the neighbour rule
def test_neighbour_stack_equals_a_slow_construction_at_the_first_middle_and_last_slice():
    volume = np.random.default_rng(0).normal(size=(5, 4, 7)).astype(np.float32)      # X x Y x Z
    for z in (0, 3, 6):
        np.testing.assert_array_equal(neighbour_stack(volume, [z])[0], slow_stack(volume, z))
    stacks = neighbour_stack(volume, np.arange(7))                                     # 7 x 3 x 5 x 4
    assert stacks.shape == (7, 3, 5, 4)
    np.testing.assert_array_equal(stacks, np.stack([slow_stack(volume, z) for z in range(7)]))
    np.testing.assert_array_equal(stacks[0, 0], volume[:, :, 0])                       # edge: centre repeated
    np.testing.assert_array_equal(stacks[6, 2], volume[:, :, 6])
    np.testing.assert_array_equal(stacks[3, 0], volume[:, :, 2])                       # a real neighbour
    # slices not available (dropped from training): replaced by the centre, never read
    available = np.array([True, False, True, True, False, True, True])
    kept = np.flatnonzero(available)
    np.testing.assert_array_equal(neighbour_stack(volume, kept, available=available),
                                  np.stack([slow_stack(volume, z, available) for z in kept]))
    assert neighbour_indices(kept, 7, available).tolist() == [[0, 0, 0], [2, 2, 3], [2, 3, 3], [5, 5, 6],
                                                              [5, 6, 6]]
    # one slice: the slice alone; a one-slice volume: the centre three times
    np.testing.assert_array_equal(neighbour_stack(volume, [2, 5], 1),
                                  np.moveaxis(volume[:, :, [2, 5]], 2, 0)[:, None])
    single = volume[:, :, :1]
    np.testing.assert_array_equal(neighbour_stack(single, [0])[0], np.stack([single[:, :, 0]] * 3))


# ------------------------------------------------------------------ what the writers store
def test_visceral_writer_stores_each_row_s_neighbours(unlabeled_prep, tiny_prepared):
    # images-only: row = z, so row r's neighbours are rows r - 1 and r + 1 (the first / last row: itself)
    for path in sorted((unlabeled_prep / "train").glob("*_image.npy")):
        pid = path.name[: -len("_image.npy")]
        images = open_training_images(unlabeled_prep, pid)
        neighbours = open_training_neighbours(unlabeled_prep, pid)
        last = images.shape[0] - 1
        assert neighbours.shape == (images.shape[0], 2, 64, 64) and neighbours.dtype == np.float32
        for row in range(images.shape[0]):
            np.testing.assert_array_equal(neighbours[row, 0], images[max(row - 1, 0)])
            np.testing.assert_array_equal(neighbours[row, 1], images[min(row + 1, last)])
    # selected organ slices (not contiguous rows): where slice z +- 1 is a row too, it is that row's image
    index = json.loads((tiny_prepared / "index.json").read_text())["slices"]
    z_of = {(pid, row): z for entries in index.values() for pid, row, z in entries}
    pairs = 0
    for (pid, row), z in z_of.items():
        images = open_training_images(tiny_prepared, pid)
        neighbours = open_training_neighbours(tiny_prepared, pid)
        for side, dz in ((0, -1), (1, 1)):
            other = [r for (p, r), zz in z_of.items() if p == pid and zz == z + dz]
            if other:
                np.testing.assert_array_equal(neighbours[row, side], images[other[0]])
                pairs += 1
    assert pairs > 10


def test_setting2_folder_gives_an_excluded_neighbour_the_centre_slice(tmp_path):
    """SSL-ALPNet layout, Setting 2: a kept slice next to a dropped one (it shows a test organ) stores its
    own image as that neighbour; no stored neighbour is a dropped slice."""
    folder = write_alpnet_folder(tmp_path / "d", [1, 2, 3, 5, 8, 10, 13])
    meta = prepare_alpnet(folder, tmp_path / "prep", fold=0, setting=2, label_set=0, rule="or")
    test_values = layout.CHAOS_T2.test_values(0)
    replaced = 0
    for sid in meta["splits"]["train"]:
        raw = np.asarray(nib.load(str(folder / f"image_{sid}.nii.gz")).dataobj).transpose(1, 0, 2)
        label = np.asarray(nib.load(str(folder / f"label_{sid}.nii.gz")).dataobj).transpose(1, 0, 2)
        volume = ((raw - raw.mean()) / raw.std()).astype(np.float32)                  # MR z-score per volume
        dropped = [any((label[:, :, z] == value).any() for value in test_values)
                   for z in range(label.shape[2])]
        available = ~np.array(dropped)
        kept = np.flatnonzero(available)
        images = open_training_images(tmp_path / "prep", sid)
        neighbours = open_training_neighbours(tmp_path / "prep", sid)
        assert images.shape[0] == kept.size and neighbours.shape == (kept.size, 2, 24, 24)
        for row, z in enumerate(kept):
            expected = slow_stack(volume, z, available)
            np.testing.assert_allclose(images[row], expected[1], atol=1e-5)
            np.testing.assert_allclose(neighbours[row], expected[[0, 2]], atol=1e-5)
            for side, dz in ((0, -1), (1, 1)):
                if 0 <= z + dz < len(dropped) and dropped[z + dz]:
                    np.testing.assert_array_equal(neighbours[row, side], images[row])   # the centre itself
                    replaced += 1
                    assert not np.allclose(neighbours[row, side], volume[:, :, z + dz], atol=1e-3)
    assert replaced > 0


# ------------------------------------------------------------------ episodes
def test_supervised_episode_channels_are_a_stored_row_and_its_neighbours(tiny_prepared):
    one = EpisodeDataset(str(tiny_prepared), CLASSES, 2, 2, 2, 48, AUGMENT, seed=3)
    three = EpisodeDataset(str(tiny_prepared), CLASSES, 2, 2, 2, 48, AUGMENT, seed=3, input_slices=3)
    for i in range(4):
        a, b = one[i], three[i]
        assert a["support_images"].shape == (2, 2, 1, 48, 48)
        assert b["support_images"].shape == (2, 2, 3, 48, 48)
        assert a["query_images"].shape == (2, 1, 48, 48) and b["query_images"].shape == (2, 3, 48, 48)
        # the same draws: the centre channel is the 1-slice image, labels and masks are the same
        assert torch.equal(b["support_images"][:, :, 1:2], a["support_images"])
        assert torch.equal(b["query_images"][:, 1:2], a["query_images"])
        for key in ("support_fg", "support_bg", "query_labels", "classes"):
            assert torch.equal(a[key], b[key]), key
    # without resize and augmentation the channels are exactly a stored row's (z - 1, z, z + 1)
    plain = EpisodeDataset(str(tiny_prepared), CLASSES, 1, 1, 1, 64, None, seed=4, input_slices=3)
    rows = {}
    for path in (tiny_prepared / "train").glob("*_image.npy"):
        pid = path.name[: -len("_image.npy")]
        images, _ = open_training_volume(tiny_prepared, pid)
        rows[pid] = (np.asarray(images), np.asarray(open_training_neighbours(tiny_prepared, pid)))
    differs = 0
    for i in range(6):
        stack = plain[i]["query_images"][0].numpy()                                    # 3 x 64 x 64
        found = [(pid, r) for pid, (images, _) in rows.items() for r in range(len(images))
                 if np.array_equal(images[r], stack[1])]
        assert found, "the centre channel is a stored training row"
        pid, row = found[0]
        np.testing.assert_array_equal(stack[[0, 2]], rows[pid][1][row])
        differs += int(not np.array_equal(stack[0], stack[1]))
    assert differs > 0


@pytest.mark.parametrize("recipe", ["project", "alpnet"])
def test_selfsup_episode_centre_channel_is_the_one_slice_view(unlabeled_prep, recipe):
    def dataset(slices):
        return SelfSupEpisodeDataset(str(unlabeled_prep), 1, 2, 2, 48, AUGMENT, {}, 20, seed=7, recipe=recipe,
                                     input_slices=slices)
    one, three = dataset(1), dataset(3)
    for i in range(3):
        a, b = one[i], three[i]
        assert b["support_images"].shape == (1, 2, 3, 48, 48) and b["query_images"].shape == (2, 3, 48, 48)
        assert torch.equal(b["support_images"][:, :, 1:2], a["support_images"])
        assert torch.equal(b["query_images"][:, 1:2], a["query_images"])
        for key in ("support_fg", "query_labels", "redraws"):
            assert torch.equal(a[key], b[key]), key


def test_the_three_channels_get_the_same_warp_and_augmentation():
    """A stack of three copies of one slice stays three copies of the 1-slice result (one random draw)."""
    rng = np.random.default_rng(2)
    image = rng.uniform(0, 1, (32, 32)).astype(np.float32)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:20, 10:24] = 1
    copies = np.stack([image] * 3)                                                      # 3 x H x W
    grid = random_grid(32, WarpParams(), np.random.default_rng(5))
    single, stacked = warp(image, mask, grid), warp(copies, mask, grid)
    assert stacked[0].shape == (3, 32, 32)
    for channel in stacked[0]:
        np.testing.assert_array_equal(channel, single[0])
    np.testing.assert_array_equal(stacked[1], single[1])
    single, stacked = alpnet_view(image, mask, np.random.default_rng(6)), alpnet_view(copies, mask,
                                                                                      np.random.default_rng(6))
    for channel in stacked[0]:
        np.testing.assert_array_equal(channel, single[0])
    np.testing.assert_array_equal(stacked[1], single[1])
    params = {"p": 1.0, "brightness": [0.7, 1.3], "contrast": [0.5, 2.0], "gamma": [0.5, 2.0]}
    a, b = np.random.default_rng(8), np.random.default_rng(8)
    single, stacked = augment_intensity(image, params, a), augment_intensity(copies, params, b)
    for channel in stacked:
        np.testing.assert_array_equal(channel, single)
    assert a.random() == b.random()                                  # the same number of draws
    # contrast about each channel's own mean: a channel is augmented as it would be alone
    other = np.stack([image, image * 0.5, image])
    alone = augment_intensity(image * 0.5, params, np.random.default_rng(9))
    np.testing.assert_array_equal(augment_intensity(other, params, np.random.default_rng(9))[1], alone)


def test_one_slice_items_follow_the_documented_episode_rule(tiny_prepared):
    """input_slices 1 is the item of before: draws from default_rng([seed, i]) (ways, then per way the
    K + Q_n slices, then per slice coin and factor per transform), images read unchanged (64 = prep size)
    and augmented as docs/method.md says (brightness x * f, contrast about the mean, clipped)."""
    params = {"p": 0.6, "brightness": [0.5, 2.0], "contrast": [0.5, 2.0]}
    data = EpisodeDataset(str(tiny_prepared), CLASSES, 2, 1, 2, 64, params, seed=11)
    index = json.loads((tiny_prepared / "index.json").read_text())["slices"]
    usable = [c for c in CLASSES if len(index.get(str(c), [])) >= 2]
    for i in range(3):
        rng = np.random.default_rng([11, i])
        ways = rng.choice(len(usable), size=2, replace=False)
        expected = []
        for cls in [usable[w] for w in ways]:
            entries = index[str(cls)]
            for pick in rng.choice(len(entries), size=2, replace=False):       # 1 support + 1 query per way
                pid, row, _ = entries[pick]
                image = np.array(open_training_volume(tiny_prepared, pid)[0][row], dtype=np.float32)
                for name in ("brightness", "contrast"):
                    coin, factor = rng.random(), rng.uniform(*params[name])
                    if coin < params["p"]:
                        mean = image.mean(dtype=np.float64)
                        image = image * np.float32(factor) if name == "brightness" else \
                            (image - np.float32(mean)) * np.float32(factor) + np.float32(mean)
                        image = np.clip(image, 0.0, 1.0).astype(np.float32)
                expected.append(image)
        item = data[i]
        np.testing.assert_array_equal(item["support_images"][:, 0, 0].numpy(), np.stack(expected[0::2]))
        np.testing.assert_array_equal(item["query_images"][:, 0].numpy(), np.stack(expected[1::2]))


# ------------------------------------------------------------------ the model
def test_encoders_take_a_3_slice_stack_and_a_1_slice_model_is_unchanged():
    torch.manual_seed(0)
    encoder = build_encoder("cnn_small").eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(encoder(x), encoder(x.repeat(1, 3, 1, 1)))      # 1 slice: repeated, as before
        assert encoder(torch.rand(2, 3, 32, 32)).shape == (2, 128, 8, 8)
    one = FewShotSegNet("cnn_small", n_grid=4)
    assert one.config["input_slices"] == 1
    three = FewShotSegNet("cnn_small", n_grid=4, input_slices=3)
    three.load_state_dict(one.state_dict())
    assert three.config == {**one.config, "input_slices": 3}
    one.eval(), three.eval()
    support = torch.rand(1, 1, 1, 1, 32, 32)
    fg = torch.zeros(1, 1, 1, 32, 32)
    fg[..., 8:24, 8:24] = 1
    query = torch.rand(1, 2, 1, 32, 32)
    with torch.no_grad():
        logits, _ = one(support, fg, 1 - fg, query)
        stacked, _ = three(support.repeat(1, 1, 1, 3, 1, 1), fg, 1 - fg, query.repeat(1, 1, 3, 1, 1))
        assert torch.equal(logits, stacked)
        with pytest.raises(AssertionError):
            three.segment(three.encode_support(support.repeat(1, 1, 1, 3, 1, 1), fg, 1 - fg), query)
        with pytest.raises(AssertionError):
            one(support.repeat(1, 1, 1, 3, 1, 1), fg, 1 - fg, query)


def test_snapshots_store_input_slices(tmp_path):
    from models.checkpoint import model_from_checkpoint, save_checkpoint
    from models.fewshot import model_input_slices
    three = FewShotSegNet("cnn_small", n_grid=4, input_slices=3)
    save_checkpoint(str(tmp_path / "three.pth"), {"model": three.state_dict(), "model_config": three.config})
    loaded, state = model_from_checkpoint(str(tmp_path / "three.pth"))
    assert state["model_config"]["input_slices"] == 3 and model_input_slices(loaded) == 3
    save_checkpoint(str(tmp_path / "bad.pth"), {"model": three.state_dict(),
                                                "model_config": {**three.config, "input_slices": 2}})
    with pytest.raises(UserError, match=r"model\.input_slices = 2: not one of the choices: use one of 1, 3"):
        model_from_checkpoint(str(tmp_path / "bad.pth"))


# ------------------------------------------------------------------ evaluation
class RecordingModel(torch.nn.Module):
    """The evaluation API of a few-shot model, recording the images it is given; foreground = the query
    centre channel above the support's foreground mean."""

    def __init__(self, input_slices: int | None):
        super().__init__()
        self.config = {} if input_slices is None else {"input_slices": input_slices}
        self.supports, self.queries = [], []

    def encode_support(self, images, fg, bg):                        # 1 x 1 x K x C x S x S
        self.supports.append(images.clone())
        centre = images[:, :, :, images.shape[3] // 2]
        return (centre * fg).sum() / fg.sum()

    def segment(self, prototype, query_images):                      # 1 x Q x C x S x S
        self.queries.append(query_images.clone())
        centre = query_images[:, :, query_images.shape[2] // 2]
        return torch.stack([prototype - centre, centre - prototype], dim=2)   # 1 x Q x 2 x S x S


def test_the_chunk_loop_feeds_neighbour_stacks_of_the_whole_volume():
    from evaluation.inference import images_to_input, run_chunks
    rng = np.random.default_rng(1)
    support = rng.normal(0, 100, (20, 20, 8)).astype(np.float32)
    query = rng.normal(0, 100, (20, 20, 6)).astype(np.float32)
    mask = np.zeros(support.shape, bool)
    mask[5:15, 5:15, 2:7] = True
    plan = [(np.array([3]), np.array([0, 1, 2])), (np.array([6]), np.array([3, 4, 5]))]
    intensity, cpu = {"mode": "window", "window": [-150.0, 150.0]}, torch.device("cpu")
    model = RecordingModel(3)
    run_chunks(model, [(support, mask)], plan, query, 16, intensity, cpu, batch_size=2)
    for (support_z, query_z), shots in zip(plan, model.supports):
        expected = images_to_input(np.stack([slow_stack(support, z) for z in support_z]), intensity, 16, cpu)
        assert torch.equal(shots[0, 0], expected)                                        # K x 3 x S x S
    queries = torch.cat([q[0] for q in model.queries])                                    # Z x 3 x S x S
    expected = images_to_input(np.stack([slow_stack(query, z) for z in range(6)]), intensity, 16, cpu)
    assert torch.equal(queries, expected) and torch.equal(queries[0, 0], queries[0, 1])  # first slice: edge
    # a model without input_slices (1-slice, SENet, test doubles) gets the slices of before
    model = RecordingModel(None)
    run_chunks(model, [(support, mask)], plan, query, 16, intensity, cpu, batch_size=2)
    queries = torch.cat([q[0] for q in model.queries])                                    # Z x 1 x S x S
    assert torch.equal(queries, images_to_input(np.moveaxis(query, -1, 0), intensity, 16, cpu))
    assert torch.equal(model.supports[0][0, 0], images_to_input(support[:, :, 3][None], intensity, 16, cpu))


def test_test_time_adaptation_of_a_3_slice_model_at_both_resolutions():
    from evaluation.adaptation import support_views, test_time_model
    from evaluation.inference import run_chunks
    from evaluation.protocols import chunk_plan
    torch.manual_seed(0)
    model = FewShotSegNet("cnn_small", n_grid=2, min_pixels=3, input_slices=3).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(3)
    volume = rng.normal(0, 1, (32, 32, 8)).astype(np.float32)
    mask = np.zeros(volume.shape, bool)
    mask[8:24, 10:26, 1:7] = True
    volume[mask] += 2.0
    images, masks = support_views(neighbour_stack(volume, [4])[0], mask[:, :, 4], 4, 24, rng)
    assert images.shape == (4, 3, 24, 24) and masks.shape == (4, 24, 24)
    for stored_views, plan in ((True, chunk_plan((1, 6), (1, 6), 3, rule="alpnet", support_mask=mask)),
                               (False, chunk_plan((1, 7), (1, 7), 2))):
        wrapped = test_time_model(model, None, adapt_steps=1, adapt_lr=1e-2, stored_views=stored_views)
        prediction = run_chunks(wrapped, [(volume, mask)], plan, volume, 24, {"mode": "zscore"}, "cpu", 4)
        assert prediction.shape == volume.shape and wrapped.adaptations == len(plan)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_3_slice_model_trains_two_steps_and_validates_on_volumes(tiny_prepared, tmp_path, capsys):
    summary, _ = train_in_process(n_steps=2, val_every=2, val_split="gold", save_every=2,
                                  eval={"batch_size": 16}, model={"input_slices": 3, "n_grid": 4},
                                  path={"data_dir": str(tiny_prepared), "log_dir": str(tmp_path)})
    assert summary["steps"] == 2 and np.isfinite(summary["best_dice"])
    assert "validation Dice" in capsys.readouterr().out


# ------------------------------------------------------------------ configuration and errors
def one_line(callable_, *args, **kwargs) -> str:
    with pytest.raises(UserError) as caught:
        callable_(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_schema_refuses_senet_and_values_other_than_1_and_3():
    from training.config_check import check_run_config
    check_run_config(resolve_config(model={"input_slices": 3}))
    check_run_config(resolve_config(("tiny", "panet"), model={"input_slices": 3}))
    check_run_config(resolve_config(("tiny", "selfsup"), model={"input_slices": 3, "head": "alpnet"}))
    assert one_line(check_run_config, resolve_config(model={"input_slices": 2})) == \
        "model.input_slices = 2: not one of the choices: use one of 1, 3"
    assert one_line(check_run_config, resolve_config(model={"input_slices": "3"})).startswith(
        "model.input_slices = '3': must be an integer, not a string")
    senet_3 = resolve_config(("tiny", "senet"), model={"input_slices": 3})
    assert one_line(check_run_config, senet_3).startswith(
        "model.input_slices = 3: SENet takes one slice per image")
    check_run_config(resolve_config(("tiny", "senet")))                 # the default (1) is fine for SENet


def test_a_3_slice_run_on_a_folder_without_neighbours_is_one_line(without_neighbours, unlabeled_prep,
                                                                  tmp_path):
    from training.config_check import check_config
    config = resolve_config(model={"input_slices": 3}, val_split="gold",
                     path={"data_dir": str(without_neighbours), "log_dir": str(tmp_path)})
    message = one_line(check_config, config, "train")
    assert message.startswith(f"path.data_dir '{without_neighbours}' has no neighbour slices")
    assert "model.input_slices=3" in message and "re-run the prepare command" in message
    assert f"--out {without_neighbours} --overwrite" in message
    message = one_line(EpisodeDataset, str(without_neighbours), CLASSES, 1, 1, 1, 32, None, 0, input_slices=3)
    assert "_neighbours.npy: missing training file" in message
    EpisodeDataset(str(without_neighbours), CLASSES, 1, 1, 1, 32, None, 0)       # 1 slice: still readable
    check_config({**config, "model": {**config["model"], "input_slices": 1}}, "train")
    old = tmp_path / "unlabeled_prep"
    shutil.copytree(unlabeled_prep, old)
    for path in (old / "train").glob("*_neighbours.npy"):
        path.unlink()
    data = SelfSupEpisodeDataset(str(old), 1, 1, 1, 32, None, {}, 20, 0, input_slices=3)
    message = one_line(data.__getitem__, 0)
    assert "_neighbours.npy: missing training file" in message and "make_superpixels.py" in message


def test_the_data_set_checker_accepts_stored_neighbours_and_refuses_broken_ones(tiny_prepared, tmp_path):
    from dataloaders.prepared import check_folder as check_prepared
    check_prepared(tiny_prepared)
    broken = tmp_path / "prep"
    shutil.copytree(tiny_prepared, broken)
    path = sorted((broken / "train").glob("*_neighbours.npy"))[0]
    np.save(path, np.load(path)[:, :1])
    assert "_neighbours.npy: float32" in one_line(check_prepared, broken)
    assert "expected float32" in one_line(check_prepared, broken)
