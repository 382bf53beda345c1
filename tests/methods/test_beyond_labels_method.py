"""The ``beyond_labels`` method: its logits and loss recomputed by hand from its parts, what trains, what a
checkpoint holds, and strict checkpoint loading."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_clip

from vocabseg.errors import CheckpointError
from vocabseg.methods import create_method

HEAD = dict(width=32, depth=1, heads=2, decoder_stages=2, fourier_frequencies=8)
TAU = 0.08


def build(init_seed: int = 0, clip_seed: int = 0, **options) -> torch.nn.Module:
    """A beyond_labels method on a private tiny CLIP (the method freezes its CLIP); ``init_seed`` seeds the
    head's initialisation, the ``seed`` option its Fourier frequencies."""
    torch.manual_seed(init_seed)
    return create_method("beyond_labels", make_tiny_clip(clip_seed), **{**HEAD, **options}).eval()


def unit_text(k: int = 3, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(k, 32, generator=torch.Generator().manual_seed(seed)), dim=-1)


def images(*size: int, b: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, *size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def method():
    return build()


def by_hand(method, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Unit dense CLIP features as (B, N, d) tokens -> head cosine -> bilinear upsampling to the image."""
    dense = method.dense(x)  # (B, d, h, w)
    b, d, h, w = dense.shape
    tokens = (dense / dense.norm(dim=1, keepdim=True)).reshape(b, d, h * w).transpose(1, 2)
    cos = method.head(tokens, (h, w), text)
    assert cos.shape == (b, text.shape[0], 4 * h, 4 * w)  # two decoder stages: x4
    return F.interpolate(cos, size=x.shape[-2:], mode="bilinear", align_corners=False)


def test_logits_equal_the_head_on_unit_dense_tokens(method):
    x, text = images(48, 80), unit_text()
    with torch.no_grad():
        got = method.logits(x, text)
        want = by_hand(method, x, text)
    assert got.shape == (2, 3, 48, 80)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert got.abs().max() <= 1 + 1e-5  # cosine similarities
    assert (got[:, 0] - got[:, 1]).abs().max() > 1e-3


def test_logits_with_padding_crop_the_padded_result(method):
    x, text = images(48, 80), unit_text()
    padded = torch.zeros(2, 3, 56, 112)
    padded[:, :, 4:52, 16:96] = x
    with torch.no_grad():
        got = method.logits(x, text, pad_multiple=56)
        want = by_hand(method, padded, text)[:, :, 4:52, 16:96]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_the_class_order_permutes_the_logits(method):
    """Nothing in the head depends on the class list's order (no per-class embeddings)."""
    x, text = images(64, 64, b=1), unit_text(k=4)
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        torch.testing.assert_close(method.logits(x, text[perm]), method.logits(x, text)[:, perm], atol=1e-5, rtol=1e-5)


def test_training_step_is_the_bce_of_cos_over_tau_and_only_the_head_learns():
    m = build().train()
    assert not m.clip.training and not m.dense.training and m.head.training  # CLIP stays in eval mode
    text = unit_text(k=3)
    x = images(48, 64)
    label = torch.randint(0, 4, (2, 48, 64), generator=torch.Generator().manual_seed(2))  # 3 = background
    label[:, :5] = 255
    with pytest.raises(RuntimeError, match="set_class_text"):
        m.training_step({"image": x, "label": label})
    m.set_class_text(text)
    assert m.class_text.requires_grad is False
    loss = m.training_step({"image": x, "label": label})["loss"]
    assert loss.ndim == 0 and torch.isfinite(loss)
    # BCE written out: one-hot targets (background = all zeros), ignored pixels left out, mean over pixels x K
    with torch.no_grad():
        m.head.eval()  # the head has no dropout or batch statistics: eval gives the same numbers
        z = by_hand(m, x, text) / TAU
        m.head.train()
        p = torch.sigmoid(z.double())
        onehot = (label[:, None] == torch.arange(3).view(1, 3, 1, 1)).double()
        per = -(onehot * torch.log(p) + (1 - onehot) * torch.log(1 - p))
        valid = (label != 255)[:, None].expand_as(per)
        want = per[valid].mean()
    torch.testing.assert_close(loss.double(), want, atol=1e-5, rtol=1e-5)
    loss.backward()
    head_grads = [p.grad for p in m.head.parameters()]
    assert all(g is not None for g in head_grads)
    assert sum(float(g.abs().sum()) for g in head_grads) > 0
    assert all(p.grad is None and not p.requires_grad for p in m.clip.parameters())
    assert all(p.grad is None for p in m.dense.parameters())
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("head.") for n in trainable)


def test_param_groups_hold_only_the_head(method):
    groups = method.param_groups()
    assert list(groups) == ["head"]
    assert {id(p) for p in groups["head"]} == {id(p) for p in method.head.parameters()}


def test_checkpoint_state_holds_the_head_unless_clip_is_stored():
    m = build()
    state = m.checkpoint_state()
    head = {f"head.{k}" for k in m.head.state_dict()}
    assert set(state) == head
    assert "head.fourier.frequencies" in state  # the random Fourier frequencies travel with the head
    for name, t in state.items():
        torch.testing.assert_close(t, m.state_dict()[name], atol=0, rtol=0)
        assert t.data_ptr() != m.state_dict()[name].data_ptr()  # a copy, not a view of the live weights
    m.store_clip = True
    stored = m.checkpoint_state()
    clip = {f"clip.{k}" for k in m.clip.state_dict()}
    assert set(stored) == head | clip
    assert not any(n.startswith("dense.") for n in stored)  # the dense method is CLIP under another name


def test_checkpoint_config():
    m = build(width=32, seed=7)
    m.clip_identity = {"model": "ViT-B-16", "pretrained": "openai"}
    config = m.checkpoint_config()
    assert config["method"] == "beyond_labels"
    assert config["options"] == {
        "dense": "clip",
        "width": 32,
        "depth": 1,
        "heads": 2,
        "decoder_stages": 2,
        "fourier": True,
        "fourier_frequencies": 8,
        "fourier_sigma": 10.0,
        "tau": TAU,
        "loss": "bce",
        "seed": 7,
        "fourier_mode": "add",
    }
    assert config["clip"] == {"model": "ViT-B-16", "pretrained": "openai"} and config["stores_clip"] is False
    json.dumps(config)  # writable as config.json


def test_round_trip_reproduces_the_logits_exactly():
    trained = build(init_seed=0)
    with torch.no_grad():  # "train" a little: move every head tensor away from its initialisation
        for p in trained.head.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    fresh = build(init_seed=1)
    x, text = images(64, 48), unit_text(k=4)
    with torch.no_grad():
        want = trained.logits(x, text)
        assert (fresh.logits(x, text) - want).abs().max() > 1e-3  # a different head before loading
        fresh.load_checkpoint_state(trained.checkpoint_state())
        torch.testing.assert_close(fresh.logits(x, text), want, atol=0, rtol=0)


def test_round_trip_with_clip_stored():
    trained = build(clip_seed=0)
    trained.store_clip = True
    fresh = build(clip_seed=5)
    fresh.store_clip = True
    x, text = images(48, 48), unit_text()
    with torch.no_grad():
        fresh.load_checkpoint_state(trained.checkpoint_state())
        torch.testing.assert_close(fresh.logits(x, text), trained.logits(x, text), atol=0, rtol=0)
        torch.testing.assert_close(fresh.clip.visual.conv1.weight, trained.clip.visual.conv1.weight, atol=0, rtol=0)


def test_a_head_only_method_refuses_a_checkpoint_without_clip_when_it_stores_clip():
    m = build()
    m.store_clip = True
    with pytest.raises(CheckpointError, match=r"missing \d+ tensor\(s\), e\.g\. clip\."):
        m.load_checkpoint_state(build().checkpoint_state())


@pytest.mark.parametrize("problem", ["missing", "extra", "shape"])
def test_strict_loading_errors(problem):
    m = build()
    before = {k: v.clone() for k, v in m.head.state_dict().items()}
    state = build(init_seed=3).checkpoint_state()
    if problem == "missing":
        del state["head.text_out.weight"]
        message = r"missing 1 tensor\(s\), e\.g\. head\.text_out\.weight"
    elif problem == "extra":
        state["head.bogus"] = torch.zeros(2)
        message = r"1 unexpected tensor\(s\), e\.g\. head\.bogus"
    else:
        state = build(width=64).checkpoint_state()
        message = r"shape mismatch: head\.\S+: checkpoint \(64, ?\d*\) vs model \(32, ?\d*\)"
    with pytest.raises(CheckpointError, match=message) as info:
        m.load_checkpoint_state(state)
    text = str(info.value)
    assert "'beyond_labels'" in text and '"width": 32' in text  # which method and head size it expected
    assert "another method, head size or CLIP model" in text
    for k, v in m.head.state_dict().items():  # nothing was loaded
        torch.testing.assert_close(v, before[k], atol=0, rtol=0)


def test_dense_must_be_training_free():
    with pytest.raises(ValueError, match="training-free"):
        create_method("beyond_labels", make_tiny_clip(), dense="beyond_labels", **HEAD)


def test_another_dense_method_changes_the_tokens():
    a, b = build(), build(dense="sclip")
    x, text = images(48, 48), unit_text()
    with torch.no_grad():
        assert (a.logits(x, text) - b.logits(x, text)).abs().max() > 1e-3
        torch.testing.assert_close(b.logits(x, text), by_hand(b, x, text), atol=1e-5, rtol=1e-5)


def test_fourier_replacing_clip_positions_is_trained_through_the_frozen_encoder():
    """``fourier_mode="replace_clip_pos"`` (Eq. 2 read literally): CLIP's patch position embeddings are
    replaced by the trainable Fourier embedding; CLIP stays frozen but passes gradients to it."""
    method = build(fourier_mode="replace_clip_pos").train()
    assert method.head.fourier is None and method.clip_position is not None
    x = images(64, 64)
    tower = method.dense.tower
    with torch.no_grad():  # the tower now takes CLS from CLIP and patches from the Fourier module
        pos = tower.positional_embedding((4, 4))
        torch.testing.assert_close(pos[0], tower.visual.positional_embedding[0])
        torch.testing.assert_close(pos[1:], method.clip_position((4, 4)))
        before = method.logits(x, unit_text())
        tower.visual.positional_embedding[1:].add_(1.0)  # CLIP's own patch positions are no longer used
        torch.testing.assert_close(method.logits(x, unit_text()), before)
    method.set_class_text(unit_text(k=2))
    target = torch.randint(0, 3, (2, 64, 64))
    method.training_step({"image": x, "label": target})["loss"].backward()
    assert method.clip_position.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in method.clip.parameters())
    assert "clip_position.proj.weight" in method.checkpoint_state()
    assert set(method.param_groups()) == {"head"}
    with pytest.raises(ValueError, match="fourier_mode"):
        build(fourier_mode="concat")
