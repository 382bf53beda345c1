"""FGAseg's modules against literal re-computations of the paper's equations from the modules' weights."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vocabseg.errors import UnknownNameError
from vocabseg.heads.fgaseg import (
    T2P_LOSSES,
    FGASegHead,
    LocalCost,
    P2Tformer,
    T2PProjector,
    build_fusion,
    class_scores,
    downsample_labels,
    sine_position_encoding,
    top_n_classes,
)


def d(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double()


def randomise_(module: torch.nn.Module, std: float = 0.1, seed: int = 0) -> None:
    """Perturb every parameter (γ, LN affines, zero biases included) so nothing is trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


# -- literal references (float64, the slow and obvious way) --------------------------------------------------------


def sine_reference(h: int, w: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """DETR's sine embedding: rows then columns, channel m of each half = sin/cos(coord / T^(2⌊m/2⌋/F))."""
    feats = dim // 2
    out = torch.zeros(h * w, dim, dtype=torch.float64)
    for i in range(h):
        for j in range(w):
            y = (i + 1) / (h + 1e-6) * 2 * math.pi
            x = (j + 1) / (w + 1e-6) * 2 * math.pi
            for half, coord in enumerate((y, x)):
                for m in range(feats):
                    phase = coord / temperature ** (2 * (m // 2) / feats)
                    out[i * w + j, half * feats + m] = math.sin(phase) if m % 2 == 0 else math.cos(phase)
    return out


def layer_norm(x: torch.Tensor, ln: torch.nn.LayerNorm) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * d(ln.weight) + d(ln.bias)


def cross_attention(q_in, k_in, v_in, mha: torch.nn.MultiheadAttention) -> torch.Tensor:
    """softmax(Q Kᵀ / √d_h) V per head, with the packed in-projection split into W_q, W_k, W_v."""
    c = q_in.shape[-1]
    heads = mha.num_heads
    dh = c // heads
    w, bias = d(mha.in_proj_weight), d(mha.in_proj_bias)
    q = q_in @ w[:c].T + bias[:c]
    k = k_in @ w[c : 2 * c].T + bias[c : 2 * c]
    v = v_in @ w[2 * c :].T + bias[2 * c :]
    outs = []
    for hd in range(heads):
        sl = slice(hd * dh, (hd + 1) * dh)
        scores = q[..., sl] @ k[..., sl].transpose(-1, -2) / math.sqrt(dh)
        att = torch.exp(scores - scores.max(-1, keepdim=True).values)
        att = att / att.sum(-1, keepdim=True)
        outs.append(att @ v[..., sl])
    return torch.cat(outs, -1) @ d(mha.out_proj.weight).T + d(mha.out_proj.bias)


def p2t_reference(module: P2Tformer, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Eqs. 5-6: out ← LN(out + Linear(CrossAttn(out, F + PE, F))) per layer; text' = text + γ ⊙ out."""
    b, c, h, w = image.shape
    tokens = d(image).flatten(2).transpose(1, 2)
    pos = sine_reference(h, w, c)
    text = d(text).unsqueeze(0).expand(b, -1, -1) if text.dim() == 2 else d(text)
    out = text
    for layer in module.layers:
        attended = cross_attention(out, tokens + pos, tokens, layer.attn)
        out = layer_norm(out + attended @ d(layer.proj.weight).T + d(layer.proj.bias), layer.norm)
    return text + d(module.gamma) * out


def conv_same(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Σ_c Σ_{a,b} kernel[c, a, b] · x[c, i + a - r, j + b - r] with zero padding, for one (C, H, W) map."""
    c, h, w = x.shape
    r = kernel.shape[-1] // 2
    xp = F.pad(x, (r, r, r, r))
    out = torch.zeros(h, w, dtype=x.dtype)
    for a in range(kernel.shape[-2]):
        for bb in range(kernel.shape[-1]):
            out += (kernel[:, a, bb, None, None] * xp[:, a : a + h, bb : bb + w]).sum(0)
    return out


def instance_norm_affine(x: torch.Tensor, norm: torch.nn.InstanceNorm2d) -> torch.Tensor:
    mu = x.mean(dim=(2, 3), keepdim=True)
    var = ((x - mu) ** 2).mean(dim=(2, 3), keepdim=True)
    scale, shift = d(norm.weight)[None, :, None, None], d(norm.bias)[None, :, None, None]
    return (x - mu) / torch.sqrt(var + norm.eps) * scale + shift


def projector_reference(module: T2PProjector, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Eq. 7: up, conv-norm-ReLU, up, conv-norm-ReLU, 1×1; then each class's generated kernel and bias."""
    v = module.vision
    x = d(image)
    x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    x = torch.relu(instance_norm_affine(F.conv2d(x, d(v[1].weight), padding=1), v[2]))
    x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    x = torch.relu(instance_norm_affine(F.conv2d(x, d(v[5].weight), padding=1), v[6]))
    x = F.conv2d(x, d(v[8].weight), d(v[8].bias))
    b, c = x.shape[:2]
    ks = module.kernel_size
    text = d(text).unsqueeze(0).expand(b, -1, -1) if text.dim() == 2 else d(text)
    params = text @ d(module.text.weight).T + d(module.text.bias)
    out = torch.zeros(b, text.shape[1], *x.shape[-2:], dtype=torch.float64)
    for i in range(b):
        for k in range(text.shape[1]):
            kernel = params[i, k, :-1].reshape(c, ks, ks)
            out[i, k] = conv_same(x[i], kernel) + params[i, k, -1]
    return out


def local_cost_reference(module: LocalCost, image: torch.Tensor, text: torch.Tensor, mode: str) -> torch.Tensor:
    """Eq. 10 with kernel normalisation: softmax over each channel's k² taps, renormalised to sum 1."""
    img = d(image) / d(image).norm(dim=1, keepdim=True)
    b, c, h, w = img.shape
    text = d(text).unsqueeze(0).expand(b, -1, -1) if text.dim() == 2 else d(text)
    t = text / text.norm(dim=-1, keepdim=True)
    params = t @ d(module.text.weight).T + d(module.text.bias)
    ks = module.kernel_size
    out = torch.zeros(b, t.shape[1], h, w, dtype=torch.float64)
    for i in range(b):
        for k in range(t.shape[1]):
            kernel = params[i, k, :-1].reshape(c, ks, ks)
            if module.kernel_norm:
                e = torch.exp(kernel - kernel.amax(dim=(1, 2), keepdim=True))
                kernel = e / e.sum(dim=(1, 2), keepdim=True)
                kernel = kernel / kernel.sum(dim=(1, 2), keepdim=True)
            if mode == "full":
                out[i, k] = conv_same(img[i], kernel)
            else:  # depthwise: filter every channel alone, then weigh the channels by the text
                per_channel = [conv_same(img[i, ch : ch + 1], kernel[ch : ch + 1]) for ch in range(c)]
                out[i, k] = sum(t[i, k, ch] * per_channel[ch] for ch in range(c))
            out[i, k] += params[i, k, -1]
    return out


# -- sine position encoding -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("grid", "dim"), [((3, 4), 8), ((5, 2), 16), ((1, 1), 4)])
def test_sine_position_encoding_matches_detr(grid, dim):
    out = sine_position_encoding(grid, dim)
    assert out.shape == (grid[0] * grid[1], dim)
    torch.testing.assert_close(out.double(), sine_reference(*grid, dim), atol=1e-6, rtol=0)


def test_sine_position_encoding_needs_width_divisible_by_4():
    with pytest.raises(ValueError, match="divisible by 4"):
        sine_position_encoding((2, 2), 6)


# -- P2Tformer ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layers", [1, 2])
def test_p2tformer_matches_eqs_5_6(layers):
    torch.manual_seed(0)
    module = P2Tformer(dim=16, heads=8, layers=layers)
    randomise_(module)
    image, text = torch.randn(2, 16, 3, 4), torch.randn(5, 16)
    out = module(image, text)
    assert out.shape == (2, 5, 16)
    torch.testing.assert_close(out.double(), p2t_reference(module, image, text), atol=1e-5, rtol=0)
    # per-image text in gives the same as the shared text expanded
    torch.testing.assert_close(module(image, text.expand(2, -1, -1)), out, atol=1e-6, rtol=0)


def test_p2tformer_gamma_starts_at_0_1_and_text_becomes_per_image():
    torch.manual_seed(0)
    module = P2Tformer(dim=32)
    assert len(module.layers) == 1 and module.layers[0].attn.num_heads == 8
    assert module.gamma.shape == (32,) and module.gamma.requires_grad
    assert torch.equal(module.gamma.detach(), torch.full((32,), 0.1))
    image, text = torch.randn(2, 32, 4, 4), torch.randn(3, 32)
    out = module(image, text)
    # two different images give two different text' for the same classes ...
    assert (out[0] - out[1]).abs().max() > 1e-2
    # ... whose offset from the text is 0.1 × a LayerNorm output (zero mean, unit variance per class)
    offset = (out - text) / 0.1
    torch.testing.assert_close(offset.mean(-1), torch.zeros(2, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(offset.var(-1, unbiased=False), torch.ones(2, 3), atol=1e-3, rtol=0)
    # γ = 0 gives back the CLIP text untouched
    with torch.no_grad():
        module.gamma.zero_()
    torch.testing.assert_close(module(image, text), text.expand(2, -1, -1))


def test_p2tformer_position_is_on_keys_only():
    """Swapping two image tokens changes the output only through the position encoding on the keys:
    without it (pos = 0) attention is permutation invariant over the tokens."""
    torch.manual_seed(0)
    module = P2Tformer(dim=16, heads=8)
    image, text = torch.randn(1, 16, 2, 2), torch.randn(3, 16)
    swapped = image.flip(-1)
    assert (module(image, text) - module(swapped, text)).abs().max() > 1e-4
    layer = module.layers[0]
    tokens = image.flatten(2).transpose(1, 2)
    no_pos = layer(text[None], tokens, torch.zeros(4, 16))
    no_pos_swapped = layer(text[None], swapped.flatten(2).transpose(1, 2), torch.zeros(4, 16))
    torch.testing.assert_close(no_pos, no_pos_swapped, atol=1e-6, rtol=0)


def test_p2tformer_rejects_bad_shapes():
    module = P2Tformer(dim=16)
    with pytest.raises(ValueError, match="channels"):
        module(torch.randn(1, 8, 2, 2), torch.randn(3, 16))
    with pytest.raises(ValueError, match="text"):
        module(torch.randn(2, 16, 2, 2), torch.randn(3, 3, 16))
    with pytest.raises(ValueError, match="divisible"):
        P2Tformer(dim=20, heads=8)


# -- T2P projector and loss ----------------------------------------------------------------------------------------


def test_t2p_projector_matches_eq_7():
    torch.manual_seed(0)
    module = T2PProjector(in_channels=8, text_dim=6)
    randomise_(module)
    assert module.channels == 4 and module.text.out_features == 4 * 9 + 1
    image, text = torch.randn(2, 8, 3, 2), torch.randn(2, 3, 6)
    out = module(image, text)
    assert out.shape == (2, 3, 12, 8)
    torch.testing.assert_close(out.double(), projector_reference(module, image, text), atol=1e-5, rtol=0)


def test_t2p_projector_normalises_each_image_alone():
    """Per-image statistics (the official BatchNorm at one image per GPU): a batch equals its images
    run one by one, so splitting a batch across DDP processes changes nothing."""
    torch.manual_seed(0)
    module = T2PProjector(in_channels=8, text_dim=6).train()
    randomise_(module)
    image, text = torch.randn(3, 8, 3, 3), torch.randn(4, 6)
    whole = module(image, text)
    alone = torch.cat([module(image[i : i + 1], text) for i in range(3)])
    torch.testing.assert_close(whole, alone, atol=2e-5, rtol=0)
    assert not any(n.endswith("running_mean") for n, _ in module.named_buffers())


def test_downsample_labels_is_pytorch_nearest():
    target = torch.arange(64).reshape(1, 8, 8)
    small = downsample_labels(target, (4, 4))
    assert torch.equal(small[0], target[0, ::2, ::2])  # source index floor(i · 8 / 4)
    assert small.dtype == target.dtype
    assert downsample_labels(target, (8, 8)) is target


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_t2p_losses_on_downsampled_labels_hand_computed():
    # 2 classes on a 2×2 map; labels at 4×4 whose nearest 2×2 pick is [[0, 1], [255, 2]] (2 = background).
    align = torch.tensor([[[[1.0, -2.0], [5.0, 0.5]], [[0.3, 0.8], [-9.0, -1.5]]]])
    full = torch.full((1, 4, 4), 7)  # 7 is never picked: it must not reach the loss
    full[0, 0, 0], full[0, 0, 2], full[0, 2, 0], full[0, 2, 2] = 0, 1, 255, 2
    target = downsample_labels(full, (2, 2))
    assert target.tolist() == [[[0, 1], [255, 2]]]
    # valid pixels (0,0): class 0; (0,1): class 1; (1,1): background
    bce_terms = [
        softplus(-1.0), softplus(0.3),
        softplus(-2.0), softplus(-0.8),
        softplus(0.5), softplus(-1.5),
    ]  # fmt: skip
    loss = T2P_LOSSES["bce"](align, target, ignore_index=255, background_index=2)
    assert loss.item() == pytest.approx(sum(bce_terms) / 6, rel=1e-6)
    mse_terms = [(1.0 - 1) ** 2, 0.3**2, (-2.0) ** 2, (0.8 - 1) ** 2, 0.5**2, (-1.5) ** 2]
    loss = T2P_LOSSES["mse"](align, target, ignore_index=255, background_index=2)
    assert loss.item() == pytest.approx(sum(mse_terms) / 6, rel=1e-6)
    # 255 relabelled as background (CAT-Seg's ignore_as_negative): pixel (1, 0) becomes a negative too
    relabelled = torch.where(target == 255, 2, target)
    loss = T2P_LOSSES["mse"](align, relabelled, ignore_index=-1, background_index=2)
    assert loss.item() == pytest.approx((sum(mse_terms) + 5.0**2 + 9.0**2) / 8, rel=1e-6)


# -- LCS ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["full", "depthwise"])
@pytest.mark.parametrize("kernel_size", [1, 3])
def test_local_cost_matches_eq_10(mode, kernel_size):
    torch.manual_seed(0)
    module = LocalCost(vision_dim=6, text_dim=6, embed_dim=4, kernel_size=kernel_size, mode=mode)
    randomise_(module, std=0.5)
    image, text = torch.randn(2, 6, 3, 4), torch.randn(2, 3, 6)
    out = module(image, text)
    assert out.shape == (2, 3, 3, 4)
    torch.testing.assert_close(out.double(), local_cost_reference(module, image, text, mode), atol=1e-5, rtol=0)


def test_local_cost_without_kernel_norm_uses_raw_kernels():
    torch.manual_seed(0)
    module = LocalCost(vision_dim=5, text_dim=7, embed_dim=4, kernel_norm=False)
    randomise_(module)
    image, text = torch.randn(1, 5, 4, 4), torch.randn(3, 7)
    torch.testing.assert_close(
        module(image, text).double(), local_cost_reference(module, image, text, "full"), atol=1e-5, rtol=0
    )


def test_depthwise_local_cost_with_1x1_kernel_is_cosine_plus_bias():
    torch.manual_seed(0)
    module = LocalCost(vision_dim=8, text_dim=8, embed_dim=4, kernel_size=1, mode="depthwise")
    image, text = torch.randn(2, 8, 3, 3), torch.randn(4, 8)
    bias = module.text(F.normalize(text, dim=-1))[:, -1]
    cosine = torch.einsum("bchw,kc->bkhw", F.normalize(image, dim=1), F.normalize(text, dim=-1))
    torch.testing.assert_close(module(image, text), cosine + bias[None, :, None, None], atol=1e-6, rtol=0)


def test_full_local_cost_with_1x1_kernel_is_the_same_map_for_every_class_up_to_its_bias():
    """The official full LCS normalises each channel's taps to sum 1, so a 1×1 kernel weighs every channel 1."""
    torch.manual_seed(0)
    module = LocalCost(vision_dim=8, text_dim=8, embed_dim=4, kernel_size=1, mode="full")
    image, text = torch.randn(2, 8, 3, 3), torch.randn(4, 8)
    bias = module.text(F.normalize(text, dim=-1))[:, -1]
    channel_sum = F.normalize(image, dim=1).sum(1, keepdim=True)
    torch.testing.assert_close(module(image, text), channel_sum + bias[None, :, None, None], atol=1e-6, rtol=0)


def test_local_cost_embedding_is_a_conv7x7_per_class():
    torch.manual_seed(0)
    module = LocalCost(vision_dim=4, text_dim=4, embed_dim=5)
    cost = torch.randn(2, 3, 6, 6)
    emb = module.embed(cost)
    assert emb.shape == (2, 5, 3, 6, 6)
    for b in range(2):
        for k in range(3):
            ref = F.conv2d(cost[b, k][None, None], module.embed_conv.weight, module.embed_conv.bias, padding=3)[0]
            torch.testing.assert_close(emb[b, :, k], ref, atol=1e-6, rtol=0)


def test_local_cost_options_are_checked():
    with pytest.raises(UnknownNameError, match="depthwise"):
        LocalCost(4, 4, 4, mode="sparse")
    with pytest.raises(ValueError, match="equal text and image widths"):
        LocalCost(4, 6, 4, mode="depthwise")
    with pytest.raises(ValueError, match="odd"):
        LocalCost(4, 4, 4, kernel_size=2)


# -- fusion and the fast decoder's pieces -----------------------------------------------------------------------


def test_cat_fusion_is_a_linear_over_concatenated_channels():
    torch.manual_seed(0)
    fusion = build_fusion("cat", 4, 3, 5)
    x, local = torch.randn(2, 4, 3, 2, 2), torch.randn(2, 3, 3, 2, 2)
    out = fusion(x, local)
    assert out.shape == (2, 5, 3, 2, 2)
    w, b = fusion.proj.weight, fusion.proj.bias
    ref = torch.einsum("oc,bckhw->bokhw", w[:, :4], x) + torch.einsum("oc,bckhw->bokhw", w[:, 4:], local)
    torch.testing.assert_close(out, ref + b[None, :, None, None, None], atol=1e-6, rtol=0)
    # 4-D maps (the decoder's (B·K, C, H, W)) go through the same Linear
    torch.testing.assert_close(fusion(x[:, :, 0], local[:, :, 0]), out[:, :, 0], atol=1e-6, rtol=0)


def test_add_fusion_sums_and_needs_equal_widths():
    fusion = build_fusion("add", 4, 4, 4)
    x, local = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    assert torch.equal(fusion(x, local), x + local)
    assert not list(fusion.parameters())
    with pytest.raises(ValueError, match="equal widths"):
        build_fusion("add", 8, 4, 4)
    with pytest.raises(UnknownNameError, match="cat"):
        build_fusion("concat", 4, 4, 4)


def test_class_scores_reshape_per_class_maps():
    head = torch.nn.Conv2d(3, 1, 3, padding=1)
    x = torch.randn(2 * 4, 3, 5, 5)
    out = class_scores(head, x, batch=2)
    assert out.shape == (2, 4, 5, 5)
    torch.testing.assert_close(out[1, 2], head(x[1 * 4 + 2 : 1 * 4 + 3])[0, 0])


def test_top_n_classes_is_the_union_of_per_pixel_top_n():
    scores = torch.full((2, 6, 1, 2), -5.0)
    scores[0, 1, 0, 0], scores[0, 4, 0, 0] = 3.0, 2.0  # image 0, pixel 0: classes 1 then 4
    scores[0, 2, 0, 1], scores[0, 5, 0, 1] = 1.0, 0.5  # image 0, pixel 1: classes 2 then 5
    scores[1, 3, 0, :] = 9.0  # image 1: class 3 first everywhere, then class 0 (lowest index among ties)
    assert top_n_classes(scores[:1], 1).tolist() == [1, 2]
    assert top_n_classes(scores[:1], 2).tolist() == [1, 2, 4, 5]
    assert 3 in top_n_classes(scores, 1).tolist() and top_n_classes(scores, 1).tolist()[:2] == [1, 2]
    assert torch.equal(top_n_classes(scores, 6), torch.arange(6))
    assert torch.equal(top_n_classes(scores, 60), torch.arange(6))
    with pytest.raises(ValueError, match="at least 1"):
        top_n_classes(scores, 0)


# -- the head: FGAseg's pieces wired into CAT-Seg's stages ---------------------------------------------------------
SIZES = dict(
    hidden_dim=16,
    heads=2,
    appearance_guidance_dim=8,
    text_guidance_dim=8,
    num_layers=1,
    window=2,
    pooling=(2, 2),
    pad_len=0,
    decoder_dims=(8, 4),
    decoder_guidance_dims=(6, 4),
    decoder_guidance_proj_dims=(4, 2),
)
CLIP_DIM, CLIP_WIDTH, GRID = 16, 12, (4, 4)


def small_fga_head(seed: int = 0, **overrides) -> FGASegHead:
    torch.manual_seed(seed)
    head = FGASegHead(CLIP_DIM, CLIP_WIDTH, **{**SIZES, **overrides})
    randomise_(head, std=0.05, seed=seed)
    return head.eval()


def head_inputs(b: int = 2, k: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(b, CLIP_DIM, *GRID, generator=g)
    text = F.normalize(torch.randn(k, 1, CLIP_DIM, generator=g), dim=-1)
    guidance = [torch.randn(b, CLIP_WIDTH, *GRID, generator=g) for _ in range(2)]
    return image, text, guidance


def fga_by_hand(head: FGASegHead, image, text, guidance, fusion: str = "cat", aux: list | None = None) -> torch.Tensor:
    """The official order (``FGA_seg_predictor`` + ``Decoder``), module by module: P2Tformer on the
    text; cosine cost (GCS) and local cost (LCS) of text', each embedded; fused; aggregated; LCS fused
    again before each upsampling stage (upsampled for the second); the 3×3 prediction conv. With
    ``aux``, the auxiliary heads' logits after each fusion (``Decoder_fast``) are appended to it."""
    b, k = image.shape[0], text.shape[0]

    def fuse(fusion_module, x, local):
        if fusion == "add":
            return x + local
        return (
            torch.cat([x, local], dim=1).movedim(1, -1) @ fusion_module.proj.weight.T + fusion_module.proj.bias
        ).movedim(-1, 1)

    text_p = head.p2t(image, text[:, 0])  # (B, K, C)
    unit = F.normalize(text_p, dim=-1)
    cost = torch.einsum("bchw,bkc->bkhw", F.normalize(image, dim=1), unit)
    gcs = head.cost_embed(cost.reshape(b * k, 1, *GRID)).reshape(b, k, -1, *GRID).transpose(1, 2)
    local = head.local_cost(image, text_p)
    lcs = head.local_cost.embed_conv(local.reshape(b * k, 1, *GRID))  # (B·K, hidden, h, w)
    x = fuse(head.cost_fusion, gcs, lcs.reshape(b, k, -1, *GRID).transpose(1, 2))
    if aux is not None:
        aux.append(head.aux_heads[0](x.transpose(1, 2).reshape(b * k, -1, *GRID)).reshape(b, k, *GRID))
    appearance = head.appearance_proj(image)
    text_guidance = head.text_proj(unit)
    for layer in head.layers:
        x = layer(x, appearance, text_guidance, head.eval_pooling)
    maps = x.transpose(1, 2).reshape(b * k, -1, *GRID)
    for i in range(2):
        g = head.decoder_guidance_proj[i](head.guidance_upsample[i](guidance[i]))
        if i:
            lcs = head.local_up[i - 1](lcs)
        maps = fuse(head.stage_fusion[i], maps, lcs)
        if aux is not None:
            aux.append(head.aux_heads[i + 1](maps).reshape(b, k, *maps.shape[-2:]))
        maps = head.decoder[i].conv(torch.cat([head.decoder[i].up(maps), g.repeat_interleave(k, dim=0)], dim=1))
    return head.predictor(maps).reshape(b, k, *maps.shape[-2:])


@pytest.mark.parametrize("fusion", ["cat", "add"])
def test_fga_head_follows_the_official_order(fusion):
    head = small_fga_head(fusion=fusion)
    image, text, guidance = head_inputs()
    with torch.no_grad():
        out, state = head(image, text, guidance, return_state=True)
        ref = fga_by_hand(head, image, text, guidance, fusion)
    assert out.shape == (2, 5, 16, 16)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert state.extras["aux"] == []  # no auxiliary heads without the fast decoder
    # text' is per image: the same classes get different embeddings in the two images
    assert (state.extras["text"][0] - state.extras["text"][1]).abs().max() > 1e-3


def test_fga_head_add_fusion_has_no_fusion_weights_and_needs_matching_widths():
    head = small_fga_head(fusion="add")
    assert not any("fusion" in n for n, _ in head.named_parameters())
    with pytest.raises(ValueError, match="equal widths"):
        FGASegHead(CLIP_DIM, CLIP_WIDTH, **{**SIZES, "decoder_dims": (6, 4)}, fusion="add")


def test_fga_head_fast_decoder_aux_logits_and_training_pass_keeps_every_class():
    head = small_fga_head(fast=True, top_n=1).train()
    image, text, guidance = head_inputs()
    out, state = head(image, text, guidance, return_state=True)
    assert out.shape == (2, 5, 16, 16) and (out > -100).all()  # no pruning in training
    assert [tuple(a.shape) for a in state.extras["aux"]] == [(2, 5, 4, 4), (2, 5, 4, 4), (2, 5, 8, 8)]
    assert [h.in_channels for h in head.aux_heads] == [16, 16, 8]
    # their values, in evaluation mode without pruning (training pools the class attention's input)
    head.eval().top_n = None
    with torch.no_grad():
        out, state = head(image, text, guidance, return_state=True)
        aux = []
        ref = fga_by_hand(head, image, text, guidance, aux=aux)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(state.extras["aux"], aux, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("top_n", [5, 9])
def test_fast_decoder_with_top_n_at_least_k_equals_the_full_decoder(top_n):
    fast = small_fga_head(fast=True, top_n=top_n)
    full = FGASegHead(CLIP_DIM, CLIP_WIDTH, **SIZES).eval()
    missing, unexpected = full.load_state_dict(fast.state_dict(), strict=False)
    assert not missing and all(k.startswith("aux_heads.") for k in unexpected)
    image, text, guidance = head_inputs(k=5)
    with torch.no_grad():
        assert torch.equal(fast(image, text, guidance), full(image, text, guidance))


def test_fast_decoder_prunes_to_the_per_pixel_top_n_union():
    head = small_fga_head(fast=True, top_n=1)
    image, text, guidance = head_inputs(b=1, k=6)
    with torch.no_grad():
        out, state = head(image, text, guidance, return_state=True)
        head.top_n = None  # the same weights without pruning
        full, full_state = head(image, text, guidance, return_state=True)
    # the first auxiliary scores (before the aggregator) are the same with and without pruning
    torch.testing.assert_close(state.extras["aux"][0], full_state.extras["aux"][0])
    kept_first = set(top_n_classes(full_state.extras["aux"][0], 1).tolist())
    kept = set((out[0] > -100).flatten(1).any(1).nonzero().flatten().tolist())
    assert kept and kept <= kept_first and len(kept_first) < 6
    assert torch.equal(state.selected[0], torch.tensor(sorted(kept)))
    assert (out[0, sorted(set(range(6)) - kept)] == -100).all()
