"""The training loop for every trained method: plain PyTorch, DDP when launched with torchrun.

One iteration is one optimiser step over ``grad_accum`` micro-batches (DDP's gradient all-reduce
runs on the last one only, through ``no_sync``). The same function runs as a single process or as
every process of ``torchrun --nproc-per-node N`` (gloo on CPU, nccl on CUDA); a torchrun entry point
should end with :func:`vocabseg.eval.distributed.exit_process`.

Exact resume: a run killed at any moment (even SIGKILL) and resumed ends with the same weights as a
run that never stopped (same machine, same thread count), for an indexed (map-style) dataset. This
holds because

- the data order and every sample's augmentation are pure functions of (seed, epoch, index), and the
  position in the data follows from the step (``sampler.py``);
- torch, Python and NumPy RNGs are re-seeded at the start of every iteration from (seed, rank, step),
  so dropout and any other randomness in ``training_step`` do not depend on the history of the
  process (this also gives each rank its own stream without gathering RNG states);
- checkpoints restore the model, optimiser, schedule, loss scaler, EMA, step, best score and rank 0's
  RNG states (used by whatever runs between iterations, e.g. validation); they are only written
  complete (``checkpoint.py``), and ``metrics.jsonl`` is trimmed back to the checkpoint's step.

A streaming dataset (WebDataset shards, :class:`~vocabseg.train.sampler.ShardStream`) resumes exactly
to the shard, not to the sample: the checkpoint stores the shards every rank has opened in its epoch
(``trainer_state["data_stream"]``) and the resumed run continues with the others (``sampler.py``).

Validation runs on rank 0 only (the other ranks wait at a barrier), every ``val_every`` steps and at
the end, on the model in eval mode under ``torch.no_grad``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

from ..eval.distributed import all_reduce_sum, barrier, init_distributed, process_device
from ..io.files import atomic_write
from .checkpoint import (
    BEST,
    LAST,
    Checkpoint,
    CheckpointError,
    capture_rng,
    checkpoint_name,
    copy_checkpoint,
    load_resume_checkpoint,
    numbered_checkpoints,
    optimizer_from_flat,
    optimizer_to_flat,
    prune_checkpoints,
    read_checkpoint,
    remove_stale,
    restore_rng,
    write_checkpoint,
)
from .ema import EMA
from .log import RunLogger
from .model import TrainingError, check_trainable
from .optim import autocast, build_optimizer, build_scheduler, check_amp, grad_scaler, lr_factor
from .recipe import RESUMABLE_CHANGES, Recipe, recipe_differences
from .sampler import ShardBatchStream, build_batch_stream, mix_seed

__all__ = ["train", "TrainResult", "RECIPE_FILE"]

RECIPE_FILE = "recipe.json"


@dataclass
class TrainResult:
    """What a finished run left behind (``best`` and ``metrics`` are complete on rank 0 only)."""

    out_dir: Path
    step: int
    checkpoint: Path | None  # checkpoint-last
    metrics: dict[str, Any]  # the last logged record
    best: dict[str, Any] | None  # {"metric", "value", "step"} of checkpoint-best
    resumed_from: Path | None
    world_size: int
    effective_batch: int
    ema: EMA | None = None


class _StepModule(nn.Module):
    """``forward(batch) = model.training_step(batch)``, so DDP's hooks see the training computation."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.model.training_step(batch)


def _describe(diff: Mapping[str, tuple[Any, Any]], limit: int = 12) -> str:
    items = [f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(diff.items())[:limit]]
    more = f", and {len(diff) - limit} more" if len(diff) > limit else ""
    return "; ".join(items) + more


def _check_out_dir(out: Path, recipe: Recipe) -> None:
    """Refuse to start afresh in a folder that holds another run."""
    saved = out / RECIPE_FILE
    if saved.is_file():
        try:
            old = json.loads(saved.read_text())
        except ValueError:
            old = {}
        diff = recipe_differences(old, recipe.to_dict())
        if diff:
            raise TrainingError(
                f"{out} holds a run of a different recipe ({_describe(diff)}). Choose an empty folder, or pass "
                "resume=True (--resume) to continue that run if only "
                f"{', '.join(sorted(RESUMABLE_CHANGES))} differ."
            )
    if numbered_checkpoints(out) or (out / LAST).exists():
        raise TrainingError(
            f"{out} already holds checkpoints; pass resume=True (--resume) to continue from the newest, "
            "or choose an empty folder to start over."
        )


