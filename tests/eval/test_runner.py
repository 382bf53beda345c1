"""The evaluation runner: index alignment, persistence and resume, predictions, reports."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from vocabseg import Segmenter
from vocabseg.data import build_dataset
from vocabseg.data.synthetic import write_synthetic, write_synthetic_pascal5i
from vocabseg.eval import evaluate, segmentation_metrics, write_summary
from vocabseg.eval.records import RecordStore

SMALL = {"short_side": 64, "crop": 32, "stride": 16}


@pytest.fixture(scope="module")
def tiny_segmenter(tiny_clip):
    return Segmenter(method="sclip", model=tiny_clip, text_cache_dir=None, templates=["a photo of a {}."], **SMALL)


class OracleSegmenter:
    """Predicts ``transform(label)`` for each image of ``dataset`` (found by the image's bytes);
    PASCAL-5i episodes: the binary label of the vocabulary's class."""

    def __init__(self, dataset, transform: Callable[[np.ndarray], np.ndarray] = lambda x: x):
        self.dataset, self.transform = dataset, transform
        self.spec = SimpleNamespace(name="sclip")
        self.clip = SimpleNamespace(model=torch.nn.Linear(2, 2))
        self.method = torch.nn.Linear(2, 2)
        self.templates, self.dtype, self.device = ["{}"], torch.float32, torch.device("cpu")
        self._samples = {self._key(dataset.read_image(s)): s for s in dataset.samples}

    @staticmethod
    def _key(array: np.ndarray) -> str:
        return hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()

    def describe(self, config=None):
        return {"method": "sclip", "model": "oracle", "surgery": False, "templates": "x", "settings": config.to_dict()}

    def predict_arrays(self, arrays, vocab, config, progress=None, return_probs=True):
        out = []
        for a in arrays:
            sample = self._samples[self._key(a)]
            if self.dataset.kind == "episodes":
                names = [c.names for c in self.dataset.vocabulary.classes]
                group = names.index(vocab.classes[1].names)
                sample = next(s for s in self.dataset.samples if s.image == sample.image and s.group == group)
            label = self.dataset.read_label(sample)
            out.append(SimpleNamespace(labels=self.transform(np.where(label == self.dataset.ignore_index, 0, label))))
        return out


def strict_json(path) -> object:
    """``path`` parsed as strict JSON: ``NaN`` / ``Infinity`` (which ``json.loads`` accepts) raise."""
    return json.loads(path.read_text(), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))


