"""Released CAT-Seg checkpoints: a state dict in the official key layout, built here from a tiny model's
weights, converts strictly to ``catseg`` and gives the same logits, through the converter, the Segmenter
and ``vocabseg convert-weights``; every kind of mismatch is a clear error naming the tensor."""

from __future__ import annotations

import json
import warnings

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_CLIP, make_tiny_clip

from vocabseg import Segmenter
from vocabseg.cli.main import main
from vocabseg.errors import CheckpointError
from vocabseg.methods import create_method
from vocabseg.methods.official import (
    OPENAI_CLIPS,
    convert_official,
    identify_openai_clip,
    is_official_file,
    read_official_weights,
)

#: official sizes where no tensor shape shows them (heads 4, pad_len 256), tiny elsewhere
HEAD = dict(
    feature_grid=4, window=2, hidden_dim=16, appearance_guidance_dim=8, text_guidance_dim=8,
    decoder_dims=(16, 16), decoder_guidance_dims=(16, 8), decoder_guidance_proj_dims=(8, 4),
)  # fmt: skip
SMALL = dict(short_side=64, crop=64, stride=32)
PRED, AGG = "sem_seg_head.predictor.", "sem_seg_head.predictor.transformer."

# our module path -> CAT-Seg's, written out from cat_seg_model.py (upsample1/2), modeling/transformer/model.py
# (Aggregator) and third_party/model_vpt.py (CLIP with separate q/k/v projection weights)
HEAD_PREFIXES = [
    ("head.guidance_upsample.0.", "upsample1."),
    ("head.guidance_upsample.1.", "upsample2."),
    ("head.cost_embed.", AGG + "conv1."),
    ("head.appearance_proj.", AGG + "guidance_projection."),
    ("head.text_proj.", AGG + "text_guidance_projection."),
    ("head.decoder_guidance_proj.", AGG + "decoder_guidance_projection."),
    ("head.decoder.0.up.", AGG + "decoder1.up."),
    ("head.decoder.0.conv.", AGG + "decoder1.conv.double_conv."),
    ("head.decoder.1.up.", AGG + "decoder2.up."),
    ("head.decoder.1.conv.", AGG + "decoder2.conv.double_conv."),
    ("head.predictor.", AGG + "head."),
]
LAYER_PARTS = [
    ("spatial.guidance_norm.", "swin_block.guidance_norm."),
    ("spatial.blocks.0.", "swin_block.block_1."),
    ("spatial.blocks.1.", "swin_block.block_2."),
    ("classwise.attn.", "attention.attention."),
    ("classwise.mlp.", "attention.MLP."),
    ("classwise.", "attention."),
]


def official_name(ours: str) -> str:
    if ours.startswith("clip."):
        rest = ours[len("clip.") :]
        for j, part in enumerate("qkv"):
            rest = rest.replace(f"attn.parametrizations.in_proj_weight.original{j}", f"attn.{part}_proj_weight")
        return PRED + "clip_model." + rest
    for mine, theirs in HEAD_PREFIXES:
        if ours.startswith(mine):
            return theirs + ours[len(mine) :]
    assert ours.startswith("head.layers."), ours
    index, rest = ours[len("head.layers.") :].split(".", 1)
    for mine, theirs in LAYER_PARTS:
        if rest.startswith(mine):
            return f"{AGG}layers.{index}.{theirs}{rest[len(mine) :]}"
    raise AssertionError(ours)


def official_swin_mask(grid: int, window: int) -> torch.Tensor:
    """SwinTransformerBlock's attn_mask buffer of the shifted block (shift = window // 2), as it computes it."""
    shift = window // 2
    region = torch.zeros(grid, grid)
    count = 0
    for rows in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for cols in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            region[rows, cols] = count
            count += 1
    n = grid // window
    windows = region.view(n, window, n, window).permute(0, 2, 1, 3).reshape(n * n, window * window)
    diff = windows.unsqueeze(1) - windows.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


