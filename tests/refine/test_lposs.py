"""LPOSS / LPOSS+ against brute-force constructions, a dense linear solve and toy images."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vocabseg.errors import SettingsError, UnknownNameError
from vocabseg.refine import REFINERS, create_refiner
from vocabseg.refine.lposs import (
    LPOSS,
    conjugate_gradient,
    knn_graph,
    last_block_values,
    normalized_adjacency,
    pixel_graph,
    propagate,
    rgb_to_lab,
    window_patch_positions,
)


def _brute_force_knn(feats, positions, k, gamma, sigma, power):
    """W of the patch graph written out densely, the way the paper states it."""
    n = feats.shape[0]
    unit = feats / feats.norm(dim=1, keepdim=True)
    sims = unit @ unit.T
    w = torch.zeros(n, n, dtype=feats.dtype)
    for i in range(n):
        for j in torch.argsort(sims[i], descending=True)[: min(k, n)].tolist():
            dist = math.dist(positions[i].tolist(), positions[j].tolist())
            w[i, j] = max(sims[i, j].item(), 0.0) ** gamma * math.exp(-sigma * dist**power)
    w = w + w.T
    w.fill_diagonal_(0)
    return w


def _dense_lp(w, y, alpha):
    degree = w.sum(1)
    degree[degree == 0] = 1
    wn = w / degree.sqrt()[:, None] / degree.sqrt()[None, :]
    return (1 - alpha) * torch.linalg.solve(torch.eye(w.shape[0], dtype=w.dtype) - alpha * wn, y)


def _random_graph(n=60, c=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, c, generator=g, dtype=torch.float64)
    positions = torch.rand(n, 2, generator=g, dtype=torch.float64) * 200
    return feats, positions


# -- the patch graph ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("k", "gamma", "sigma", "power"), [(7, 3.0, 0.01, 1.0), (1000, 2.0, 0.05, 2.0)])
def test_knn_graph_matches_brute_force(k, gamma, sigma, power):
    feats, positions = _random_graph()
    graph = knn_graph(feats, positions, k=k, gamma=gamma, sigma=sigma, distance_power=power)
    expected = _brute_force_knn(feats, positions, k, gamma, sigma, power)
    torch.testing.assert_close(graph.to_dense(), expected, rtol=1e-12, atol=1e-12)
    assert graph.layout == torch.sparse_csr


def test_knn_graph_keeps_only_k_neighbours_per_row_before_symmetrising():
    feats, positions = _random_graph(n=40)
    dense = knn_graph(feats, positions, k=5).to_dense()
    # each patch found 4 others (itself is the 5th); symmetrising adds those that found it
    found = (dense > 0).sum(1)
    assert (found >= 4).all() and found.float().mean() < 8
    torch.testing.assert_close(dense, dense.T)
    assert torch.count_nonzero(dense.diagonal()) == 0


def test_symmetric_normalisation_properties():
    feats, positions = _random_graph()
    w = knn_graph(feats, positions, k=10)
    # an isolated node (no edges at all) must neither divide by zero nor gain edges
    w = torch.block_diag(w.to_dense(), torch.zeros(1, 1, dtype=w.dtype)).to_sparse_csr()
    normalized = normalized_adjacency(w)
    wn = normalized.to_dense()
    torch.testing.assert_close(wn, wn.T)
    assert torch.isfinite(wn).all() and wn[-1].abs().sum() == 0
    eig = torch.linalg.eigvalsh(wn)
    assert eig.max() == pytest.approx(1.0, abs=1e-10) and eig.min() >= -1 - 1e-10
    # D^1/2 1 is the eigenvector of eigenvalue 1 on the connected part
    root = w.to_dense().sum(1)[:-1].sqrt()
    torch.testing.assert_close(wn[:-1, :-1] @ root, root)
    x = torch.randn(wn.shape[0], 3, dtype=wn.dtype)
    torch.testing.assert_close(normalized @ x, wn @ x)


# -- the solve ----------------------------------------------------------------------------------------------------
def test_cg_solve_matches_dense_linear_solve():
    feats, positions = _random_graph(n=80)
    graph = knn_graph(feats, positions, k=12)
    y = torch.randn(80, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    z = propagate(graph, y, alpha=0.95, tol=1e-12, max_iter=1000)
    torch.testing.assert_close(z, _dense_lp(graph.to_dense(), y, 0.95), rtol=0, atol=1e-5)
    # the official 10 iterations are a truncated solve: measurably different
    truncated = propagate(graph, y, alpha=0.95, tol=1e-6, max_iter=10)
    assert (truncated - z).abs().max() > 1e-4


def test_cg_columns_are_independent_solves():
    """Columns that converge at different iterations give what K separate solves give."""
    g = torch.Generator().manual_seed(2)
    m = torch.randn(30, 30, dtype=torch.float64, generator=g)
    a = m @ m.T + 30 * torch.eye(30, dtype=torch.float64)
    b = torch.randn(30, 3, dtype=torch.float64, generator=g)
    eigenvalues, eigenvectors = torch.linalg.eigh(a)
    b[:, 1] = eigenvectors[:, 0] * 1e3  # an eigenvector: converges after one step
    b[:, 2] = 0  # nothing to solve
    together = conjugate_gradient(lambda x: a @ x, b, tol=1e-8, max_iter=7)
    apart = torch.cat([conjugate_gradient(lambda x: a @ x, b[:, i : i + 1], tol=1e-8, max_iter=7) for i in range(3)], 1)
    torch.testing.assert_close(together, apart, rtol=1e-12, atol=1e-12)
    assert together[:, 2].abs().sum() == 0
    torch.testing.assert_close(together[:, 1], eigenvectors[:, 0] * 1e3 / eigenvalues[0])


def test_propagation_fixes_a_noisy_patch_on_a_two_region_image():
    """An 8 x 8 patch grid, left half one texture, right half another; one left patch mislabelled."""
    g = torch.Generator().manual_seed(3)
    rows, cols = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    left = (cols < 4).flatten()
    centres = torch.tensor([1.0, 0, 0, 0, 0, 0]), torch.tensor([0, 1.0, 0, 0, 0, 0])
    feats = torch.where(left[:, None], centres[0], centres[1]) + 0.1 * torch.randn(64, 6, generator=g)
    positions = torch.stack([rows, cols], -1).reshape(-1, 2).float() * 16 + 8
    scores = torch.stack([left.float(), (~left).float()], 1) * 0.3 + 0.05 * torch.rand(64, 2, generator=g)
    noisy = 3 * 8 + 1  # row 3, column 1: inside the left region
    scores[noisy] = torch.tensor([0.0, 0.3])
    assert scores.argmax(1)[noisy] == 1
    refined = LPOSS(k=20).refine_patches(scores, feats, positions)
    assert torch.equal(refined.argmax(1), (~left).long())


def test_outputs_stay_on_the_scale_of_the_inputs():
    """(1 - α) scaling: constant scores on a regular graph come back unchanged."""
    graph = torch.ones(6, 6, dtype=torch.float64).fill_diagonal_(0).to_sparse_csr()
    y = torch.full((6, 2), 0.25, dtype=torch.float64)
    torch.testing.assert_close(propagate(graph, y, alpha=0.95, tol=1e-12, max_iter=100), y)


# -- LPOSS+: the pixel graph -----------------------------------------------------------------------------------------
def test_rgb_to_lab_reference_colours():
    image = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]).reshape(3, 1, 3)  # white, red, black
    lab = rgb_to_lab(image)[:, 0].T
    torch.testing.assert_close(lab[0], torch.tensor([100.0, 0.0, 0.0]), atol=0.02, rtol=0)
    torch.testing.assert_close(lab[1], torch.tensor([53.24, 80.09, 67.20]), atol=0.05, rtol=0)
    torch.testing.assert_close(lab[2], torch.tensor([0.0, 0.0, 0.0]), atol=0.02, rtol=0)


def test_pixel_graph_matches_brute_force():
    image = torch.rand(3, 6, 7, generator=torch.Generator().manual_seed(4))
    tau, window = 0.5, 5
    graph = pixel_graph(image, tau=tau, window=window)
    lab = (rgb_to_lab(image) / torch.tensor([100.0, 128.0, 128.0])[:, None, None]).flatten(1).T
    yx = [(y, x) for y in range(6) for x in range(7)]
    expected = torch.zeros(42, 42)
    for i, (y, x) in enumerate(yx):
        for j, (v, u) in enumerate(yx):
            if i != j and abs(v - y) <= window // 2 and abs(u - x) <= window // 2:
                expected[i, j] = math.exp(-(lab[i] - lab[j]).norm().item() / tau)
    dense = graph.adjacency.to_dense()
    torch.testing.assert_close(dense[graph.pixels][:, graph.pixels], expected, rtol=1e-5, atol=1e-6)
    padding = torch.ones(dense.shape[0], dtype=torch.bool)
    padding[graph.pixels] = False
    assert dense[padding].abs().sum() == 0 and dense[:, padding].abs().sum() == 0
    cols = graph.adjacency.col_indices()
    crow = graph.adjacency.crow_indices()
    for row in range(dense.shape[0]):  # CSR invariants the sparse kernels rely on: sorted, no repeats
        assert (cols[crow[row] : crow[row + 1]].diff() > 0).all()


def test_lposs_plus_respects_a_colour_edge():
    """Scores that bleed 3 pixels across a red/blue edge are pulled back to the edge."""
    h, w, edge = 20, 30, 13
    image = torch.zeros(3, h, w)
    image[0, :, :edge] = 0.9
    image[2, :, edge:] = 0.9
    image += 0.02 * torch.rand(3, h, w, generator=torch.Generator().manual_seed(5))
    truth = (torch.arange(w) >= edge).long().expand(h, w)
    scores = torch.stack([(truth == 0).float(), (truth == 1).float()])
    scores[:, :, edge : edge + 3] = torch.tensor([0.55, 0.45])[:, None, None]  # blurred across the edge
    assert (scores.argmax(0) != truth).sum() == 3 * h
    refined = LPOSS(pixel=True).refine_pixels(image, scores)
    assert refined.shape == (2, h, w)
    assert torch.equal(refined.argmax(0), truth)


# -- the whole image: windows, stitching, interface -----------------------------------------------------------------
def test_window_patch_positions_are_the_official_patch_centres():
    positions = window_patch_positions((10, 26, 20, 52), (2, 4))  # 8-px patches: y1 + 4 + 8 i
    assert positions.tolist() == [[r, c] for r in (14.0, 22.0) for c in (24.0, 32.0, 40.0, 48.0)]


def test_refine_windows_one_window_is_patch_refinement_upsampled():
    g = torch.Generator().manual_seed(6)
    image = torch.rand(3, 32, 48, generator=g)
    feats = torch.randn(5, 4, 6, generator=g)
    scores = torch.randn(3, 4, 6, generator=g)  # already on the feature grid
    lposs = LPOSS(k=10)
    out = lposs.refine_windows(image, [(0, 32, 0, 48)], [scores], [feats])
    positions = window_patch_positions((0, 32, 0, 48), (4, 6))
    patches = lposs.refine_patches(scores.flatten(1).T, feats.flatten(1).T, positions)
    expected = F.interpolate(patches.T.reshape(1, 3, 4, 6), size=(32, 48), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(out, expected)


def test_refine_windows_joins_all_windows_in_one_graph():
    """Two windows over a non-square image: the noisy window is fixed by the other window's patches."""
    g = torch.Generator().manual_seed(7)
    image = torch.rand(3, 16, 40, generator=g)
    boxes = [(0, 16, 0, 24), (0, 16, 16, 40)]  # overlapping by 8 px
    feats = [torch.ones(4, 2, 3) + 0.01 * torch.randn(4, 2, 3, generator=g) for _ in boxes]
    clean = torch.tensor([1.0, 0.0])[:, None, None].expand(2, 16, 24)
    noisy = clean.flip(0) * 0.2 + clean * 0.1  # class 1 slightly ahead in the second window
    out = LPOSS(k=12, sigma=0.0).refine_windows(image, boxes, [clean, noisy], feats)
    assert out.shape == (2, 16, 40)
    assert (out.argmax(0) == 0).all()
    plus = LPOSS(k=12, sigma=0.0, pixel=True).refine_windows(image, boxes, [clean, noisy], feats)
    assert plus.shape == (2, 16, 40) and torch.isfinite(plus).all()


