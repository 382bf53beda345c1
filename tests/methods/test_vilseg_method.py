"""The ``vilseg`` method: its region logits and its three losses recomputed by hand from its parts, what each
loss trains, the momentum teacher, checkpoints with and without the teacher, the cluster mask generator,
exact resume after SIGKILL, and that a short run on captioned shapes makes the clusters follow the shapes."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.optimize import linear_sum_assignment

from vocabseg import Segmenter
from vocabseg.errors import CheckpointError, MethodOptionError
from vocabseg.heads.vilseg import contrastive_loss, dino_loss, iic_loss, photometric_flip, unflip
from vocabseg.masks import as_masks
from vocabseg.methods import get_method_spec
from vocabseg.methods.vilseg import ViLSegMasks, paint_regions
from vocabseg.models.clip import OPENAI_MEAN, OPENAI_STD
from vocabseg.text.templates import resolve_templates

TRAIN = Path(__file__).parents[1] / "train"
SETUP = TRAIN / "vilseg_setup.py"


@pytest.fixture(scope="module")
def shapes():
    from train import vilseg_setup

    return vilseg_setup


def build(shapes, seed: int = 0, **options) -> torch.nn.Module:
    return shapes.build_model(seed, **options)


def unit_text(k: int = 3, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(k, 32, generator=torch.Generator().manual_seed(seed)), dim=-1)


def images(*size: int, b: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, *size, generator=torch.Generator().manual_seed(seed))


def batch(shapes, b: int = 3, size: int = 64, crop: int = 32) -> dict:
    ds = shapes.CaptionedShapes(n=b, size=size, crop=crop)
    return ds.collate_fn([ds[(i, i)] for i in range(b)])


def by_hand(method, x: torch.Tensor, text: torch.Tensor, soft: bool = False) -> torch.Tensor:
    """Cluster argmax on the dense grid, each cluster's mean unit embedding, its cosine with every class,
    painted over the cluster's cells, then bilinear upsampling: cluster by cluster, the slow way."""
    dense = method.dense(x).float()  # (B, D, h, w)
    b, d, h, w = dense.shape
    conv = method.cluster_head.main
    logits = torch.einsum("cd,bdhw->bchw", conv.weight[:, :, 0, 0], dense) + conv.bias.view(1, -1, 1, 1)
    probs = torch.softmax(logits, dim=1)
    unit = dense / dense.norm(dim=1, keepdim=True)
    out = torch.zeros(b, text.shape[0], h, w)
    for n in range(b):
        labels = probs[n].argmax(0)
        for c in range(probs.shape[1]):
            mask = probs[n, c] if soft else (labels == c).float()
            if mask.sum() == 0:
                continue  # an empty cluster paints nothing
            region = (unit[n] * mask).sum(dim=(1, 2)) / mask.sum()
            cos = text @ (region / region.norm())
            out[n] += cos[:, None, None] * mask
    return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)


# -- inference ------------------------------------------------------------------------------------------
def test_spec():
    spec = get_method_spec("vilseg")
    assert spec.trainable and spec.templates == "photo" and resolve_templates("photo") == ("a photo of a {}.",)
    assert "vocabseg train --recipe vilseg_clip_vitb_cc3m" in spec.weights
    assert spec.options["clusters"] == 25 and spec.options["head"] == "dino" and spec.options["trainable_blocks"] == 4


def test_logits_are_each_clusters_class_cosines_painted_over_it(shapes):
    method = build(shapes).eval()
    x, text = images(48, 80), unit_text()
    with torch.no_grad():
        got = method.logits(x, text)
        want = by_hand(method, x, text)
    assert got.shape == (2, 3, 48, 80)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert got.abs().max() <= 1 + 1e-5