def official_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors (CLIP's included) under CAT-Seg's names, with the shifted blocks' mask buffers."""
    model.store_clip = True
    state = {official_name(k): v for k, v in model.checkpoint_state().items()}
    grid, window = model.method_options["feature_grid"], model.method_options["window"]
    for i in range(model.method_options["num_layers"]):
        state[f"{AGG}layers.{i}.swin_block.block_2.attn_mask"] = official_swin_mask(grid, window)
    return state


@pytest.fixture(scope="module")
def trained():
    """A tiny catseg whose head and CLIP Q/V moved off their initialisation (as a released model's)."""
    torch.manual_seed(0)
    model = create_method("catseg", make_tiny_clip(0), **HEAD).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return model


@pytest.fixture(scope="module")
def release(trained, tmp_path_factory):
    """``model_tiny.pth``: a detectron2 training checkpoint in CAT-Seg's layout."""
    path = tmp_path_factory.mktemp("release") / "model_tiny.pth"
    torch.save({"model": official_state(trained), "iteration": 79999}, path)
    return path


def x_and_text(k: int = 3):
    x = torch.randn(2, 3, 48, 80, generator=torch.Generator().manual_seed(1))
    return x, F.normalize(torch.randn(k, 1, 32, generator=torch.Generator().manual_seed(2)), dim=-1)


# -- the conversion ------------------------------------------------------------------------------------------------
def test_a_release_converts_to_the_same_logits(trained, release):
    converted = convert_official(release, "catseg", base_model=TINY_CLIP)
    assert converted.options == {
        "hidden_dim": 16, "prompt_channels": 1, "appearance_guidance_dim": 8, "text_guidance_dim": 8, "num_layers": 2,
        "decoder_dims": [16, 16], "decoder_guidance_dims": [16, 8], "decoder_guidance_proj_dims": [8, 4],
        "window": 2, "feature_grid": 4,
    }  # fmt: skip
    assert converted.clip == {"model": TINY_CLIP, "pretrained": None} and converted.stores_clip
    fresh = create_method("catseg", make_tiny_clip(seed=5), **converted.options).eval()  # other CLIP, other head
    fresh.store_clip = True
    x, text = x_and_text()
    with torch.no_grad():
        want = trained.logits(x, text)
        assert (fresh.logits(x, text) - want).abs().max() > 1e-3
        fresh.load_checkpoint_state(converted.state)
        torch.testing.assert_close(fresh.logits(x, text), want, atol=0, rtol=0)


def test_the_segmenter_reads_a_release_file_directly(trained, release, rgb_image):
    assert is_official_file(release) and not is_official_file(release.with_suffix(".safetensors"))
    loaded = Segmenter(method="catseg", model=TINY_CLIP, weights=release, text_cache_dir=None, **SMALL)
    in_memory = Segmenter(method=trained, model=trained.clip, text_cache_dir=None, **SMALL)
    a, b = loaded.segment(rgb_image, "cat, dog, sofa"), in_memory.segment(rgb_image, "cat, dog, sofa")
    np.testing.assert_array_equal(a.probs, b.probs)
    assert loaded.weights_source == str(release)


def test_convert_weights_cli_round_trip(trained, release, tmp_path, rgb_image, capsys):
    out = tmp_path / "catseg-tiny"
    assert main(["convert-weights", str(release), str(out), "--method", "catseg", "--model", TINY_CLIP]) == 0
    assert "--weights" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "manifest.json"}
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "catseg" and config["clip"] == {"model": TINY_CLIP, "pretrained": None}
    assert config["stores_clip"] is True and config["converted_from"]["file"] == "model_tiny.pth"
    folder = Segmenter(method="catseg", weights=out, text_cache_dir=None, **SMALL)  # base CLIP from config.json
    direct = Segmenter(method="catseg", model=TINY_CLIP, weights=release, text_cache_dir=None, **SMALL)
    np.testing.assert_array_equal(
        folder.segment(rgb_image, "cat, dog").probs, direct.segment(rgb_image, "cat, dog").probs
    )
    # an existing folder is never overwritten; an unknown method is named
    assert main(["convert-weights", str(release), str(out), "--method", "catseg", "--model", TINY_CLIP]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["convert-weights", str(release), str(tmp_path / "x"), "--method", "beyond_labels"]) == 2
    assert "no converter" in capsys.readouterr().err


# -- strictness ------------------------------------------------------------------------------------------------------
def saved(tmp_path, state, name="bad.pth"):
    path = tmp_path / name
    torch.save({"model": state}, path)
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        ("missing", rf"1 missing tensor\(s\): {AGG}layers\.1\.attention\.padding_tokens"),
        ("missing_clip", rf"1 missing tensor\(s\): {PRED}clip_model\.transformer\.resblocks\.0\.attn\.k_proj_weight"),
        ("extra", rf"1 unknown tensor\(s\): {PRED}bogus\.weight"),
        ("extra_clip", rf"1 unknown tensor\(s\): {PRED}clip_model\.visual\.extra_token"),
        ("shape", rf"1 shape mismatch\(es\): {AGG}head\.bias: \(2,\) vs \(1,\) expected"),
    ],
)
def test_mismatches_are_errors_naming_the_tensor(trained, tmp_path, change, message):
    state = official_state(trained)
    if change == "missing":
        del state[f"{AGG}layers.1.attention.padding_tokens"]
    elif change == "missing_clip":
        del state[f"{PRED}clip_model.transformer.resblocks.0.attn.k_proj_weight"]
    elif change == "extra":
        state[f"{PRED}bogus.weight"] = torch.zeros(2)
    elif change == "extra_clip":
        state[f"{PRED}clip_model.visual.extra_token"] = torch.zeros(2)
    else:
        state[f"{AGG}head.bias"] = torch.zeros(2)
    with pytest.raises(CheckpointError, match=message) as info:
        convert_official(saved(tmp_path, state), "catseg", base_model=TINY_CLIP)
    assert "does not convert to 'catseg'" in str(info.value)


