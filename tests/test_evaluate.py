"""Evaluation library: validate(), evaluate() outputs, baselines, bad input.

The tiny prepared folder and the stand-in model here are shared by the other evaluation tests
(`from test_evaluate import make_prepared, IntensityModel`).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from util.errors import UserError

SHAPE = (24, 20, 16)            # X x Y x Z, canonical
LPS_AFFINE = np.diag([-1.5, -1.5, 2.5, 1.0])


def _box(shape, x, y, z):
    mask = np.zeros(shape, dtype=bool)
    mask[x[0]:x[1], y[0]:y[1], z[0]:z[1]] = True
    return mask


def make_volume(shift: int, organs=("liver", "spleen", "kidney_left")) -> dict:
    """A canonical phantom volume: bright boxes (organs) on a dark body; shift moves them in z and x."""
    label = np.zeros(SHAPE, dtype=np.uint8)
    if "liver" in organs:
        label[_box(SHAPE, (2 + shift, 12 + shift), (3, 15), (3 + shift, 12 + shift))] = 1
    if "spleen" in organs:
        label[_box(SHAPE, (15, 21), (8, 16), (6, 10 + shift))] = 2
    if "kidney_left" in organs:
        label[_box(SHAPE, (14, 20), (2, 6), (1, 4))] = 14
    image = np.full(SHAPE, -400, dtype=np.int16)
    image[label > 0] = 60
    image[label == 2] = 120
    image[0, 0, :] = -1000                      # air corner: fixes the min-max range of every slice
    image[-1, -1, :] = 400
    return {"image": image, "label": label, "affine": np.diag([1.5, 1.5, 2.5, 1.0]),
            "original_affine": LPS_AFFINE, "original_shape": np.array(SHAPE),
            "original_axcodes": np.array("LPS"), "spacing": np.array([1.5, 1.5, 2.5])}


def make_prepared(root: Path, split: str = "gold", pids=("10000100", "10000104", "10000105"),
                  absent: dict | None = None) -> Path:
    """PREP folder with meta.json and volumes/<split>/<pid>.npz; absent = {pid: organs kept}."""
    prep = Path(root) / "prep"
    folder = prep / "volumes" / split
    folder.mkdir(parents=True, exist_ok=True)
    for shift, pid in enumerate(pids):
        organs = (absent or {}).get(pid, ("liver", "spleen", "kidney_left"))
        np.savez(folder / f"{pid}.npz", **make_volume(shift, organs))
    meta = {"format_version": 1, "intensity": {"mode": "minmax"}, "prep_size": 32,
            "splits": {"train": [], "val": [], "gold": []} | {split: list(pids)}}
    (prep / "meta.json").write_text(json.dumps(meta))
    (prep / "index.json").write_text(json.dumps({"slices": {}}))
    return prep


class IntensityModel(torch.nn.Module):
    """Stand-in few-shot model with the FewShotSegNet evaluation API: prototypes are the mean
    scaled intensities of support foreground and background; logits = -|query - prototype|."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(20.0))
        self.calls = {"encode": 0, "segment": 0}

    def encode_support(self, images, fg, bg):          # B x N x K x 1 x H x W, B x N x K x H x W
        self.calls["encode"] += 1
        images = images[:, :, :, 0]
        fg_mean = (images * fg).sum((2, 3, 4)) / fg.sum((2, 3, 4)).clamp(min=1)    # B x N
        bg_mean = (images * bg).sum((2, 3, 4)) / bg.sum((2, 3, 4)).clamp(min=1)    # B x N
        return torch.stack([bg_mean[:, 0], fg_mean[:, 0]], dim=1)                  # B x 2

    def segment(self, prototypes, query_images):       # B x Q x 1 x H x W -> B x Q x 2 x H x W
        self.calls["segment"] += 1
        return -self.scale * (query_images - prototypes[:, None, :, None, None]).abs()


def test_validate_returns_mean_and_per_organ_restores_mode_and_needs_prepared_data(tmp_path):
    from evaluation.evaluate import validate
    prep = make_prepared(tmp_path, split="val")
    model = IntensityModel().train()
    result = validate(model, prep, split="val", organs=["liver", "spleen"], preset="thirds",
                      input_size=32, device="cpu", batch_size=4)
    assert model.training
    assert set(result["per_organ"]) == {"liver", "spleen"}
    assert result["preset"] == "thirds"
    # the stand-in separates the bright organs from the dark body, but liver and spleen are both bright
    assert 0.0 < result["per_organ"]["liver"] <= 1.0
    assert result["mean_dice"] == pytest.approx(np.mean(list(result["per_organ"].values())))
    with pytest.raises(UserError, match="prepare_visceral"):
        validate(IntensityModel(), tmp_path / "nothing", organs=["liver"], input_size=32)


