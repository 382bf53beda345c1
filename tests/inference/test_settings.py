"""Settings checked where they live: ``InferenceConfig`` and the ``Segmenter`` constructor, before any model."""

from __future__ import annotations

import json
import math
from dataclasses import fields

import numpy as np
import pytest
import torch

import vocabseg.segmenter
from vocabseg.cli.main import main
from vocabseg.errors import MethodOptionError, SettingsError, WeightsUnavailableError
from vocabseg.inference.config import MAX_PAD_MULTIPLE, InferenceConfig, option_flag
from vocabseg.methods import get_method_spec, list_methods
from vocabseg.segmenter import Segmenter

NAN, INF = math.nan, math.inf

BAD_SETTINGS = [  # (Segmenter keyword arguments, text the SettingsError must contain)
    ({"crop": -5}, "crop=-5 (--crop) must be an integer >= 0"),
    ({"crop": "224"}, "crop='224' (--crop) must be an integer"),
    ({"crop": True}, "crop=True (--crop) must be an integer"),
    ({"stride": 0}, "stride=0 (--stride) must be an integer > 0"),
    ({"stride": -1}, "stride=-1 (--stride) must be an integer > 0"),
    ({"short_side": -10}, "short_side=-10 (--short-side) must be an integer >= 0"),
    ({"prob_threshold": NAN}, "prob_threshold=nan (--prob-threshold) must be a number from 0 (off) to 1"),
    ({"prob_threshold": -0.5}, "prob_threshold=-0.5 (--prob-threshold)"),
    ({"prob_threshold": 1e9}, "prob_threshold=1000000000.0 (--prob-threshold)"),
    ({"logit_scale": NAN}, "logit_scale=nan (--logit-scale) must be a finite number > 0"),
    ({"logit_scale": -1}, "logit_scale=-1 (--logit-scale) must be a finite number > 0"),
    ({"logit_scale": INF}, "logit_scale=inf (--logit-scale) must be a finite number > 0"),
    ({"batch_size": -1}, "batch_size=-1 (--batch-size) must be an integer >= 0"),
    ({"pamr_dilations": (0,)}, "pamr_dilations=(0,) (--pamr-dilations) must be one or more integers > 0"),
    ({"pamr_dilations": ()}, "pamr_dilations=() (--pamr-dilations)"),
    ({"pad_multiple": 5000},
     f"pad_multiple=5000 (--pad-multiple) must be an integer from 0 (off) to {MAX_PAD_MULTIPLE}"),
    ({"crop": 100, "stride": 200}, "stride=200 (--stride) must not exceed crop=100 (--crop)"),
    ({"max_pixels": 0}, "max_pixels=0 (--max-pixels) must be a positive number of pixels"),
    ({"max_pixels": -1}, "max_pixels=-1 (--max-pixels)"),
    ({"device": "cuda"}, "device='cuda' (--device): no CUDA GPU is available here"),
    ({"device": "tpu9"}, "device='tpu9' (--device) is not a device; use cpu, cuda, cuda:N or mps"),
    ({"device": "meta"}, "device='meta' (--device) is not supported; use cpu, cuda, cuda:N or mps"),
    ({"dtype": "float16"}, "dtype='float16' (--dtype) is not supported on the CPU"),
    ({"dtype": torch.bfloat16}, "dtype='bfloat16' (--dtype) is not supported on the CPU"),
    ({"dtype": "int8"}, "dtype='int8' (--dtype) is not one of float32, fp32, float16, fp16, bfloat16, bf16"),
]  # fmt: skip


@pytest.fixture()
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the settings were checked")

    monkeypatch.setattr(vocabseg.segmenter, "load_clip", refuse)
    monkeypatch.setattr(vocabseg.segmenter, "create_method", refuse)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # "no GPU" on any machine


