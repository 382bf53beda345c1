"""The training loop: it learns, resumes exactly after SIGKILL, and DDP equals one big-batch process."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from vocabseg.train import DataConfig, TrainingError, lr_factor, train
from vocabseg.train.checkpoint import LAST, checkpoint_name, numbered_checkpoints
from vocabseg.train.log import read_metrics

from .harness import assert_identical, check_ddp_equals_single, check_sigkill_resume, tensors
from .toy import ToySegDataset, ToySegModel, pixel_accuracy, toy_recipe

TOY_RUN = Path(__file__).with_name("toy_run.py")


def test_training_learns_the_toy_task(tmp_path):
    held_out = ToySegDataset(n=8, base_seed=99)
    model = ToySegModel(seed=0, dropout=0.1)
    before = pixel_accuracy(model, held_out)
    recipe = toy_recipe(max_iters=60, batch_size=8, checkpoint_every=60, log_every=20)
    recipe = replace(recipe, schedule=replace(recipe.schedule, min_lr=0.0))
    result = train(recipe, model, ToySegDataset(n=32), tmp_path / "run", progress=False)
    after = pixel_accuracy(model, held_out)
    assert before < 0.5  # about chance for 3 classes
    assert after > 0.9
    assert result.step == 60 and result.effective_batch == 8
    assert result.metrics["loss"] < 0.5 and [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [
        20,
        40,
        60,
    ]


TOY = Path(__file__).with_name("toy.py")


@pytest.mark.slow
def test_sigkill_then_resume_ends_with_identical_weights(tmp_path):
    """Reference: an uninterrupted run. Then runs with 0 and 2 loader workers, killed mid-way with
    SIGKILL and resumed in a new process, must end with bit-identical model, optimiser, EMA and logs."""
    setup = f"{TOY}:toy_resume_setup"
    check_sigkill_resume(tmp_path, setup, kill_at=((0, 3, 0.0), (2, 6, 0.2)), step_delay=0.15)
    assert any(k.startswith("ema.") for k in tensors(tmp_path / "ref", "trainer_state.safetensors"))
    assert [r["step"] for r in read_metrics(tmp_path / "ref" / "metrics.jsonl")] == list(range(1, 13))
    for w in (0, 2):
        assert [s for s, _ in numbered_checkpoints(tmp_path / f"w{w}")] == [9, 12]  # keep_last=2


@pytest.mark.slow
def test_two_ddp_processes_equal_one_process_with_twice_the_batch(tmp_path):
    ddp_state, one_state = check_ddp_equals_single(tmp_path, f"{TOY}:toy_ddp_setup", per_rank_keys=("seen",))
    # DDP broadcasts rank 0's buffers: it counted its own half of each batch
    assert int(ddp_state["seen"]) * 2 == int(one_state["seen"]) == 6 * 8
    assert not torch.equal(one_state["head.weight"], ToySegModel(seed=0).head.weight.detach())  # it did train
    assert [r["step"] for r in read_metrics(tmp_path / "one" / "metrics.jsonl")] == list(range(1, 7))


def test_resume_from_a_corrupt_newest_checkpoint_falls_back_and_stays_exact(tmp_path):
    recipe = toy_recipe(max_iters=8, checkpoint_every=2, keep_last=3, grad_accum=2, ema_decay=0.5)
    data = ToySegDataset(n=24)
    train(recipe, ToySegModel(seed=0), data, tmp_path, progress=False)
    reference = tensors(tmp_path), tensors(tmp_path, "trainer_state.safetensors")
    ref_metrics = read_metrics(tmp_path / "metrics.jsonl")
    for name in (checkpoint_name(8), LAST):  # the newest two are damaged: resume must use step 6
        with open(tmp_path / name / "model.safetensors", "r+b") as f:
            f.seek(-3, os.SEEK_END)
            f.write(b"\x00\xff\x00")
    with pytest.warns(UserWarning, match="damaged"):
        result = train(recipe, ToySegModel(seed=0), data, tmp_path, resume=True, progress=False)
    assert result.resumed_from == tmp_path / checkpoint_name(6) and result.step == 8
    assert_identical(tensors(tmp_path), reference[0])
    assert_identical(tensors(tmp_path, "trainer_state.safetensors"), reference[1])
    assert read_metrics(tmp_path / "metrics.jsonl") == ref_metrics  # steps 7, 8 dropped, then rewritten


def test_refuses_another_recipe_or_existing_checkpoints_without_resume(tmp_path):
    data = ToySegDataset(n=24)
    recipe = toy_recipe(max_iters=3)
    train(recipe, ToySegModel(seed=0), data, tmp_path, progress=False)
    other = recipe.with_overrides(["optim.lr=0.01"])
    with pytest.raises(TrainingError, match=r"different recipe.*optim\.lr"):
        train(other, ToySegModel(seed=0), data, tmp_path, progress=False)
    with pytest.raises(TrainingError, match="already holds checkpoints"):
        train(recipe, ToySegModel(seed=0), data, tmp_path, progress=False)
    with pytest.raises(TrainingError, match=r"Cannot resume.*optim\.lr.*0\.05 -> 0\.01"):
        train(other, ToySegModel(seed=0), data, tmp_path, resume=True, progress=False)
    longer = recipe.with_overrides(["max_iters=5", "log_every=2"])  # allowed: extends the run
    result = train(longer, ToySegModel(seed=0), data, tmp_path, resume=True, progress=False)
    assert result.step == 5 and result.resumed_from == tmp_path / checkpoint_name(3)
    assert json.loads((tmp_path / "recipe.json").read_text())["max_iters"] == 5
    lr4 = {r["step"]: r["lr/head"] for r in read_metrics(tmp_path / "metrics.jsonl")}[4]
    assert lr4 == pytest.approx(0.05 * lr_factor(longer.schedule, 3, 5, 0.05))  # the new schedule from the first step


def test_resume_true_in_an_empty_folder_starts_fresh(tmp_path):
    result = train(toy_recipe(max_iters=2), ToySegModel(seed=0), ToySegDataset(n=24), tmp_path, resume=True)
    assert result.step == 2 and result.resumed_from is None


def test_validation_keeps_the_best_checkpoint(tmp_path):
    scores = iter([0.2, 0.7, 0.5, 0.6])
    seen_modes = []

    def validate(model):
        seen_modes.append(model.training)
        return {"mIoU": next(scores), "pixel_acc": 1.0}

    recipe = toy_recipe(max_iters=8, val_every=2, checkpoint_every=4)
    result = train(recipe, ToySegModel(seed=0), ToySegDataset(n=24), tmp_path, validate=validate, progress=False)
    assert seen_modes == [False] * 4  # eval mode during validation
    assert result.best == {"metric": "mIoU", "value": 0.7, "step": 4}
    best = json.loads((tmp_path / "checkpoint-best" / "config.json").read_text())
    assert best["step"] == 4
    logged = {r["step"]: r.get("val/mIoU") for r in read_metrics(tmp_path / "metrics.jsonl")}
    assert [logged[s] for s in (2, 4, 6, 8)] == [0.2, 0.7, 0.5, 0.6]


def test_amp_is_refused_on_cpu_before_anything_is_written(tmp_path):
    with pytest.raises(TrainingError, match="amp='bf16'.*CUDA"):
        train(toy_recipe(amp="bf16"), ToySegModel(), ToySegDataset(), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_model_contract_is_checked(tmp_path):
    with pytest.raises(TrainingError, match="lacks training_step"):
        train(toy_recipe(), torch.nn.Linear(2, 2), ToySegDataset(), tmp_path)


def test_data_workers_do_not_change_the_result(tmp_path):
    results = {}
    for workers in (0, 2):
        recipe = toy_recipe(max_iters=4, data=DataConfig(dataset="toy", crop=16, num_workers=workers))
        train(recipe, ToySegModel(seed=0), ToySegDataset(n=24), tmp_path / str(workers), progress=False)
        results[workers] = tensors(tmp_path / str(workers))
    assert_identical(results[0], results[2])


class TeacherToyModel(ToySegModel):
    """A toy model with a momentum teacher of its head, kept up to date by the ``after_step`` hook."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.register_buffer("teacher", self.head.weight.detach().clone())
        self.hook_steps: list[int] = []

    def after_step(self, step: int) -> None:
        assert not torch.is_grad_enabled()
        self.hook_steps.append(step)
        self.teacher.mul_(0.9).add_(0.1 * self.head.weight)


def test_after_step_runs_once_per_optimiser_step_and_its_state_resumes_exactly(tmp_path):
    recipe = toy_recipe(max_iters=6, batch_size=4, grad_accum=2, checkpoint_every=3)
    whole = TeacherToyModel(seed=0)
    train(recipe, whole, ToySegDataset(n=24), tmp_path / "whole", progress=False)
    assert whole.hook_steps == [1, 2, 3, 4, 5, 6]  # not once per micro-batch
    assert not torch.equal(whole.teacher, TeacherToyModel(seed=0).teacher)

    first = TeacherToyModel(seed=0)
    train(replace(recipe, max_iters=3), first, ToySegDataset(n=24), tmp_path / "split", progress=False)
    resumed = TeacherToyModel(seed=0)
    train(recipe, resumed, ToySegDataset(n=24), tmp_path / "split", resume=True, progress=False)
    assert resumed.hook_steps == [4, 5, 6]
    torch.testing.assert_close(resumed.teacher, whole.teacher, rtol=0, atol=0)