def _resume_point(out: Path, recipe: Recipe, resume: bool | str | os.PathLike | None) -> Checkpoint | None:
    if resume is None or resume is False:
        _check_out_dir(out, recipe)
        return None
    if resume is True:
        ckpt = load_resume_checkpoint(out)
        if ckpt is None:  # nothing to resume yet (e.g. killed before the first checkpoint): start
            _check_out_dir(out, recipe)
            return None
    else:
        ckpt = read_checkpoint(resume)
        if not ckpt.resumable:
            raise CheckpointError(f"Checkpoint {ckpt.path} holds no trainer state, so training cannot resume from it.")
    assert ckpt.trainer_state is not None
    diff = recipe_differences(ckpt.trainer_state.get("recipe", {}), recipe.to_dict())
    fixed = {k: v for k, v in diff.items() if k not in RESUMABLE_CHANGES}
    if fixed:
        raise TrainingError(
            f"Cannot resume from {ckpt.path}: the recipe differs in {', '.join(fixed)} ({_describe(fixed)}). "
            f"Only {', '.join(sorted(RESUMABLE_CHANGES))} may change when resuming."
        )
    return ckpt


def _seed_step(seed: int, rank: int, step: int) -> None:
    """Every RNG a training step may use, as a function of (seed, rank, step) only."""
    s = mix_seed(seed, rank, step)
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s % 2**32)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _loss_of(outputs: Any, step: int) -> Tensor:
    if not isinstance(outputs, Mapping) or not isinstance(outputs.get("loss"), Tensor):
        raise TrainingError(f"training_step must return a dict with a 'loss' tensor; got {type(outputs).__name__}.")
    loss = outputs["loss"]
    if loss.dim() != 0:
        raise TrainingError(f"training_step's 'loss' must be 0-d, got shape {tuple(loss.shape)} (step {step}).")
    return loss


def _validate(validate: Callable[[nn.Module], Mapping[str, float]], model: nn.Module) -> dict[str, float]:
    model.eval()
    try:
        with torch.no_grad():
            scores = validate(model)
    finally:
        model.train()
    if not isinstance(scores, Mapping):
        raise TrainingError(f"validate(model) must return a dict of numbers, got {type(scores).__name__}.")
    return {str(k): float(v) for k, v in scores.items()}


