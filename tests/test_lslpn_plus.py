"""LSLPN+ options (models/lslpn_plus.py, evaluation/adaptation.py): shapes, determinism, the query-informed
prototypes against a slow per-query, per-cell loop written here, multi-scale fusion against the separate
heads, the config checks, the validation hold-out, and test-time adaptation leaving the snapshot alone."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import resolve_config

from models.fewshot import FewShotSegNet, check_model_config, local_head, with_head_options
from models.local_prototypes import MEAN_EPS, LocalPrototypeHead, grid_cells, official_cell_loop
from models.lslpn_plus import LSLPNPlusHead, fuse, mix_prototypes
from util.errors import UserError

OPTIONS = {"n_grid": 4, "overlap": True, "vote": "max", "resolution": "image", "min_pixels": 3, "scale": 20.0}


def _episode(seed, B=2, N=1, K=1, Q=3, C=6, feat=(6, 6), image=(24, 24)):
    g = torch.Generator().manual_seed(seed)
    (h, w), (H, W) = feat, image
    sf = torch.randn(B, N, K, C, h, w, generator=g)
    qf = torch.randn(B, Q, C, h, w, generator=g)
    fg = torch.zeros(B, N, K, H, W)
    for b in range(B):
        for n in range(N):
            r0 = int(torch.randint(0, H // 2, (1,), generator=g))
            fg[b, n, :, r0:r0 + H // 2, 3 + 2 * n: 3 + 2 * n + W // 2] = 1.0
    bg = 1 - fg.amax(1, keepdim=True).expand_as(fg)
    return sf, fg, bg, qf


def slow_query_round(sf, fg, bg, qf, image_size, n_grid, weight, confidence, min_pixels=3, scale=20.0):
    """First pass by the official cell loop; then, query by query and cell by cell: the query's confident
    class pixels averaged into its own prototypes, mixed with the support's unit prototypes, and the query
    rescored with a running maximum (the 'max' vote), all in float64."""
    first = official_cell_loop(sf, fg, bg, qf, image_size, n_grid, True, "max", min_pixels, scale)
    B, N, K = sf.shape[:3]
    Q, L = qf.shape[1], N + 1
    H, W = image_size

    def up(features):                                                 # C x h x w -> C x H x W
        return F.interpolate(features[None].double(), size=(H, W), mode="bilinear", align_corners=False)[0]

    def average(features, mask, r0, r1, c0, c1):
        m = mask[r0:r1, c0:c1].double()
        if m.sum() <= min_pixels:
            return torch.zeros(features.shape[0], dtype=torch.float64)
        return (features[:, r0:r1, c0:c1] * m).sum((1, 2)) / (m.sum() + MEAN_EPS)

    def unit(v):
        return v / v.norm().clamp_min(1e-8)

    out = torch.full((B, Q, L, H, W), -1.0, dtype=torch.float64)
    cells = [(r, c) for r in grid_cells(H, n_grid, True) for c in grid_cells(W, n_grid, True)]
    for b in range(B):
        supp = [[up(sf[b, n, k]) for k in range(K)] for n in range(N)]
        for q in range(Q):
            query = up(qf[b, q])
            probability = first[b, q].softmax(0)
            top, predicted = probability.max(0)
            own_masks = [((predicted == c) & (top >= confidence)) for c in range(L)]
            for (r0, r1), (c0, c1) in cells:
                support = [sum(average(supp[n][k], bg[b, n, k], r0, r1, c0, c1)
                               for n in range(N) for k in range(K)) / (N * K)]
                support += [sum(average(supp[n][k], fg[b, n, k], r0, r1, c0, c1) for k in range(K)) / K
                            for n in range(N)]
                for c in range(L):
                    own = average(query, own_masks[c], r0, r1, c0, c1)
                    mixed = (1 - weight) * unit(support[c]) + weight * unit(own) if own.abs().sum() > 0 \
                        else unit(support[c])
                    s = scale * F.cosine_similarity(query[:, r0:r1, c0:c1], mixed[:, None, None], dim=0,
                                                    eps=1e-8)
                    out[b, q, c, r0:r1, c0:c1] = torch.maximum(out[b, q, c, r0:r1, c0:c1], s)
    return out


@pytest.mark.parametrize("weight,confidence,N", [(0.5, 0.0, 1), (0.3, 0.9, 1), (0.7, 0.0, 2)])
def test_query_informed_prototypes_equal_the_slow_loop(weight, confidence, N):
    sf, fg, bg, qf = _episode(1 + N, N=N)
    head = LSLPNPlusHead([LocalPrototypeHead(**OPTIONS)], "mean", 1, weight, confidence)
    fast = head.score(head.compute_prototypes(sf, fg, bg, (24, 24)), qf)
    slow = slow_query_round(sf, fg, bg, qf, (24, 24), 4, weight, confidence)
    assert fast.shape == (2, 3, N + 1, 24, 24)
    assert torch.allclose(fast.double(), slow, atol=2e-3), float((fast.double() - slow).abs().max())
    plain = LocalPrototypeHead(**OPTIONS)
    before = plain.score(plain.compute_prototypes(sf, fg, bg, (24, 24)), qf)
    assert (fast - before).abs().max() > 0.1            # the round changes the logits


def test_plain_options_build_the_plain_head_and_one_scale_equals_it():
    assert type(local_head({**OPTIONS, "grids": [4]})) is LocalPrototypeHead
    assert type(local_head({**OPTIONS, "grids": [], "query_rounds": 0})) is LocalPrototypeHead
    sf, fg, bg, qf = _episode(5)
    plain = LocalPrototypeHead(**OPTIONS)
    one = LSLPNPlusHead([LocalPrototypeHead(**OPTIONS)], "max", 0)
    assert torch.equal(one.score(one.compute_prototypes(sf, fg, bg, (24, 24)), qf),
                       plain.score(plain.compute_prototypes(sf, fg, bg, (24, 24)), qf))


@pytest.mark.parametrize("fusion", ["mean", "max"])
def test_multi_scale_fuses_the_separate_heads(fusion):
    sf, fg, bg, qf = _episode(7)
    heads = [LocalPrototypeHead(**{**OPTIONS, "n_grid": n}) for n in (2, 3, 6)]
    separate = [h.score(h.compute_prototypes(sf, fg, bg, (24, 24)), qf) for h in heads]
    multi = local_head({**OPTIONS, "grids": [2, 3, 6], "grid_fusion": fusion})
    logits = multi.score(multi.compute_prototypes(sf, fg, bg, (24, 24)), qf)
    expected = torch.stack(separate).mean(0) if fusion == "mean" else torch.stack(separate).amax(0)
    assert logits.shape == (2, 3, 2, 24, 24) and torch.allclose(logits, expected)
    assert torch.equal(fuse(separate, fusion), expected)
    again = multi.score(multi.compute_prototypes(sf, fg, bg, (24, 24)), qf)
    assert torch.equal(logits, again)                   # deterministic


def test_mixing_keeps_the_support_where_the_query_has_no_prototype():
    support = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    own = torch.tensor([[0.0, 0.0], [5.0, 0.0]])
    mixed = mix_prototypes(support, own, 0.25)
    assert torch.allclose(mixed[0], torch.tensor([0.6, 0.8]))
    assert torch.allclose(mixed[1], torch.tensor([0.25, 0.75]))


def test_full_model_with_plus_options_is_deterministic_and_trains():
    torch.manual_seed(0)
    model = FewShotSegNet("cnn_small", n_grid=4, grids=[2, 4], query_rounds=2, min_pixels=3)
    assert model.config["grids"] == [2, 4] and model.config["query_rounds"] == 2
    images = torch.rand(1, 1, 1, 1, 32, 32)
    fg = torch.zeros(1, 1, 1, 32, 32)
    fg[..., 8:20, 8:20] = 1
    queries = torch.rand(1, 2, 1, 32, 32)
    logits, _ = model(images, fg, 1 - fg, queries)
    assert logits.shape == (1, 2, 2, 32, 32)
    logits.mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(images, fg, 1 - fg, queries)[0], model(images, fg, 1 - fg, queries)[0])
    plain = with_head_options(model, {"grids": [], "query_rounds": 0})
    assert type(plain.head) is LocalPrototypeHead and plain.config["grids"] == []
    for a, b in zip(plain.parameters(), model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("model,message", [
    ({"grids": [8, 4]}, "model.grids"),
    ({"grids": [0, 4]}, "model.grids"),
    ({"grids": [4, 64]}, "larger than the 16 x 16 feature map"),
    ({"head": "panet", "n_grid": 1, "query_rounds": 1}, "not of the 'panet' head"),
    ({"query_weight": 1.5}, "model.query_weight"),
    ({"grid_fusion": "median"}, "model.grid_fusion"),
])
def test_bad_plus_options_get_one_line(model, message):
    with pytest.raises(UserError, match=message) as error:
        check_model_config({"encoder": "cnn_small", **model}, input_size=64)
    assert "\n" not in str(error.value)


# ---- the validation scan -----------------------------------------------------------------------
def test_validation_scan_is_held_out_of_training(tmp_path):
    from test_alpnet_layout import write_alpnet_folder

    from dataloaders import layouts as layout
    from dataloaders.prepare import prepare_alpnet
    folder = write_alpnet_folder(tmp_path / "d", [1, 2, 3, 5, 8, 10, 13])
    ids = layout.scan_ids(folder)
    for fold in range(5):
        test, support, training = layout.fold_scans(ids, fold, layout.CHAOS_T2)
        held = layout.validation_scan(ids, fold, layout.CHAOS_T2)
        assert held in training and held not in test and held != support
    meta = prepare_alpnet(folder, tmp_path / "p", fold=0, setting=2, label_set=0, validation=True)
    assert meta["alpnet"]["support"] == "8" and meta["alpnet"]["validation"] == ["10"]
    assert meta["splits"]["train"] == ["13"] and "10" in meta["splits"]["gold"]
    assert not (tmp_path / "p" / "train" / "10_image.npy").exists()
    assert (tmp_path / "p" / "volumes" / "gold" / "10.npz").is_file()


# ---- test-time adaptation ----------------------------------------------------------------------
def _slice(seed=0, size=48):
    rng = np.random.default_rng(seed)
    image = rng.normal(0, 1, (size, size)).astype(np.float32)
    mask = np.zeros((size, size), bool)
    mask[12:30, 15:33] = True
    image[mask] += 2.0
    return image, mask


def test_adaptation_never_changes_the_snapshot_and_is_deterministic(tmp_path):
    from evaluation.adaptation import SupportAdaptedModel, adapt_to_support, support_views
    from evaluation.evaluate import load_snapshot
    from evaluation.inference import run_chunks
    from models.checkpoint import save_checkpoint
    torch.manual_seed(0)
    model = FewShotSegNet("cnn_small", n_grid=4, min_pixels=3)
    path = tmp_path / "snap.pth"
    save_checkpoint(str(path), {"model": model.state_dict(), "model_config": model.config, "step": 1,
                                "input_size": 32})
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    loaded, _ = load_snapshot(path)
    before = {k: v.clone() for k, v in loaded.state_dict().items()}
    image, mask = _slice()
    adapted = adapt_to_support(loaded, image, mask, 32, steps=3, lr=1e-2)
    assert any(not torch.equal(before[k], v) for k, v in adapted.state_dict().items())
    assert all(torch.equal(before[k], v) for k, v in loaded.state_dict().items())
    again = adapt_to_support(loaded, image, mask, 32, steps=3, lr=1e-2)
    assert all(torch.equal(a, b) for a, b in zip(adapted.state_dict().values(), again.state_dict().values()))
    wrapped = SupportAdaptedModel(loaded, 2, 1e-2, stored_views=True)       # views at the stored 48 x 48
    volume, masks = np.repeat(image[..., None], 3, axis=2), np.repeat(mask[..., None], 3, axis=2)
    plan = [(np.array([1]), np.array([0, 2]))]
    first = run_chunks(wrapped, [(volume, masks)], plan, volume, 32, {"mode": "zscore"})
    second = run_chunks(wrapped, [(volume, masks)], plan, volume, 32, {"mode": "zscore"})
    assert first.shape == (48, 48, 3) and np.array_equal(first, second) and wrapped.adaptations == 1
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    images, masks = support_views(image, mask, 4, 32, np.random.default_rng(0))
    assert images.shape == (4, 32, 32) and masks.shape == (4, 32, 32)
    assert bool((masks.flatten(1).sum(1) > 0).all())


def test_support_adapted_model_runs_the_volumetric_protocol_and_leaves_the_model_alone():
    from evaluation.adaptation import SupportAdaptedModel, test_time_model
    from evaluation.inference import run_chunks
    from evaluation.protocols import chunk_plan
    torch.manual_seed(0)
    model = FewShotSegNet("cnn_small", n_grid=4, min_pixels=3).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(1)
    volume = rng.normal(0, 200, (40, 40, 10)).astype(np.float32)
    mask = np.zeros(volume.shape, bool)
    mask[10:25, 12:28, 2:8] = True
    volume[mask] += 400
    wrapped = test_time_model(model, {"grids": [2, 4], "query_rounds": 1}, adapt_steps=2, adapt_lr=1e-2)
    assert isinstance(wrapped, SupportAdaptedModel) and wrapped.config["grids"] == [2, 4]
    intensity = {"mode": "window", "window": [-200.0, 600.0]}
    args = ([(volume, mask)], chunk_plan((2, 7), (2, 7), 2), volume, 32, intensity)
    first = run_chunks(wrapped, *args)
    again = test_time_model(model, {"grids": [2, 4], "query_rounds": 1}, 2, 1e-2)
    second = run_chunks(again, *args)
    assert first.shape == volume.shape and np.array_equal(first, second)   # deterministic
    assert wrapped.adaptations == 2                                       # one per chunk's support slice
    plain = run_chunks(model, *args)
    assert not np.array_equal(first, plain) or first.any()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert test_time_model(model) is model                               # off by default


# ---- the named config and eval.head_options ------------------------------------------------------------
def test_lslpn_plus_is_lslpn_with_the_boundary_loss_and_the_test_time_options_docs_lslpn_plus_md_measured():
    """`train.py with lslpn_plus` trains LSLPN plus the boundary loss (the plain head), `test.py with
    lslpn_plus` applies the test-time options to the snapshots: the 'LSLPN+' row of the committed report
    (its Options list), nothing more."""
    import re
    from pathlib import Path

    from config import default_config
    from evaluation.adaptation import test_time_head_options
    from training.config_check import check_run_config
    from training.loop import config_hash, trajectory_differences
    plain, plus = resolve_config(("demo",)), resolve_config(("demo", "lslpn_plus"))
    check_run_config(plus)
    assert plus["model"] == plain["model"]                                  # no head option in training
    training = trajectory_differences(plain, plus, default_config())
    assert training == ["boundary_weight: 0.0 -> 0.3"]
    assert config_hash(plain, default_config()) != config_hash(plus, default_config())
    test_time = test_time_head_options(plus["eval"])
    assert test_time == {"grids": [4, 8]}                                  # fusion: mean
    assert (plus["eval"]["adapt_steps"], plus["eval"]["adapt_lr"]) == (20, 1e-2)
    assert test_time_head_options(plain["eval"]) is None                   # off by default
    doc = (Path(__file__).resolve().parents[1] / "docs" / "lslpn_plus.md").read_text()
    line = re.search(r"^- LSLPN\+: (.+)$", doc, flags=re.MULTILINE)
    assert line, "docs/lslpn_plus.md has no '- LSLPN+: ...' line in its Options list"
    measured = dict(item.split("=", 1) for item in re.split(r", (?=\w+=)", line.group(1)))
    used = {key.split(":")[0].split(".")[-1] for key in training} | set(test_time)
    used |= {"adapt_steps", "adapt_lr"} if plus["eval"]["adapt_steps"] else set()
    if "grids" in used:
        used.add("grid_fusion")                  # the report names the fusion of the grids it used
    assert used == set(measured)
    values = {"boundary_weight": plus["boundary_weight"], "input_slices": plus["model"].get("input_slices"),
              "adapt_steps": plus["eval"]["adapt_steps"], "adapt_lr": plus["eval"]["adapt_lr"],
              **plus["eval"]["head_options"], **test_time}
    assert {key: str(values[key]) for key in measured} == measured


def test_test_time_head_options_are_the_eval_entries_that_differ_from_the_plain_head():
    from evaluation.adaptation import test_time_head_options
    plain = resolve_config(("tiny",))["eval"]["head_options"]
    assert test_time_head_options({"head_options": plain}) is None
    given = {**plain, "grids": [4, 8], "query_weight": 0.3}
    assert test_time_head_options({"head_options": given}) == {"grids": [4, 8], "query_weight": 0.3}


@pytest.mark.parametrize("update, message", [
    ({"gridz": [4, 8]}, "eval.head_options.gridz = [4, 8]: unknown key"),
    ({"grids": [8, 4]}, "eval.head_options.grids = [8, 4]: must be increasing positive grid sizes"),
    ({"grid_fusion": "sum"}, "eval.head_options.grid_fusion = 'sum': unknown: use one of 'mean', 'max'"),
])
def test_head_options_are_checked_as_the_model_keys_they_name(update, message):
    from training.config_check import check_run_config
    config = resolve_config(("tiny",))
    config["eval"] = {**config["eval"], "head_options": {**config["eval"]["head_options"], **update}}
    with pytest.raises(UserError) as caught:
        check_run_config(config)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)
