"""ViL-Seg's heads and losses against literal re-computations: IIC (the paper's Eq. 7-8 and IIC's reference
``IID_segmentation_loss``), CLIP's InfoNCE (Eqs. 3-4, symmetric; gathered over 2 gloo processes), DINO's
loss and centring, the projection heads, and the clustering transform g with its inverse."""

from __future__ import annotations

import math
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from vocabseg.heads.vilseg import (
    LOGIT_SCALE_INIT,
    ClusterHead,
    DINOHead,
    LinearHead,
    build_projection_head,
    contrastive_loss,
    dino_loss,
    iic_joint,
    iic_loss,
    photometric_flip,
    unflip,
    update_center,
)


def probs(b: int, c: int, h: int, w: int, seed: int, sharp: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.softmax(sharp * torch.randn(b, c, h, w, generator=g, dtype=torch.float64), dim=1)


def one_hot_maps(labels: torch.Tensor, c: int) -> torch.Tensor:
    return F.one_hot(labels, c).permute(0, 3, 1, 2).double()


# -- IIC -----------------------------------------------------------------------------------------------
def paper_iic(p1: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
    """Eq. 7 (J = mean over pixels of φ φ'ᵀ), symmetrised as IIC does, and −I(J) of Eq. 8 with
    J_c, J_c' the row and column sums; pixel by pixel, the slow way."""
    b, c, h, w = p1.shape
    joint = torch.zeros(c, c, dtype=p1.dtype)
    for n in range(b):
        for y in range(h):
            for x in range(w):
                joint = joint + torch.outer(p1[n, :, y, x], p2[n, :, y, x])
    joint = joint / (b * h * w)
    joint = (joint + joint.t()) / 2
    total = torch.zeros((), dtype=p1.dtype)
    for i in range(c):
        for j in range(c):
            ji, jj = joint[i].sum(), joint[:, j].sum()
            jij = joint[i, j]
            if jij > 0:
                total = total + jij * torch.log(jij / (ji * jj))
    return -total


def reference_iic(x1: torch.Tensor, x2: torch.Tensor, lamb: float = 1.0, half_t: int = 0) -> torch.Tensor:
    """IIC's ``IID_segmentation_loss`` (xu-ji/IIC, code/utils/segmentation/IID_losses.py), no mask or affine
    transform: conv2d over a (2T+1)² displacement window, normalised by the (detached) total,
    symmetrised, clamped in place at EPS, λ-weighted marginals."""
    x1 = x1.permute(1, 0, 2, 3).contiguous()
    x2 = x2.permute(1, 0, 2, 3).contiguous()
    p_i_j = F.conv2d(x1, weight=x2, padding=(half_t, half_t))
    p_i_j = p_i_j.sum(dim=2, keepdim=False).sum(dim=2, keepdim=False)
    current_norm = p_i_j.sum().item()
    p_i_j = p_i_j / current_norm
    p_i_j = (p_i_j + p_i_j.t()) / 2.0
    p_i_mat = p_i_j.sum(dim=1).unsqueeze(1)
    p_j_mat = p_i_j.sum(dim=0).unsqueeze(0)
    p_i_j = p_i_j.clone()
    p_i_j[(p_i_j < sys.float_info.epsilon).data] = sys.float_info.epsilon
    p_i_mat = p_i_mat.clone()
    p_j_mat = p_j_mat.clone()
    p_i_mat[(p_i_mat < sys.float_info.epsilon).data] = sys.float_info.epsilon
    p_j_mat[(p_j_mat < sys.float_info.epsilon).data] = sys.float_info.epsilon
    return (-p_i_j * (torch.log(p_i_j) - lamb * torch.log(p_i_mat) - lamb * torch.log(p_j_mat))).sum()


def test_iic_equals_the_papers_equation_and_iics_reference_code():
    p1, p2 = probs(2, 4, 3, 5, seed=0), probs(2, 4, 3, 5, seed=1)
    got = iic_loss(p1, p2)
    torch.testing.assert_close(got.double(), paper_iic(p1, p2), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got.double(), reference_iic(p1, p2), atol=1e-6, rtol=1e-6)
    assert -math.log(4) <= float(got) < 0  # −I, and I is at most ln C


def test_iic_gradients_equal_the_references():
    a, b = probs(2, 3, 4, 4, seed=2), probs(2, 3, 4, 4, seed=3)
    grads = []
    for fn in (iic_loss, paper_iic, reference_iic):
        x1, x2 = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
        fn(x1, x2).backward()
        grads.append((x1.grad, x2.grad))
    for g1, g2 in grads[1:]:
        torch.testing.assert_close(grads[0][0].double(), g1, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(grads[0][1].double(), g2, atol=1e-6, rtol=1e-5)


def test_iic_displacement_window_equals_the_reference():
    p1, p2 = probs(2, 3, 5, 6, seed=4), probs(2, 3, 5, 6, seed=5)
    torch.testing.assert_close(
        iic_loss(p1, p2, window=1).double(), reference_iic(p1, p2, half_t=1), atol=1e-6, rtol=1e-6
    )
    # λ other than 1 as the reference weights the marginals
    torch.testing.assert_close(iic_loss(p1, p2, lamb=1.5).double(), reference_iic(p1, p2, 1.5), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(iic_loss(p1, p2, window=1), iic_loss(p1, p2))


@pytest.mark.parametrize("c", [2, 5, 25])
def test_perfectly_correlated_assignments_reach_minus_ln_c(c):
    """Identical one-hot assignments with every cluster equally often: J = I/C, marginals 1/C, so
    I(J) = Σ_c (1/C) ln((1/C) / (1/C²)) = ln C; the EPS-clamped zeros add ~C²·EPS·ln(1/EPS), nothing."""
    labels = torch.arange(c * 4).remainder(c).view(1, 2, 2 * c)
    p = one_hot_maps(labels, c)
    loss = iic_loss(p, p)
    assert abs(float(loss) + math.log(c)) < 1e-9
    torch.testing.assert_close(iic_joint(p, p).double(), torch.eye(c, dtype=torch.float64) / c)


@pytest.mark.parametrize("c", [2, 5])
def test_independent_assignments_give_zero(c):
    """Every (c, c') pair of one-hot assignments once: J = 1/C² = J_c J_c', so I(J) = 0; and a soft
    assignment u at every pixel in both views: J = u uᵀ, again the product of its marginals."""
    first, second = torch.meshgrid(torch.arange(c), torch.arange(c), indexing="ij")
    p1, p2 = one_hot_maps(first.reshape(1, 1, -1), c), one_hot_maps(second.reshape(1, 1, -1), c)
    assert abs(float(iic_loss(p1, p2))) < 1e-9
    u = F.softmax(torch.randn(c, generator=torch.Generator().manual_seed(6), dtype=torch.float64), 0)
    soft = u.view(1, c, 1, 1).expand(2, c, 3, 3)
    assert abs(float(iic_loss(soft, soft))) < 1e-9
    assert float(iic_loss(p1, p1)) < -0.5  # the same maps paired with themselves do carry information


def test_iic_refuses_mismatched_maps():
    with pytest.raises(ValueError, match="one shape"):
        iic_loss(probs(1, 3, 2, 2, 0), probs(1, 3, 2, 3, 0))


def test_the_flip_is_undone_before_pairing():
    """g(x) = colour change + flip of x; the second view's outputs, flipped back, pair with x's pixel by
    pixel: for a per-pixel head on a colour-invariant input the two maps are then identical."""
    x = torch.randn(4, 3, 5, 7, generator=torch.Generator().manual_seed(7))
    flags = iter([torch.tensor([0.1, 0.6, 0.2, 0.9])])  # the flip draw: images 0 and 2 flip

    def rand(*shape, **kw):
        return next(flags) if shape == (4,) else torch.full(shape, 0.5, **kw)  # 0.5: a = 1, b = 0

    gx, flipped = photometric_flip(x, rand=rand)
    assert flipped.tolist() == [True, False, True, False]
    torch.testing.assert_close(gx[0], x[0].flip(-1))
    torch.testing.assert_close(gx[1], x[1])
    torch.testing.assert_close(unflip(gx, flipped), x)


def test_the_colour_change_is_per_image_and_channel_affine():
    x = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(8))
    torch.manual_seed(0)
    gx, flipped = photometric_flip(x, flip_prob=0.0)
    assert not flipped.any()
    for n in range(3):
        for ch in range(3):
            a, b = torch.linalg.lstsq(
                torch.stack([x[n, ch].flatten(), torch.ones(16)], 1), gx[n, ch].flatten()
            ).solution
            torch.testing.assert_close(gx[n, ch], a * x[n, ch] + b, atol=1e-5, rtol=1e-5)
            assert 0.6 - 1e-6 <= float(a) <= 1.4 + 1e-6 and abs(float(b)) <= 0.4 + 1e-6


def test_cluster_head_is_a_1x1_convolution_and_softmax():
    head = ClusterHead(8, clusters=3, overcluster=True)
    feats = torch.randn(2, 8, 4, 5)
    main, over = head.all_heads(feats)
    assert main.shape == (2, 3, 4, 5) and over.shape == (2, 9, 4, 5)
    w, bias = head.main.weight[:, :, 0, 0], head.main.bias
    literal = torch.softmax(torch.einsum("kd,bdhw->bkhw", w, feats) + bias.view(1, 3, 1, 1), dim=1)
    torch.testing.assert_close(head(feats), literal, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(main, literal, atol=1e-6, rtol=1e-6)
    assert ClusterHead(8, 3).over is None and len(ClusterHead(8, 3).all_heads(feats)) == 1


# -- DINO ---------------------------------------------------------------------------------------------
def test_dino_loss_and_centring_are_dinos():
    g = torch.Generator().manual_seed(9)
    student, teacher = torch.randn(3, 6, 10, generator=g), torch.randn(3, 10, generator=g)
    center = torch.randn(1, 10, generator=g)
    total = 0.0
    for n in range(3):
        q = torch.exp((teacher[n] - center[0]) / 0.04)
        q = q / q.sum()
        for v in range(6):
            log_p = student[n, v] / 0.1 - torch.logsumexp(student[n, v] / 0.1, 0)
            total += float(-(q * log_p).sum())
    got = dino_loss(student, teacher, center, student_temp=0.1, teacher_temp=0.04)
    assert abs(float(got) - total / 18) < 1e-4
    before = center.clone()
    update_center(center, teacher, momentum=0.9)
    torch.testing.assert_close(center, 0.9 * before + 0.1 * teacher.mean(0, keepdim=True))


def test_dino_loss_trains_the_student_only():
    student = torch.randn(2, 6, 8, requires_grad=True)
    teacher = torch.randn(2, 8, requires_grad=True)
    dino_loss(student, teacher, torch.zeros(1, 8), 0.1, 0.04).backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None


def test_projection_heads():
    torch.manual_seed(0)
    head = DINOHead(16, out_dim=32, hidden=24, bottleneck=8)
    x = torch.randn(5, 16)
    m = head.mlp
    hidden = F.gelu(m[2](F.gelu(m[0](x))))
    z = m[4](hidden)
    z = z / z.norm(dim=-1, keepdim=True)
    v = head.last_layer.weight
    literal = z @ (v / v.norm(dim=1, keepdim=True)).t()  # weight norm with g = 1
    torch.testing.assert_close(head(x), literal, atol=1e-6, rtol=1e-6)
    assert head(x).abs().max() <= 1 + 1e-6  # cosines with unit prototypes
    assert [tuple(lin.weight.shape) for lin in (m[0], m[2], m[4])] == [(24, 16), (24, 24), (8, 24)]
    linear = build_projection_head("linear", 16, 32, 0, 0)
    assert isinstance(linear, LinearHead)
    torch.testing.assert_close(linear(x), x @ linear.proj.weight.t() + linear.proj.bias)
    assert isinstance(build_projection_head("dino", 16, 32, 24, 8), DINOHead)


# -- InfoNCE ------------------------------------------------------------------------------------------
def literal_infonce(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Eqs. 3-4 (cosine / τ, averaged over the b positive pairs), image → text and text → image."""
    b = image.shape[0]
    s = torch.exp(logit_scale).clamp(max=100)
    cos = torch.stack(
        [torch.stack([F.cosine_similarity(image[m], text[n], dim=0) for n in range(b)]) for m in range(b)]
    )
    i2t = sum(-torch.log(torch.exp(s * cos[m, m]) / torch.exp(s * cos[m]).sum()) for m in range(b)) / b
    t2i = sum(-torch.log(torch.exp(s * cos[n, n]) / torch.exp(s * cos[:, n]).sum()) for n in range(b)) / b
    return (i2t + t2i) / 2


def test_infonce_is_clips_symmetric_loss():
    g = torch.Generator().manual_seed(10)
    image, text = torch.randn(5, 12, generator=g), torch.randn(5, 12, generator=g)
    scale = torch.tensor(LOGIT_SCALE_INIT)
    torch.testing.assert_close(contrastive_loss(image, text, scale), literal_infonce(image, text, scale))
    big = torch.tensor(math.log(1000.0))  # the scale is capped at 100
    torch.testing.assert_close(
        contrastive_loss(image, text, big), contrastive_loss(image, text, torch.tensor(math.log(100.0)))
    )
    assert abs(LOGIT_SCALE_INIT - math.log(1 / 0.07)) < 1e-12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Towers(torch.nn.Module):
    """Two linear "encoders" and a logit scale: InfoNCE's gradients reach parameters through the gathers."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.image, self.text = torch.nn.Linear(6, 4), torch.nn.Linear(5, 4)
        self.logit_scale = torch.nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return contrastive_loss(self.image(x), self.text(t), self.logit_scale)


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return (
        torch.randn(8, 6, generator=g),
        torch.randn(8, 5, generator=g),
        torch.randn(8, 4, generator=g),
        torch.randn(8, 4, generator=g),
    )


def _cluster_maps() -> tuple[torch.Tensor, torch.Tensor]:
    return probs(4, 3, 3, 3, seed=12).float(), probs(4, 3, 3, 3, seed=13).float()


def _gathered_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x, t, img, txt = _inputs()
        rows = slice(rank * 4, rank * 4 + 4)
        feats = (img[rows].clone().requires_grad_(True), txt[rows].clone().requires_grad_(True))
        loss = contrastive_loss(*feats, torch.tensor(LOGIT_SCALE_INIT))
        loss.backward()
        model = torch.nn.parallel.DistributedDataParallel(_Towers())
        model(x[rows], t[rows]).backward()
        grads = {n: p.grad for n, p in model.module.named_parameters()}
        p1, p2 = _cluster_maps()
        maps = (p1[rank * 2 : rank * 2 + 2].clone().requires_grad_(True), p2[rank * 2 : rank * 2 + 2].clone())
        iic = iic_loss(*maps)
        iic.backward()
        center = torch.zeros(1, 4)
        update_center(center, img[rows], momentum=0.9)
        result = {"loss": loss.detach(), "feature_grads": [f.grad for f in feats], "param_grads": grads}
        result.update(iic=iic.detach(), iic_grad=maps[0].grad, center=center)
        torch.save(result, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_batch_losses_over_two_processes_equal_one_process(tmp_path):
    """Two gloo processes with half a batch each. InfoNCE: each computes the loss of all 8 pairs (the
    negatives of both), equal to one process's. Each process's gradient on its own rows is world × the
    one-process gradient (every process's loss is the whole loss), so DDP's average over processes gives
    the one-process parameter gradients exactly, which the DDP-wrapped towers show. IIC's joint
    distribution and DINO's centre are likewise over the whole batch."""
    mp.spawn(_gathered_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    x, t, img, txt = _inputs()
    feats = (img.clone().requires_grad_(True), txt.clone().requires_grad_(True))
    single = contrastive_loss(*feats, torch.tensor(LOGIT_SCALE_INIT))
    single.backward()
    towers = _Towers()
    towers(x, t).backward()
    for rank in (0, 1):
        got = torch.load(tmp_path / f"{rank}.pt")
        torch.testing.assert_close(got["loss"], single.detach())
        rows = slice(rank * 4, rank * 4 + 4)
        for g, f in zip(got["feature_grads"], feats):
            torch.testing.assert_close(g / 2, f.grad[rows], atol=1e-7, rtol=1e-5)
        for name, p in towers.named_parameters():
            torch.testing.assert_close(got["param_grads"][name], p.grad, atol=1e-7, rtol=1e-5)
    p1, p2 = _cluster_maps()
    p1.requires_grad_(True)
    whole = iic_loss(p1, p2)
    whole.backward()
    center = torch.zeros(1, 4)
    update_center(center, img, momentum=0.9)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"{rank}.pt")
        torch.testing.assert_close(got["iic"], whole.detach())
        torch.testing.assert_close(got["iic_grad"] / 2, p1.grad[rank * 2 : rank * 2 + 2], atol=1e-7, rtol=1e-5)
        torch.testing.assert_close(got["center"], center)