@pytest.mark.parametrize("kwargs, message", BAD_SETTINGS, ids=[repr(k) for k, _ in BAD_SETTINGS])
def test_segmenter_refuses_bad_settings_before_loading(no_model_load, kwargs, message):
    with pytest.raises(SettingsError) as info:
        Segmenter(method="sclip", model="ViT-B-16", pretrained=None, **kwargs)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_a_gpu_index_beyond_the_machine_names_the_ones_there(no_model_load, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(
        SettingsError, match=r"device='cuda:2' \(--device\): this machine has 2 GPU\(s\), cuda:0 to cuda:1"
    ):
        Segmenter(method="sclip", model="ViT-B-16", pretrained=None, device="cuda:2")  # fmt: skip


def test_vfm_for_a_method_without_one(no_model_load):
    with pytest.raises(MethodOptionError, match=r"'sclip' does not use a VFM, so it takes no vfm= \(--vfm\)") as info:
        Segmenter(method="sclip", model="ViT-B-16", pretrained=None, vfm="dino_vitb8")
    with_vfm = [n for n in list_methods() if get_method_spec(n).uses_vfm]
    assert "proxyclip" in with_vfm
    assert str(info.value).endswith(f"only the VFM methods do: {', '.join(with_vfm)}.")


def test_missing_local_files_are_named_before_loading(no_model_load, tmp_path):
    missing = tmp_path / "missing.pt"
    with pytest.raises(WeightsUnavailableError, match=rf"pretrained='{missing}' \(--pretrained\): checkpoint file not"):
        Segmenter(method="sclip", model="ViT-B-16", pretrained=str(missing))
    with pytest.raises(WeightsUnavailableError, match=rf"\(--model\): the folder {tmp_path / 'nope'} does not exist"):
        Segmenter(method="sclip", model=f"local-dir:{tmp_path / 'nope'}")
    with pytest.raises(WeightsUnavailableError, match=r"\(--model\): .* has no open_clip_config.json"):
        Segmenter(method="sclip", model=f"local-dir:{tmp_path}")


def test_boundary_values_are_accepted():
    InferenceConfig(crop=112, stride=112)  # stride == crop: windows touch, nothing is left out
    InferenceConfig(crop=0, stride=500)  # whole image: the stride is unused
    InferenceConfig(pad_multiple=MAX_PAD_MULTIPLE, prob_threshold=1.0, area_threshold=1.0, short_side=0)


def test_numbers_are_normalised_so_results_serialise():
    cfg = InferenceConfig(crop=np.int64(64), stride=np.int32(32), logit_scale=50, pamr_dilations=[4, np.int64(8)])
    assert type(cfg.crop) is int and type(cfg.stride) is int and type(cfg.logit_scale) is float
    assert cfg.pamr_dilations == (4, 8) and all(type(d) is int for d in cfg.pamr_dilations)
    assert json.loads(json.dumps(cfg.to_dict()))["crop"] == 64


def test_settings_are_checked_again_when_overridden():
    with pytest.raises(SettingsError, match=r"stride=64 \(--stride\) must not exceed crop=32 \(--crop\)"):
        InferenceConfig(crop=224, stride=64).updated(crop=32)


def test_help_and_docs_come_from_the_fields(capsys):
    with pytest.raises(SystemExit):
        main(["segment", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    doc = " ".join(InferenceConfig.__doc__.split())
    for f in fields(InferenceConfig):
        described = " ".join(f"{f.metadata['help']}; allowed: {f.metadata['allowed']}".split())
        assert f"{option_flag(f.name)}" in help_text and described in help_text
        assert f"{f.name}: {' '.join(f.metadata['help'].split())}. Allowed: {f.metadata['allowed']}." in doc


def test_the_sclip_lineage_defaults_are_the_config_defaults():
    base = InferenceConfig()
    assert (base.short_side, base.crop, base.stride, base.logit_scale) == (336, 224, 112, 40.0)
    assert get_method_spec("clip").defaults == base and get_method_spec("sclip").defaults == base
    assert get_method_spec("naclip").defaults == InferenceConfig(pamr_steps=10)
    assert get_method_spec("proxyclip").defaults == InferenceConfig(crop=336, pad_multiple=56)