def _run(tmp_path, **overrides):
    from evaluation.evaluate import evaluate
    prep = overrides.pop("prep", None) or make_prepared(tmp_path)
    arguments = dict(methods={"mask copy": None, "toy": IntensityModel()}, organs=["liver", "spleen"],
                     prep_dir=prep, preset="thirds", out_dir=tmp_path / "out", input_size=32, device="cpu",
                     batch_size=4, fold=0, progress=False)
    arguments.update(overrides)
    return evaluate(**arguments), tmp_path / "out"


def test_evaluate_writes_every_output(tmp_path):
    results, out = _run(tmp_path)
    for name in ("results.json", "results.csv", "table.md", "results.png", "misalignment.png",
                 "figure_data.npz"):
        assert (out / name).is_file(), name
    assert not list(out.rglob("*.tmp-*"))
    stored = json.loads((out / "results.json").read_text())
    assert stored["preset"]["name"] == "thirds" and stored["fold"] == 0
    assert stored["supports"] == ["10000100"]           # no 10000132: first by sorted id
    liver = stored["results"]["toy"]["liver"]
    assert {case["query"] for case in liver["per_volume"]} == {"10000104", "10000105"}
    values = [case["dice_range"] for case in liver["per_volume"]]
    assert liver["range"]["mean"] == pytest.approx(np.mean(values))
    assert liver["range"]["median"] == pytest.approx(np.median(values))
    assert liver["range"]["std"] == pytest.approx(np.std(values))
    assert liver["range"]["value"] == pytest.approx(np.mean(values))   # thirds: mean
    # CSV: one row per (method, organ, query) with the preset
    rows = (out / "results.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2 * 2 * 2 and all(",thirds," in row for row in rows[1:])
    # table: methods as rows, Table 1 columns, percentages
    table = (out / "table.md").read_text()
    assert "| Method | liver | spleen | kidney | psoas | mean |" in table
    mask_copy_row = next(line for line in table.splitlines() if line.startswith("| mask copy |"))
    expected = 100 * stored["results"]["mask copy"]["liver"]["range"]["value"]
    assert f"| {expected:.1f} |" in mask_copy_row


def test_mask_copy_dice_and_its_nifti_prediction_in_the_original_geometry(tmp_path):
    import nibabel as nib

    from dataloaders.nifti import load_nifti
    from evaluation.protocols import dice, mask_copy, organ_range
    results, out = _run(tmp_path, methods={"mask copy": None}, organs=["liver"])
    support, query = make_volume(0), make_volume(2)
    s_range, q_range = organ_range(support["label"] == 1, 1), organ_range(query["label"] == 1, 1)
    copied = mask_copy(support["label"] == 1, s_range, SHAPE, q_range, 3)
    case = next(c for c in results["results"]["mask copy"]["liver"]["per_volume"] if c["query"] == "10000105")
    assert case["dice_range"] == pytest.approx(dice(copied[..., q_range[0]:q_range[1] + 1],
                                                   query["label"][..., q_range[0]:q_range[1] + 1] == 1))
    assert case["dice_volume"] == pytest.approx(dice(copied, query["label"] == 1))
    path = out / "predictions" / "mask_copy" / "10000105_liver.nii.gz"
    image = nib.load(str(path))
    assert image.shape == SHAPE
    np.testing.assert_allclose(image.affine, LPS_AFFINE)
    assert (np.asarray(image.dataobj) == copied[::-1, ::-1, :]).all()   # LPS storage: RAS flipped in x, y
    assert (load_nifti(path).array.astype(bool) == copied).all()


def test_whole_volume_dice_counts_organ_outside_the_range(tmp_path):
    # threshold 200 (lslpn) on a tiny phantom: the organ range is only the slices with > 200 voxels
    prep = make_prepared(tmp_path)
    folder = prep / "volumes" / "gold"
    for shift, pid in enumerate(("10000100", "10000104", "10000105")):
        volume = make_volume(shift)
        volume["label"][:, :, :] = 0
        volume["label"][0:20, 0:15, 4:8] = 1          # 300 voxels per slice: in range
        volume["label"][0:5, 0:5, 9 + shift] = 1      # 25 voxels: outside the range, still organ
        np.savez(folder / f"{pid}.npz", **volume)
    results, _ = _run(tmp_path, prep=prep, preset="inclusive", methods={"mask copy": None}, organs=["liver"])
    case = results["results"]["mask copy"]["liver"]["per_volume"][0]
    assert case["dice_range"] == pytest.approx(1.0)
    assert case["dice_volume"] == pytest.approx(2 * 1200 / (1200 + 1225))


def test_batching_does_not_change_the_prediction_and_support_is_encoded_once_per_chunk_with_k_shots():
    from evaluation.inference import run_chunks
    from evaluation.protocols import chunk_plan
    support, query = make_volume(0), make_volume(1)
    predictions, seen = [], []

    class Recording(IntensityModel):
        def encode_support(self, images, fg, bg):
            seen.append(tuple(images.shape))
            return super().encode_support(images, fg, bg)
    for batch_size in (1, 3, 64):
        model = IntensityModel()
        predictions.append(run_chunks(model, [(support["image"], support["label"] == 1)],
                                      chunk_plan((3, 11), (4, 12), 3), query["image"], 32, {"mode": "minmax"},
                                      "cpu", batch_size))
        # 9 query slices in 3 chunks of 3
        assert model.calls == {"encode": 3, "segment": 3 * -(-3 // batch_size)}
    assert all((p == predictions[0]).all() for p in predictions)
    assert not predictions[0][..., :4].any() and not predictions[0][..., 13:].any()
    shots = [(support["image"], support["label"] == 1)] * 3
    run_chunks(Recording(), shots, chunk_plan((3, 11), (4, 12), 3, 3), query["image"], 32, {"mode": "minmax"},
               "cpu", 8)
    assert seen == [(1, 1, 3, 1, 32, 32)] * 3                       # k = 3 support slices per chunk


def test_support_all_reports_mean_and_std_over_supports_and_the_default_support(tmp_path):
    results, out = _run(tmp_path, support="all", methods={"mask copy": None}, organs=["liver"])
    liver = results["results"]["mask copy"]["liver"]
    per_support = {}
    for case in liver["per_volume"]:
        per_support.setdefault(case["support"], []).append(case["dice_range"])
    assert len(per_support) == 3 and all(len(v) == 2 for v in per_support.values())
    means = [np.mean(v) for v in per_support.values()]
    assert liver["range"]["value"] == pytest.approx(np.mean(means))
    assert liver["range"]["std_over_supports"] == pytest.approx(np.std(means))
    assert "±" in (out / "table.md").read_text()
    assert (out / "predictions" / "mask_copy" / "support_10000104" / "10000100_liver.nii.gz").is_file()
    from evaluation.evaluate import choose_supports
    assert choose_supports(["10000100", "10000132"], "default") == ["10000132"]    # the official support
    assert choose_supports(["10000100", "10000104"], "default") == ["10000100"]
    assert choose_supports(["10000100", "10000104"], 10000104) == ["10000104"]


def test_organ_absent_from_support_or_query_is_reported_not_a_crash(tmp_path):
    prep = make_prepared(tmp_path, absent={"10000104": ("liver",), "10000100": ("liver", "kidney_left")})
    results, out = _run(tmp_path, prep=prep, methods={"mask copy": None}, organs=["liver", "spleen"])
    spleen = results["results"]["mask copy"]["spleen"]
    assert spleen["per_volume"] == [] and len(spleen["skipped"]) == 2
    assert all("absent from support 10000100" in case["skipped"] for case in spleen["skipped"])
    prep2 = make_prepared(tmp_path / "b", absent={"10000104": ("liver",)})
    results, _ = _run(tmp_path / "b", prep=prep2, methods={"mask copy": None}, organs=["spleen"])
    spleen = results["results"]["mask copy"]["spleen"]
    assert [c["query"] for c in spleen["per_volume"]] == ["10000105"]
    assert "absent from query 10000104" in spleen["skipped"][0]["skipped"]
    prep3 = make_prepared(tmp_path / "c", absent={pid: ("liver",) for pid in ("10000100", "10000104",
                                                                               "10000105")})
    results, out = _run(tmp_path / "c", prep=prep3, organs=["spleen"])       # every query skipped: outputs
    assert results["results"]["toy"]["spleen"]["range"]["value"] is None
    assert "| toy | – | – |" in (out / "table.md").read_text()


def test_unknown_organ_and_missing_gold_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="unknown organ"):
        _run(tmp_path, organs=["brain"])
    prep = make_prepared(tmp_path / "v", split="val")
    with pytest.raises(UserError, match="no prepared gold volumes.*prepare_visceral"):
        _run(tmp_path / "v", prep=prep)


@pytest.fixture(scope="module")
def test_py_runs(tmp_path_factory) -> dict:
    """The test.py commands of the two tests below, in one process one after the other
    (conftest.run_sacred_cases: test.py's run_sacred once per command, stdout/stderr captured;
    the real `python test.py` process contract is test_errors.test_real_processes_*):
    {name: ({code, out, err}, its folder)}."""
    from conftest import run_sacred_cases
    roots = {name: tmp_path_factory.mktemp(name) for name in ("no_data", "missing_snapshot", "writes")}
    commands = {
        "no_data": [f"path.data_dir={roots['no_data'] / 'nothing'}", f"path.log_dir={roots['no_data']}"],
        "missing_snapshot": [f"path.data_dir={make_prepared(roots['missing_snapshot'])}",
                             f"path.log_dir={roots['missing_snapshot']}",
                             f"eval.snapshots={{'LSLPN': '{roots['missing_snapshot'] / 'missing.pth'}'}}"],
        "writes": [f"path.data_dir={make_prepared(roots['writes'])}",
                   f"path.log_dir={roots['writes'] / 'runs'}", "eval.preset=senet", "fold=1", "device=cpu",
                   "amp=bf16"]}
    results = run_sacred_cases("test", [["tiny", *words] for words in commands.values()])
    return {name: (result, roots[name]) for name, result in zip(commands, results)}


def test_test_py_writes_results_in_the_sacred_run_folder(test_py_runs):
    done, root = test_py_runs["writes"]
    assert done["code"] == 0, done["err"][-2000:]
    run_dir = root / "runs" / "test" / "1"
    stored = json.loads((run_dir / "results.json").read_text())
    assert stored["preset"]["name"] == "senet" and stored["organs"] == ["spleen"] and stored["fold"] == 1
    assert list(stored["results"]) == ["mask copy"]
    assert (run_dir / "table.md").read_text() in done["out"]
    assert (run_dir / "predictions" / "mask_copy" / "10000104_spleen.nii.gz").is_file()


def test_test_py_bad_input_is_one_line(test_py_runs):
    done, _ = test_py_runs["no_data"]
    assert done["code"] == 2
    lines = done["err"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "prepare_visceral" in lines[0]
    done, _ = test_py_runs["missing_snapshot"]
    lines = done["err"].strip().splitlines()
    assert done["code"] == 2 and len(lines) == 1 and "missing.pth" in lines[0], done["err"]


def test_snapshots_unreadable_of_another_fold_encoder_or_intensity_scaling_are_refused(tmp_path):
    """A checkpoint records its fold and its training data's intensity scaling; evaluating it on another
    fold's training organs or on data scaled otherwise would be a silent wrong answer: one-line errors."""
    from test_notebook_eval import make_tiny_snapshot

    from evaluation.evaluate import evaluate, load_snapshot
    from models.checkpoint import load_checkpoint, save_checkpoint
    with pytest.raises(UserError, match="does not exist"):
        load_snapshot(tmp_path / "missing.pth")
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "imagenet.pth")
    with pytest.raises(UserError, match="not a train.py checkpoint"):
        load_snapshot(tmp_path / "imagenet.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="unreadable"):
        load_snapshot(tmp_path / "garbage.pth")
    prep = make_prepared(tmp_path)                       # meta.json: per-slice min-max
    snapshot = make_tiny_snapshot(tmp_path / "fold1.pth", fold=1)
    with pytest.raises(UserError, match="trained for fold 1 .* liver"):
        evaluate({"LSLPN": str(snapshot)}, ["liver"], prep, preset="thirds", input_size=32, device="cpu",
                 progress=False)
    state = load_checkpoint(str(snapshot))
    save_checkpoint(str(tmp_path / "other.pth"), {**state, "model": {("encoder.other." + k): v
                                                                     for k, v in state["model"].items()}})
    with pytest.raises(UserError, match="another encoder"):
        load_snapshot(tmp_path / "other.pth")
    snapshot = make_tiny_snapshot(tmp_path / "fold0.pth", fold=0)
    state = load_checkpoint(str(snapshot))
    save_checkpoint(str(snapshot), {**state, "intensity": {"mode": "window", "window": [-125.0, 275.0]}})
    with pytest.raises(UserError, match="trained on slices scaled .*window"):
        evaluate({"LSLPN": str(snapshot)}, ["liver"], prep, preset="thirds", input_size=32, device="cpu",
                 progress=False)
    save_checkpoint(str(snapshot), {**state, "intensity": {"mode": "minmax"}})   # the same scaling: accepted
    results = evaluate({"LSLPN": str(snapshot)}, ["liver"], prep, preset="thirds", input_size=32,
                       device="cpu", progress=False)
    assert results["results"]["LSLPN"]["liver"]["range"]["value"] is not None


@pytest.mark.parametrize("preset", ["thirds", "alpnet"])
def test_range_dice_scores_the_first_and_the_last_slice_of_the_range(tmp_path, preset):
    """The query's organ moves away on the first and last slice of its range (3..11): mask copy misses
    both, and the range Dice counts them: 2 * 7 / (9 + 9) slices' worth, by a loop over the slices."""
    pids = ("10000100", "10000104")
    prep = make_prepared(tmp_path, pids=pids)
    here, away = (slice(2, 12), slice(3, 15)), (slice(12, 22), slice(3, 15))
    for pid in pids:
        volume = make_volume(0)
        volume["label"][:] = 0
        for z in range(3, 12):
            x, y = away if (pid == pids[1] and z in (3, 11)) else here
            volume["label"][x, y, z] = 1
        np.savez(prep / "volumes" / "gold" / f"{pid}.npz", **volume)
    results, _ = _run(tmp_path, prep=prep, preset=preset, methods={"mask copy": None}, organs=["liver"])
    case = results["results"]["mask copy"]["liver"]["per_volume"][0]
    assert tuple(case["query_range"]) == (3, 11)
    query = np.load(prep / "volumes" / "gold" / f"{pids[1]}.npz")["label"] == 1
    copied = np.zeros_like(query)
    copied[here[0], here[1], 3:12] = True                 # the support's prism on every range slice
    tp = sum(int((copied[..., z] & query[..., z]).sum()) for z in range(3, 12))
    sizes = sum(int(copied[..., z].sum() + query[..., z].sum()) for z in range(3, 12))
    assert case["dice_range"] == pytest.approx(2 * tp / sizes) == pytest.approx(14 / 18)
    assert case["dice_volume"] == pytest.approx(14 / 18)


def _records(dice_by_support: dict) -> list[dict]:
    return [{"method": "m", "organ": "liver", "support": support, "query": f"q{i}", "dice_range": value,
             "dice_volume": value / 2, "support_range": (0, 1), "query_range": (0, 1), "skipped": None}
            for support, values in dice_by_support.items() for i, value in enumerate(values)]


def test_senet_aggregates_the_median_over_queries_per_support_then_the_mean_over_supports(tmp_path,
                                                                                        monkeypatch):
    import evaluation.evaluate as evaluation
    from evaluation.protocols import PRESETS
    from evaluation.results import summarise
    dice_by_support = {"s1": [0.1, 0.9, 0.2], "s2": [0.6, 0.5, 0.6], "s3": [0.85, 0.0, 0.8]}
    medians = [sorted(values)[1] for values in dice_by_support.values()]              # 0.2, 0.6, 0.8
    means = [sum(values) / 3 for values in dice_by_support.values()]
    senet = summarise(_records(dice_by_support), PRESETS["senet"])["m"]["liver"]
    assert senet["range"]["value"] == pytest.approx(sum(medians) / 3)                 # not the median, 0.6
    assert senet["range"]["std_over_supports"] == pytest.approx(np.std(medians))
    assert senet["volume"]["value"] == pytest.approx(sum(medians) / 6)
    thirds = summarise(_records(dice_by_support), PRESETS["thirds"])["m"]["liver"]
    assert thirds["range"]["value"] == pytest.approx(sum(means) / 3)
    # validate() during training: the preset's aggregate over the queries of its one support
    monkeypatch.setattr(evaluation, "run_protocol", lambda *args, **kwargs: _records({"s1": [0.1, 0.9, 0.2]}))
    prep = make_prepared(tmp_path, split="val")
    for preset, expected in (("senet", 0.2), ("thirds", 0.4)):
        result = evaluation.validate(IntensityModel(), prep, split="val", organs=["liver"], preset=preset,
                                     input_size=32)
        assert result["per_organ"]["liver"] == pytest.approx(expected) == result["mean_dice"]