def test_every_cell_of_a_cluster_takes_the_clusters_class_and_empty_clusters_are_skipped(shapes):
    method = build(shapes).eval()
    x, text = images(64, 96, b=1), unit_text(k=4)
    with torch.no_grad():
        method.cluster_head.main.bias[0] = -1e4  # cluster 0 never wins: empty in every image
        dense = method.dense(x)
        probs = method.cluster_probabilities(x)
        painted = method.logits(x, text)
    labels = probs.argmax(1)[0]
    assert 0 not in labels.unique().tolist() and len(labels.unique()) > 1 and torch.isfinite(painted).all()
    onehot = F.one_hot(labels[None], probs.shape[1]).permute(0, 3, 1, 2).float()
    on_grid = paint_regions(F.normalize(dense, dim=1), onehot, text)
    classes = on_grid.argmax(1)[0]
    for c in labels.unique().tolist():  # argmax over classes is constant inside each cluster
        assert len(classes[labels == c].unique()) == 1, c
    upsampled = F.interpolate(on_grid, size=x.shape[-2:], mode="bilinear", align_corners=False)
    torch.testing.assert_close(painted, upsampled, atol=1e-6, rtol=1e-6)


def test_soft_masks_option(shapes):
    method = build(shapes, masks="soft").eval()
    x, text = images(64, 64), unit_text()
    with torch.no_grad():
        torch.testing.assert_close(method.logits(x, text), by_hand(method, x, text, soft=True), atol=1e-5, rtol=1e-5)
    with pytest.raises(MethodOptionError, match="masks='blurry'"):
        build(shapes, masks="blurry")


def test_logits_with_padding_crop_the_padded_result(shapes):
    method = build(shapes).eval()
    x, text = images(48, 80), unit_text()
    padded = torch.zeros(2, 3, 64, 96)
    padded[:, :, 8:56, 8:88] = x
    with torch.no_grad():
        torch.testing.assert_close(
            method.logits(x, text, pad_multiple=32),
            by_hand(method, padded, text)[:, :, 8:56, 8:88],
            atol=1e-5,
            rtol=1e-5,
        )


# -- training ---------------------------------------------------------------------------------------------
def test_training_step_is_the_weighted_sum_of_the_three_losses(shapes):
    method = build(shapes, vision_weight=2.0, cross_weight=0.5, cluster_weight=3.0)
    data = batch(shapes)
    torch.manual_seed(5)
    out = method.training_step(data)
    # by hand: the teacher starts as a copy of the student, with a zero centre
    with torch.no_grad():
        e_img = method.global_view(data["image"])
        e_local = method.global_view(data["local_crops"].flatten(0, 1)).view(3, 6, -1)
        vision = dino_loss(method.projection(e_local), method.projection(e_img), torch.zeros(1, 64), 0.1, 0.04)
        tokens = method.tokenizer(data["caption"])
        cross = contrastive_loss(e_img, method.clip.encode_text(tokens), method.logit_scale)
        torch.manual_seed(5)
        transformed, flipped = photometric_flip(data["image"])
        p1 = method.cluster_head(method.dense(data["image"]).float())
        p2 = unflip(method.cluster_head(method.dense(transformed).float()), flipped)
        cluster = iic_loss(p1, p2)
    for name, want in (("vision", vision), ("cross", cross), ("cluster", cluster)):
        torch.testing.assert_close(out[name], want, atol=1e-5, rtol=1e-5, msg=name)
    torch.testing.assert_close(out["loss"], 2.0 * vision + 0.5 * cross + 3.0 * cluster, atol=1e-5, rtol=1e-5)
    assert float(out["logit_scale"]) == pytest.approx(1 / 0.07)
    # the step moved DINO's centre towards the teacher's batch mean
    torch.testing.assert_close(method.teacher.center, 0.1 * method.projection(e_img).mean(0, keepdim=True))


def _grads(method) -> dict[str, torch.Tensor | None]:
    return {n: p.grad for n, p in method.named_parameters()}


