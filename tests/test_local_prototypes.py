"""The local prototype head against its plain per-cell loop (official_cell_loop) and a pixel-by-pixel
loop written here, and its behaviour."""
import pytest
import torch
import torch.nn.functional as F

from models.local_prototypes import LocalPrototypeHead, grid_cells, official_cell_loop
from util.errors import UserError


def literal_grid(size: int, n_grid: int, overlap: bool) -> list[tuple[int, int]]:
    """Cells along one axis: length size // n_grid, stride half a cell or a cell, border cell."""
    length = size // n_grid
    stride = max(length // 2, 1) if overlap else length
    cells = []
    start = 0
    while start + length <= size:
        cells.append((start, start + length))
        start += stride
    if cells[-1][1] < size:
        cells.append((size - length, size))
    return cells


def pixel_reference(sf, fg, bg, qf, image_size, n_grid, overlap, vote, min_pixels=10, scale=20.0):
    """The head's logits by loops down to single pixels (float64, 1 episode of batch 1, 1 query):
    per covering cell, per shot, the masked average (zero when <= min_pixels pixels), summed / K
    (background / (K * N)); per pixel the covering cells' scaled cosines and their vote."""
    N, K = sf.shape[1:3]
    H, W = image_size

    def up(f):
        return F.interpolate(f.double(), size=(H, W), mode="bilinear", align_corners=False)

    supp, query = up(sf[0].flatten(0, 1)).unflatten(0, (N, K)), up(qf[0])[0]   # N x K x C x H x W
    rows, cols = literal_grid(H, n_grid, overlap), literal_grid(W, n_grid, overlap)

    def average(n, k, mask, r0, r1, c0, c1):
        m = mask[r0:r1, c0:c1].double()
        if m.sum() <= min_pixels:
            return torch.zeros(supp.shape[2], dtype=torch.float64)
        return (supp[n, k, :, r0:r1, c0:c1] * m).sum((1, 2)) / (m.sum() + 1e-5)

    prototypes = {}
    for r0, r1 in rows:
        for c0, c1 in cols:
            cell = (r0, r1, c0, c1)
            background = sum(average(n, k, bg[0, n, k], *cell) for n in range(N) for k in range(K)) / (K * N)
            prototypes[cell] = [background] + [sum(average(n, k, fg[0, n, k], *cell) for k in range(K)) / K
                                               for n in range(N)]
    out = torch.empty(1, 1, 1 + N, H, W, dtype=torch.float64)
    for x in range(H):
        for y in range(W):
            covering = [(r0, r1, c0, c1) for r0, r1 in rows if r0 <= x < r1
                        for c0, c1 in cols if c0 <= y < c1]      # row-major cell order
            for c in range(1 + N):
                scores = [scale * float(F.cosine_similarity(query[:, x, y], prototypes[cell][c], dim=0,
                                                            eps=1e-8)) for cell in covering]
                out[0, 0, c, x, y] = {"max": max([-1.0] + scores), "mean": sum(scores) / len(scores),
                                      "cover": scores[-1]}[vote]
    return out


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


def test_grid_cells_examples_and_refusals():
    assert len(grid_cells(512, 8, True)) == 15
    assert grid_cells(100, 8, False)[-2:] == [(84, 96), (88, 100)]   # extra border cell
    assert grid_cells(100, 8, True)[-1] == (88, 100)
    with pytest.raises(AssertionError, match="n_grid"):    # the config schema refuses these in one line
        grid_cells(100, 0, True)
    with pytest.raises(AssertionError, match="n_grid"):
        grid_cells(4, 8, True)


CASES = [  # image, feature map, n_grid, overlap, vote, K, N (batch 2, min_pixels 3)
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
def test_head_equals_the_cell_loop_with_ways_shots_and_batches(image, feat, n_grid, overlap, vote, K, N):
    sf, fg, bg, qf = _episode(sum(image) + n_grid + K, 2, N, K, 1, 6, feat, image)
    head = LocalPrototypeHead(n_grid, overlap, vote, "image", min_pixels=3, scale=20.0)
    out = head(sf, fg, bg, qf, image)
    ref = official_cell_loop(sf, fg, bg, qf, image, n_grid, overlap, vote, min_pixels=3)
    assert out.shape == ref.shape == (2, 1, 1 + N, *image)
    assert torch.allclose(out.double(), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("vote", ["max", "mean", "cover"])
def test_cell_loop_equals_the_pixel_loop(vote):
    """The per-cell loop against loops down to single pixels (2 ways, 2 shots, border cells)."""
    sf, fg, bg, qf = _episode(3, 1, 2, 2, 1, 5, (6, 7), (22, 27))
    for n_grid, overlap in ((4, True), (3, False)):
        loop = official_cell_loop(sf, fg, bg, qf, (22, 27), n_grid, overlap, vote, min_pixels=2)
        pixels = pixel_reference(sf, fg, bg, qf, (22, 27), n_grid, overlap, vote, min_pixels=2)
        assert torch.allclose(loop, pixels, atol=1e-9)


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
def test_head_equals_the_cell_loop_on_every_pixel_at_full_size(image, feat, n_grid, overlap, vote, K, relu):
    """Image resolution at the paper's size and a non-dividing one, 1e-4 on every pixel; blobs of
    30% of each side leave many cells empty or nearly empty (<= 10 pixels)."""
    sf, fg, bg, qf = _episode(n_grid + K + image[1], 1, 1, K, 1, 4, feat, image, blob=0.3)
    if relu:  # the official ResNet's features: many exact zeros
        sf, qf = sf.relu(), qf.relu()
    head = LocalPrototypeHead(n_grid, overlap, vote, "image", min_pixels=10)
    out = head(sf, fg, bg, qf, image)
    ref = official_cell_loop(sf, fg, bg, qf, image, n_grid, overlap, vote, min_pixels=10)
    assert out.shape == ref.shape == (1, 1, 2, *image)
    assert (out - ref.float()).abs().max() <= 1e-4
    if vote == "max":
        assert ref.min() >= -1                                  # the running maximum starts at -1


@pytest.mark.parametrize("vote", ["max", "mean", "cover"])
def test_feature_resolution_equals_the_cell_loop_on_the_feature_map(vote):
    """'feature' resolution: the cell loop run on the feature map (area-downsampled
    masks, pixel counts in image pixels), then the logits upsampled, gives the head's logits."""
    image, feat = (48, 40), (12, 10)
    sf, fg, bg, qf = _episode(5, 1, 2, 3, 1, 4, feat, image, blob=0.4)
    head = LocalPrototypeHead(4, True, vote, "feature", min_pixels=10)
    area = 16.0                                                  # image pixels per feature cell

    def soft(m):
        return F.interpolate(m.flatten(0, 2)[:, None], size=feat, mode="area")[:, 0].view(*m.shape[:3], *feat)

    # scaling the soft masks by `area` makes the loop's pixel counts image pixels; averages are unchanged
    ref = official_cell_loop(sf, soft(fg) * area, soft(bg) * area, qf, feat, 4, True, vote, min_pixels=10)
    ref = F.interpolate(ref.flatten(0, 1), size=image, mode="bilinear", align_corners=False)
    ref = ref.view(1, 1, 3, *image)
    out = head(sf, fg, bg, qf, image)
    assert (out - ref.float()).abs().max() <= 1e-4


def test_min_pixels_threshold():
    """A shot's cell average counts only with MORE than min_pixels class pixels (else zero)."""
    C, H, W = 3, 16, 16
    sf = torch.rand(1, 1, 1, C, 4, 4) + 0.1
    qf = torch.rand(1, 1, C, 4, 4) + 0.1
    for n_pixels, has_fg in ((10, False), (11, True)):
        fg = torch.zeros(1, 1, 1, H, W)
        fg.view(-1)[torch.arange(n_pixels)] = 1              # pixels of the first row, cell (0, 0)
        head = LocalPrototypeHead(1, True, "max", "image", min_pixels=10)
        protos = head.compute_prototypes(sf, fg, 1 - fg, (H, W))
        assert bool(protos.vectors[0, 1, 0, 0].abs().sum() > 0) is has_fg
        logits = head.score(protos, qf)
        assert bool((logits[0, 0, 1] > 0).all()) is has_fg    # zero prototype: cosine 0 everywhere
        assert has_fg or bool((logits[0, 0, 1] == 0).all())


def test_empty_cells_vote_with_cosine_zero():
    """The official rule, by hand: a cell without class pixels has the zero prototype, scores 0 and
    takes part in every vote; the max vote is floored at -1.

    8 x 8 image, n_grid 2 with overlap: cells of 4 pixels at 0, 2, 4 on both axes; foreground only
    in the 2 x 2 pixels that only cell (0, 0) covers, where the query cosine with it is negative.
    """
    H = W = 8
    sf = torch.zeros(1, 1, 1, 2, H, W)
    sf[:, :, :, 0] = 1.0                                     # support feature (1, 0)
    qf = torch.zeros(1, 1, 2, H, W)
    qf[:, :, 0], qf[:, :, 1] = -1.0, 0.2                    # query cosine with (1, 0) < 0
    fg = torch.zeros(1, 1, 1, H, W)
    fg[..., :2, :2] = 1
    cosine = 20 * F.cosine_similarity(torch.tensor([1.0, 0]), torch.tensor([-1.0, 0.2]), dim=0)  # -19.6
    heads = {vote: LocalPrototypeHead(2, True, vote, "image", min_pixels=2)
             for vote in ("max", "mean", "cover")}
    logits = {vote: head(sf, fg, 1 - fg, qf, (H, W))[0, 0, 1] for vote, head in heads.items()}
    expected = {  # (pixels covered by cell (0, 0) only, by 2 cells, by 4 cells of which (0, 0), by none)
        "max": (-1.0, 0.0, 0.0, 0.0),
        "mean": (cosine, cosine / 2, cosine / 4, 0.0),
        "cover": (cosine, 0.0, 0.0, 0.0),                    # the last covering cell is empty
    }
    for vote, (alone, two, four, none) in expected.items():
        got = logits[vote]
        for region, value in (((slice(0, 2), slice(0, 2)), alone), ((slice(0, 2), slice(2, 4)), two),
                              ((slice(2, 4), slice(2, 4)), four), ((slice(6, 8), slice(6, 8)), none)):
            assert torch.allclose(got[region], torch.full((2, 2), float(value)), atol=1e-5), (vote, region)


def _smooth(g, shape, size):
    low = torch.randn(*shape, 6, 6, generator=g)
    return F.interpolate(low.flatten(0, -3).unsqueeze(1), size=size, mode="bicubic",
                         align_corners=False).view(*shape, *size)


def test_feature_mode_agrees_with_image_mode_on_smooth_inputs():
    """'feature' and 'image' mode share the argmax on >= 94% of pixels for smooth inputs.

    Measured (128 x 128 images, 32 x 32 features as the cnn_small demo, 16 channels, features
    bicubic from 4-8 point noise, two disc masks, n_grid 1, 8 with overlap and 4, 8 without, seeds
    0-3): mean 95.7%, worst case 93.9% (seed 0, tested here: 95.2-96.0%). With coarser 24 x 24
    feature maps (96 x 96 input): mean 93.2%, worst case 89.2%.
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
        assert agreement >= 0.94, (n_grid, overlap, agreement)


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


def test_prototypes_broadcast_over_query_batch_and_batch_items_are_independent():
    sf, fg, bg, qf = _episode(5, 1, 1, 2, 4, 6, (6, 8), (24, 32))
    head = LocalPrototypeHead(4, True, "max", "image", min_pixels=3)
    protos = head.compute_prototypes(sf, fg, bg, (24, 32))
    many = head.score(protos, qf.view(4, 1, 6, 6, 8))          # query batch 4, prototypes batch 1
    one = head.score(protos, qf)                              # batch 1, 4 queries
    assert many.shape == (4, 1, 2, 24, 32)
    assert torch.allclose(many[:, 0], one[0], atol=1e-5)
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
    with pytest.raises(UserError, match="empty mask"):
        head(sf, torch.zeros_like(fg), bg, qf, (24, 32))
    with pytest.raises(UserError, match="model.n_grid = 8"):
        LocalPrototypeHead(8, True, "max", "image")(sf, fg, bg, qf, (24, 32))  # > 6 x 8 features


def _alignment_reference(head, sf, fg, bg, qf, query_logits):
    """The local head's alignment loss by loops (float64): per episode b, the query argmax masks are the
    shots of every way (background: the argmax-0 pixels); `official_cell_loop` scores each support image
    (n, k) with those prototypes; cross-entropy of (background, way n) against its labelled pixels (fg 1,
    bg 0, others ignored), averaged per image, then over all B x N x K images."""
    B, N, K = sf.shape[:3]
    H, W = query_logits.shape[-2:]
    losses = []
    for b in range(B):
        pred = query_logits[b].argmax(1)                                     # Q x H x W
        shots_fg = torch.stack([(pred == n + 1).double() for n in range(N)])  # N x Q x H x W
        shots_bg = torch.stack([(pred == 0).double()] * N)
        shots = torch.stack([qf[b]] * N)                                      # N x Q x C x h x w
        scores = official_cell_loop(shots[None], shots_fg[None], shots_bg[None], sf[b].flatten(0, 1)[None],
                                    (H, W), head.n_grid, head.overlap, head.vote, head.min_pixels,
                                    head.scale)[0]                            # NK x (1 + N) x H x W
        for n in range(N):
            for k in range(K):
                pair = scores[n * K + k][[0, n + 1]]                          # 2 x H x W
                total, count = 0.0, 0
                for x in range(H):
                    for y in range(W):
                        if fg[b, n, k, x, y] > 0.5:
                            target = 1
                        elif bg[b, n, k, x, y] > 0.5:
                            target = 0
                        else:
                            continue
                        total -= float(torch.log_softmax(pair[:, x, y], 0)[target])
                        count += 1
                losses.append(total / max(count, 1))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("vote,N,K,Q", [("max", 2, 2, 2), ("mean", 1, 3, 1)])
def test_alignment_loss_equals_the_loop(vote, N, K, Q):
    image, feat = (16, 20), (4, 5)
    sf, fg, bg, qf = _episode(11 + N, 2, N, K, Q, 6, feat, image)
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, Q, 1 + N, *image, generator=g)                     # every class wins somewhere
    logits[:, :, 1:, 4:12, 5:15] += 2.0
    head = LocalPrototypeHead(2, True, vote, "image", min_pixels=3, scale=20.0)
    got = head.alignment_loss(head.compute_prototypes(sf, fg, bg, image), logits, qf, sf, fg, bg)
    assert float(got) == pytest.approx(_alignment_reference(head, sf, fg, bg, qf, logits), rel=1e-5)
