"""The local prototype head against the literal loop reference, and its behaviour."""
import pytest
import torch
import torch.nn.functional as F

from models.local_prototypes import LocalPrototypeHead, grid_cells
from models.reference import cellwise_reference, literal_grid, literal_reference, official_cell_loop
from util.errors import UserError


def _episode(seed, B, N, K, Q, C, feat, image, blob=0.5):
    """Random features; each support mask is a noisy rectangle covering `blob` of each side, so
    that some cells are full, some partly filled (around min_pixels) and many empty."""
    g = torch.Generator().manual_seed(seed)
    (h, w), (H, W) = feat, image
    sf = torch.randn(B, N, K, C, h, w, generator=g)
    qf = torch.randn(B, Q, C, h, w, generator=g)
    fg = torch.zeros(B, N, K, H, W)
    bh, bw = max(int(H * blob), 1), max(int(W * blob), 1)
    for b in range(B):
        for n in range(N):
            for k in range(K):
                r0 = int(torch.randint(0, H - bh + 1, (1,), generator=g))
                c0 = int(torch.randint(0, W - bw + 1, (1,), generator=g))
                fg[b, n, k, r0:r0 + bh, c0:c0 + bw] = (torch.rand(bh, bw, generator=g) > 0.25).float()
    bg = 1 - fg.amax(1, keepdim=True).expand_as(fg)  # not in any foreground class of the episode
    return sf, fg, bg, qf


@pytest.mark.parametrize("size,n_grid,overlap", [(512, 8, True), (512, 8, False), (100, 8, True),
                                                 (100, 8, False), (120, 8, True), (7, 3, True),
                                                 (64, 1, True), (5, 5, True)])
def test_grid_cells(size, n_grid, overlap):
    cells = grid_cells(size, n_grid, overlap)
    assert cells == literal_grid(size, n_grid, overlap)
    length = size // n_grid
    assert all(b - a == length for a, b in cells)
    assert cells[0][0] == 0 and cells[-1][1] == size        # the whole axis is covered
    if size % n_grid == 0 and length % 2 == 0:
        assert len(cells) == (2 * n_grid - 1 if overlap else n_grid)


def test_grid_cells_examples():
    assert len(grid_cells(512, 8, True)) == 15
    assert grid_cells(100, 8, False)[-2:] == [(84, 96), (88, 100)]   # extra border cell
    assert grid_cells(100, 8, True)[-1] == (88, 100)
    with pytest.raises(UserError, match="n_grid"):
        grid_cells(100, 0, True)
    with pytest.raises(UserError, match="n_grid"):
        grid_cells(4, 8, True)


CASES = [  # image, feature map, n_grid, overlap, vote, K, N
    ((24, 32), (6, 8), 4, True, "max", 1, 1),
    ((24, 32), (6, 8), 4, False, "mean", 3, 2),
    ((26, 30), (7, 8), 2, True, "cover", 3, 2),
    ((26, 30), (7, 8), 2, False, "max", 1, 2),
    ((16, 20), (4, 5), 1, True, "max", 3, 1),
    ((16, 20), (4, 5), 1, False, "mean", 1, 2),
    ((32, 32), (8, 8), 8, True, "max", 3, 2),
    ((32, 40), (8, 10), 8, False, "cover", 1, 1),
    ((30, 34), (8, 9), 8, True, "mean", 1, 1),
    ((30, 34), (8, 9), 4, True, "cover", 3, 1),
]