@pytest.mark.parametrize("term", ["vision", "cross", "cluster"])
def test_what_each_loss_trains(shapes, term):
    """L_vision and L_cross train the last image blocks and their heads; L_cluster (Eq. 1: L_cluster(Φ_c))
    only the clustering head. Frozen blocks and the text tower get nothing."""
    weights = {f"{t}_weight": float(t == term) for t in ("vision", "cross", "cluster")}
    method = build(shapes, **weights)
    method.training_step(batch(shapes))["loss"].backward()
    grads = _grads(method)
    moved = {n for n, g in grads.items() if g is not None and g.abs().sum() > 0}
    block = "clip.visual.transformer.resblocks.2.attn.in_proj_weight"
    expected = {
        "vision": {block, "projection.last_layer.weight"},
        "cross": {block, "logit_scale"},
        "cluster": {"cluster_head.main.weight"},
    }[term]
    assert expected <= moved, expected - moved
    assert not any(n.startswith("clip.visual.transformer.resblocks.0.") for n in moved)
    assert not any(n.startswith("clip.") and not n.startswith("clip.visual.") for n in moved)  # text frozen
    if term == "cluster":
        assert moved <= {"cluster_head.main.weight", "cluster_head.main.bias"}
    else:
        assert not any(n.startswith("cluster_head.") for n in moved)


def test_cluster_grad_lets_iic_train_the_encoder(shapes):
    method = build(shapes, vision_weight=0.0, cross_weight=0.0, cluster_grad=True)
    method.training_step(batch(shapes))["loss"].backward()
    assert method.clip.visual.transformer.resblocks[2].attn.in_proj_weight.grad.abs().sum() > 0


def test_param_groups_and_what_is_trainable(shapes):
    method = build(shapes, overcluster=True)
    groups = method.param_groups()
    names = {id(p): n for n, p in method.named_parameters()}
    named = {g: {names[id(p)] for p in ps} for g, ps in groups.items()}
    assert set(named) == {"clip", "clip_no_decay", "head", "head_no_decay"}
    assert all(n.startswith("clip.visual.transformer.resblocks.") for n in named["clip"] | named["clip_no_decay"])
    assert {n.split(".")[4] for n in named["clip"] | named["clip_no_decay"]} == {"1", "2"}  # trainable_blocks=2
    assert "logit_scale" in named["head_no_decay"] and "cluster_head.over.weight" in named["head"]
    assert all(method.state_dict()[n].ndim < 2 for n in named["clip_no_decay"] | named["head_no_decay"])
    assert not any(n.startswith("teacher.") for g in named.values() for n in g)  # the teacher is not trained
    everything = build(shapes, trainable_blocks="all", train_text=True)
    trained = {n for n, p in everything.named_parameters() if p.requires_grad}
    assert {"clip.visual.conv1.weight", "clip.visual.positional_embedding", "clip.token_embedding.weight"} <= trained
    assert "clip.logit_scale" not in trained  # CLIP's own scale is unused: ViL-Seg learns its own
    with pytest.raises(MethodOptionError, match="has 3 blocks"):
        build(shapes, trainable_blocks=4)
    with pytest.raises(MethodOptionError, match="'some'"):
        build(shapes, trainable_blocks="some")


def test_train_text_trains_the_text_tower(shapes):
    method = build(shapes, train_text=True, vision_weight=0.0, cluster_weight=0.0)
    method.training_step(batch(shapes))["loss"].backward()
    assert method.clip.token_embedding.weight.grad.abs().sum() > 0


def test_the_teacher_is_an_ema_of_the_student(shapes):
    method = build(shapes)
    tower = dict(method.teacher.tower.named_buffers())
    student = dict(method.clip.visual.named_parameters())
    assert set(tower) == {n for n, p in student.items() if p.requires_grad}
    for name, t in tower.items():
        torch.testing.assert_close(t, student[name], atol=0, rtol=0)  # starts as a copy
    before = {n: t.clone() for n, t in tower.items()}
    head_before = [p.clone() for p in method.teacher.head.parameters()]
    with torch.no_grad():
        for p in method.parameters():
            if p.requires_grad:
                p.add_(0.1)
    method.after_step(1)
    for name, t in tower.items():
        torch.testing.assert_close(t, 0.996 * before[name] + 0.004 * student[name], atol=1e-6, rtol=1e-6)
    for t, old, s in zip(method.teacher.head.parameters(), head_before, method.projection.parameters()):
        torch.testing.assert_close(t, 0.996 * old + 0.004 * s, atol=1e-6, rtol=1e-6)
    # the teacher's embedding is CLIP run with the teacher's tensors in place of the trained ones
    x = images(64, 64)
    copy_clip = copy.deepcopy(method.clip)
    with torch.no_grad():
        for name, t in tower.items():
            copy_clip.visual.get_parameter(name).copy_(t)
        want = copy_clip.encode_image(x)
        torch.testing.assert_close(method._teacher_embedding(x), want, atol=1e-5, rtol=1e-5)
        assert (method.global_view(x) - want).abs().max() > 1e-4  # the student differs now


