"""Checkpoints: round trip, damage detection, resume selection, pruning, safe replacement, no pickle."""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vocabseg.errors import VocabsegError
from vocabseg.train import CheckpointError, train
from vocabseg.train.checkpoint import (
    LAST,
    capture_rng,
    checkpoint_name,
    copy_checkpoint,
    find_resume_checkpoint,
    numbered_checkpoints,
    optimizer_from_flat,
    optimizer_to_flat,
    prune_checkpoints,
    read_checkpoint,
    remove_stale,
    restore_rng,
    write_checkpoint,
)

from .toy import ToySegDataset, ToySegModel, toy_recipe

SRC = Path(__file__).resolve().parents[2] / "src" / "vocabseg" / "train"


def _write(path: Path, step: int = 3, value: float = 1.0) -> Path:
    return write_checkpoint(
        path,
        model_state={"w": torch.full((4, 4), value), "n": torch.tensor(7)},
        config={"method": "toy", "options": {"a": 1}},
        step=step,
        recipe="toy",
        trainer_tensors={"optimizer.state.0.exp_avg": torch.ones(4)},
        trainer_state={"epoch": 1},
    )


def test_round_trip(tmp_path):
    ckpt = read_checkpoint(_write(tmp_path / "c"))
    assert ckpt.step == 3 and ckpt.resumable
    assert ckpt.config == {"method": "toy", "options": {"a": 1}, "format_version": 1, "step": 3, "recipe": "toy"}
    assert torch.equal(ckpt.model_state["w"], torch.ones(4, 4)) and int(ckpt.model_state["n"]) == 7
    assert ckpt.trainer_state == {"epoch": 1, "format_version": 1, "step": 3}
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert sorted(manifest["files"]) == [
        "config.json",
        "model.safetensors",
        "trainer_state.json",
        "trainer_state.safetensors",
    ]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    with pytest.raises(ValueError, match="must not use the keys"):
        write_checkpoint(tmp_path / "d", model_state={}, config={"step": 1}, step=1, recipe="toy")


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda c: _flip_byte(c / "model.safetensors"), "model.safetensors is corrupt"),
        (lambda c: os.truncate(c / "model.safetensors", 10), "model.safetensors has 10 bytes, expected"),
        (lambda c: (c / "manifest.json").unlink(), "incomplete: manifest.json is missing"),
        (lambda c: (c / "trainer_state.json").unlink(), "trainer_state.json is missing"),
        (lambda c: (c / "manifest.json").write_text("{"), "manifest.json is unreadable"),
    ],
)
def test_damage_is_a_checkpoint_error_naming_the_folder(tmp_path, damage, message):
    folder = _write(tmp_path / "c")
    damage(folder)
    with pytest.raises(CheckpointError, match=message) as info:
        read_checkpoint(folder)
    assert str(folder) in str(info.value) and isinstance(info.value, VocabsegError)


def test_resume_picks_the_newest_valid_checkpoint(tmp_path):
    assert find_resume_checkpoint(tmp_path) is None
    for step in (2, 4, 6):
        copy_checkpoint(_write(tmp_path / checkpoint_name(step), step=step), tmp_path / LAST)
    assert find_resume_checkpoint(tmp_path) == tmp_path / checkpoint_name(6)
    (tmp_path / checkpoint_name(6) / "trainer_state.json").unlink()
    with pytest.warns(UserWarning, match="trainer_state.json is missing"):
        assert find_resume_checkpoint(tmp_path) == tmp_path / LAST  # same step, still intact
    _flip_byte(tmp_path / LAST / "model.safetensors")
    with pytest.warns(UserWarning, match="damaged") as warned:
        assert find_resume_checkpoint(tmp_path) == tmp_path / checkpoint_name(4)
    assert len(warned) == 2
    for step in (2, 4):
        (tmp_path / checkpoint_name(step) / "manifest.json").unlink()
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="all 4 are damaged"):
        find_resume_checkpoint(tmp_path)


