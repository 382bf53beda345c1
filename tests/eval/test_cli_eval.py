"""``vocabseg eval`` end to end with the tiny model in a local-dir folder."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_CLIP

from vocabseg.cli.eval import expand_benchmarks
from vocabseg.cli.main import main
from vocabseg.data.synthetic import write_synthetic, write_synthetic_pascal5i


@pytest.fixture()
def model_args(tiny_clip_dir):
    return ["--model", f"local-dir:{tiny_clip_dir}", "--method", "sclip", "--templates", "name",
            "--short-side", "64", "--crop", "32", "--stride", "16", "--no-progress"]  # fmt: skip


def test_list(capsys):
    assert main(["eval", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ("voc21", "context459", "ade847", "folder", "pascal5i-3", "SegmentationClassAug/"):
        assert name in out


def test_expand_benchmarks():
    assert expand_benchmarks("all") == [
        "voc21", "context60", "coco_object", "voc20", "context59", "coco_stuff", "cityscapes", "ade150",
    ]  # fmt: skip
    assert expand_benchmarks("pascal5i, voc20,voc20") == [*(f"pascal5i-{i}" for i in range(4)), "voc20"]


def test_all_runs_the_benchmarks_present_and_reports_the_others(tmp_path, model_args, capsys):
    write_synthetic("voc20", tmp_path / "data", num_images=2, nested=True)
    write_synthetic("ade150", tmp_path / "data", num_images=2, nested=True)
    out = tmp_path / "out"
    code = main(["eval", "-b", "all", "--data-root", str(tmp_path / "data"), "-o", str(out), "--save-predictions",
                 *model_args])  # fmt: skip
    assert code == 0
    captured = capsys.readouterr()
    for name in ("voc21", "voc20", "ade150"):  # VOC21 shares VOC20's folder
        assert f"{name}: mIoU" in captured.out
    assert "5 benchmark(s) not found" in captured.err and "coco_stuff: skipped, coco_stuff: no COCO-Stuff164k" in (
        captured.err
    )
    summary = (out / "summary.md").read_text()
    assert "| method | model | protocol | voc21 | voc20 | ade150 | avg (standard 8) |" in summary
    assert "(3 of 8)" in summary
    (ade_run,) = (out / "ade150").iterdir()
    result = json.loads((ade_run / "result.json").read_text())
    assert result["dataset"]["label_handling"].startswith("reduce_zero_label")
    assert result["templates"] == "name"
    assert len(list((ade_run / "predictions").glob("*.png"))) == 2


def test_single_missing_benchmark_fails_with_the_layout_message(tmp_path, model_args, capsys):
    (tmp_path / "data").mkdir()
    assert main(["eval", "-b", "cityscapes", "--data-root", str(tmp_path / "data"), *model_args]) == 2
    err = capsys.readouterr().err
    assert "no Cityscapes" in err and "leftImg8bit/val/ (images)" in err and "an empty folder" in err


def test_option_checks(tmp_path, model_args, capsys):
    assert main(["eval", "-b", "voc21", "--data-root", str(tmp_path), "--episodes", "pairs", *model_args]) == 2
    assert "--episodes does not apply to voc21" in capsys.readouterr().err
    assert main(["eval", "-b", "vco21", "--data-root", str(tmp_path), *model_args]) == 2
    assert "Did you mean 'voc21'" in capsys.readouterr().err
    assert main(["eval", "-b", "voc21", *model_args]) == 2
    assert "--data-root" in capsys.readouterr().err


def test_pascal5i_folds(tmp_path, model_args, capsys):
    write_synthetic_pascal5i(tmp_path / "VOC2012", num_images=2, hsnet_lists=True)
    code = main(["eval", "-b", "pascal5i-0,pascal5i-1", "--data-root", str(tmp_path), "--episodes", "hsnet1000",
                 "-o", str(tmp_path / "out"), *model_args])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "pascal5i-0: mIoU" in out and "FB-IoU" in out
    (run,) = (tmp_path / "out" / "pascal5i-1").iterdir()
    md = (run / "result.md").read_text()
    assert "HSNet's 1000 episodes" in md and "FB-IoU" in md and "| bus |" in md
    assert "settings | short side 64" in md and "prob threshold 0.1" in md  # SCLIP's VOC21 paper threshold


def test_random_weights_are_seeded_so_a_rerun_resumes(tmp_path, capsys):
    """--pretrained none draws the same weights for the same --seed (default 0): the same run folder,
    and a rerun computes nothing; another seed draws other weights, so another run folder."""
    data = write_synthetic("voc21", tmp_path / "data", num_images=2, seed=3)
    out = tmp_path / "out"
    command = ["eval", "-b", "voc21", "--data-root", str(data), "-o", str(out), "--model", TINY_CLIP,
               "--pretrained", "none", "--method", "sclip", "--templates", "name", "--short-side", "64",
               "--crop", "32", "--stride", "16", "--no-progress"]  # fmt: skip
    assert main([*command, "--seed", "0"]) == 0
    (run,) = (out / "voc21").iterdir()
    first = json.loads((run / "result.json").read_text())
    assert (first["computed"], first["resumed"], first["seed"]) == (2, 0, 0)
    assert main(command) == 0  # the default seed is 0, and the global RNGs have moved on since
    assert list((out / "voc21").iterdir()) == [run]
    again = json.loads((run / "result.json").read_text())
    assert (again["computed"], again["resumed"]) == (0, 2) and again["metrics"] == first["metrics"]
    assert "seed 0, run id" in (run / "result.md").read_text()

    assert main([*command, "--seed", "1"]) == 0
    (other,) = set((out / "voc21").iterdir()) - {run}
    weights = [json.loads((r / "run.json").read_text())["weights"] for r in (run, other)]
    assert weights[0] != weights[1]
    result = json.loads((other / "result.json").read_text())
    assert (result["computed"], result["resumed"], result["seed"]) == (2, 0, 1)


@pytest.mark.parametrize(
    ("value", "message"), [("-1", "between 0 and 2**63 - 1, not -1"), ("x", "an integer, not 'x'")]
)
def test_seed_must_be_a_non_negative_integer(value, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--seed", value, "--list"])
    assert exc.value.code == 2
    assert f"argument --seed: must be {message}" in capsys.readouterr().err


def test_paper_protocol_builds_one_segmenter_per_method_options_set(tmp_path, model_args, monkeypatch, capsys):
    """CLIPer's paper options differ on VOC (336-px sliding views, threshold 0.1) and ADE-150 (its
    defaults): one segmenter for VOC21 and VOC20 (run one after the other), one for ADE-150, each run
    recording its options; -O wins over the paper's; the unified protocol builds one."""
    import vocabseg.cli.eval as eval_cli

    write_synthetic("voc20", tmp_path / "data", num_images=2, nested=True)
    write_synthetic("ade150", tmp_path / "data", num_images=2, nested=True)
    built, order = [], []

    def recording(args, base_options=None):
        seg = segmenter_from_args(args, base_options)
        built.append(dict(seg.method.method_options))
        return seg

    segmenter_from_args = eval_cli.segmenter_from_args
    monkeypatch.setattr(eval_cli, "segmenter_from_args", recording)
    args = [a if a != "sclip" else "cliper" for a in model_args]

    def run(protocol, *extra):
        built.clear()
        out = tmp_path / protocol / "-".join(extra)
        code = main(["eval", "-b", "voc21,ade150,voc20", "--data-root", str(tmp_path / "data"), "-o", str(out),
                     "--protocol", protocol, *args, *extra])  # fmt: skip
        assert code == 0
        order.append([line.split(":")[0] for line in capsys.readouterr().out.splitlines()[:3]])
        recorded = {}
        for name in ("voc21", "voc20", "ade150"):
            (run_dir,) = (out / name).iterdir()
            recorded[name] = json.loads((run_dir / "run.json").read_text())["method_options"]
        return recorded

    voc, ade = dict(slide_crop=336, attention_thr=0.1), dict(slide_crop=224, attention_thr=0.2)
    recorded = run("paper")
    assert [(b["slide_crop"], b["attention_thr"]) for b in built] == [(336, 0.1), (224, 0.2)]
    for name, want in (("voc21", voc), ("voc20", voc), ("ade150", ade)):
        assert {k: recorded[name][k] for k in want} == want, name

    recorded = run("paper", "-O", "attention_thr=0.3")
    assert [(b["slide_crop"], b["attention_thr"]) for b in built] == [(336, 0.3), (224, 0.3)]
    assert (recorded["voc20"]["slide_crop"], recorded["voc20"]["attention_thr"]) == (336, 0.3)

    recorded = run("unified")
    assert [(b["slide_crop"], b["attention_thr"]) for b in built] == [(224, 0.2)]
    assert recorded["voc20"] == recorded["ade150"]
    assert order == [["voc21", "voc20", "ade150"]] * 2 + [["voc21", "ade150", "voc20"]]