def test_files_that_are_not_releases_are_refused(trained, tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="not a readable released checkpoint"):
        convert_official(junk, "catseg")
    no_model = tmp_path / "state_only.pth"
    torch.save({"state_dict": {"a": torch.zeros(1)}}, no_model)
    with pytest.raises(CheckpointError, match=r"not a detectron2 checkpoint: .*found \['state_dict'\]"):
        convert_official(no_model, "catseg")
    other = saved(tmp_path, {"sem_seg_head.predictor.prompt_tokens": torch.zeros(2)}, "other.pth")
    with pytest.raises(CheckpointError, match="not a CAT-Seg checkpoint"):
        convert_official(other, "catseg")
    with pytest.raises(CheckpointError, match=r"width 64 and patch 16, none of ViT-B/16.*--model"):
        convert_official(saved(tmp_path, official_state(trained), "tiny.pth"), "catseg")  # no base_model
    with pytest.raises(CheckpointError, match="say which method"):
        read_official_weights(other, None)
    with pytest.raises(CheckpointError, match="no converter for released checkpoints of 'beyond_labels'"):
        Segmenter(method="beyond_labels", weights=other)


def test_a_mask_of_another_window_is_refused(trained, tmp_path):
    state = official_state(trained)
    state[f"{AGG}layers.0.swin_block.block_2.attn_mask"] = torch.zeros(4, 4, 4)
    with pytest.raises(CheckpointError, match="not the shifted-window mask of a 4x4 grid with window 2"):
        convert_official(saved(tmp_path, state), "catseg", base_model=TINY_CLIP)


def meta_release(model: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """``catseg`` on open_clip's ``model`` and its release layout, as meta tensors (shapes only, no memory)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            ours = create_method("catseg", open_clip.create_model(model, pretrained=None, device="meta"))
    ours.store_clip = True
    state = {official_name(k): torch.empty(v.shape, device="meta") for k, v in ours.checkpoint_state().items()}
    for i in range(2):
        state[f"{AGG}layers.{i}.swin_block.block_2.attn_mask"] = official_swin_mask(24, 12)
    return ours, state


# -- the released architectures ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "release_clip, model, guidance, image",
    [
        ("ViT-B/16", "ViT-B-16-quickgelu", (3, 7), (384, 384)),
        ("ViT-L/14@336px", "ViT-L-14-336-quickgelu", (7, 15), (336, 336)),
    ],
)
def test_the_released_layouts_convert_with_the_official_sizes(release_clip, model, guidance, image):
    """The full ViT-B and ViT-L layouts (meta tensors: shapes only, no memory) give the official options,
    the QuickGELU OpenAI tower, and every tensor accounted for."""
    ours, state = meta_release(model)
    assert ours.guidance_layers == guidance and ours.image_size == image
    assert ours.clip.visual.transformer.resblocks[0].mlp.gelu.__class__.__name__ == "QuickGELU"
    assert identify_openai_clip(state, PRED + "clip_model.")[0] == release_clip
    converted = convert_official(state, "catseg")
    assert converted.clip == {"model": OPENAI_CLIPS[release_clip].model, "pretrained": None}
    assert converted.notes["clip_pretrained"] == f"{model}/openai"
    assert converted.options == {
        "hidden_dim": 128, "prompt_channels": 1, "appearance_guidance_dim": 128, "text_guidance_dim": 128,
        "num_layers": 2, "decoder_dims": [64, 32], "decoder_guidance_dims": [256, 128],
        "decoder_guidance_proj_dims": [32, 16], "window": 12, "feature_grid": 24,
    }  # fmt: skip
    assert len(converted.state) == len(state) - 2  # everything but the two mask buffers


def test_building_an_openai_release_on_another_tower_warns():
    """CAT-Seg's ViT-B/16 is OpenAI's QuickGELU tower; ``--model ViT-B-16`` (GELU in open_clip) would differ."""
    _, state = meta_release("ViT-B-16-quickgelu")
    with pytest.warns(UserWarning, match=r"ViT-B-16-quickgelu in open_clip, QuickGELU\); building it on ViT-B-16"):
        converted = convert_official(state, "catseg", base_model="ViT-B-16")
    assert converted.clip["model"] == "ViT-B-16"
