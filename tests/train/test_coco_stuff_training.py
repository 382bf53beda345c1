"""COCO-Stuff-171 as training data (CAT-Seg / FGAseg) and the recipes that train on it.

The data is a tiny converted COCO-Stuff the test writes: ``images/{train,val}2017/*.jpg`` and
``annotations/{train,val}2017/*_labelTrainIds.png``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from vocabseg.data import build_dataset
from vocabseg.data.classes import packaged_class_file
from vocabseg.data.registry import get_dataset_spec
from vocabseg.data.synthetic import random_label, write_sample, write_synthetic
from vocabseg.data.train import TrainTransforms
from vocabseg.errors import DatasetLayoutError, MethodOptionError
from vocabseg.methods import list_methods
from vocabseg.train import DataConfig, Recipe, get_recipe, list_recipes
from vocabseg.train.optim import build_optimizer
from vocabseg.train.tasks import TRAIN_DATA, build_training

RECIPES = ["catseg_vitb_coco_stuff", "catseg_vitl_coco_stuff", "fgaseg_vitb_coco_stuff", "fgaseg_vitl_coco_stuff"]


def write_coco_stuff(root: Path, train: int = 3, val: int = 2, size: tuple[int, int] = (40, 60)) -> Path:
    """val2017 via the benchmark's synthetic writer, train2017 the same way in the train folders."""
    write_synthetic("coco_stuff", root, num_images=val, size=size, seed=1)
    layout = get_dataset_spec("coco_stuff").layout.for_split("train")
    rng = np.random.default_rng(0)
    for k in range(train):
        image = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
        write_sample(layout, root, f"{k + 100:012d}", image, random_label(rng, size, 171, 255))
    return root


def test_coco_stuff_reads_the_train2017_folders(tmp_path):
    root = write_coco_stuff(tmp_path / "coco_stuff164k", train=3, val=2)
    train = build_dataset("coco_stuff", tmp_path, split="train")  # found under the standard folder name
    val = build_dataset("coco_stuff", tmp_path)
    assert [s.id for s in train.samples] == ["000000000100", "000000000101", "000000000102"]
    assert all("train2017" in str(s.image) and "train2017" in str(s.label) for s in train.samples)
    assert len(val.samples) == 2 and all("val2017" in str(s.image) for s in val.samples)
    assert train.vocabulary.class_names == val.vocabulary.class_names and len(train.vocabulary) == 171
    assert "[train split" in train.description and train.notes == []  # no standard size asserted for train
    with pytest.raises(DatasetLayoutError, match=r"no 'test' split is known .*\(known: val, train\)"):
        build_dataset("coco_stuff", root, split="test")
    (root / "annotations/train2017/000000000101_labelTrainIds.png").unlink()
    with pytest.raises(DatasetLayoutError, match=r"1 of 6 image/label files are missing.*000000000101_labelTrainIds"):
        build_dataset("coco_stuff", root, split="train")


def test_the_training_data_supervises_all_171_classes(tmp_path):
    root = write_coco_stuff(tmp_path)
    data = TRAIN_DATA["coco_stuff"]
    dataset = data.train(DataConfig(dataset="coco_stuff", crop=32), root, TrainTransforms(crop=32))
    assert dataset.num_classes == 171 and dataset.class_names == [c[0] for c in packaged_class_file("coco_stuff")]
    assert dataset.ignore_index == 255 and dataset.background_index is None and len(dataset) == 3
    sample = dataset[(1, 7)]
    assert sample["image"].shape == (3, 32, 32) and sample["label"].shape == (32, 32)
    raw = dataset.read_label(dataset.samples[1])
    assert set(np.unique(sample["label"])) <= set(np.unique(raw))  # the stored train ids, cropped, unchanged
    assert len(data.validation(DataConfig(dataset="coco_stuff", crop=32), root).samples) == 2

    # another class list (CAT-Seg's coco.json names) for training and validation alike
    names = [f"name {i}" for i in range(171)]
    (tmp_path / "coco.json").write_text(json.dumps(names))
    config = DataConfig(dataset="coco_stuff", crop=32, options={"classes_file": str(tmp_path / "coco.json")})
    assert data.train(config, root, TrainTransforms(crop=32)).class_names == names
    assert data.validation(config, root).vocabulary.class_names == names
    assert data.options == ("classes_file",)


@pytest.mark.parametrize("name", RECIPES)
def test_the_recipes_are_the_official_settings(name):
    recipe = get_recipe(name)
    method, backbone = name.split("_")[:2]
    assert name in list_recipes() and Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe
    assert recipe.model.method == method and recipe.model.options == {}  # the methods' own defaults
    assert method in list_methods(trainable=True)
    model, tag = recipe.model.clip_model, recipe.model.pretrained
    assert (model, tag) in open_clip.list_pretrained() and open_clip.get_model_config(model)["quick_gelu"]
    assert model == {"vitb": "ViT-B-16-quickgelu", "vitl": "ViT-L-14-336-quickgelu"}[backbone] and tag == "openai"
    assert recipe.data.dataset == "coco_stuff" and recipe.data.dataset in TRAIN_DATA
    assert (recipe.data.crop, recipe.data.scale, recipe.data.cat_max_ratio) == (384, (1.0, 1.0), 1.0)
    assert recipe.data.flip and recipe.data.photometric
    optim, schedule = recipe.optim, recipe.schedule
    assert (optim.name, optim.lr, optim.weight_decay, optim.lr_mult) == ("adamw", 2e-4, 1e-4, {"clip": 0.01})
    assert (schedule.name, schedule.warmup_iters, schedule.min_lr) == ("cosine", 0, 0.0)
    assert (recipe.max_iters, recipe.clip_grad_norm, recipe.amp, recipe.val_every) == (80_000, 0.01, "none", 5000)
    assert recipe.batch_size == {"catseg": 4, "fgaseg": 8}[method]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["catseg", "fgaseg"])
def test_a_recipe_builds_its_training_on_a_tiny_coco_stuff(method, tmp_path, tiny_clip_dir):
    """The recipe's data, model and optimiser groups fit together (``lr_mult`` names a group the method
    has), and validation runs through the evaluation harness on COCO-Stuff val."""
    from .catseg_setup import OPTIONS

    root = write_coco_stuff(tmp_path)
    recipe = get_recipe(f"{method}_vitb_coco_stuff").with_overrides(
        [f'model.clip_model="local-dir:{tiny_clip_dir}"', "model.pretrained=null", "data.crop=32",
         "data.num_workers=0", f"model.options={json.dumps(OPTIONS)}"]
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
        setup = build_training(recipe, root, val_limit=1)
    assert setup.dataset.num_classes == 171 and len(setup.dataset) == 3
    groups = setup.model.param_groups()
    assert set(recipe.optim.lr_mult) <= set(groups)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a lr_mult group the model lacks would warn
        optimizer = build_optimizer(setup.model, recipe.optim)
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["clip"] == pytest.approx(2e-6) and lrs["head"] == pytest.approx(2e-4)
    torch.manual_seed(0)
    metrics = setup.validate(setup.model)
    assert 0.0 <= metrics["mIoU"] <= 1.0
    with pytest.raises(MethodOptionError, match=r"data.options \['fold'\] do not apply to 'coco_stuff'"):
        build_training(recipe.with_overrides(["data.options.fold=1"]), root)
