"""The organ vocabulary: indices, RadLex ids, aliases and fold class pools (docs/method.md, "VISCERAL
data, folds and the paper's figures")."""
import pytest

from dataloaders import organs
from util.errors import UserError


def test_twenty_structures_with_official_indices_and_radlex_ids():
    assert sorted(organs.STRUCTURES) == list(range(1, 21))
    assert organs.STRUCTURES[1] == ("liver", 58)
    assert organs.STRUCTURES[2] == ("spleen", 86)
    assert organs.STRUCTURES[13] == ("kidney_right", 29662)
    assert organs.STRUCTURES[14] == ("kidney_left", 29663)
    assert organs.STRUCTURES[17] == ("psoas_right", 32248)
    assert organs.STRUCTURES[18] == ("psoas_left", 32249)
    assert len(set(organs.RADLEX_TO_INDEX)) == 20


@pytest.mark.parametrize("name, index", [("iliopsoas_left", 18), ("Iliopsoas Right", 17),
                                         ("kidney_left", 14), ("adrenal_gland_right", 4), ("liver", 1)])
def test_aliases_map_to_official_indices(name, index):
    assert organs.organ_index(name) == index


def test_unknown_organ_is_a_one_line_user_error():
    with pytest.raises(UserError, match="unknown organ 'livr'"):
        organs.organ_index("livr")


@pytest.mark.parametrize("fold", range(4))
def test_fold_test_organs_are_never_training_classes(fold):
    test = {organs.NAME_TO_INDEX[name] for name in organs.FOLD_ORGANS[fold]}
    six = organs.training_classes(fold, "six_organs")
    every = organs.training_classes(fold, "all_structures")
    assert not test & set(six) and not test & set(every)
    assert len(six) == 6 - len(test) and len(every) == 20 - len(test)
    assert set(six) <= set(every)
