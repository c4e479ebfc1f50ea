"""Options this project once had and removed, and the one-line error for a config or snapshot that
still uses one. The last version that had all of them is commit b9c8bb5 (2026-11-27): a snapshot
trained with one of them still runs there.

`REMOVED` maps (option, removed value) to what to do instead; the option is the key inside its
config section (`model.empty_cell` is ("empty_cell", ...) of the model config). A new removal is
one line in `REMOVED`.
"""
from __future__ import annotations

from typing import Mapping

from util.errors import UserError

LAST_COMMIT = "b9c8bb5"
LAST_VERSION = f"commit {LAST_COMMIT} (2026-11-27)"

REMOVED = {
    # model.empty_cell 'skip': a cell with <= min_pixels class pixels took no part in the vote
    ("empty_cell", "skip"): "retrain with empty_cell='zero'",
    # model.encoder 'resnet50_torchvision': this project's earlier torchvision-layout ResNet-50
    ("encoder", "resnet50_torchvision"): "retrain with encoder='resnet50_lslpn' (the authors' ResNet-50)",
    # eval.preset 'lslpn': the older name of the protocol preset 'inclusive'
    ("preset", "lslpn"): "use preset 'inclusive' (the same rule under its current name)",
}
# A snapshot without this model key was written before the key existed, with the removed value.
MISSING_IN_SNAPSHOT_MEANS = {"empty_cell": "skip"}


def removed_option_error(option: str, value, source: str, shown: str | None = None) -> UserError | None:
    """The one-line UserError for `option` = `value` when that value was removed, else None.

    shown: the option as the user wrote it (default 'model.<option>'); source: where it was read,
    e.g. a snapshot path or 'the config'.
    """
    if not isinstance(value, str) or (option, value) not in REMOVED:
        return None
    return UserError(f"{shown or 'model.' + option} = {value!r} (in {source}): this option was removed "
                     f"after {LAST_VERSION}: {REMOVED[option, value]} or check out {LAST_COMMIT}")


def refuse_removed_options(model_config: Mapping, source: str, prefix: str = "model",
                           snapshot: bool = False) -> None:
    """UserError (one line) when a model config uses a removed option value.

    snapshot=True: `model_config` is the config a checkpoint stores; a prototype-model snapshot
    without a key of MISSING_IN_SNAPSHOT_MEANS was trained with that removed value.
    """
    for option, value in model_config.items():
        error = removed_option_error(option, value, source, f"{prefix}.{option}")
        if error is not None:
            raise error
    if snapshot and (model_config.get("method") or "prototype") == "prototype":
        for option, value in MISSING_IN_SNAPSHOT_MEANS.items():
            if option not in model_config:
                raise UserError(f"{prefix}.{option} missing (in {source}): the snapshot predates the "
                                f"option and was trained with {option}={value!r}, which was removed after "
                                f"{LAST_VERSION}: {REMOVED[option, value]} or check out {LAST_COMMIT}")
