"""Scoring a benchmark on a named class subset (``--classes-subset vilseg-unseen``): the classes it names,
its metrics recomputed pixel by pixel from the labels and predictions, and the errors it gives."""

from __future__ import annotations

import hashlib
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vocabseg.cli.main import main
from vocabseg.data import build_dataset
from vocabseg.data.synthetic import write_synthetic
from vocabseg.errors import DatasetLayoutError, UnknownNameError
from vocabseg.eval import evaluate, segmentation_metrics

#: ViL-Seg Sec. 4.1, as printed: the unseen classes of the SPNet / ZS3Net splits
PAPER_UNSEEN = {
    "voc20": ["potted plant", "sheep", "sofa", "train", "tv-monitor"],
    "context59": ["cow", "motorbike", "sofa", "cat"],
    "coco_stuff": [
        "frisbee", "skateboard", "cardboard", "carrot", "scissors", "suitcase", "giraffe", "cow", "road",
        "wall concrete", "tree", "grass", "river", "clouds", "playingfield",
    ],
}  # fmt: skip


def squash(name: str) -> str:
    """Spelling-insensitive: "tv-monitor" ~ "tv monitor", "wall concrete" ~ "concrete wall"."""
    return "".join(sorted(name.replace("-", " ").replace(" ", "")))


@pytest.mark.parametrize("benchmark", list(PAPER_UNSEEN))
def test_the_subset_names_the_papers_unseen_classes(benchmark, tmp_path):
    ds = build_dataset(benchmark, write_synthetic(benchmark, tmp_path, num_images=1), classes_subset="vilseg-unseen")
    assert ds.name == f"{benchmark}-vilseg-unseen" and ds.settings_key == benchmark  # the benchmark's settings
    names = [ds.vocabulary.classes[i].names[0] for i in ds.scored_classes]
    assert [squash(n) for n in names] == [squash(n) for n in PAPER_UNSEEN[benchmark]]
    assert len(set(ds.scored_classes)) == len(PAPER_UNSEEN[benchmark])
    assert ds.num_classes == {"voc20": 20, "context59": 59, "coco_stuff": 171}[benchmark]  # all still predicted
    assert "scored on class subset vilseg-unseen" in ds.notes[-1]
    assert ds.identity()["scored_classes"] == list(ds.scored_classes)
    assert "scored_classes" not in build_dataset(benchmark, ds.root).identity()  # earlier run ids unchanged


