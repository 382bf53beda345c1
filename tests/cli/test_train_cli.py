"""`vocabseg train`, then the trained weights through `segment`, `eval` and `recipes`; bad input gets one
clear error line and exit status 2."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from vocabseg.cli.main import main
from vocabseg.data.synthetic import write_synthetic_pascal5i_shapes

HEAD = '{"width": 32, "depth": 1, "heads": 2, "decoder_stages": 1, "fourier_frequencies": 8}'


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_synthetic_pascal5i_shapes(tmp_path_factory.mktemp("voc"), 12, 6, size=(64, 64), seed=1)


@pytest.fixture()
def train_args(tiny_clip_dir, data_root):
    return ["train", "--recipe", "beyond_labels_pascal5i", "--fold", "1", "--data-root", str(data_root),
            "--model", f"local-dir:{tiny_clip_dir}", "--pretrained", "none", "--max-iters", "4", "--batch-size", "2",
            "--checkpoint-every", "2", "--val-every", "2", "--val-limit", "3", "--no-progress",
            "--set", "data.crop=64", "--set", "data.num_workers=0", "--set", f"model.options={HEAD}"]  # fmt: skip


def test_train_then_segment_and_eval_with_the_weights(train_args, data_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*train_args, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "effective batch 2" in err and "checkpoint-last" in err
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["data"]["options"]["fold"] == 1 and recipe["max_iters"] == 4 and recipe["batch_size"] == 2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr"} <= set(records[-1]) and records[-1]["step"] == 4
    for name in ("checkpoint-last", "checkpoint-best"):
        assert {"model.safetensors", "config.json", "manifest.json"} <= {p.name for p in (out / name).iterdir()}
    assert json.loads((out / "checkpoint-last" / "config.json").read_text())["method"] == "beyond_labels"
    assert not list(out.rglob("*.pt")) and not list(out.rglob("*.bin"))  # no pickles
    assert list((out / "tb").glob("events.out.tfevents.*"))  # TensorBoard (the train extra is installed)

    image = tmp_path / "img.png"
    Image.fromarray(np.full((40, 56, 3), 128, np.uint8)).save(image)
    seg_out = tmp_path / "seg"
    weights = ["--method", "beyond_labels", "--weights", str(out / "checkpoint-last")]
    assert main(["segment", str(image), "-c", "cat, dog", "-o", str(seg_out), *weights]) == 0
    result = json.loads((seg_out / "img" / "result.json").read_text())
    assert result["method"] == "beyond_labels" and result["weights"].endswith("checkpoint-last")
    assert result["settings"]["score"] == "sigmoid"

    eval_out = tmp_path / "eval"
    best = str(out / "checkpoint-best")
    code = main(["eval", "-b", "pascal5i-1", "--data-root", str(data_root), "--limit", "2", "--no-progress",
                 "-o", str(eval_out), "--method", "beyond_labels", "--weights", best])  # fmt: skip
    assert code == 0
    assert "pascal5i-1: mIoU" in capsys.readouterr().out

    # one checkpoint per fold through a {fold} pattern; the summary prints the PASCAL-5i table
    for fold in (1, 2):
        shutil.copytree(out / "checkpoint-last", tmp_path / f"f{fold}")
    code = main(["eval", "-b", "pascal5i-1,pascal5i-2", "--data-root", str(data_root), "--no-progress",
                 "-o", str(eval_out), "--method", "beyond_labels", "--weights", str(tmp_path / "f{fold}")])  # fmt: skip
    assert code == 0
    summary = (eval_out / "summary.md").read_text()
    assert "## PASCAL-5i" in summary and "(2 of 4 folds)" in summary
    assert main(["eval", "-b", "pascal5i-3", "--data-root", str(data_root), "-o", str(eval_out),
                 "--method", "beyond_labels", "--weights", str(tmp_path / "f{fold}")]) == 2  # fmt: skip
    assert "f3" in capsys.readouterr().err  # the missing fold's path is named

    # resuming a finished run changes nothing; a new run in the same folder is refused
    assert main([*train_args, "--out", str(out), "--resume"]) == 0
    assert main([*train_args, "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err


def test_recipes_lists_and_shows(capsys):
    assert main(["recipes"]) == 0
    assert "beyond_labels_pascal5i" in capsys.readouterr().out
    assert main(["recipes", "beyond_labels_pascal5i"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["method"] == "beyond_labels"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--set", "optim.lrr=1"], "lrr"),
        (["--set", "max_iters=many"], "max_iters"),
        (["--recipe", "beyond_labelz"], "Did you mean"),
        (["--set", 'data.options={"fold": 9}'], "fold"),
    ],
)
def test_bad_training_input_is_one_clear_error(train_args, tmp_path, capsys, extra, message):
    assert main([*train_args, "--out", str(tmp_path / "run"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vocabseg: error:") and message in err and "Traceback" not in err


def test_trained_method_needs_weights_and_refuses_broken_ones(tiny_clip_dir, tmp_path, capsys):
    image = tmp_path / "img.png"
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(image)
    base = ["segment", str(image), "-c", "cat", "-o", str(tmp_path / "o"), "--method", "beyond_labels",
            "--model", f"local-dir:{tiny_clip_dir}"]  # fmt: skip
    assert main(base) == 2
    assert "--weights" in capsys.readouterr().err
    broken = tmp_path / "ckpt"
    broken.mkdir()
    (broken / "config.json").write_text('{"method": "beyond_labels"}')
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    assert main([*base, "--weights", str(broken)]) == 2
    assert "model.safetensors" in capsys.readouterr().err