def same(a: dict, b: dict) -> bool:
    """Equal metric dicts, NaN included (compared by their exact JSON text)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


@pytest.mark.parametrize("name", ["voc21", "voc20", "ade150", "cityscapes"])
def test_perfect_predictions_score_one(name, tmp_path):
    """Prediction index = dataset label index, through every label rule (VOC20 / ADE shift by one)."""
    ds = build_dataset(name, write_synthetic(name, tmp_path, num_images=3, seed=2))
    result = evaluate(OracleSegmenter(ds), ds, progress=False)
    present = [i for i, v in enumerate(result.metrics["IoU"]) if not math.isnan(v)]
    assert present and result.miou == 1.0 and result.metrics["aAcc"] == 1.0
    expected = torch.zeros_like(result.accumulator)
    for s in ds.samples:
        label = torch.from_numpy(ds.read_label(s))
        valid = label[label != ds.ignore_index]
        expected += torch.diag(torch.bincount(valid, minlength=ds.num_classes))
    assert torch.equal(result.accumulator, expected)


def test_accumulator_matches_a_hand_made_prediction(tmp_path):
    ds = build_dataset("voc21", write_synthetic("voc21", tmp_path, num_images=2, seed=5))
    shifted = OracleSegmenter(ds, transform=lambda lab: (lab + 1) % 21)
    result = evaluate(shifted, ds, progress=False, convention="detectron2")
    labels = [ds.read_label(s) for s in ds.samples]
    cm = torch.zeros(21, 21, dtype=torch.int64)
    for lab in labels:
        valid = lab != 255
        np.add.at(cm.numpy(), (lab[valid], (lab[valid] + 1) % 21), 1)
    assert torch.equal(result.accumulator, cm)
    assert result.miou == 0.0 and result.all_metrics["mmseg"]["mIoU"] == 0.0
    assert same(result.metrics, segmentation_metrics(cm, "detectron2"))


def test_resume_gives_the_uninterrupted_result_without_recomputing(tmp_path, tiny_segmenter, monkeypatch):
    ds = build_dataset("coco_object", write_synthetic("coco_object", tmp_path / "data", num_images=5, seed=1))
    full = evaluate(tiny_segmenter, ds, protocol="unified", overrides=SMALL, out_dir=tmp_path / "a", progress=False)

    real = tiny_segmenter.predict_arrays
    calls = []

    def interrupted(arrays, *args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(len(arrays))
        return real(arrays, *args, **kwargs)

    monkeypatch.setattr(tiny_segmenter, "predict_arrays", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate(tiny_segmenter, ds, protocol="unified", overrides=SMALL, out_dir=tmp_path / "b", images_per_batch=1)
    run_dir = next((tmp_path / "b" / "coco_object").iterdir())
    assert len(list((run_dir / "records").glob("*.json"))) == 2 and not (run_dir / "result.json").exists()

    def counting(arrays, *args, **kwargs):
        calls.append(len(arrays))
        return real(arrays, *args, **kwargs)

    calls.clear()
    monkeypatch.setattr(tiny_segmenter, "predict_arrays", counting)
    resumed = evaluate(tiny_segmenter, ds, protocol="unified", overrides=SMALL, out_dir=tmp_path / "b", progress=False)
    assert sum(calls) == 3 and (resumed.info["computed"], resumed.info["resumed"]) == (3, 2)
    assert torch.equal(resumed.accumulator, full.accumulator) and same(resumed.metrics, full.metrics)
    assert resumed.run_dir.name == full.run_dir.name  # same configuration, same run id

    calls.clear()  # everything is done now: nothing is recomputed
    again = evaluate(tiny_segmenter, ds, protocol="unified", overrides=SMALL, out_dir=tmp_path / "b", progress=False)
    assert calls == [] and torch.equal(again.accumulator, full.accumulator)

    changed = evaluate(  # a changed setting never reuses stale records
        tiny_segmenter, ds, protocol="unified", overrides={**SMALL, "logit_scale": 30.0}, out_dir=tmp_path / "b"
    )
    assert sum(calls) == 5 and changed.run_dir != resumed.run_dir and changed.info["resumed"] == 0


def test_records_are_sparse_json_and_checked(tmp_path):
    store = RecordStore(tmp_path, (3, 3))
    counts = torch.tensor([[4, 0, 0], [0, 0, 1], [0, 0, 0]])
    store.save("city/a b", counts)
    record = json.loads(store.path("city/a b").read_text())
    assert record == {"id": "city/a b", "shape": [3, 3], "index": [0, 5], "count": [4, 1]}
    assert torch.equal(store.load(["city/a b", "missing"])["city/a b"], counts)
    with pytest.warns(UserWarning, match=r"city%2Fa%20b.json: shape \[3, 3\], not the benchmark's \[2, 2\]"):
        assert RecordStore(tmp_path, (2, 2)).load(["city/a b"]) == {}  # another shape: not reused
    store.path("x").write_text("{truncated")
    with pytest.warns(UserWarning, match=r"x.json: unreadable"):
        assert "x" not in store.load(["x"])


def test_predictions_reports_and_limit(tmp_path, tiny_segmenter):
    ds = build_dataset("cityscapes", write_synthetic("cityscapes", tmp_path / "data", num_images=3))
    result = evaluate(tiny_segmenter, ds, overrides=SMALL, out_dir=tmp_path / "out", limit=2, save_predictions=True)
    assert result.info["num_evaluated"] == 2 and result.accumulator.sum() == 2 * (40 * 60 - 60)  # ignore band
    pred = result.run_dir / "predictions" / "aachen" / "aachen_000000_000000.png"
    png = Image.open(pred)
    assert png.mode == "P" and png.size == (60, 40) and png.getpalette()[:3] == [128, 64, 128]  # road colour
    assert (result.run_dir / "predictions" / "aachen" / "aachen_000000_000002.png").is_file()  # sorted ids
    assert not (result.run_dir / "predictions" / "bremen").exists()  # beyond the limit
    data = json.loads((result.run_dir / "result_limit2.json").read_text())
    assert data["benchmark"] == "cityscapes" and data["protocol"]["name"] == "paper" and data["limit"] == 2
    assert data["settings"]["short_side"] == 64 and data["protocol"]["overrides"] == SMALL
    assert data["metrics"]["mIoU"] == pytest.approx(result.miou)
    md = (result.run_dir / "result_limit2.md").read_text()
    assert "wangf3014/SCLIP" in md and "short side 64" in md and "mmseg IoUMetric" in md and "| road |" in md
    summary = write_summary(tmp_path / "out").read_text()
    assert "| sclip | custom | paper+overrides |" in summary and f"{100 * result.miou:.2f}*" in summary

    # a class absent from both labels is not scored: null (never NaN) in every JSON file written
    present = set().union(*(np.unique(ds.read_label(s)).tolist() for s in ds.limited(2)))
    absent = min(set(range(ds.num_classes)) - present)  # 0 (road) with these labels
    written = sorted((tmp_path / "out").rglob("*.json"))
    assert {p.name for p in written} >= {"run.json", "result_limit2.json", "summary.json"}
    assert len([p for p in written if p.parent.name == "records"]) == 2
    parsed = {p: strict_json(p) for p in written}
    result_json = parsed[result.run_dir / "result_limit2.json"]
    d2 = result_json["all_metrics"]["detectron2"]
    assert d2["IoU"][absent] is None and d2["Acc"][absent] is None and result_json["metrics"]["Acc"][absent] is None
    assert parsed[tmp_path / "out" / "summary.json"][0]["all_metrics"]["detectron2"]["IoU"][absent] is None
    row = next(line for line in md.splitlines() if line.startswith(f"| {ds.class_names[absent]} |"))
    assert row.endswith("| - |")  # its Acc: not scored


def test_summary_json_is_strict_over_results_of_older_versions(tmp_path):
    """``json.loads`` accepts the NaN tokens older versions wrote; the summary must not pass them on."""
    run_dir = tmp_path / "voc21" / "sclip-0123456789ab"
    run_dir.mkdir(parents=True)
    old = {"benchmark": "voc21", "method": "sclip", "model": "ViT-B-16", "row_id": "r", "limit": None,
           "protocol": {"label": "paper"}, "metrics": {"mIoU": 0.5, "IoU": [0.5, float("nan")]}}  # fmt: skip
    (run_dir / "result.json").write_text(json.dumps(old))
    assert "NaN" in (run_dir / "result.json").read_text()
    write_summary(tmp_path)
    assert strict_json(tmp_path / "summary.json")[0]["metrics"]["IoU"] == [0.5, None]


def test_episodes_through_the_runner(tmp_path):
    root = write_synthetic_pascal5i(tmp_path, num_images=4, hsnet_lists=True, seed=7)
    ds = build_dataset("pascal5i-0", root, episodes="hsnet1000")
    result = evaluate(OracleSegmenter(ds), ds, progress=False)
    assert result.metrics["mIoU"] == 1.0 and result.metrics["FB-IoU"] == 1.0
    assert result.accumulator.shape == (5, 2, 2) and result.info["convention"] == "episodes"
    # each pair is computed once but counts with its HSNet weight
    fg = sum(s.weight * int((ds.read_label(s) == 1).sum()) for s in ds.samples)
    assert int(result.accumulator[:, 1, 1].sum()) == fg
    background_only = OracleSegmenter(ds, transform=np.zeros_like)
    r = evaluate(background_only, ds, progress=False)
    assert r.metrics["mIoU"] == 0.0 and 0 < r.metrics["FB-IoU"] < 0.5