@pytest.mark.parametrize("image,feat,n_grid,overlap,vote,K,N", CASES)
def test_image_mode_equals_literal_reference(image, feat, n_grid, overlap, vote, K, N):
    sf, fg, bg, qf = _episode(sum(image) + n_grid + K, 2, N, K, 1, 6, feat, image)
    head = LocalPrototypeHead(n_grid, overlap, vote, "image", min_pixels=3, scale=20.0)
    out = head(sf, fg, bg, qf, image)
    ref = literal_reference(sf, fg, bg, qf, image, n_grid, overlap, vote, min_pixels=3)
    assert out.shape == ref.shape == (2, 1, 1 + N, *image)
    assert (ref > -20).any()
    if n_grid >= 4:
        assert (ref == -20).any()                           # locations without any prototype occur
    assert torch.allclose(out.double(), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("overlap,vote", [(True, "max"), (False, "cover")])
def test_non_dividing_size_100x120(overlap, vote):
    """100 x 120 with n_grid 8: cells of 12 x 15 pixels and a border cell on both axes."""
    sf, fg, bg, qf = _episode(7, 1, 1, 1, 1, 8, (25, 30), (100, 120))
    head = LocalPrototypeHead(8, overlap, vote, "image")
    ref = literal_reference(sf, fg, bg, qf, (100, 120), 8, overlap, vote)
    assert torch.allclose(head(sf, fg, bg, qf, (100, 120)).double(), ref, atol=1e-4, rtol=0)


ZERO_CASES = [  # image, feature map, n_grid, overlap, vote, K, ReLU features
    ((512, 512), (64, 64), 8, True, "max", 1, False),
    ((512, 512), (64, 64), 16, True, "mean", 3, True),
    ((512, 512), (64, 64), 4, False, "cover", 3, False),
    ((512, 512), (64, 64), 1, True, "max", 3, True),
    ((417, 385), (53, 49), 8, True, "max", 3, False),
    ((417, 385), (53, 49), 16, False, "max", 1, True),
    ((417, 385), (53, 49), 4, True, "mean", 1, False),
    ((417, 385), (53, 49), 1, False, "cover", 1, False),
]


@pytest.mark.parametrize("image,feat,n_grid,overlap,vote,K,relu", ZERO_CASES)
def test_zero_rule_equals_the_official_cell_loop_on_every_pixel(image, feat, n_grid, overlap, vote, K, relu):
    """'zero' rule at image resolution against the per-cell loop of method.md section 6, 1e-4 on
    every pixel; blobs of 30% of each side leave many cells empty or nearly empty (<= 10 pixels)."""
    sf, fg, bg, qf = _episode(n_grid + K + image[1], 1, 1, K, 1, 4, feat, image, blob=0.3)
    if relu:  # the official ResNet's features: many exact zeros
        sf, qf = sf.relu(), qf.relu()
    head = LocalPrototypeHead(n_grid, overlap, vote, "image", min_pixels=10, empty_cell="zero")
    out = head(sf, fg, bg, qf, image)
    ref = official_cell_loop(sf, fg, bg, qf, image, n_grid, overlap, vote, min_pixels=10)
    assert out.shape == ref.shape == (1, 1, 2, *image)
    assert (out - ref.float()).abs().max() <= 1e-4
    if vote == "max":
        assert ref.min() >= -1                                  # the running maximum starts at -1


def test_zero_rule_differs_from_skip_rule_with_signed_features():
    """A cell with no class pixels: 'zero' scores cosine 0 there, 'skip' the floor -scale."""
    sf, fg, bg, qf = _episode(2, 1, 1, 1, 1, 4, (8, 8), (64, 64), blob=0.3)
    zero = LocalPrototypeHead(8, True, "max", "image", empty_cell="zero")(sf, fg, bg, qf, (64, 64))
    skip = LocalPrototypeHead(8, True, "max", "image", empty_cell="skip")(sf, fg, bg, qf, (64, 64))
    far = fg[0, 0, 0] == 0
    assert (skip[0, 0, 1][far] == -20).any() and (zero[0, 0, 1] >= 0).any()
    assert zero.min() >= -1 and not torch.equal(zero.argmax(2), skip.argmax(2))


@pytest.mark.parametrize("vote", ["max", "mean", "cover"])
def test_zero_rule_feature_resolution_equals_the_cell_loop_on_the_feature_map(vote):
    """'feature' resolution with 'zero': the cell loop run on the feature map (area-downsampled
    masks, pixel counts in image pixels), then the logits upsampled, gives the head's logits."""
    image, feat = (48, 40), (12, 10)
    sf, fg, bg, qf = _episode(5, 1, 2, 3, 1, 4, feat, image, blob=0.4)
    head = LocalPrototypeHead(4, True, vote, "feature", min_pixels=10, empty_cell="zero")
    area = 16.0                                                  # image pixels per feature cell
    soft = lambda m: F.interpolate(m.flatten(0, 2)[:, None], size=feat, mode="area")[:, 0].view(*m.shape[:3], *feat)
    # scaling the soft masks by `area` makes the loop's pixel counts image pixels; averages are unchanged
    ref = official_cell_loop(sf, soft(fg) * area, soft(bg) * area, qf, feat, 4, True, vote, min_pixels=10)
    ref = F.interpolate(ref.flatten(0, 1), size=image, mode="bilinear", align_corners=False).view(1, 1, 3, *image)
    out = head(sf, fg, bg, qf, image)
    assert (out - ref.float()).abs().max() <= 1e-4


def test_cellwise_reference_equals_literal():
    sf, fg, bg, qf = _episode(3, 1, 2, 2, 1, 5, (6, 7), (22, 27))
    for vote in ("max", "mean", "cover"):
        a = literal_reference(sf, fg, bg, qf, (22, 27), 4, True, vote, min_pixels=2)
        b = cellwise_reference(sf, fg, bg, qf, (22, 27), 4, True, vote, min_pixels=2)
        assert torch.allclose(a, b, atol=1e-9)


def test_min_pixels_threshold():
    """A cell gets a prototype only with MORE than min_pixels class pixels."""
    C, H, W = 3, 16, 16
    sf = torch.rand(1, 1, 1, C, 4, 4) + 0.1
    qf = torch.rand(1, 1, C, 4, 4) + 0.1
    for n_pixels, has_fg in ((10, False), (11, True)):
        fg = torch.zeros(1, 1, 1, H, W)
        fg.view(-1)[torch.arange(n_pixels)] = 1              # pixels of the first row, cell (0, 0)
        head = LocalPrototypeHead(1, True, "max", "image", min_pixels=10)
        protos = head.compute_prototypes(sf, fg, 1 - fg, (H, W))
        assert bool(protos.present[0, 1, 0, 0]) is has_fg
        logits = head.score(protos, qf)
        assert bool((logits[0, 0, 1] > -20).all()) is has_fg


def test_empty_cell_never_wins_the_vote():
    """All scored cosines are negative; an empty covering cell (zero prototype in the official
    code, cosine 0) must not win the max: the pixel keeps its negative score."""
    H = W = 8
    sf = torch.zeros(1, 1, 1, 2, H, W)
    sf[:, :, :, 0] = 1.0                                     # support feature (1, 0)
    qf = torch.zeros(1, 1, 2, H, W)
    qf[:, :, 0], qf[:, :, 1] = -1.0, 0.2                    # query cosine with (1, 0) < 0
    fg = torch.zeros(1, 1, 1, H, W)
    fg[..., :4, :4] = 1                                      # foreground only in the top-left cell
    head = LocalPrototypeHead(2, True, "max", "image", min_pixels=2)
    logits = head(sf, fg, 1 - fg, qf, (H, W))[0, 0, 1]
    expected = 20 * torch.nn.functional.cosine_similarity(torch.tensor([1.0, 0]),
                                                           torch.tensor([-1.0, 0.2]), dim=0)
    assert torch.allclose(logits[:4, :4], expected.expand(4, 4), atol=1e-5)  # not 0
    assert torch.all(logits[6:, 6:] == -20)                 # covered by no prototype-bearing cell
    mean = LocalPrototypeHead(2, True, "mean", "image", min_pixels=2)(sf, fg, 1 - fg, qf, (H, W))
    assert torch.allclose(mean[0, 0, 1, :4, :4], expected.expand(4, 4), atol=1e-5)


def _smooth(g, shape, size):
    low = torch.randn(*shape, 6, 6, generator=g)
    return F.interpolate(low.flatten(0, -3).unsqueeze(1), size=size, mode="bicubic",
                         align_corners=False).view(*shape, *size)


def test_feature_mode_agrees_with_image_mode_on_smooth_inputs():
    """'feature' and 'image' mode share the argmax on >= 97% of pixels for smooth inputs.

    Measured (128 x 128 images, 32 x 32 features as the cnn_small demo, 16 channels, features
    bicubic from 4-8 point noise, two disc masks, n_grid 1/4/8, overlap on/off, seeds 0-3):
    mean 98.0-98.4%, worst case 97.0-97.7%. With coarser 24 x 24 feature maps (96 x 96 input)
    the worst case drops to 95.7-96.9% (mean 97.2-97.9%).
    """
    g = torch.Generator().manual_seed(0)
    H = W = 128
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    s = H / 96
    fg = torch.stack([((yy - 40 * s) ** 2 + (xx - 50 * s) ** 2 < (22 * s) ** 2).float(),
                      ((yy - 60 * s) ** 2 + (xx - 35 * s) ** 2 < (15 * s) ** 2).float()])
    fg = fg.view(2, 1, 1, H, W)
    sf, qf = _smooth(g, (2, 1, 1, 16), (32, 32)), _smooth(g, (2, 2, 16), (32, 32))
    for n_grid, overlap in ((1, True), (4, True), (8, True), (8, False)):
        a = LocalPrototypeHead(n_grid, overlap, "max", "image")(sf, fg, 1 - fg, qf, (H, W))
        b = LocalPrototypeHead(n_grid, overlap, "max", "feature")(sf, fg, 1 - fg, qf, (H, W))
        agreement = (a.argmax(2) == b.argmax(2)).float().mean().item()
        assert agreement >= 0.97, (n_grid, overlap, agreement)


def test_location_sensitivity_two_identical_blobs():
    """The paper's thesis: two identical blobs, support mask on the left one only. Local
    prototypes (n_grid 8) segment the left blob only; global prototypes (n_grid 1) both."""
    H, W, C = 64, 64, 8
    blob_l = torch.zeros(H, W)
    blob_l[24:40, 8:24] = 1
    blob_r = torch.zeros(H, W)
    blob_r[24:40, 40:56] = 1
    g = torch.Generator().manual_seed(0)
    v_blob, v_back = torch.randn(C, generator=g), torch.randn(C, generator=g)
    image_feats = v_back[:, None, None] + (blob_l + blob_r) * (v_blob - v_back)[:, None, None]
    image_feats = image_feats + 0.05 * torch.randn(C, H, W, generator=g)
    feats = F.avg_pool2d(image_feats[None], 4)                 # C x 16 x 16 "encoder" output
    sf, qf = feats.view(1, 1, 1, C, 16, 16), feats.view(1, 1, C, 16, 16)
    fg = blob_l.view(1, 1, 1, H, W)
    for resolution in ("image", "feature"):
        local = LocalPrototypeHead(8, True, "max", resolution)(sf, fg, 1 - fg, qf, (H, W))
        pred = local.argmax(2)[0, 0]
        assert pred[blob_l > 0].float().mean() > 0.9 and pred[blob_r > 0].float().mean() < 0.1
        glob = LocalPrototypeHead(1, True, "max", resolution)(sf, fg, 1 - fg, qf, (H, W))
        pred = glob.argmax(2)[0, 0]
        assert pred[blob_l > 0].float().mean() > 0.9 and pred[blob_r > 0].float().mean() > 0.9


def test_prototypes_broadcast_over_query_batch():
    sf, fg, bg, qf = _episode(5, 1, 1, 2, 4, 6, (6, 8), (24, 32))
    head = LocalPrototypeHead(4, True, "max", "image", min_pixels=3)
    protos = head.compute_prototypes(sf, fg, bg, (24, 32))
    many = head.score(protos, qf.view(4, 1, 6, 6, 8))          # query batch 4, prototypes batch 1
    one = head.score(protos, qf)                              # batch 1, 4 queries
    assert many.shape == (4, 1, 2, 24, 32)
    assert torch.allclose(many[:, 0], one[0], atol=1e-5)


def test_batch_items_are_independent():
    sf, fg, bg, qf = _episode(9, 3, 2, 1, 1, 4, (6, 8), (24, 32))
    head = LocalPrototypeHead(4, True, "mean", "feature", min_pixels=3)
    both = head(sf, fg, bg, qf, (24, 32))
    single = head(sf[1:2], fg[1:2], bg[1:2], qf[1:2], (24, 32))
    assert torch.allclose(both[1:2], single, atol=1e-5)


@pytest.mark.parametrize("resolution", ["image", "feature"])
def test_gradients_and_autocast(resolution):
    sf, fg, bg, qf = _episode(11, 2, 1, 2, 1, 6, (6, 8), (24, 32))
    sf.requires_grad_(True)
    qf.requires_grad_(True)
    head = LocalPrototypeHead(4, True, "max", resolution, min_pixels=3)
    out = head(sf, fg, bg, qf, (24, 32))
    F.cross_entropy(out.flatten(0, 1), (fg[:, 0, :1] > 0).long().flatten(0, 1)).backward()
    assert sf.grad.abs().sum() > 0 and qf.grad.abs().sum() > 0
    assert torch.isfinite(sf.grad).all() and torch.isfinite(qf.grad).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = head(sf.bfloat16(), fg, bg, qf.bfloat16(), (24, 32))
    assert low.dtype == torch.float32 and torch.isfinite(low).all()


@pytest.mark.cuda  # skipped without a GPU (conftest.py); tools/gpu_check.sh runs it
def test_cuda_matches_cpu():
    sf, fg, bg, qf = _episode(13, 2, 2, 2, 2, 6, (8, 9), (30, 34))
    head = LocalPrototypeHead(8, True, "max", "image", min_pixels=3)
    cpu = head(sf, fg, bg, qf, (30, 34))
    with torch.autocast("cuda", dtype=torch.float16):
        gpu = head(sf.cuda(), fg.cuda(), bg.cuda(), qf.cuda(), (30, 34))
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-3)