# -- checkpoints ------------------------------------------------------------------------------------------
def _perturbed(shapes, seed: int):
    method = build(shapes)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in method.checkpoint_state():
            method.state_dict()[t].add_(0.05 * torch.randn(method.state_dict()[t].shape, generator=g))
    return method


def test_checkpoint_round_trip_with_and_without_the_teacher(shapes):
    trained = _perturbed(shapes, 1)
    state = trained.checkpoint_state()
    assert any(n.startswith("teacher.tower.") for n in state) and "teacher.center" in state
    assert set(trained.inference_state()) == {n for n in state if not n.startswith("teacher.")}
    x, text = images(64, 64), unit_text()
    with torch.no_grad():
        want = trained.eval().logits(x, text)
        resumed = build(shapes, seed=3)
        resumed.load_checkpoint_state(state)  # exact resume: the teacher too
        for name, t in state.items():
            torch.testing.assert_close(resumed.state_dict()[name], t, atol=0, rtol=0, msg=name)
        slim = build(shapes, seed=3)
        slim.load_checkpoint_state(trained.inference_state())  # inference only: the teacher restarts
        torch.testing.assert_close(slim.eval().logits(x, text), want, atol=0, rtol=0)
        torch.testing.assert_close(slim.teacher.head.last_layer.weight, trained.projection.last_layer.weight)
        assert not slim.teacher.center.any()
    partial = {n: t for n, t in state.items() if n != "teacher.center"}
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\), e\.g\. teacher\.center"):
        build(shapes).load_checkpoint_state(partial)


def test_checkpoint_config(shapes):
    config = build(shapes).checkpoint_config()
    assert config["method"] == "vilseg" and config["options"]["trainable_blocks"] == 2
    json.dumps(config)


# -- the clusters as region masks -------------------------------------------------------------------------
def test_mask_generator_gives_the_clusters(shapes):
    method = build(shapes).eval()
    gen = ViLSegMasks(method, OPENAI_MEAN, OPENAI_STD, short_side=64)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, size=(50, 70, 3), dtype=np.uint8)
    masks = gen(image)
    assert masks.dtype == bool and masks.shape[1:] == (50, 70) and masks.shape[0] >= 1
    np.testing.assert_array_equal(masks.sum(0), 1)  # a partition of the image
    np.testing.assert_array_equal(as_masks(masks, (50, 70), "x"), masks)
    x = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    x = (x - torch.tensor(OPENAI_MEAN).view(3, 1, 1)) / torch.tensor(OPENAI_STD).view(3, 1, 1)
    x = F.interpolate(x[None], size=(64, 90), mode="bilinear", align_corners=False)
    with torch.no_grad():
        probs = F.interpolate(method.cluster_probabilities(x), size=(50, 70), mode="bilinear", align_corners=False)
    labels = probs.argmax(1)[0].numpy()
    assert len(masks) == len(np.unique(labels))
    for mask, c in zip(masks, np.unique(labels)):
        np.testing.assert_array_equal(mask, labels == c)
    before = gen.identity
    assert gen.persistent and before.startswith("vilseg:") and gen.identity == before
    with torch.no_grad():
        method.cluster_head.main.bias.add_(1.0)
    assert gen.identity != before  # other weights, other masks: caches must not mix them
    with pytest.raises(MethodOptionError, match="vilseg method"):
        ViLSegMasks(torch.nn.Linear(2, 2), OPENAI_MEAN, OPENAI_STD)
    seg = Segmenter(method=method, model=method.clip, text_cache_dir=None)
    from_seg = ViLSegMasks.from_segmenter(seg, short_side=64)
    np.testing.assert_array_equal(from_seg(image), gen(image))


