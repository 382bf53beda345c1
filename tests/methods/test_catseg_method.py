"""The ``catseg`` method: its image features and logits recomputed from CLIP's parts, Q/V-only fine-tuning of
both towers, the official loss, what a checkpoint holds, and the trainer's resume / DDP / learning checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_clip
from train.catseg_setup import prepared

from vocabseg import Segmenter
from vocabseg.errors import CheckpointError
from vocabseg.methods import create_method, get_method_spec
from vocabseg.methods.catseg import default_guidance_layers, split_qkv
from vocabseg.models.clip import default_tokenizer
from vocabseg.text.templates import resolve_templates

TRAIN = Path(__file__).parents[1] / "train"
SETUP = TRAIN / "catseg_setup.py"
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
    return create_method("catseg", clip, **{**HEAD, **options}).eval()


def unit_text(k: int = 3, p: int = 1, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(k, p, 32, generator=torch.Generator().manual_seed(seed)), dim=-1)


def images(*size: int, b: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, *size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def method():
    return build()


# -- features and logits -------------------------------------------------------------------------------------------
def test_default_guidance_layers_are_the_official_ones():
    assert default_guidance_layers(12) == (3, 7)  # ViT-B/16: CATSeg.layer_indexes
    assert default_guidance_layers(24) == (7, 15)  # ViT-L/14
    assert default_guidance_layers(3) == (0, 1) and default_guidance_layers(2) == (0, 0)


def test_image_features_are_the_value_path_output_and_the_middle_blocks(method):
    """Dense features = ValuePathCLIP on the window resized to 64 px; guidance = the raw outputs of blocks
    0 and 1 (the tiny CLIP's 3 blocks), CLS dropped, as (B, width, h, w)."""
    x = images(48, 80)
    assert method.guidance_layers == (0, 1) and method.image_size == (64, 64)
    resized = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
    with torch.no_grad():
        dense, guidance = method.image_features(x)
        torch.testing.assert_close(dense, method.dense(resized), **TOL)
        tokens, _ = method.dense.tower.embed(resized, "bicubic_size")
        blocks = method.clip.visual.transformer.resblocks
        for i, want in enumerate(guidance):
            tokens = blocks[i](tokens)
            torch.testing.assert_close(want, tokens[:, 1:].transpose(1, 2).reshape(2, 64, 4, 4), **TOL)


def test_logits_are_the_head_on_those_features_upsampled_to_the_window(method):
    x, text = images(48, 80), unit_text()
    with torch.no_grad():
        got = method.logits(x, text)
        dense, guidance = method.image_features(x)
        head = method.head(dense, text, guidance)
        want = F.interpolate(head, size=(48, 80), mode="bilinear", align_corners=False)
    assert head.shape == (2, 3, 16, 16) and got.shape == (2, 3, 48, 80)
    torch.testing.assert_close(got, want, **TOL)


def test_text_forms(method):
    """(K, D) is one template; (B, K, P, D) is per-image text, equal to each image with its own."""
    x, text = images(64, 64), unit_text()
    per_image = unit_text(seed=5)[None].expand(2, -1, -1, -1).clone()
    per_image[1] = unit_text(seed=6)
    with torch.no_grad():
        torch.testing.assert_close(method.logits(x, text[:, 0]), method.logits(x, text), **TOL)
        together = method.logits(x, per_image)
        for b in range(2):
            torch.testing.assert_close(together[b : b + 1], method.logits(x[b : b + 1], per_image[b]), **TOL)
    with pytest.raises(ValueError, match=r"text must be \(K, D\)"):
        method.logits(x, torch.zeros(32))


def test_spec_matches_the_official_setup():
    spec = get_method_spec("catseg")
    assert spec.trainable and spec.text_input == "per_template"
    assert resolve_templates(spec.templates) == ("A photo of a {} in the scene",)
    d = spec.defaults
    assert (d.short_side, d.crop, d.stride, d.score, d.logit_scale) == (640, 384, 256, "sigmoid", 1.0)


# -- Q/V fine-tuning ------------------------------------------------------------------------------------------------
def trainable_names(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_splitting_q_k_v_changes_no_number_and_happens_once():
    clip = make_tiny_clip()
    fused = {n: p.detach().clone() for n, p in clip.named_parameters() if n.endswith("attn.in_proj_weight")}
    model = create_method("catseg", clip, **HEAD)
    again = create_method("catseg", clip, **HEAD)  # a second method on the same CLIP reuses the split
    for name, weight in fused.items():
        attn = clip.get_submodule(name.rsplit(".", 1)[0])
        assert torch.equal(attn.in_proj_weight, weight)
        assert len(attn.parametrizations["in_proj_weight"]) == 1
    assert trainable_names(again) >= {n for n in trainable_names(model) if n.startswith("clip.")}


def test_only_q_and_v_of_both_towers_train_and_k_gets_no_update():
    model = prepared(build()).train()
    visual, text = model.clip.visual.transformer.resblocks, model.clip.transformer.resblocks
    clip_trainable = {n for n in trainable_names(model) if n.startswith("clip.")}
    want = {f"clip.visual.transformer.resblocks.{i}.{QKV}{j}" for i in range(len(visual)) for j in (0, 2)}
    want |= {f"clip.transformer.resblocks.{i}.{QKV}{j}" for i in range(len(text)) for j in (0, 2)}
    assert clip_trainable == want  # no K, no biases, no positions (the official name filter)
    groups = model.param_groups()
    assert {id(p) for p in groups["clip"]} == {id(p) for n, p in model.named_parameters() if n in want}
    assert {id(p) for p in groups["head"]} == {id(p) for p in model.head.parameters()}

    before = {n: t.detach().clone() for n, t in model.state_dict().items() if n.startswith("clip.")}
    before_k = {id(b): split_qkv(b.attn)[1].detach().clone() for b in (*visual, *text)}
    label = torch.randint(0, 3, (2, 64, 64), generator=torch.Generator().manual_seed(3))
    loss = model.training_step({"image": images(64, 64), "label": label})["loss"]
    loss.backward()
    for tower in (visual, text):
        for i, block in enumerate(tower):
            q, k, v = split_qkv(block.attn)
            assert k.grad is None and not k.requires_grad
            assert v.grad.abs().sum() > 0, f"block {i}: no gradient reaches V"
            if tower is text or i < len(tower) - 1:  # the dense last block skips q·k: its Q gets exactly 0
                assert q.grad.abs().sum() > 0, f"block {i}: no gradient reaches Q"
    opt = torch.optim.AdamW([{"params": g} for g in groups.values()], lr=1e-2, weight_decay=0.1)
    opt.step()
    after = model.state_dict()
    changed = {n for n, t in before.items() if not torch.equal(t, after[n])}
    assert changed == want  # K never moves (the last visual block's Q only by weight decay: its gradient is 0)
    for block in (*visual, *text):  # so the fused weight's K rows are the original ones
        d = block.attn.in_proj_weight.shape[1]
        assert torch.equal(block.attn.in_proj_weight[d : 2 * d], before_k[id(block)])


def test_finetune_modes():
    positions = build(finetune="attention+position")
    assert {"clip.positional_embedding", "clip.visual.positional_embedding"} <= trainable_names(positions)
    frozen = build(finetune="none")
    assert set(frozen.param_groups()) == {"head"}
    assert not any(n.startswith("clip.") for n in trainable_names(frozen))
    with pytest.raises(Exception, match="finetune mode 'qkv'"):
        build(finetune="qkv")


def test_positions_get_gradients_when_fine_tuned():
    model = prepared(build(finetune="attention+position")).train()
    label = torch.randint(0, 3, (2, 64, 64), generator=torch.Generator().manual_seed(3))
    model.training_step({"image": images(64, 64), "label": label})["loss"].backward()
    assert model.clip.positional_embedding.grad.abs().sum() > 0  # the text tower's
    assert model.clip.visual.positional_embedding.grad.abs().sum() > 0


# -- training ---------------------------------------------------------------------------------------------------------
def test_prepare_training_keeps_the_first_name_in_the_scene_template():
    model = prepared(build())
    tokenizer = default_tokenizer(model.clip)
    want = tokenizer(
        ["A photo of a cat in the scene", "A photo of a dog in the scene", "A photo of a sofa in the scene"]
    )
    assert model.class_tokens.shape == (3, 1, want.shape[-1])
    assert torch.equal(model.class_tokens[:, 0], want)
    with torch.no_grad():  # encoded through the (fine-tuned) text tower, as the Segmenter's text encoder does
        encoded = F.normalize(model.clip.encode_text(want), dim=-1)
        torch.testing.assert_close(model.encode_class_text()[:, 0], encoded, **TOL)


def literal_bce(logits: torch.Tensor, label: torch.Tensor, ignore_as_negative: bool) -> torch.Tensor:
    """Official loss: sigmoid BCE against one-hot targets, ignored pixels all-zero (or left out)."""
    k = logits.shape[1]
    p = torch.sigmoid(logits.double())
    onehot = (label[:, None] == torch.arange(k).view(1, k, 1, 1)).double()
    per = -(onehot * torch.log(p) + (1 - onehot) * torch.log(1 - p))
    if ignore_as_negative:
        return per.mean()
    valid = (label != 255)[:, None].expand_as(per)
    return per[valid].mean()


@pytest.mark.parametrize("ignore_as_negative", [True, False])
def test_training_step_is_the_official_bce_at_label_resolution(ignore_as_negative):
    model = prepared(build(ignore_as_negative=ignore_as_negative)).train()
    x = images(48, 48)
    label = torch.randint(0, 3, (2, 40, 56), generator=torch.Generator().manual_seed(2))
    label[:, :6] = 255
    loss = model.training_step({"image": x, "label": label})["loss"]
    with torch.no_grad():
        logits = model.class_logits(x, model.encode_class_text())  # training mode: 2x2 pooling
        logits = F.interpolate(logits, size=(40, 56), mode="bilinear", align_corners=False)
        want = literal_bce(logits, label, ignore_as_negative)
    torch.testing.assert_close(loss.double(), want, atol=1e-5, rtol=1e-5)
    assert abs(float(want) - float(literal_bce(logits, label, not ignore_as_negative))) > 1e-4  # the rule matters


def test_training_needs_the_classes_first():
    with pytest.raises(RuntimeError, match="prepare_training"):
        build().train().training_step({"image": images(64, 64), "label": torch.zeros(2, 64, 64, dtype=torch.long)})


# -- checkpoints ------------------------------------------------------------------------------------------------------
def test_checkpoint_holds_the_head_and_the_fine_tuned_q_v():
    model = build()
    state = model.checkpoint_state()
    head = {f"head.{k}" for k in model.head.state_dict()}
    clip = {n for n in state if n.startswith("clip.")}
    assert set(state) == head | clip
    assert clip == {n for n in trainable_names(model) if n.startswith("clip.")} and clip
    assert not any(n.startswith("dense.") for n in state)
    config = model.checkpoint_config()
    assert config["method"] == "catseg" and config["options"]["finetune"] == "attention"
    json.dumps(config)


def test_round_trip_reproduces_the_logits_exactly():
    trained = build(init_seed=0)
    with torch.no_grad():  # "train": move the head and CLIP's Q/V away from their initialisation
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    fresh = build(init_seed=1)  # the same base CLIP, another head
    x, text = images(64, 48), unit_text(k=4)
    with torch.no_grad():
        want = trained.logits(x, text)
        assert (fresh.logits(x, text) - want).abs().max() > 1e-3
        fresh.load_checkpoint_state(trained.checkpoint_state())
        torch.testing.assert_close(fresh.logits(x, text), want, atol=0, rtol=0)
        tokens = torch.ones(1, 77, dtype=torch.long)
        torch.testing.assert_close(fresh.clip.encode_text(tokens), trained.clip.encode_text(tokens), atol=0, rtol=0)


def test_strict_loading_names_the_missing_tensor():
    state = build().checkpoint_state()
    name = f"clip.transformer.resblocks.0.{QKV}2"
    del state[name]
    with pytest.raises(CheckpointError, match=rf"missing 1 tensor\(s\), e\.g\. {name}"):
        build().load_checkpoint_state(state)


def test_segmenter_encodes_the_classes_with_the_fine_tuned_text_tower():
    model = build()
    clip = model.clip
    seg = Segmenter(method=model, model=clip, text_cache_dir=None, short_side=64, crop=64, stride=32)
    assert seg.templates == ("A photo of a {} in the scene",)
    before = seg.text_encoder.encode(["cat"], per_template=True)
    with torch.no_grad():
        v = split_qkv(clip.transformer.resblocks[0].attn)[2]
        v.add_(0.5 * torch.randn(v.shape, generator=torch.Generator().manual_seed(0)))  # fine-tune V
    after = seg.text_encoder.encode(["cat"], per_template=True)
    assert after.shape == (1, 1, 32) and (after - before).abs().max() > 1e-4


# -- the trainer ------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_resume_after_sigkill_is_exact(tmp_path):
    from train.harness import check_sigkill_resume

    state = check_sigkill_resume(tmp_path, f"{SETUP}:setup", kill_at=((0, 3, 0.0),), step_delay=0.3)
    assert any(QKV in k for k in state) and any(k.startswith("head.") for k in state)


@pytest.mark.slow
def test_two_ddp_processes_equal_one_process_with_twice_the_batch(tmp_path):
    from train.harness import check_ddp_equals_single

    ddp, one = check_ddp_equals_single(tmp_path, f"{SETUP}:setup", batch_size=2)
    from train import catseg_setup

    initial = catseg_setup.build_model().checkpoint_state()
    moved = {k for k in one if not torch.equal(one[k], initial[k])}
    assert any(QKV in k for k in moved) and any(k.startswith("head.") for k in moved)  # both groups trained


@pytest.mark.slow
def test_catseg_learns_the_shapes(tmp_path):
    """300 steps on 48 synthetic scenes: the loss falls and held-out mIoU (seen classes) is far above chance."""
    from dataclasses import replace

    from train import catseg_setup

    from vocabseg.train import train
    from vocabseg.train.log import read_metrics

    torch.set_num_threads(1)
    model = catseg_setup.build_model()
    recipe = catseg_setup.catseg_recipe(max_iters=300, checkpoint_every=300, log_every=20, clip_grad_norm=None)
    recipe = replace(recipe, schedule=replace(recipe.schedule, warmup_iters=10))
    held_out = catseg_setup.Shapes(n=16, seed=1)
    before = catseg_setup.seen_miou(model, held_out)
    train(recipe, model, catseg_setup.Shapes(n=48, seed=0), tmp_path, progress=False)
    after = catseg_setup.seen_miou(model, held_out)
    losses = [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert losses[-1] < 0.5 * losses[0], losses
    assert before < 0.1, before  # a random head: about chance
    assert after > 0.35, after  # measured 0.58 (~35 s on a loaded 2-core machine)
    assert math.isfinite(after)
