"""The ``fgaseg`` method: CAT-Seg's features through FGAseg's head, its loss recomputed from its parts, the fast
decoder's top-N pruning, what trains and what a checkpoint holds, and the trainer's learning / resume / DDP checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_clip
from train.catseg_setup import prepared

from vocabseg.errors import CheckpointError, MethodOptionError, UnknownNameError
from vocabseg.heads.fgaseg import FGASegHead
from vocabseg.methods import create_method, get_method_spec

SETUP = Path(__file__).parents[1] / "train" / "fgaseg_setup.py"
#: the contract test's tiny sizes: the tiny CLIP (3 blocks, patch 16) at a 4×4 grid, window 2 (shifted)
HEAD = dict(
    feature_grid=4, window=2, hidden_dim=16, heads=2, appearance_guidance_dim=8, text_guidance_dim=8, pad_len=8,
    decoder_dims=(16, 16), decoder_guidance_dims=(16, 8), decoder_guidance_proj_dims=(8, 4),
)  # fmt: skip
TOL = dict(atol=1e-5, rtol=1e-5)
QKV = "attn.parametrizations.in_proj_weight.original"


def build(init_seed: int = 0, clip_seed: int = 0, **options) -> torch.nn.Module:
    clip = make_tiny_clip(clip_seed)
    torch.manual_seed(init_seed)
    return create_method("fgaseg", clip, **{**HEAD, **options}).eval()


def unit_text(k: int = 3, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(k, 1, 32, generator=torch.Generator().manual_seed(seed)), dim=-1)


def images(*size: int, b: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, *size, generator=torch.Generator().manual_seed(seed))


def same_weights(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """Copy ``source``'s weights into ``target``; only the fast decoder's auxiliary heads may be left over."""
    missing, unexpected = target.load_state_dict(source.state_dict(), strict=False)
    assert all(".aux_heads." in k for k in [*missing, *unexpected]), (missing, unexpected)


@pytest.fixture(scope="module")
def method():
    return build()


# -- the spec and the head ----------------------------------------------------------------------------------------


def test_spec_is_catseg_s_inference_protocol_and_template():
    spec, catseg = get_method_spec("fgaseg"), get_method_spec("catseg")
    assert spec.trainable and spec.defaults == catseg.defaults
    assert (spec.text_input, spec.templates) == (catseg.text_input, catseg.templates)
    assert "prompt_channels" not in spec.options  # P2Tformer refines one embedding per class
    for name, default in dict(
        fusion="cat", lcs="full", lcs_kernel=3, kernel_norm=True, p2t_layers=1, t2p_loss="bce", t2p_weight=0.02,
        fast_decoder=False, top_n=None, aux_weights=(0.2, 1.0, 1.0),
    ).items():  # fmt: skip
        assert spec.options[name] == default, name
    assert {k: v for k, v in spec.options.items() if k in catseg.options} == {
        k: v for k, v in catseg.options.items() if k != "prompt_channels"
    }


def test_the_head_is_fgaseg_s_with_catseg_s_widths(method):
    head = method.head
    assert isinstance(head, FGASegHead) and head.prompt_channels == 1
    assert head.p2t.dim == 32 and len(head.p2t.layers) == 1 and head.local_cost.mode == "full"
    assert head.text_proj[0].in_features == 32 and head.guidance_upsample[0].in_channels == 64  # CLIP's widths
    assert head.aux_heads is None and head.top_n is None
    fast = build(fast_decoder=True).head
    assert len(fast.aux_heads) == 3 and fast.top_n == 16  # the official select_topk
    assert build(fast_decoder=True, top_n=4).head.top_n == 4


def test_logits_are_the_fgaseg_head_on_catseg_s_features(method):
    x, text = images(48, 80), unit_text()
    with torch.no_grad():
        got = method.logits(x, text)
        dense, guidance = method.image_features(F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False))
        out, state = method.head(dense, text, guidance, return_state=True)
        want = F.interpolate(out, size=(48, 80), mode="bilinear", align_corners=False)
    assert got.shape == (2, 3, 48, 80)
    torch.testing.assert_close(got, want, **TOL)
    # the per-image text': the same classes embedded differently in the two images
    assert state.extras["text"].shape == (2, 3, 32)
    assert (state.extras["text"][0] - state.extras["text"][1]).abs().max() > 1e-3


def test_options_are_checked_with_clear_errors():
    with pytest.raises(MethodOptionError, match="fast_decoder=True"):
        build(top_n=8)
    with pytest.raises(MethodOptionError, match="one weight per auxiliary head"):
        build(fast_decoder=True, aux_weights=(0.2, 1.0))
    with pytest.raises(UnknownNameError, match="mse"):
        build(t2p_loss="l2")
    with pytest.raises(UnknownNameError, match="cat"):
        build(fusion="concat")
    with pytest.raises(UnknownNameError, match="depthwise"):
        build(lcs="grouped")
    with pytest.raises(ValueError, match="add fusion needs equal widths"):
        build(fusion="add")  # decoder_dims[0] = 16 is not hidden_dim / 2 = 8
    assert build(fusion="add", decoder_dims=(8, 8)).head.stage_fusion[0].__class__.__name__ == "AddFusion"


# -- the fast decoder ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [3, 5])
def test_fast_decoder_with_top_n_at_least_k_equals_the_full_decoder(k):
    fast, full = build(fast_decoder=True, top_n=k), build(init_seed=1)
    same_weights(fast, full)
    x, text = images(64, 64, b=3), unit_text(k=k)
    with torch.no_grad():
        torch.testing.assert_close(fast.logits(x, text), full.logits(x, text), **TOL)


def test_pruning_keeps_per_pixel_top_n_classes_per_image():
    model = build(fast_decoder=True, top_n=1)
    x, text = images(64, 64, b=3, seed=4), unit_text(k=6, seed=3)
    with torch.no_grad():
        out = model.class_logits(x, text)
        alone = torch.cat([model.class_logits(x[i : i + 1], text) for i in range(3)])
    torch.testing.assert_close(out, alone, atol=0, rtol=0)  # an image's classes are its own
    dropped = (out == -100).flatten(2).all(-1)  # (B, K): classes pruned away
    assert dropped.any(dim=1).all() and not dropped.all(dim=1).any()
    assert ((out > -100).flatten(2).all(-1) | dropped).all()  # a class is kept everywhere or nowhere
    # without pruning (training mode runs every class), nothing is dropped
    model.head.top_n = None
    with torch.no_grad():
        assert (model.class_logits(x, text) > -100).all()


# -- training --------------------------------------------------------------------------------------------------------


def literal_bce(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Official loss: sigmoid BCE against one-hot targets, ignored (255) pixels all-zero targets."""
    k = logits.shape[1]
    p = torch.sigmoid(logits.double())
    onehot = (label[:, None] == torch.arange(k).view(1, k, 1, 1)).double()
    return (-(onehot * torch.log(p) + (1 - onehot) * torch.log(1 - p))).mean()


