"""SAM automatic mask generation through transformers, end to end on a tiny random-weight SAM
saved as a local ``save_pretrained`` folder (no download)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from vocabseg.errors import SettingsError, WeightsUnavailableError
from vocabseg.masks import MASK_MODEL_FLAG, SamMasks, create_mask_generator

#: the tiny model's input side: the image processor resizes the long side to this
TINY_SAM_SIDE = 64


@pytest.fixture(scope="module")
def tiny_sam_dir(tmp_path_factory) -> Path:
    side = TINY_SAM_SIDE
    config = transformers.SamConfig(
        vision_config={
            "hidden_size": 16,
            "output_channels": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": side,
            "patch_size": 16,
            "window_size": 0,
            "global_attn_indexes": [0],
            "num_pos_feats": 8,
            "mlp_dim": 32,
        },
        prompt_encoder_config={"hidden_size": 16, "image_size": side, "patch_size": 16, "mask_input_channels": 4},
        mask_decoder_config={
            "hidden_size": 16,
            "mlp_dim": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "iou_head_hidden_dim": 16,
        },
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-sam")
    transformers.SamModel(config).save_pretrained(folder)
    transformers.SamImageProcessor(
        size={"longest_edge": side}, pad_size={"height": side, "width": side}
    ).save_pretrained(folder)
    return folder


OPTIONS = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}


@pytest.fixture()
def image() -> np.ndarray:
    """A non-square 40 x 56 image: two flat halves."""
    img = np.zeros((40, 56, 3), dtype=np.uint8)
    img[:, :28] = (220, 40, 40)
    img[:, 28:] = (30, 30, 200)
    return img


def test_sam_from_a_local_folder_matches_the_transformers_pipeline(tiny_sam_dir, image):
    generator = create_mask_generator("sam", model=str(tiny_sam_dir), **OPTIONS)
    masks = generator(image)
    assert masks.dtype == bool and masks.ndim == 3 and masks.shape[1:] == (40, 56) and len(masks) >= 1
    reference = transformers.pipeline("mask-generation", model=str(tiny_sam_dir), device="cpu")
    expected = reference(Image.fromarray(image), points_per_crop=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)[
        "masks"
    ]
    assert np.array_equal(masks, np.stack([m.numpy() for m in expected]))


def test_thresholds_reach_the_model_and_no_mask_is_an_empty_array(tiny_sam_dir, image):
    strict = SamMasks("sam", tiny_sam_dir, points_per_side=4, pred_iou_thresh=1.01)
    masks = strict(image)
    assert masks.shape == (0, 40, 56) and masks.dtype == bool


def test_identity_names_weights_and_options(tiny_sam_dir):
    a = SamMasks("sam", tiny_sam_dir, points_per_side=4)
    assert a.persistent and a.identity.startswith("sam:")
    assert SamMasks("sam", tiny_sam_dir, points_per_side=4).identity == a.identity
    assert SamMasks("sam", tiny_sam_dir, points_per_side=8).identity != a.identity
    changed = SamMasks("sam", tiny_sam_dir, points_per_side=4)
    with torch.no_grad():
        next(changed.model.parameters()).add_(1.0)
    assert changed.identity != a.identity


def test_a_hub_id_not_in_the_cache_offline_is_one_clear_error():
    with pytest.raises(WeightsUnavailableError) as info:
        create_mask_generator("sam2", model="nobody/no-such-sam2")
    message = str(info.value)
    assert message.splitlines()[0].startswith(
        "Could not load pretrained weights for mask generator 'sam2' (nobody/no-such-sam2): they are not in the cache"
    )
    assert "HF_HUB_OFFLINE is set" in message.splitlines()[0]
    assert f"`{MASK_MODEL_FLAG} /path/to/folder`" in message and "--pretrained none --vfm-pretrained none" in message
    assert "Traceback" not in message and len(message.splitlines()) == 3


def test_a_missing_local_folder_names_the_option(tmp_path):
    with pytest.raises(WeightsUnavailableError, match=f"^{MASK_MODEL_FLAG} {tmp_path}/nope: no such folder"):
        SamMasks("sam", tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsUnavailableError, match="the folder has no config.json"):
        SamMasks("sam", tmp_path / "empty")


def test_unknown_options_and_families_are_refused_before_loading():
    with pytest.raises(SettingsError, match=r"Mask generator 'sam' does not take points; it takes model=None, "):
        create_mask_generator("sam", points=8)
    with pytest.raises(SettingsError, match="points_per_side=0 and points_per_batch=64 must be at least 1"):
        SamMasks("sam", points_per_side=0)


def test_sam2_through_the_same_pipeline(tmp_path, image):
    """A tiny random SAM 2 (Hiera backbone, 128 px input) saved locally, end to end."""
    side = 128
    backbone = {
        "model_type": "sam2_hiera_det_model",
        "hidden_size": 8,
        "image_size": [side, side],
        "blocks_per_stage": [1, 1, 2, 1],
        "embed_dim_per_stage": [8, 16, 32, 64],
        "num_attention_heads_per_stage": [1, 1, 1, 1],
        "window_size_per_stage": [4, 4, 4, 4],
        "global_attention_blocks": [3],  # not a pooling block: those need a window
        "window_positional_embedding_background_size": [2, 2],
    }
    config = transformers.Sam2Config(
        vision_config={
            "backbone_config": backbone,
            "backbone_channel_list": [64, 32, 16, 8],
            "backbone_feature_sizes": [[side // 4] * 2, [side // 8] * 2, [side // 16] * 2],
            "fpn_hidden_size": 16,
        },
        prompt_encoder_config={"hidden_size": 16, "image_size": side, "patch_size": 16, "mask_input_channels": 4},
        mask_decoder_config={
            "hidden_size": 16,
            "mlp_dim": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "iou_head_hidden_dim": 16,
        },
    )
    torch.manual_seed(0)
    transformers.Sam2Model(config).save_pretrained(tmp_path)
    transformers.Sam2ImageProcessor(
        size={"height": side, "width": side}, mask_size={"height": side // 4, "width": side // 4}
    ).save_pretrained(tmp_path)
    generator = create_mask_generator("sam2", model=str(tmp_path), **{**OPTIONS, "points_per_side": 2})
    masks = generator(image)
    assert masks.dtype == bool and masks.shape[1:] == (40, 56) and len(masks) >= 1
    assert generator.identity.startswith("sam2:")
