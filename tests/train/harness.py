"""Checks every trained model must pass through the one trainer, shared by the trainer's own tests and
each method's: exact resume after SIGKILL, and two DDP processes equal to one with the whole batch.

A *setup* names a function as ``"path/to/file.py:function"``; the function is called as
``setup(batch_size=..., workers=...)`` (``batch_size=None``: the setup's own) and returns
``(recipe, model, train_dataset)``; see ``toy.py``'s setups. Resume runs
happen in child processes (``run_setup.py``) so they can be SIGKILLed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch.utils.data import Dataset

RUN_SETUP = Path(__file__).with_name("run_setup.py")


def load_setup(setup: str) -> Callable[..., tuple[Any, torch.nn.Module, Dataset]]:
    """The function a ``"file.py:function"`` setup names."""
    path, _, name = setup.rpartition(":")
    spec = importlib.util.spec_from_file_location(f"_setup_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(Path(path).parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(Path(path).parent))
    return getattr(module, name)


class SlowDataset(Dataset):
    """Delays every sample, so a run lasts long enough to be killed between two checkpoints."""

    def __init__(self, dataset: Dataset, delay: float):
        self.dataset, self.delay = dataset, delay

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: Any) -> Any:
        time.sleep(self.delay)
        return self.dataset[item]

    def __getattr__(self, name: str) -> Any:  # collate_fn and friends of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def tensors(run: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    """A saved checkpoint's tensors (copied, not views of the file)."""
    from vocabseg.train.checkpoint import LAST

    return {k: v.clone() for k, v in load_file(run / LAST / name).items()}


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def start_run(out: Path, setup: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(RUN_SETUP), str(out), setup, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def finish_run(proc: subprocess.Popen, timeout: float = 300) -> str:
    output, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, output
    return output


def kill_after(proc: subprocess.Popen, marker: Path, extra_delay: float = 0.0, timeout: float = 240) -> None:
    """SIGKILL once ``marker`` exists (plus a delay), checking the run had not finished."""
    deadline = time.monotonic() + timeout
    while not marker.exists():
        assert proc.poll() is None, f"run ended before writing {marker.name}: {proc.communicate()[0]}"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    time.sleep(extra_delay)
    assert proc.poll() is None, "the run finished before it could be killed; use a longer step delay"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def _kill_all(runs: list[tuple[subprocess.Popen, Path, float]], timeout: float = 240) -> None:
    """:func:`kill_after` for several runs at once: each is killed as soon as its own marker appears."""
    deadline = time.monotonic() + timeout
    pending = list(runs)
    while pending:
        ready = [r for r in pending if r[1].exists()]
        for run in ready:
            kill_after(*run)
            pending.remove(run)
        for proc, marker, _ in pending:
            assert proc.poll() is None, f"run ended before writing {marker.name}: {proc.communicate()[0]}"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)


def check_sigkill_resume(
    tmp_path: Path,
    setup: str,
    *,
    kill_at: Iterable[tuple[int, int, float]] = ((0, 3, 0.0),),
    step_delay: float = 0.15,
) -> dict[str, torch.Tensor]:
    """An uninterrupted reference run, and one run per ``(workers, checkpoint step, extra delay)``
    SIGKILLed after that checkpoint and resumed in a new process: each must end with bit-identical
    weights, trainer state (optimiser, EMA, RNG) and metrics log. Returns the reference weights."""
    from vocabseg.train.checkpoint import checkpoint_name
    from vocabseg.train.log import read_metrics

    reference = start_run(tmp_path / "ref", setup)
    killed = {}
    for workers, step, delay in kill_at:
        out = tmp_path / f"w{workers}"
        killed[workers] = (
            out,
            step,
            delay,
            start_run(out, setup, "--workers", str(workers), "--step-delay", str(step_delay)),
        )
    _kill_all([(proc, out / checkpoint_name(step), delay) for out, step, delay, proc in killed.values()])
    resumed = {w: start_run(out, setup, "--workers", str(w), "--resume") for w, (out, *_) in killed.items()}
    finish_run(reference)
    ref_model, ref_state = tensors(tmp_path / "ref"), tensors(tmp_path / "ref", "trainer_state.safetensors")
    ref_metrics = read_metrics(tmp_path / "ref" / "metrics.jsonl")
    for w, proc in resumed.items():
        output = finish_run(proc)
        assert "resuming at step" in output and "resumed_from=None" not in output, output
        run = killed[w][0]
        assert_identical(tensors(run), ref_model)
        assert_identical(tensors(run, "trainer_state.safetensors"), ref_state)
        assert read_metrics(run / "metrics.jsonl") == ref_metrics
    return ref_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, out: str, setup: str, batch_size: int) -> None:
    from vocabseg.eval.distributed import exit_process
    from vocabseg.train import train

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    recipe, model, dataset = load_setup(setup)(batch_size=batch_size, workers=0)
    result = train(recipe, model, dataset, out, progress=False)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"world_size": result.world_size, "effective_batch": result.effective_batch}, f)
    exit_process(0)


def check_ddp_equals_single(
    tmp_path: Path, setup: str, *, batch_size: int = 2, atol: float = 1e-5, per_rank_keys: Iterable[str] = ()
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Two gloo processes with ``batch_size`` each must end with the weights of one process with
    twice the batch, and log the same (rank-averaged) losses. ``per_rank_keys``: buffers DDP takes
    from rank 0 (counters of a rank's own samples), compared by the caller. Returns (ddp, single)."""
    from vocabseg.train import train
    from vocabseg.train.log import read_metrics

    ddp_out = tmp_path / "ddp"
    mp.spawn(_ddp_worker, args=(2, free_port(), str(ddp_out), setup, batch_size), nprocs=2, join=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the DDP workers: another thread count changes float reductions
    try:
        recipe, model, dataset = load_setup(setup)(batch_size=2 * batch_size, workers=0)
        result = train(recipe, model, dataset, tmp_path / "one", progress=False)
    finally:
        torch.set_num_threads(threads)
    for rank in (0, 1):
        info = json.loads((ddp_out / f"rank{rank}.json").read_text())
        assert info == {"world_size": 2, "effective_batch": result.effective_batch}
    ddp_state, one_state = tensors(ddp_out), tensors(tmp_path / "one")
    assert sorted(ddp_state) == sorted(one_state)
    skip = set(per_rank_keys)
    for k in one_state:
        if k not in skip:
            torch.testing.assert_close(ddp_state[k], one_state[k], rtol=0, atol=atol, msg=lambda m, k=k: f"{k}: {m}")
    ddp_log, one_log = read_metrics(ddp_out / "metrics.jsonl"), read_metrics(tmp_path / "one" / "metrics.jsonl")
    assert [r["step"] for r in ddp_log] == [r["step"] for r in one_log]  # rank 0 only
    for a, b in zip(ddp_log, one_log):
        assert abs(a["loss"] - b["loss"]) <= max(atol, 1e-5) * 10, (a, b)
    return ddp_state, one_state


def with_batch(recipe: Any, batch_size: int, workers: int) -> Any:
    """``recipe`` with another batch size and number of loader workers."""
    return replace(recipe, batch_size=batch_size, data=replace(recipe.data, num_workers=workers))
