"""The CAT-Seg head's modules, each against a literal re-computation with the same weights."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vocabseg.heads.catseg import (
    CATSegHead,
    ClassAggregation,
    GuidedSwinBlock,
    LinearClassAttention,
    UpBlock,
    shifted_window_mask,
    window_partition,
    window_reverse,
)

TOL = dict(atol=1e-5, rtol=1e-5)
HEAD = dict(
    hidden_dim=16, heads=2, appearance_guidance_dim=8, text_guidance_dim=8, num_layers=2, window=4, pad_len=6,
    decoder_dims=(16, 16), decoder_guidance_dims=(12, 8), decoder_guidance_proj_dims=(4, 4),
)  # fmt: skip
C, WIDTH = 24, 20  # CLIP joint width, CLIP tower width


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def perturb(module: torch.nn.Module, scale: float = 0.2) -> torch.nn.Module:
    """Move every parameter off its initialisation (zeros: padding tokens, norms' biases)."""
    with torch.no_grad():
        for i, p in enumerate(module.parameters()):
            p.add_(scale * randn(*p.shape, seed=100 + i))
    return module


def make_head(seed: int = 0, **changes) -> CATSegHead:
    torch.manual_seed(seed)
    return perturb(CATSegHead(C, WIDTH, **{**HEAD, **changes})).eval()


def inputs(b: int = 2, k: int = 3, p: int = 1, grid: int = 8, seed: int = 0):
    image = randn(b, C, grid, grid, seed=seed)
    text = F.normalize(randn(k, p, C, seed=seed + 1), dim=-1)
    guidance = [randn(b, WIDTH, grid, grid, seed=seed + 2), randn(b, WIDTH, grid, grid, seed=seed + 3)]
    return image, text, guidance


def layer_norm(x: torch.Tensor, ln: torch.nn.LayerNorm) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def linear(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    return x @ layer.weight.T + layer.bias


# -- cost volume -------------------------------------------------------------------------------------------------
def test_cost_volume_is_the_cosine_of_every_pixel_with_every_class_and_template():
    head = make_head(prompt_channels=2)
    image = randn(2, C, 3, 4)
    text = randn(2, 5, 2, C, seed=1)  # per image, not unit: the head normalises both sides
    cost = head.cost_volume(image, text)
    assert cost.shape == (2, 2, 5, 3, 4)
    for b in range(2):
        for p in range(2):
            for k in range(5):
                for y in range(3):
                    for x in range(4):
                        v, t = image[b, :, y, x], text[b, k, p]
                        want = float(v @ t) / (float(v.norm()) * float(t.norm()))
                        assert abs(float(cost[b, p, k, y, x]) - want) < 1e-5


# -- spatial aggregation: windows and shifts ---------------------------------------------------------------------
def test_window_partition_and_reverse_are_inverse_and_row_major():
    x = randn(2, 8, 12, 3)
    w = window_partition(x, 4)
    assert w.shape == (2 * 2 * 3, 16, 3)
    torch.testing.assert_close(w[1].view(4, 4, 3), x[0, 0:4, 4:8])  # window (0, 1) of image 0
    torch.testing.assert_close(w[6 + 3].view(4, 4, 3), x[1, 4:8, 0:4])  # window (1, 0) of image 1
    torch.testing.assert_close(window_reverse(w, 4, 8, 12), x)


def rolled_region(r: int, size: int, window: int, shift: int) -> int:
    """Which of Swin's three bands a coordinate of the rolled grid lies in."""
    return 0 if r < size - window else (1 if r < size - shift else 2)


def test_shift_mask_separates_exactly_the_tokens_from_different_original_regions():
    h, w, window, shift = 8, 12, 4, 2
    mask = shifted_window_mask(h, w, window, shift)
    assert mask.shape == (2 * 3, 16, 16)
    assert shifted_window_mask(h, w, window, 0) is None
    for wy in range(2):
        for wx in range(3):
            for i in range(16):
                for j in range(16):
                    (ri, ci), (rj, cj) = (wy * 4 + i // 4, wx * 4 + i % 4), (wy * 4 + j // 4, wx * 4 + j % 4)
                    same = rolled_region(ri, h, window, shift) == rolled_region(rj, h, window, shift) and (
                        rolled_region(ci, w, window, shift) == rolled_region(cj, w, window, shift)
                    )
                    assert float(mask[wy * 3 + wx, i, j]) == (0.0 if same else -100.0)


def literal_swin_block(block: GuidedSwinBlock, x: torch.Tensor, guidance: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Token by token: attention over the tokens of the same window of the grid rolled by -shift that also
    come from the same region (Swin's shifted windows, the -100 mask read as exclusion), then the MLP."""
    window, shift, attn = block.window, block.shift, block.attn
    n, _, c = x.shape
    heads, d = attn.heads, c // attn.heads
    y = torch.cat([layer_norm(x, block.norm1), guidance], dim=-1)
    q, k, v = linear(y, attn.q), linear(y, attn.k), linear(y[..., :c], attn.v)
    out = torch.zeros_like(x)
    rolled = [((i - shift) % h, (j - shift) % w) for i in range(h) for j in range(w)]  # token -> rolled position

    def key(t: int) -> tuple[int, ...]:
        r, s = rolled[t]
        regions = (rolled_region(r, h, window, shift), rolled_region(s, w, window, shift)) if shift else (0, 0)
        return (r // window, s // window, *regions)

    groups = [[s for s in range(h * w) if key(s) == key(t)] for t in range(h * w)]
    for b in range(n):
        for t in range(h * w):
            keys = groups[t]
            assert len(keys) <= window * window
            heads_out = []
            for hd in range(heads):
                sl = slice(hd * d, (hd + 1) * d)
                scores = torch.stack([q[b, t, sl] @ k[b, s, sl] for s in keys]) / math.sqrt(d)
                weights = torch.exp(scores - scores.max()) / torch.exp(scores - scores.max()).sum()
                heads_out.append(sum(wt * v[b, s, sl] for wt, s in zip(weights, keys)))
            out[b, t] = linear(torch.cat(heads_out), attn.proj)
    x = x + out
    hidden = linear(layer_norm(x, block.norm2), block.mlp.fc1)
    hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))  # exact GELU
    return x + linear(hidden, block.mlp.fc2)


@pytest.mark.parametrize("shift", [0, 2])
def test_guided_swin_block_equals_literal_window_attention(shift):
    torch.manual_seed(0)
    block = perturb(GuidedSwinBlock(8, 4, heads=2, window=4, shift=shift))
    h, w = 8, 8
    x, g = randn(2, h * w, 8, seed=1), randn(2, h * w, 4, seed=2)
    with torch.no_grad():
        got = block(x, g, (h, w))
        want = literal_swin_block(block, x, g, h, w)
    torch.testing.assert_close(got, want, **TOL)
    if shift:  # the shift matters: an unshifted block with the same weights differs
        block.shift = 0
        with torch.no_grad():
            assert (block(x, g, (h, w)) - want).abs().max() > 1e-3


def test_a_grid_not_tiled_by_the_window_is_refused_and_a_small_grid_is_one_window():
    torch.manual_seed(0)
    block = GuidedSwinBlock(8, 4, heads=2, window=4, shift=2)
    with pytest.raises(ValueError, match="not tiled by 4x4 windows"):
        block(randn(1, 6 * 8, 8), randn(1, 6 * 8, 4), (6, 8))
    x, g = randn(1, 9, 8), randn(1, 9, 4)
    with torch.no_grad():
        got = block(x, g, (3, 3))  # min(grid) <= window: one 3x3 window, no shift (Swin's rule)
        block.window, block.shift = 3, 0
        want = literal_swin_block(block, x, g, 3, 3)
    torch.testing.assert_close(got, want, **TOL)


# -- class aggregation -----------------------------------------------------------------------------------------
def literal_linear_attention(att: LinearClassAttention, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """out_l = Σ_s φ(q_l)·φ(k_s) v_s / (Σ_s φ(q_l)·φ(k_s) + ε) per head, φ = ELU + 1."""
    n, k, c = x.shape
    d = c // att.heads
    xg = torch.cat([x, g], dim=-1)
    q, key, v = linear(xg, att.q), linear(xg, att.k), linear(x, att.v)
    phi = lambda z: torch.where(z > 0, z + 1, torch.exp(z))  # noqa: E731  (ELU(z) + 1)
    out = torch.zeros_like(x)
    for b in range(n):
        for hd in range(att.heads):
            sl = slice(hd * d, (hd + 1) * d)
            for i in range(k):
                sims = [phi(q[b, i, sl]) @ phi(key[b, s, sl]) for s in range(k)]
                out[b, i, sl] = sum(sim * v[b, s, sl] for sim, s in zip(sims, range(k))) / (sum(sims) + att.eps)
    return out


def test_class_linear_attention_equals_the_equation():
    torch.manual_seed(0)
    att = perturb(LinearClassAttention(8, 4, heads=2))
    x, g = randn(3, 5, 8, seed=1), randn(3, 5, 4, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(att(x, g), literal_linear_attention(att, x, g), **TOL)


def literal_class_layer(layer: ClassAggregation, x: torch.Tensor, g: torch.Tensor, pool: int) -> torch.Tensor:
    """Average-pool each class map, pad the classes to pad_len with the learned tokens, pre-norm linear
    attention + MLP across classes at every pooled position, upsample (align corners), add."""
    b, c, k, h, w = x.shape
    pad = max(layer.pad_len - k, 0)
    out = x.clone()
    for i in range(b):
        maps = x[i].transpose(0, 1)  # (K, C, h, w)
        pooled = F.avg_pool2d(maps, pool) if pool > 1 else maps
        hp, wp = pooled.shape[-2:]
        guidance = torch.cat([g[i], layer.padding_guidance[0].expand(pad, -1)])
        update = torch.zeros(k, c, hp, wp)
        for y in range(hp):
            for xx in range(wp):
                tokens = torch.cat([pooled[:, :, y, xx], layer.padding_tokens[0].expand(pad, -1)])  # (pad_len, C)
                a = (
                    tokens
                    + literal_linear_attention(layer.attn, layer_norm(tokens, layer.norm1)[None], guidance[None])[0]
                )
                hidden = torch.relu(linear(layer_norm(a, layer.norm2), layer.mlp[0]))
                a = a + linear(hidden, layer.mlp[2])
                update[:, :, y, xx] = a[:k]
        if pool > 1:
            update = F.interpolate(update, size=(h, w), mode="bilinear", align_corners=True)
        out[i] = x[i] + update.transpose(0, 1)
    return out


@pytest.mark.parametrize("pool", [1, 2])
def test_class_aggregation_pads_to_pad_len_with_the_learned_tokens(pool):
    torch.manual_seed(0)
    layer = perturb(ClassAggregation(8, 4, heads=2, pad_len=6))
    x, g = randn(2, 8, 4, 4, 4, seed=1), randn(2, 4, 4, seed=2)
    with torch.no_grad():
        got = layer(x, g, (pool, pool))
        want = literal_class_layer(layer, x, g, pool)
    torch.testing.assert_close(got, want, **TOL)
    with torch.no_grad():  # the padding takes part: another padding token changes the classes' outputs
        layer.padding_tokens.copy_(randn(*layer.padding_tokens.shape, seed=3))
        assert (layer(x, g, (pool, pool)) - got).abs().max() > 1e-3


def test_the_head_pools_before_class_attention_in_training_only():
    head = make_head()
    image, text, guidance = inputs()
    with torch.no_grad():
        evaluated = head(image, text, guidance)
        head.train()
        trained = head(image, text, guidance)
        head.eval_pooling = head.pooling
        head.eval()
        torch.testing.assert_close(head(image, text, guidance), trained)  # the only train/eval difference
    assert head.pooling == (2, 2) and (evaluated - trained).abs().max() > 1e-3


# -- classes above pad_len -------------------------------------------------------------------------------------
def test_above_pad_len_the_top_classes_by_max_cost_are_kept_and_the_rest_get_minus_100():
    head = make_head(pad_len=4)
    image, text, guidance = inputs(k=7)
    with torch.no_grad():
        out = head(image, text, guidance)
    unit = F.normalize(image, dim=1)
    for b in range(2):
        best = [float((unit[b] * text[k, 0][:, None, None]).sum(0).max()) for k in range(7)]
        kept = sorted(sorted(range(7), key=lambda k: -best[k])[:4])
        others = [k for k in range(7) if k not in kept]
        assert (out[b, others] == -100.0).all()
        with torch.no_grad():  # the kept classes' logits: the head on those 4 alone (no padding at pad_len)
            alone = head(image[b : b + 1], text[kept], [g[b : b + 1] for g in guidance])[0]
        torch.testing.assert_close(out[b, kept], alone, **TOL)
        assert (out[b, kept] > -50).all()


def test_up_to_pad_len_classes_every_class_is_aggregated():
    head = make_head(pad_len=4)
    image, text, guidance = inputs(k=4)
    with torch.no_grad():
        assert (head(image, text, guidance) > -50).all()


# -- decoder -------------------------------------------------------------------------------------------------------
def literal_up_block(block: UpBlock, x: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
    """ConvTranspose ×2, then each class map of image b gets image b's guidance, then two conv-GN-ReLU."""
    up = F.conv_transpose2d(x, block.up.weight, block.up.bias, stride=2)
    k = x.shape[0] // guidance.shape[0]
    rows = [torch.cat([up[i], guidance[i // k]]) for i in range(x.shape[0])]
    y = torch.stack(rows)
    for conv, norm in ((block.conv[0], block.conv[1]), (block.conv[3], block.conv[4])):
        y = F.conv2d(y, conv.weight, padding=1)
        n, c, h, w = y.shape
        groups = y.view(n, norm.num_groups, -1)
        mu, var = groups.mean(-1, keepdim=True), groups.var(-1, unbiased=False, keepdim=True)
        y = ((groups - mu) / torch.sqrt(var + norm.eps)).view(n, c, h, w) * norm.weight[:, None, None]
        y = torch.relu(y + norm.bias[:, None, None])
    return y


def test_decoder_stage_equals_its_literal_computation():
    torch.manual_seed(0)
    block = perturb(UpBlock(32, 32, 8))
    assert block.conv[1].num_groups == 2  # 16 channels per group, as the official DoubleConv
    x, guidance = randn(2 * 3, 32, 4, 4, seed=1), randn(2, 8, 8, 8, seed=2)  # B = 2 images, K = 3 classes
    with torch.no_grad():
        torch.testing.assert_close(block(x, guidance), literal_up_block(block, x, guidance), **TOL)


def test_middle_layer_guidance_is_upsampled_x2_and_x4():
    head = make_head()
    assert [(u.kernel_size, u.stride) for u in head.guidance_upsample] == [((2, 2), (2, 2)), ((4, 4), (4, 4))]
    image, text, guidance = inputs()
    with torch.no_grad():
        logits, state = head(image, text, guidance, return_state=True)
    assert logits.shape == (2, 3, 32, 32) and head.upsampling == 4
    assert [tuple(g.shape) for g in state.decoder_guidance] == [(2, 4, 16, 16), (2, 4, 32, 32)]
    with pytest.raises(ValueError, match="1 middle-layer guidance maps for 2 decoder stages"):
        head(image, text, guidance[:1])


# -- the whole head ------------------------------------------------------------------------------------------------
def test_the_class_order_permutes_the_logits():
    head = make_head()
    image, text, guidance = inputs(k=5)
    perm = torch.tensor([3, 0, 4, 2, 1])
    with torch.no_grad():
        torch.testing.assert_close(head(image, text[perm], guidance), head(image, text, guidance)[:, perm], **TOL)


def test_per_image_text_equals_each_image_with_its_own_text():
    head = make_head()
    image, _, guidance = inputs()
    per_image = F.normalize(randn(2, 3, 1, C, seed=9), dim=-1)
    with torch.no_grad():
        together = head(image, per_image, guidance)
        for b in range(2):
            alone = head(image[b : b + 1], per_image[b], [g[b : b + 1] for g in guidance])
            torch.testing.assert_close(together[b : b + 1], alone, **TOL)


def test_a_one_template_head_takes_a_template_ensemble_as_its_mean():
    head = make_head()
    image, text, guidance = inputs(p=3)
    with torch.no_grad():
        got = head(image, text, guidance)
        want = head(image, F.normalize(text.mean(1, keepdim=True), dim=-1), guidance)
    torch.testing.assert_close(got, want, **TOL)
    with pytest.raises(ValueError, match="built for 2 templates per class, got 3"):
        make_head(prompt_channels=2)(image, text, guidance)


class AddOne(CATSegHead):
    """A subclass changing one stage (as FGAseg adds a local cost before the aggregator)."""

    def embed(self, state):
        state.extras["seen"] = state.cost.shape
        return super().embed(state) + 1.0


def test_subclasses_change_one_stage_and_see_the_shared_state():
    torch.manual_seed(0)
    base = perturb(CATSegHead(C, WIDTH, **HEAD)).eval()
    torch.manual_seed(0)
    extended = perturb(AddOne(C, WIDTH, **HEAD)).eval()
    image, text, guidance = inputs()
    with torch.no_grad():
        out, state = extended(image, text, guidance, return_state=True)
        assert (out - base(image, text, guidance)).abs().max() > 1e-3
    assert state.extras["seen"] == (2, 1, 3, 8, 8) and state.num_classes == 3 and state.selected is None


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="one entry per stage"):
        CATSegHead(C, WIDTH, decoder_dims=(64, 32), decoder_guidance_dims=(256,))
    with pytest.raises(ValueError, match="not divisible by heads"):
        CATSegHead(C, WIDTH, hidden_dim=30, heads=4)
    with pytest.raises(ValueError, match=r"text must be \(K, P, C\)"):
        make_head()(*inputs()[:1], randn(3, C), inputs()[2])


class DropMiddleClass(CATSegHead):
    """A decoder stage that drops classes (as FGAseg's top-N pruning): keeps classes 0 and 2 of 3."""

    def decode_stage(self, i, maps, state):
        if i == 0:
            keep = torch.tensor([0, 2])
            maps = maps.view(state.batch, -1, *maps.shape[1:])[:, keep].flatten(0, 1)
            state.selected = keep.expand(state.batch, -1)
        return super().decode_stage(i, maps, state)


def test_a_decoder_stage_may_drop_classes():
    """The decoder works on each class map alone, so the kept classes' logits are the full run's."""
    torch.manual_seed(0)
    base = perturb(CATSegHead(C, WIDTH, **HEAD)).eval()
    torch.manual_seed(0)
    pruned = perturb(DropMiddleClass(C, WIDTH, **HEAD)).eval()
    image, text, guidance = inputs()
    with torch.no_grad():
        full, out = base(image, text, guidance), pruned(image, text, guidance)
    torch.testing.assert_close(out[:, [0, 2]], full[:, [0, 2]], **TOL)
    assert (out[:, 1] == -100.0).all()