def test_last_block_values_are_the_value_projection(tiny_vfm):
    images = torch.randn(2, 3, 32, 40, generator=torch.Generator().manual_seed(8))
    values = last_block_values(tiny_vfm, images)
    model = tiny_vfm.model
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    for block in model.blocks[:-1]:
        x = block(x)
    qkv = model.blocks[-1].attn.qkv(model.blocks[-1].norm1(x))
    dim = qkv.shape[-1] // 3
    expected = qkv[:, model.num_prefix_tokens :, 2 * dim :].transpose(1, 2).reshape(2, dim, 4, 5)
    torch.testing.assert_close(values, expected)


# -- registry and settings -------------------------------------------------------------------------------------------
def test_registry_builds_lposs_and_lposs_plus():
    assert set(REFINERS) == {"lposs", "lposs+"}
    assert create_refiner("lposs").pixel is False
    plus = create_refiner("lposs+", k=50)
    assert plus.pixel is True and plus.k == 50 and plus.tau == 0.01 and plus.window == 13


def test_registry_refuses_unknown_names_and_options():
    with pytest.raises(UnknownNameError, match="Unknown refiner 'lpos'.*Did you mean 'lposs'"):
        create_refiner("lpos")
    with pytest.raises(SettingsError, match="Refiner 'lposs' does not take beta; it takes k=400"):
        create_refiner("lposs", beta=1)
    with pytest.raises(SettingsError, match="does not take pixel"):
        create_refiner("lposs", pixel=True)  # the name says which stage runs


@pytest.mark.parametrize(
    ("option", "message"), [({"alpha": 1.0}, "alpha=1.0 (between 0 and 1"), ({"window": 12}, "window=12 (an odd")]
)
def test_bad_settings_name_the_option(option, message):
    with pytest.raises(SettingsError, match=r"Invalid LPOSS setting: " + message.replace("(", r"\(")):
        LPOSS(**option)