# -- the trainer -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_resume_after_sigkill_is_exact(tmp_path):
    from train.harness import check_sigkill_resume

    check_sigkill_resume(tmp_path, f"{SETUP}:setup")


def nmi(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised mutual information (arithmetic mean of the entropies) of two labelings."""
    _, ia = np.unique(a.ravel(), return_inverse=True)
    _, ib = np.unique(b.ravel(), return_inverse=True)
    joint = np.zeros((ia.max() + 1, ib.max() + 1))
    np.add.at(joint, (ia, ib), 1)
    joint /= joint.sum()
    pa, pb = joint.sum(1), joint.sum(0)
    nz = joint > 0
    mi = float((joint[nz] * np.log(joint[nz] / np.outer(pa, pb)[nz])).sum())
    ha, hb = float(-(pa * np.log(pa)).sum()), float(-(pb * np.log(pb)).sum())
    return 2 * mi / (ha + hb) if ha + hb > 0 else 0.0


def matched_miou(clusters: np.ndarray, truth: np.ndarray) -> float:
    """Mean IoU of the true classes after the Hungarian one-to-one matching of clusters to classes."""
    k, c = int(truth.max()) + 1, int(clusters.max()) + 1
    iou = np.zeros((k, c))
    for i in range(k):
        for j in range(c):
            inter = np.sum((truth == i) & (clusters == j))
            union = np.sum((truth == i) | (clusters == j))
            iou[i, j] = inter / union if union else 0.0
    rows, cols = linear_sum_assignment(-iou)
    return float(iou[rows, cols].sum() / k)


@pytest.mark.slow
def test_a_short_run_makes_the_clusters_follow_the_shapes(shapes, tmp_path):
    """150 steps on captioned coloured shapes (tiny random CLIP): the clusters' agreement with the true
    shapes (NMI, and mIoU after Hungarian matching) on held-out images rises well above its start."""
    from vocabseg.train import train
    from vocabseg.train.recipe import OptimConfig, ScheduleConfig

    torch.set_num_threads(1)
    size = 128
    held_out = [shapes.draw(i, size) for i in range(1000, 1032)]
    x = torch.stack([shapes.normalise(im) for im, _, _ in held_out])

    def agreement(method) -> tuple[float, float]:
        with torch.no_grad():
            clusters = method.eval().cluster_probabilities(x).argmax(1)
        truth = torch.stack([shapes.labels_on_grid(lab, clusters.shape[-1]) for _, lab, _ in held_out])
        method.train()
        return nmi(clusters.numpy(), truth.numpy()), matched_miou(clusters.numpy(), truth.numpy())

    model = shapes.build_model()
    nmi_before, miou_before = agreement(model)
    recipe = shapes.vilseg_recipe(
        optim=OptimConfig(name="adamw", lr=5e-3, weight_decay=0.0, lr_mult={"clip": 0.1, "clip_no_decay": 0.1}),
        schedule=ScheduleConfig(name="constant", warmup_iters=10),
        max_iters=150,
        batch_size=16,
        checkpoint_every=150,
        log_every=50,
    )
    dataset = shapes.CaptionedShapes(n=256, size=size, crop=48)
    train(recipe, model, dataset, tmp_path / "run", progress=False)
    nmi_after, miou_after = agreement(model)
    print(f"NMI {nmi_before:.3f} -> {nmi_after:.3f}; matched mIoU {miou_before:.3f} -> {miou_after:.3f}")
    assert nmi_before < 0.15 and nmi_after > 0.3 and nmi_after > nmi_before + 0.2  # measured: 0.09 -> 0.39
    assert miou_before < 0.25 and miou_after > miou_before + 0.15  # measured: 0.15 -> 0.43
    # the run's checkpoint segments through the Segmenter
    seg = Segmenter(method="vilseg", weights=tmp_path / "run" / "checkpoint-last", text_cache_dir=None, short_side=size)
    image = (held_out[0][0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    result = seg.segment(image, "red, green, blue, yellow, grey")
    assert result.labels.shape == (size, size) and math.isfinite(float(result.probs.sum()))


def write_coco_captions(root: Path, draw, n: int = 4) -> Path:
    """A COCO Captions folder (``annotations/captions_train2017.json`` + ``train2017/``) of drawn shapes."""
    images, anns = [], []
    (root / "train2017").mkdir(parents=True)
    for i in range(n):
        image, _, caption = draw(i, 48)
        name = f"{i:012d}.jpg"
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(root / "train2017" / name)
        images.append({"id": i, "file_name": name})
        anns.append({"id": i, "image_id": i, "caption": caption})
    (root / "annotations").mkdir()
    (root / "annotations" / "captions_train2017.json").write_text(json.dumps({"images": images, "annotations": anns}))
    return root


@pytest.mark.slow
def test_the_coco_captions_recipe_trains_from_the_command_line(shapes, tmp_path, capsys):
    """``vocabseg train --recipe vilseg_clip_vitb_coco_captions`` on a tiny COCO Captions folder (tiny random
    CLIP, small heads), then its checkpoint segments through ``vocabseg segment``."""
    from vocabseg.cli.main import main

    root = write_coco_captions(tmp_path / "coco", shapes.draw)
    small = [f"model.options.{k}={v}" for k, v in {"trainable_blocks": 2, "head_dim": 32, "head_hidden": 32,
                                                     "head_bottleneck": 8, "clusters": 4}.items()]  # fmt: skip
    sets = [*small, "data.crop=64", "data.options.local_size=32", "data.num_workers=0"]
    args = ["train", "--recipe", "vilseg_clip_vitb_coco_captions", "--data-root", str(root), "--out",
            str(tmp_path / "run"), "--model", "vocabseg-test-tiny", "--pretrained", "none", "--max-iters", "2",
            "--batch-size", "2", "--no-progress", *(a for s in sets for a in ("--set", s))]  # fmt: skip
    assert main(args) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 2 and {"vision", "cross", "cluster", "logit_scale"} <= set(records[-1])
    config = json.loads((tmp_path / "run" / "checkpoint-last" / "config.json").read_text())
    assert config["method"] == "vilseg" and config["options"]["clusters"] == 4 and config["stores_clip"] is True
    image = tmp_path / "shapes.png"
    Image.fromarray(np.full((40, 56, 3), 128, dtype=np.uint8)).save(image)
    out = tmp_path / "seg"
    code = main(["segment", str(image), "-c", "red, blue", "-o", str(out), "--method", "vilseg", "--weights",
                 str(tmp_path / "run" / "checkpoint-last")])  # fmt: skip
    assert code == 0, capsys.readouterr().err


def test_recipes(shapes):
    """The paper's numbers in its recipe; the CLIP recipes' learning rates through the parameter groups."""
    from vocabseg.methods import create_method
    from vocabseg.train import get_recipe
    from vocabseg.train.optim import build_optimizer

    paper = get_recipe("vilseg_scratch_vitb_cc12m")
    assert (paper.optim.name, paper.optim.lr, paper.optim.weight_decay) == ("adam", 5e-4, 0.04)
    assert paper.schedule.warmup_iters == 4000 and paper.batch_size * 8 == 768 and paper.model.pretrained is None
    scratch = create_method("vilseg", shapes.tiny_clip(), **{**dict(paper.model.options), "head_dim": 32})
    frozen = {n for n, p in scratch.clip.named_parameters() if not p.requires_grad}
    assert frozen == {"logit_scale"}  # both towers train from scratch; CLIP's own scale is unused
    clip_recipe = get_recipe("vilseg_clip_vitb_cc3m")
    assert clip_recipe.data.dataset == "caption_shards" and clip_recipe.model.pretrained == "openai"
    assert get_recipe("vilseg_clip_vitb_coco_captions").data.dataset == "coco_captions"
    groups = {g["name"]: g for g in build_optimizer(build(shapes), clip_recipe.optim).param_groups}
    rates = {name: (g["lr"], g["weight_decay"]) for name, g in groups.items()}
    assert rates == {
        "clip": (5e-5, 0.04),
        "clip_no_decay": (5e-5, 0.0),
        "head": (5e-4, 0.04),
        "head_no_decay": (5e-4, 0.0),
    }
