"""Optimiser groups, learning-rate schedules, clipping, accumulation and mixed-precision refusal."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from vocabseg.train import ScheduleConfig, TrainingError, build_optimizer, build_scheduler, lr_factor, train
from vocabseg.train.optim import autocast, check_amp, grad_scaler

from .toy import ToySegDataset, ToySegModel, toy_recipe


def test_warmup_then_cosine_to_min_lr():
    s = ScheduleConfig(name="cosine", warmup_iters=10, warmup_start_factor=0.1, min_lr=1e-3)
    base = 1e-2
    assert lr_factor(s, 0, 110, base) == pytest.approx(0.1)
    assert lr_factor(s, 5, 110, base) == pytest.approx(0.55)  # halfway up the linear ramp
    assert lr_factor(s, 10, 110, base) == pytest.approx(1.0)
    assert lr_factor(s, 60, 110, base) == pytest.approx(0.1 + 0.9 * 0.5)  # cosine midpoint
    assert base * lr_factor(s, 110, 110, base) == pytest.approx(1e-3)  # ends at min_lr
    assert base * lr_factor(s, 500, 110, base) == pytest.approx(1e-3)  # and stays there


def test_poly_and_constant():
    poly = ScheduleConfig(name="poly", power=0.9)
    assert lr_factor(poly, 0, 100, 1.0) == 1.0
    assert lr_factor(poly, 25, 100, 1.0) == pytest.approx(0.75**0.9)
    assert lr_factor(poly, 100, 100, 1.0) == 0.0
    floor = replace(poly, min_lr=0.1)
    assert lr_factor(floor, 50, 100, 1.0) == pytest.approx(0.1 + 0.9 * 0.5**0.9)
    const = ScheduleConfig(name="constant", warmup_iters=4, warmup_start_factor=0.5)
    assert [lr_factor(const, i, 100, 1.0) for i in (0, 2, 4, 99)] == [0.5, 0.75, 1.0, 1.0]


def test_group_multipliers_and_the_scheduler_per_iteration():
    recipe = toy_recipe(max_iters=20).with_overrides(
        ["optim.lr_mult.body=0.1", "optim.wd_mult.head=0", "schedule.warmup_iters=4", "schedule.min_lr=0"]
    )
    model = ToySegModel()
    opt = build_optimizer(model, recipe.optim)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["body"]["lr"] == pytest.approx(0.005) and groups["head"]["lr"] == pytest.approx(0.05)
    assert groups["body"]["weight_decay"] == pytest.approx(1e-4) and groups["head"]["weight_decay"] == 0.0
    assert isinstance(opt, torch.optim.AdamW)
    sched = build_scheduler(opt, recipe)
    for step in range(12):
        factor = lr_factor(recipe.schedule, step, 20, 0.05)
        assert groups["body"]["lr"] == pytest.approx(0.005 * factor)
        assert groups["head"]["lr"] == pytest.approx(0.05 * factor)
        opt.step()
        sched.step()
    assert math.isclose(groups["head"]["lr"], 0.05 * lr_factor(recipe.schedule, 12, 20, 0.05))


def test_optimizer_table_and_group_errors():
    model = ToySegModel()
    recipe = toy_recipe()
    sgd = build_optimizer(model, replace(recipe.optim, name="sgd", momentum=0.5))
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.5
    assert isinstance(build_optimizer(model, replace(recipe.optim, name="adam")), torch.optim.Adam)

    model.param_groups = lambda: {"a": list(model.body.parameters()), "b": [model.body.weight]}
    with pytest.raises(TrainingError, match=r"body\.weight appears twice.*'a'.*'b'"):
        build_optimizer(model, recipe.optim)
    model.param_groups = lambda: {"a": [], "b": []}
    with pytest.raises(TrainingError, match="no trainable parameters"):
        build_optimizer(model, recipe.optim)
    model.param_groups = lambda: {"a": list(model.body.parameters()), "empty": []}
    with pytest.raises(TrainingError, match=r"in no group.*head\.weight"):
        build_optimizer(model, recipe.optim)
    model.param_groups = lambda: {"a": [*model.body.parameters(), *model.head.parameters(), model.stem.weight]}
    with pytest.raises(TrainingError, match=r"stem\.weight, which does not require grad"):
        build_optimizer(model, recipe.optim)
    model.param_groups = lambda: {"all": [*model.body.parameters(), *model.head.parameters()], "empty": []}
    opt = build_optimizer(model, replace(recipe.optim, lr_mult={}))
    assert [g["name"] for g in opt.param_groups] == ["all"]  # empty groups are skipped
    with pytest.warns(UserWarning, match=r"\['body'\].*no effect"):
        build_optimizer(model, recipe.optim)  # lr_mult names a group the model does not have


def _trainable(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])


def _one_sgd_step(tmp_path, clip: float | None) -> float:
    recipe = toy_recipe(max_iters=1, clip_grad_norm=clip, checkpoint_every=1).with_overrides(
        ["optim.name=sgd", "optim.lr=1", "optim.momentum=0", "optim.weight_decay=0", "optim.lr_mult={}"]
    )
    recipe = replace(recipe, schedule=ScheduleConfig(name="constant"))
    model = ToySegModel(dropout=0.0)
    before = _trainable(model)
    train(recipe, model, ToySegDataset(n=8), tmp_path / str(clip), progress=False)
    return float((_trainable(model) - before).norm())  # = lr × the (clipped) gradient norm


def test_clipping_bounds_the_whole_model_gradient_norm(tmp_path):
    unclipped = _one_sgd_step(tmp_path, None)
    assert unclipped > 0.05
    assert _one_sgd_step(tmp_path, 0.01) == pytest.approx(0.01, rel=1e-3)
    assert _one_sgd_step(tmp_path, 10 * unclipped) == pytest.approx(unclipped, rel=1e-5)  # a loose bound is a no-op


def test_two_accumulated_micro_batches_equal_one_double_batch(tmp_path):
    def run(batch_size: int, grad_accum: int) -> torch.Tensor:
        recipe = toy_recipe(max_iters=3, batch_size=batch_size, grad_accum=grad_accum, checkpoint_every=3)
        model = ToySegModel(dropout=0.0)
        train(recipe, model, ToySegDataset(n=24), tmp_path / f"{batch_size}x{grad_accum}", progress=False)
        return _trainable(model)

    accumulated, single = run(4, 2), run(8, 1)
    torch.testing.assert_close(accumulated, single, rtol=0, atol=1e-6)
    assert not torch.allclose(accumulated, run(4, 1), atol=1e-4)  # half the batch is a different run


def test_mixed_precision_is_cuda_only():
    check_amp("none", "cpu")
    for amp in ("bf16", "fp16"):
        with pytest.raises(TrainingError, match="only runs on CUDA"):
            check_amp(amp, "cpu")
        with pytest.raises(TrainingError):
            grad_scaler(amp if amp == "fp16" else "fp16", "cpu")
    assert grad_scaler("bf16", "cuda") is None and grad_scaler("none", "cpu") is None
    with autocast("none", "cpu"):
        assert not torch.is_autocast_enabled("cpu")
