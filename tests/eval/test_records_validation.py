"""Records with valid JSON but impossible content are recomputed with one warning, never trusted."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from vocabseg import Segmenter
from vocabseg.cli.main import main
from vocabseg.data import build_dataset
from vocabseg.data.synthetic import write_synthetic, write_synthetic_pascal5i
from vocabseg.eval import evaluate
from vocabseg.eval.records import RecordStore
from vocabseg.eval.runner import EpisodeScorer

SMALL = {"short_side": 64, "crop": 32, "stride": 16}
COUNTS = torch.tensor([[4, 0, 0], [0, 0, 1], [0, 0, 0]])  # 5 pixels counted


def _write(store: RecordStore, sample_id: str, **changes) -> None:
    """The record of ``COUNTS`` for a 6-pixel image, with ``changes`` (``None``: the key left out)."""
    record = {"id": sample_id, "shape": [3, 3], "index": [0, 5], "count": [4, 1], "pixels": 6, **changes}
    store.path(sample_id).parent.mkdir(parents=True, exist_ok=True)
    store.path(sample_id).write_text(json.dumps({k: v for k, v in record.items() if v is not None}))


def _load(store: RecordStore, ids: list[str], **kwargs) -> tuple[dict, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = store.load(ids, **kwargs)
    return found, [str(w.message) for w in caught]


def test_a_saved_record_stores_the_pixel_count_and_loads_back(tmp_path):
    store = RecordStore(tmp_path, (3, 3))
    store.save("a", COUNTS, pixels=6)
    assert json.loads(store.path("a").read_text())["pixels"] == 6
    found, messages = _load(store, ["a"])
    assert torch.equal(found["a"], COUNTS) and messages == []
    _write(store, "b", pixels=None)  # a record without a pixel count (older versions) is still valid
    found, messages = _load(store, ["b"])
    assert torch.equal(found["b"], COUNTS) and messages == []


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"index": [0, 9]}, "an index is outside 0..8: 0..9"),  # an IndexError before
        ({"index": [-1, 5]}, "an index is outside 0..8: -1..5"),  # silently wrapped around before
        ({"count": [4, -1]}, "a count is negative: -1"),
        ({"count": [4000, 1000]}, "5000 pixels counted, more than the image's 6"),  # counts x 1000
        ({"index": [0, 5, 6]}, "3 indices but 2 counts"),
        ({"count": [2**62, 2**62], "pixels": None}, f"{2**63} pixels counted, more than an int64 holds"),
        ({"shape": [2, 2]}, "shape [2, 2], not the benchmark's [3, 3]"),
        ({"shape": [9]}, "shape [9], not the benchmark's [3, 3]"),
        ({"index": [0, 0]}, "an index is repeated"),
        ({"count": [4.0, 1]}, "count is not a list of integers"),
        ({"count": [True, 1]}, "count is not a list of integers"),
        ({"index": "0,5"}, "index is not a list of integers"),
        ({"pixels": -6}, "pixels is -6, not a non-negative integer"),
        ({"id": "other"}, "it holds the id 'other'"),
    ],
)
def test_an_impossible_record_is_recomputed_with_one_warning_naming_it(tmp_path, changes, reason):
    store = RecordStore(tmp_path, (3, 3))
    store.save("good", COUNTS, pixels=6)
    _write(store, "bad", **changes)
    found, messages = _load(store, ["good", "bad"])
    assert list(found) == ["good"] and torch.equal(found["good"], COUNTS)
    assert messages == [f"recomputing the invalid record {store.path('bad')}: {reason}."]


def test_not_an_object_and_truncated_records_warn_the_same_way(tmp_path):
    store = RecordStore(tmp_path, (3, 3))
    store.path("a").parent.mkdir(parents=True)
    store.path("a").write_text("[1, 2]")
    store.path("b").write_text('{"id": "b", "shape": [3, ')
    found, messages = _load(store, ["a", "b"])
    assert found == {} and len(messages) == 2
    assert messages[0] == f"recomputing the invalid record {store.path('a')}: not a JSON object."
    assert messages[1].startswith(f"recomputing the invalid record {store.path('b')}: unreadable (Expecting")


def test_an_episode_record_counts_for_its_own_class_only(tmp_path):
    ds = build_dataset("pascal5i-0", write_synthetic_pascal5i(tmp_path, num_images=2, hsnet_lists=True, seed=1))
    scorer, sample = EpisodeScorer(ds), ds.samples[0]
    own = torch.zeros(scorer.shape, dtype=torch.int64)
    own[sample.group] = torch.tensor([[5, 1], [2, 3]])
    assert scorer.check(own, sample) is None
    other = (sample.group + 1) % 5
    moved = own.roll(1, dims=0)
    assert scorer.check(moved, sample) == f"counts for fold class {other} in an episode of class {sample.group}"
    store = RecordStore(tmp_path / "run", scorer.shape)
    store.save(sample.id, moved, pixels=40 * 60)
    found, messages = _load(store, [sample.id], check=lambda sid, counts: scorer.check(counts, sample))
    assert found == {} and messages == [
        f"recomputing the invalid record {store.path(sample.id)}: counts for fold class {other} in an episode "
        f"of class {sample.group}."
    ]


def test_evaluate_recomputes_corrupt_records_and_gets_the_uninterrupted_result(tmp_path, tiny_clip):
    seg = Segmenter(method="sclip", model=tiny_clip, text_cache_dir=None, templates=["a photo of a {}."], **SMALL)
    ds = build_dataset("voc21", write_synthetic("voc21", tmp_path / "data", num_images=3, seed=2))
    full = evaluate(seg, ds, protocol="unified", overrides=SMALL, out_dir=tmp_path / "out", progress=False)
    first, second, _ = (full.run_dir / "records" / f"{s.id}.json" for s in ds.samples)
    assert json.loads(first.read_text())["pixels"] == 40 * 60
    record = json.loads(first.read_text())
    first.write_text(json.dumps({**record, "count": [1000 * c for c in record["count"]]}))
    record = json.loads(second.read_text())
    second.write_text(json.dumps({**record, "index": [*record["index"][:-1], 21 * 21]}))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = evaluate(seg, ds, protocol="unified", overrides=SMALL, out_dir=tmp_path / "out", progress=False)
    assert sorted(str(w.message).split(": ")[0] for w in caught) == [
        f"recomputing the invalid record {p}" for p in sorted([first, second])
    ]
    assert (again.info["computed"], again.info["resumed"]) == (2, 1)
    assert torch.equal(again.accumulator, full.accumulator)
    assert json.dumps(again.all_metrics) == json.dumps(full.all_metrics)
    third = evaluate(seg, ds, protocol="unified", overrides=SMALL, out_dir=tmp_path / "out", progress=False)
    assert third.info["computed"] == 0  # the recomputed records were written back


def test_the_command_line_prints_one_warning_line_per_invalid_record(tmp_path, tiny_clip_dir, capsys):
    data = write_synthetic("voc21", tmp_path / "data", num_images=2, seed=2)
    command = ["eval", "-b", "voc21", "--data-root", str(data), "-o", str(tmp_path / "out"), "--model",
               f"local-dir:{tiny_clip_dir}", "--method", "sclip", "--templates", "name", "--short-side", "64",
               "--crop", "32", "--stride", "16", "--no-progress"]  # fmt: skip
    assert main(command) == 0
    (run,) = (tmp_path / "out" / "voc21").iterdir()
    path = sorted((run / "records").iterdir())[0]
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "count": [-c for c in record["count"]]}))
    capsys.readouterr()
    assert main(command) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert lines == [f"vocabseg: warning: recomputing the invalid record {path}: a count is negative: "
                     f"{-max(record['count'])}."]  # fmt: skip
    assert json.loads((run / "result.json").read_text())["computed"] == 1


def test_run_identity_holds_every_plain_method_option(tiny_clip):
    """String and tuple options (not only numbers) reach the run id; modules are left to the fingerprint."""
    from vocabseg.eval.records import _method_options
    from vocabseg.methods import create_method

    naclip = _method_options(create_method("naclip", clip=tiny_clip, gaussian_std=3.0))
    assert naclip == {"gaussian_std": 3.0}
    proxy = _method_options(create_method("proxyclip", clip=tiny_clip, vfm=lambda x: x[:, :8, ::8, ::8]))
    assert "vfm" not in proxy and proxy["gamma"] == 3.0
    som, l2 = (_method_options(create_method("sfp", clip=tiny_clip, outlier=o)) for o in ("som", "l2norm"))
    assert som["outlier"] == "som" and l2["outlier"] == "l2norm"
