"""Sharded evaluation with 2 gloo processes equals the single-process result, exactly."""

from __future__ import annotations

import json
import os
import socket

import torch
import torch.multiprocessing as mp
from conftest import TINY_CLIP

from vocabseg import Segmenter
from vocabseg.data import build_dataset
from vocabseg.data.synthetic import write_synthetic
from vocabseg.eval import evaluate
from vocabseg.eval.distributed import WorldInfo, exit_process, init_distributed, process_device, world_info

SMALL = {"short_side": 64, "crop": 32, "stride": 16}
TEMPLATES = ["a photo of a {}."]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _evaluate(model_dir, data_root, out_dir):
    seg = Segmenter(method="sclip", model=f"local-dir:{model_dir}", text_cache_dir=None, templates=TEMPLATES)
    ds = build_dataset("voc21", data_root)
    return evaluate(seg, ds, protocol="unified", overrides=SMALL, out_dir=out_dir, progress=False)


def _worker(rank, world_size, port, model_dir, data_root, out_dir, report_dir):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    result = _evaluate(model_dir, data_root, out_dir)
    report = {"info": vars(info), "acc": result.accumulator.tolist(), "miou": result.miou}
    report["computed"] = result.info["computed"]
    with open(os.path.join(report_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    exit_process(0)  # the teardown that avoids gloo's abort at interpreter exit


def test_two_gloo_processes_equal_one(tmp_path, tiny_clip_dir):
    data = write_synthetic("voc21", tmp_path / "data", num_images=5, seed=4)
    single = _evaluate(tiny_clip_dir, data, tmp_path / "single")
    reports = tmp_path / "reports"
    reports.mkdir()
    args = (2, _free_port(), str(tiny_clip_dir), str(data), str(tmp_path / "ddp"), str(reports))
    mp.spawn(_worker, args=args, nprocs=2, join=True)
    for rank in (0, 1):
        r = json.loads((reports / f"rank{rank}.json").read_text())
        assert r["info"] == {"rank": rank, "world_size": 2, "local_rank": rank}
        assert torch.equal(torch.tensor(r["acc"]), single.accumulator)  # all-reduced: every rank has the total
        assert r["miou"] == single.miou and r["computed"] == 5  # 3 + 2 images, summed over ranks
    run_dir = tmp_path / "ddp" / "voc21" / single.run_dir.name  # same configuration, same run id
    assert len(list((run_dir / "records").glob("*.json"))) == 5  # each rank wrote its shard's records
    data_json = json.loads((run_dir / "result.json").read_text())  # written by rank 0 only
    assert data_json["world_size"] == 2 and data_json["metrics"]["mIoU"] == single.miou
    # and a single process resumes from the records of the sharded run without recomputing
    resumed = _evaluate(tiny_clip_dir, data, tmp_path / "ddp")
    assert resumed.info["computed"] == 0 and torch.equal(resumed.accumulator, single.accumulator)


def _cli_worker(rank, world_size, port, argv):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    import conftest  # noqa: F401  (registers the tiny model's config in this fresh process)

    from vocabseg.cli.main import main

    main(argv)  # a torchrun worker: ends the process with exit_process(code)


def test_random_weights_are_the_same_in_every_process(tmp_path):
    """--pretrained none: each rank seeds before building, so both draw the same weights and write
    one run folder (without the seed each process drew its own weights, hence its own run id)."""
    data = write_synthetic("voc21", tmp_path / "data", num_images=3, seed=4)
    argv = ["eval", "-b", "voc21", "--data-root", str(data), "-o", str(tmp_path / "out"), "--model", TINY_CLIP,
            "--pretrained", "none", "--method", "sclip", "--templates", "name", "--short-side", "64", "--crop", "32",
            "--stride", "16", "--no-progress", "--seed", "5"]  # fmt: skip
    mp.spawn(_cli_worker, args=(2, _free_port(), argv), nprocs=2, join=True)
    (run,) = (tmp_path / "out" / "voc21").iterdir()
    assert len(list((run / "records").glob("*.json"))) == 3
    result = json.loads((run / "result.json").read_text())
    assert (result["world_size"], result["computed"], result["seed"]) == (2, 3, 5)


def test_world_info_from_torchrun_environment(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert world_info() == WorldInfo(0, 1, 0) and not world_info().distributed
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    info = world_info()
    assert info == WorldInfo(3, 4, 1) and not info.is_main
    assert process_device("cuda", info) == "cuda:1" and process_device("cuda:0", info) == "cuda:0"
    assert process_device("cpu", info) == "cpu"