class Oracle:
    """Predicts ``transform(label)`` for each image of ``dataset`` (found by the image's bytes)."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform
        self.spec = SimpleNamespace(name="sclip")
        self.clip = SimpleNamespace(model=torch.nn.Linear(2, 2))
        self.method = torch.nn.Linear(2, 2)
        self.templates, self.dtype, self.device = ["{}"], torch.float32, torch.device("cpu")
        self.samples = {self.key(dataset.read_image(s)): s for s in dataset.samples}

    @staticmethod
    def key(array: np.ndarray) -> str:
        return hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()

    def describe(self, config=None):
        return {"method": "sclip", "model": "oracle", "surgery": False, "templates": "x", "settings": config.to_dict()}

    def predict_arrays(self, arrays, vocab, config, progress=None, return_probs=True):
        out = []
        for a in arrays:
            label = self.dataset.read_label(self.samples[self.key(a)])
            clean = np.where(label == self.dataset.ignore_index, 0, label)
            out.append(SimpleNamespace(labels=self.transform(clean)))
        return out


def confuse(label: np.ndarray) -> np.ndarray:
    """sheep (16) -> sofa (17), aeroplane (0) -> potted plant (15): misses and false positives."""
    pred = label.copy()
    pred[label == 16] = 17
    pred[label == 0] = 15
    return pred


def test_subset_metrics_equal_a_pixel_count(tmp_path):
    root = write_synthetic("voc20", tmp_path, num_images=4, size=(30, 40), seed=3)
    ds = build_dataset("voc20", root, classes_subset="vilseg-unseen")
    result = evaluate(Oracle(ds, confuse), ds, progress=False, out_dir=tmp_path / "out")
    labels = [ds.read_label(s) for s in ds.samples]
    preds = [confuse(np.where(lab == 255, 0, lab)) for lab in labels]
    valid = [lab != 255 for lab in labels]
    ious, hit, total = [], 0, 0
    for c in ds.scored_classes:
        inter = sum(int(((p == c) & (g == c) & v).sum()) for p, g, v in zip(preds, labels, valid))
        union = sum(int((((p == c) | (g == c)) & v).sum()) for p, g, v in zip(preds, labels, valid))
        if union:
            ious.append(inter / union)
        hit += inter
        total += sum(int(((g == c) & v).sum()) for g, v in zip(labels, valid))
    assert len(ious) == 5 and total > 0
    assert result.miou == pytest.approx(sum(ious) / len(ious))
    assert result.metrics["aAcc"] == pytest.approx(hit / total)  # the paper's pixel accuracy
    iou = result.metrics["IoU"]
    assert iou[16] == 0.0 and 0 < iou[15] < 1 and iou[18] == 1.0  # sheep missed, potted plant over-predicted
    whole = segmentation_metrics(result.accumulator)
    assert whole["IoU"] == iou and not math.isclose(whole["mIoU"], result.miou)  # same counts, other mean
    assert result.run_dir.parent.name == "voc20-vilseg-unseen"
    report = (result.run_dir / "result.md").read_text()
    assert "scored on class subset vilseg-unseen (5 of 20 classes: potted plant" in report
    assert json.loads((result.run_dir / "result.json").read_text())["dataset"]["scored_classes"] == [15, 16, 17, 18, 19]


def test_subset_of_all_classes_is_the_usual_metrics():
    rng = np.random.default_rng(0)
    mat = torch.from_numpy(rng.integers(0, 50, size=(6, 6)))
    mat[2] = 0  # a class without ground truth
    for convention in ("mmseg", "detectron2"):
        full, every = segmentation_metrics(mat, convention), segmentation_metrics(mat, convention, range(6))
        assert json.dumps(full) == json.dumps(every)


def test_unknown_subsets_and_uncovered_benchmarks_are_refused(tmp_path):
    root = write_synthetic("voc21", tmp_path, num_images=1)
    with pytest.raises(UnknownNameError, match="vilseg-unseen"):
        build_dataset("voc20", root, classes_subset="vilseg-unsen")
    with pytest.raises(DatasetLayoutError, match="no classes for voc21; it covers voc20, context59, coco_stuff"):
        build_dataset("voc21", root, classes_subset="vilseg-unseen")


def test_cli_scores_the_subset(tmp_path, tiny_clip_dir, capsys):
    root = write_synthetic("voc20", tmp_path / "data", num_images=2, nested=True)
    args = ["eval", "-b", "voc20", "--data-root", str(root.parents[1]), "-o", str(tmp_path / "out"),
            "--classes-subset", "vilseg-unseen", "--model", f"local-dir:{tiny_clip_dir}", "--method", "sclip",
            "--templates", "name", "--short-side", "64", "--crop", "32", "--stride", "16", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    assert "voc20-vilseg-unseen: mIoU" in capsys.readouterr().out
    (run,) = (tmp_path / "out" / "voc20-vilseg-unseen").iterdir()
    result = json.loads((run / "result.json").read_text())
    iou = result["all_metrics"]["mmseg"]["IoU"]
    scored = [iou[i] for i in (15, 16, 17, 18, 19) if iou[i] is not None]
    assert result["metrics"]["mIoU"] == pytest.approx(sum(scored) / len(scored))
    pascal = ["eval", "-b", "pascal5i-0", "--data-root", str(root.parents[1]), "--classes-subset", "vilseg-unseen",
              "--model", f"local-dir:{tiny_clip_dir}", "--method", "sclip"]  # fmt: skip
    assert main(pascal) != 0
    assert "--classes-subset does not apply to pascal5i-0" in capsys.readouterr().err
