"""Slice extraction option --official-slices: the official notebook never considers the last axial slice."""
import numpy as np

from dataloaders.prepare import Selection, select_slices


def test_last_axial_slice_is_never_considered_with_skip_last():
    label = np.zeros((16, 16, 8), np.uint8)
    label[:, :, 2] = 1                                   # 256 voxels: qualifies (> 150)
    label[:, :, 7] = 1                                   # the last slice qualifies too
    label[:4, :4, 4] = 1                                 # 16 voxels: does not
    rng = np.random.default_rng(0)
    assert select_slices(label, 1, rng, Selection()).tolist() == [2, 7]
    assert select_slices(label, 1, rng, Selection(skip_last=True)).tolist() == [2]


def test_skip_last_with_many_qualifying_slices_draws_from_0_to_z_minus_2():
    label = np.ones((16, 16, 30), np.uint8)              # every slice qualifies: 29 of them without the last
    for seed in range(20):
        chosen = select_slices(label, 1, np.random.default_rng(seed), Selection(skip_last=True))
        assert len(chosen) == 5 and chosen.max() <= 28