def test_replacing_last_is_safe_and_leftovers_are_cleaned(tmp_path):
    first = _write(tmp_path / checkpoint_name(1), step=1, value=1.0)
    second = _write(tmp_path / checkpoint_name(2), step=2, value=2.0)
    copy_checkpoint(first, tmp_path / LAST)
    copy_checkpoint(second, tmp_path / LAST)
    assert read_checkpoint(tmp_path / LAST).step == 2
    assert float(read_checkpoint(tmp_path / LAST).model_state["w"][0, 0]) == 2.0
    # a kill between the two renames of a replacement leaves the old copy aside and no checkpoint-last:
    os.rename(tmp_path / LAST, tmp_path / ".old-checkpoint-last-abc")
    (tmp_path / ".tmp-checkpoint-00000003-abc").mkdir()  # and a kill mid-write leaves a hidden temp dir
    assert find_resume_checkpoint(tmp_path) == second  # neither is mistaken for a checkpoint
    assert len(remove_stale(tmp_path)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint_name(1), checkpoint_name(2)]


def test_keep_last_pruning(tmp_path):
    for step in range(1, 6):
        _write(tmp_path / checkpoint_name(step), step=step)
    deleted = prune_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in deleted] == [checkpoint_name(s) for s in (1, 2, 3)]
    assert [s for s, _ in numbered_checkpoints(tmp_path)] == [4, 5]


def test_optimizer_state_round_trips_without_pickle():
    model = ToySegModel()
    opt = torch.optim.AdamW(
        [{"params": list(model.body.parameters()), "name": "body"}, {"params": list(model.head.parameters())}], lr=0.1
    )
    sample = ToySegDataset()[0]
    for _ in range(2):
        model.training_step({k: v[None] for k, v in sample.items()})["loss"].backward()
        opt.step()
    tensors, meta = optimizer_to_flat(opt)
    assert "optimizer.state.0.exp_avg" in tensors and json.loads(json.dumps(meta)) == meta
    fresh = torch.optim.AdamW(
        [{"params": list(model.body.parameters()), "name": "body"}, {"params": list(model.head.parameters())}], lr=0.5
    )
    optimizer_from_flat(fresh, tensors, meta)
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for pid in a["state"]:
        for key, value in a["state"][pid].items():
            assert torch.equal(value, b["state"][pid][key])
    wrong = torch.optim.AdamW([{"params": list(model.parameters())}], lr=0.1)
    with pytest.raises(CheckpointError, match="parameter groups"):
        optimizer_from_flat(wrong, tensors, meta)


def test_rng_states_round_trip():
    tensors, meta = capture_rng()
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(123), random.seed(4), np.random.seed(5)
    restore_rng(tensors, json.loads(json.dumps(meta)))
    assert (torch.rand(3).tolist(), random.random(), np.random.rand()) == (expected[0].tolist(), *expected[1:])


def test_a_run_writes_only_safetensors_and_json(tmp_path):
    recipe = toy_recipe(max_iters=7, checkpoint_every=2, keep_last=2, ema_decay=0.9)
    train(recipe, ToySegModel(), ToySegDataset(n=24), tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        checkpoint_name(6),
        checkpoint_name(7),
        LAST,
        "metrics.jsonl",
        "recipe.json",
        "tb",
    ]
    assert read_checkpoint(tmp_path / LAST).step == 7
    for path in tmp_path.rglob("*"):
        if not path.is_file():
            continue
        assert path.suffix not in {".pt", ".pth", ".bin", ".pkl", ".pickle"}, path
        assert not path.read_bytes().startswith(b"\x80"), f"{path} looks like a pickle"
        if path.suffix == ".safetensors":
            load_file(path)
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".jsonl":
            assert all(json.loads(line) for line in path.read_text().splitlines())
        else:
            assert path.parent.name == "tb" and path.name.startswith("events.out.tfevents"), path
    for source in SRC.glob("*.py"):  # nothing in the engine can write or read a pickle
        text = source.read_text()
        assert not re.search(r"torch\.(save|load)\(|import pickle|pickle\.", text), source