def literal_mse(align: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Eq. 8 with the same targets."""
    k = align.shape[1]
    onehot = (label[:, None] == torch.arange(k).view(1, k, 1, 1)).double()
    return ((align.double() - onehot) ** 2).mean()


def nearest(label: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Pixel (i, j) of an (h, w) map takes label (⌊i·H/h⌋, ⌊j·W/w⌋) (the official nearest resize)."""
    rows = [i * label.shape[1] // h for i in range(h)]
    cols = [j * label.shape[2] // w for j in range(w)]
    return label[:, rows][:, :, cols]


@pytest.mark.parametrize(("fast", "kind"), [(False, "bce"), (True, "bce"), (False, "mse")])
def test_training_step_is_bce_plus_weighted_t2p_and_auxiliary_losses(fast, kind):
    model = prepared(build(fast_decoder=fast, t2p_loss=kind)).train()
    x = images(48, 48)
    label = torch.randint(0, 3, (2, 40, 56), generator=torch.Generator().manual_seed(2))
    label[:, :6] = 255
    out = model.training_step({"image": x, "label": label})
    with torch.no_grad():  # the same forward pass (training mode: 2×2 pooling), then the terms written out
        dense, guidance = model.image_features(x)
        logits, state = model.head(dense, model.text_features(model.encode_class_text()), guidance, return_state=True)
        up = lambda t: F.interpolate(t, size=(40, 56), mode="bilinear", align_corners=False)  # noqa: E731
        align = model.head.t2p(dense, state.extras["text"])
        assert align.shape == (2, 3, 16, 16)  # 4× the 4×4 grid
        small = nearest(label, 16, 16)
        want = {
            "loss_seg": literal_bce(up(logits), label),
            "loss_t2p": (literal_bce if kind == "bce" else literal_mse)(align, small),
        }
        weights = {"loss_seg": 1.0, "loss_t2p": 0.02}
        if fast:
            assert [tuple(a.shape[-2:]) for a in state.extras["aux"]] == [(4, 4), (4, 4), (8, 8)]
            for i, (aux, weight) in enumerate(zip(state.extras["aux"], (0.2, 1.0, 1.0))):
                want[f"loss_aux{i}"], weights[f"loss_aux{i}"] = literal_bce(up(aux), label), weight
    assert set(out) == {"loss", *want}
    for name, value in want.items():
        torch.testing.assert_close(out[name].double(), value, **TOL, msg=name)
    total = sum(weights[n] * v for n, v in want.items())
    torch.testing.assert_close(out["loss"].double(), total, **TOL)


def test_every_head_parameter_and_only_q_v_of_clip_get_gradients():
    """No parameter is left without a gradient (DDP would refuse it): P2Tformer, T2P projector, LCS, fusions,
    LCS upsampler and auxiliary heads all reach the loss."""
    model = prepared(build(fast_decoder=True)).train()
    label = torch.randint(0, 3, (2, 32, 32), generator=torch.Generator().manual_seed(2))
    model.training_step({"image": images(64, 64), "label": label})["loss"].backward()
    head = dict(model.head.named_parameters())
    assert {n.split(".")[0] for n in head} >= {
        "p2t", "t2p", "local_cost", "cost_fusion", "stage_fusion", "local_up", "aux_heads",
    }  # fmt: skip
    no_grad = [n for n, p in head.items() if p.grad is None or p.grad.abs().sum() == 0]
    assert not no_grad, no_grad
    groups = model.param_groups()
    assert {id(p) for p in groups["head"]} == {id(p) for p in model.head.parameters()}
    clip = [n for n, p in model.named_parameters() if p.requires_grad and n.startswith("clip.")]
    assert clip and all(n.endswith((f"{QKV}0", f"{QKV}2")) for n in clip)  # Q and V only, as CAT-Seg


# -- checkpoints ------------------------------------------------------------------------------------------------------


def test_checkpoint_round_trip_reproduces_the_logits_and_loading_is_strict():
    trained = build(fast_decoder=True, top_n=2)
    with torch.no_grad():  # "train": move the head and CLIP's Q/V away from their initialisation
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    state = trained.checkpoint_state()
    assert {n for n in state if n.startswith("head.")} == {f"head.{k}" for k in trained.head.state_dict()}
    assert "head.p2t.gamma" in state and any(n.startswith("head.aux_heads.") for n in state)
    config = trained.checkpoint_config()
    assert config["method"] == "fgaseg" and config["options"]["fast_decoder"] and config["options"]["top_n"] == 2
    json.dumps(config)
    fresh = build(init_seed=1, fast_decoder=True, top_n=2)
    x, text = images(64, 48), unit_text(k=4)
    with torch.no_grad():
        want = trained.logits(x, text)
        assert (fresh.logits(x, text) - want).abs().max() > 1e-3
        fresh.load_checkpoint_state(state)
        torch.testing.assert_close(fresh.logits(x, text), want, atol=0, rtol=0)
    with pytest.raises(CheckpointError, match="aux_heads"):
        build().load_checkpoint_state(state)  # a fast-decoder checkpoint does not fit the plain decoder


# -- the trainer ------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_resume_after_sigkill_is_exact(tmp_path):
    from train.harness import check_sigkill_resume

    state = check_sigkill_resume(tmp_path, f"{SETUP}:setup", kill_at=((0, 3, 0.0),), step_delay=0.3)
    assert any(QKV in k for k in state) and "head.p2t.gamma" in state and "head.aux_heads.0.weight" in state


@pytest.mark.slow
def test_two_ddp_processes_equal_one_process_with_twice_the_batch(tmp_path):
    """Every loss term (BCE, T2P, auxiliary) is a mean of per-image losses and the T2P projector normalises each
    image alone, so a batch split over two processes trains exactly like one process (within rounding: the
    official BatchNorm in the projector would differ by ~1.5e-5 here)."""
    from train import fgaseg_setup
    from train.harness import check_ddp_equals_single

    ddp, one = check_ddp_equals_single(tmp_path, f"{SETUP}:ddp_setup", batch_size=2, atol=1e-6)
    initial = fgaseg_setup.build_model(fast_decoder=True).checkpoint_state()
    moved = {k for k in one if not torch.equal(one[k], initial[k])}
    assert any(QKV in k for k in moved) and "head.p2t.gamma" in moved  # both groups trained
    assert {"head.t2p.vision.1.weight", "head.local_cost.text.weight", "head.aux_heads.0.weight"} <= moved


@pytest.mark.slow
def test_fgaseg_learns_the_shapes(tmp_path):
    """200 steps on 48 synthetic scenes: the loss falls and held-out mIoU (seen classes) is far above chance."""
    from dataclasses import replace

    from train import catseg_setup, fgaseg_setup

    from vocabseg.train import train
    from vocabseg.train.log import read_metrics

    torch.set_num_threads(1)
    model = fgaseg_setup.build_model()
    recipe = fgaseg_setup.fgaseg_recipe(max_iters=200, checkpoint_every=200, log_every=20, clip_grad_norm=None)
    recipe = replace(recipe, optim=replace(recipe.optim, lr=4e-3), schedule=replace(recipe.schedule, warmup_iters=10))
    held_out = fgaseg_setup.Shapes(n=16, seed=1)
    before = catseg_setup.seen_miou(model, held_out)
    result = train(recipe, model, fgaseg_setup.Shapes(n=48, seed=0), tmp_path, progress=False)
    after = catseg_setup.seen_miou(model, held_out)
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert result.step == 200
    assert records[-1]["loss"] < 0.5 * records[0]["loss"], records
    assert records[-1]["loss_t2p"] < records[0]["loss_t2p"], records  # the alignment map learns too
    assert before < 0.1, before  # a random head: about chance
    assert after > 0.4, after  # measured 0.67 (~25 s on a loaded 2-core machine)
    assert math.isfinite(after)