def train(
    recipe: Recipe,
    model: nn.Module,
    dataset: Dataset,
    out_dir: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    resume: bool | str | os.PathLike = False,
    validate: Callable[[nn.Module], Mapping[str, float]] | None = None,
    best_metric: str = "mIoU",
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` (a :class:`~vocabseg.train.model.TrainableModel`) on ``dataset`` by ``recipe``.

    Args:
        dataset: ``dataset[(index, seed)]`` returns a dict of tensors derived from ``seed`` only; or a
            streaming :class:`~vocabseg.train.sampler.ShardStream` (resumed at a shard boundary).
        out_dir: run folder: ``recipe.json``, ``metrics.jsonl``, ``tb/``, ``checkpoint-*``.
        resume: ``True``: continue from the newest valid checkpoint in ``out_dir`` (start fresh when
            there is none); a path: continue from that checkpoint; ``False``: start fresh, refusing
            a folder that already holds checkpoints or another recipe.
        validate: ``validate(model) -> {"mIoU": ..., ...}``, run on rank 0 every ``val_every`` steps
            and at the end; the best ``best_metric`` (higher is better) is kept in ``checkpoint-best``.
    """
    check_trainable(model)
    info = init_distributed(device)
    dev = torch.device(process_device(str(device), info))
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)
    check_amp(recipe.amp, dev)
    out = Path(out_dir)
    ckpt = _resume_point(out, recipe, resume)
    barrier()  # every rank has read the folder before rank 0 changes it

    model.to(dev)
    model.train()
    optimizer = build_optimizer(model, recipe.optim)
    scheduler = build_scheduler(optimizer, recipe)
    scaler = grad_scaler(recipe.amp, dev)
    ema = EMA(model, recipe.ema_decay) if recipe.ema_decay is not None else None
    world, accum = info.world_size, recipe.grad_accum
    effective_batch = recipe.batch_size * world * accum
    step, best = 0, None
    if ckpt is not None:
        ts, tt = ckpt.trainer_state, ckpt.trainer_tensors
        assert ts is not None and tt is not None
        model.load_checkpoint_state(ckpt.model_state)
        optimizer_from_flat(optimizer, tt, ts["optimizer"])
        scheduler.load_state_dict(ts["scheduler"])
        factor = lr_factor(recipe.schedule, ckpt.step, recipe.max_iters, recipe.optim.lr)
        for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs):  # max_iters may have changed
            group["lr"] = base_lr * factor
        if scaler is not None and ts.get("scaler"):
            scaler.load_state_dict(ts["scaler"])
        if ema is not None:
            ema.load_state_dict({k[4:]: v for k, v in tt.items() if k.startswith("ema.")})
        restore_rng(tt, ts["rng"])
        step, best = ckpt.step, ts.get("best")
        if (ts.get("world_size"), ts.get("batch_size")) != (world, recipe.batch_size):
            warnings.warn(
                f"Resuming with {world} process(es) × batch {recipe.batch_size} where the checkpoint was written with "
                f"{ts.get('world_size')} × {ts.get('batch_size')}: the data order differs from an uninterrupted run.",
                stacklevel=2,
            )

    data_state = ckpt.trainer_state.get("data_stream") if ckpt is not None and ckpt.trainer_state else None
    stream = build_batch_stream(
        dataset,
        seed=recipe.seed,
        rank=info.rank,
        world_size=world,
        batch_size=recipe.batch_size,
        num_workers=recipe.data.num_workers,
        pin_memory=dev.type == "cuda",
        start=step * accum,
        resume=data_state,
    )
    streaming = isinstance(stream, ShardBatchStream)
    if ckpt is not None and data_state is None and streaming:
        warnings.warn(
            f"Checkpoint {ckpt.path} holds no streaming-data position: the data stream starts again at epoch 0.",
            stacklevel=2,
        )
    stream_state = None  # the data position of every rank, gathered at checkpoint steps (streaming data)

    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale(out)
        text = json.dumps(recipe.to_dict(), indent=2) + "\n"
        atomic_write(out / RECIPE_FILE, lambda f: f.write(text.encode()))
    logger = RunLogger(out, enabled=info.is_main, start_step=step, total=recipe.max_iters, progress=progress)
    barrier()

    step_module = _StepModule(model)
    ddp = None
    if info.distributed:
        ddp = DistributedDataParallel(step_module, device_ids=[dev.index] if dev.type == "cuda" else None)
    forward = ddp if ddp is not None else step_module
    params = [p for g in optimizer.param_groups for p in g["params"]]
    group_names = [str(g.get("name", i)) for i, g in enumerate(optimizer.param_groups)]
    trainable = sum(p.numel() for p in params)
    total = sum(p.numel() for p in model.parameters())
    logger.info(
        f"Training {recipe.name!r} on {dev} ({recipe.amp if recipe.amp != 'none' else 'full precision'}): "
        f"{world} process(es) × batch {recipe.batch_size} × {accum} accumulation = effective batch {effective_batch}; "
        f"{trainable:,} trainable of {total:,} parameters; "
        + (f"resuming at step {step} from {ckpt.path}" if ckpt is not None else "starting at step 0")
        + f" of {recipe.max_iters}; output {out}"
    )
    if step >= recipe.max_iters:
        logger.info(f"Nothing to train: the checkpoint is at step {step} and max_iters is {recipe.max_iters}.")

    def trainer_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
        opt_tensors, opt_meta = optimizer_to_flat(optimizer)
        rng_tensors, rng_meta = capture_rng()
        tensors = {**opt_tensors, **rng_tensors}
        if ema is not None:
            tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
        position = stream.state()
        state = {
            "epoch": position["epoch"],
            "batch_in_epoch": position["batch_in_epoch"],
            "micro_batches": position["micro_batches"],
            "world_size": world,
            "batch_size": recipe.batch_size,
            "grad_accum": accum,
            "effective_batch": effective_batch,
            "scheduler": scheduler.state_dict(),
            "optimizer": opt_meta,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng_meta,
            "best": best,
            "recipe": recipe.to_dict(),
        }
        if stream_state is not None:
            state["data_stream"] = stream_state
        return tensors, json.loads(json.dumps(state))

    def save(target: Path) -> Path:
        tensors, state = trainer_state()
        return write_checkpoint(
            target,
            model_state=model.checkpoint_state(),
            config=model.checkpoint_config(),
            step=step,
            recipe=recipe.name,
            trainer_tensors=tensors,
            trainer_state=state,
        )

    after_step = getattr(model, "after_step", None)  # the optional per-optimiser-step hook
    record: dict[str, Any] = {}
    try:
        while step < recipe.max_iters:
            _seed_step(recipe.seed, info.rank, step)
            lr = recipe.optim.lr * lr_factor(recipe.schedule, step, recipe.max_iters, recipe.optim.lr)
            group_lrs = [float(g["lr"]) for g in optimizer.param_groups]
            optimizer.zero_grad(set_to_none=True)
            sums: dict[str, Tensor] = {}
            for micro in range(accum):
                batch = _to_device(stream.next(), dev)
                last = micro == accum - 1
                with ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext():
                    with autocast(recipe.amp, dev):
                        outputs = forward(batch)
                    loss = _loss_of(outputs, step) / accum
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                for k, v in outputs.items():
                    if isinstance(v, Tensor) and v.dim() == 0:
                        sums[k] = sums.get(k, 0.0) + v.detach().float()
            if scaler is not None:
                scaler.unscale_(optimizer)
            grad_norm = None
            if recipe.clip_grad_norm is not None:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, recipe.clip_grad_norm)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            step += 1
            if after_step is not None:  # e.g. a momentum teacher follows the student (PixelCLIP, ViL-Seg)
                with torch.no_grad():
                    after_step(step)
            if ema is not None:
                ema.update(step)
            logger.advance()

            at_end = step == recipe.max_iters
            periodic_val = recipe.val_every is not None and step % recipe.val_every == 0
            val_due = validate is not None and (at_end or periodic_val)
            ckpt_due = at_end or step % recipe.checkpoint_every == 0
            if val_due or at_end or step % recipe.log_every == 0:
                keys = sorted(sums)
                values = torch.stack([sums[k] for k in keys]) / accum
                if info.distributed:
                    values = all_reduce_sum(values, dev) / world
                record = {"step": step, **dict(zip(keys, values.tolist()))}
                if not math.isfinite(record["loss"]):
                    raise TrainingError(f"The loss is {record['loss']} at step {step}; training diverged.")
                record.update({"lr": lr, "epoch": stream.epoch_progress})
                record.update({f"lr/{n}": v for n, v in zip(group_names, group_lrs)})
                if grad_norm is not None:
                    record["grad_norm"] = float(grad_norm)
                if streaming:  # unreadable samples the shard readers skipped, all ranks together
                    skipped = torch.tensor([float(sum(stream.skipped.values()))])
                    if info.distributed:
                        skipped = all_reduce_sum(skipped, dev)
                    record["data/skipped"] = int(skipped.item())
            improved = False
            if val_due and info.is_main:
                assert validate is not None
                scores = _validate(validate, model)
                record.update({f"val/{k}": v for k, v in scores.items()})
                if best_metric not in scores:
                    raise TrainingError(f"validate() returned {sorted(scores)}, without best_metric {best_metric!r}.")
                if best is None or scores[best_metric] > best["value"]:
                    best = {"metric": best_metric, "value": scores[best_metric], "step": step}
                    improved = True
            if record.get("step") == step:
                logger.log(record)
            if streaming and (ckpt_due or periodic_val or at_end):  # on every rank (a collective)
                stream_state = stream.gathered_state()
                if info.is_main and ckpt_due and stream.skipped:
                    counts = ", ".join(f"{k} {v}" for k, v in sorted(stream.skipped.items()))
                    logger.info(f"Data: samples skipped so far by process 0's shard readers: {counts}.")
            if info.is_main:
                if improved:  # before the numbered checkpoint, whose state records this best
                    save(out / BEST)
                if ckpt_due:
                    numbered = save(out / checkpoint_name(step))
                    copy_checkpoint(numbered, out / LAST)
                    prune_checkpoints(out, recipe.keep_last)
            if val_due or ckpt_due:
                barrier()
    finally:
        stream.close()
        logger.close()
    barrier()
    last = out / LAST
    return TrainResult(
        out_dir=out,
        step=step,
        checkpoint=last if last.is_dir() else None,
        metrics=record,
        best=best,
        resumed_from=ckpt.path if ckpt is not None else None,
        world_size=world,
        effective_batch=effective_batch,
        ema=ema,
    )