def test_bad_input():
    sf, fg, bg, qf = _episode(1, 2, 1, 1, 1, 4, (6, 8), (24, 32))
    head = LocalPrototypeHead(4, True, "max", "image", min_pixels=3)
    with pytest.raises(UserError, match="support_fg"):
        head(sf, fg[..., :-1], bg, qf, (24, 32))             # wrong mask shape
    with pytest.raises(UserError, match="support_bg"):
        head(sf, fg, bg[:, :, :, None], qf, (24, 32))
    with pytest.raises(UserError, match="empty mask"):
        head(sf, torch.zeros_like(fg), bg, qf, (24, 32))
    with pytest.raises(UserError, match="query_features"):
        head(sf, fg, bg, qf[:1], (24, 32))                   # batch sizes differ
    with pytest.raises(UserError, match="model.n_grid = 8"):
        LocalPrototypeHead(8, True, "max", "image")(sf, fg, bg, qf, (24, 32))  # > 6 x 8 features
    for kwargs, key in (({"n_grid": 0}, "model.n_grid = 0"), ({"vote": "median"}, "model.vote"),
                        ({"resolution": "pixel"}, "model.resolution"),
                        ({"min_pixels": -1}, "model.min_pixels"), ({"scale": 0}, "model.scale"),
                        ({"empty_cell": "none"}, "model.empty_cell = 'none': unknown rule")):
        with pytest.raises(UserError, match=key):
            LocalPrototypeHead(**kwargs)
