"""Loading CLIP and VFM weights: every way a user passes them, and every way that can fail.

HF_HUB_OFFLINE=1 (conftest) makes hub downloads fail at once, as they would on an offline cluster.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import TINY_CLIP
from safetensors.torch import save_file
from torch import nn

from vocabseg.errors import UnknownNameError, WeightsUnavailableError
from vocabseg.models import load_clip, load_vfm


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_local_dir_loads_the_exact_weights(tiny_clip, tiny_clip_dir):
    loaded = load_clip(f"local-dir:{tiny_clip_dir}")
    assert same_weights(loaded.model, tiny_clip)
    assert loaded.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert loaded.tokenizer(["a cat"]).shape == (1, 77)
    assert not loaded.model.training


@pytest.mark.parametrize("suffix", [".safetensors", ".bin", ".pt"])
def test_checkpoint_files(tiny_clip, tmp_path, suffix):
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in tiny_clip.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save(state, path)
    loaded = load_clip(TINY_CLIP, pretrained=str(path))
    assert same_weights(loaded.model, tiny_clip)
    assert loaded.name == f"{TINY_CLIP}/{path}"


class _Holder(nn.Module):
    """A TorchScript container whose state_dict has CLIP's key names, like OpenAI's JIT archives."""

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        for key, value in state.items():
            *path, leaf = key.split(".")
            module = self
            for part in path:
                if not hasattr(module, part):
                    module.add_module(part, nn.Module())
                module = getattr(module, part)
            module.register_buffer(leaf, value.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_openai_style_jit_archive(tiny_clip, tmp_path):
    path = tmp_path / "ViT-tiny.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(_Holder(tiny_clip.state_dict())).save(str(path))
        loaded = load_clip(TINY_CLIP, pretrained=str(path))
    assert same_weights(loaded.model, tiny_clip)


def test_random_weights_only_when_asked():
    with pytest.warns(UserWarning, match="RANDOM weights"):
        loaded = load_clip(TINY_CLIP, pretrained=None)
    assert loaded.name == f"{TINY_CLIP}/random"


def test_unreachable_weights_fail_with_one_clear_message(tmp_path):
    with pytest.raises(WeightsUnavailableError) as err:
        load_clip("ViT-B-16", pretrained="openai", cache_dir=str(tmp_path))
    msg = str(err.value)
    assert "ViT-B-16 (pretrained='openai')" in msg
    assert str(tmp_path) in msg  # the cache directory
    assert "--pretrained /path/to/" in msg and "local-dir:" in msg  # how to pass a local file
    assert "HF_HUB_OFFLINE is set" in msg


def test_hf_hub_id_offline_never_falls_back_to_random_weights():
    with pytest.raises(WeightsUnavailableError, match="hf-hub:timm/ViT-B-16-SigLIP"):
        load_clip("hf-hub:timm/ViT-B-16-SigLIP")


def test_unknown_names_list_the_choices():
    with pytest.raises(UnknownNameError, match="Did you mean 'ViT-B-16'"):
        load_clip("ViT-B-61", pretrained=None)
    with pytest.raises(UnknownNameError, match="Unknown pretrained tag for ViT-B-16 'opneai'.*openai"):
        load_clip("ViT-B-16", pretrained="opneai")
    with pytest.raises(WeightsUnavailableError, match="checkpoint file not found"):
        load_clip(TINY_CLIP, pretrained="/nonexistent/weights.safetensors")


def test_local_dir_without_weights(tmp_path, tiny_clip_dir):
    folder = tmp_path / "noweights"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text((tiny_clip_dir / "open_clip_config.json").read_text())
    with pytest.raises(WeightsUnavailableError, match="no open_clip_model.safetensors"):
        load_clip(f"local-dir:{folder}")
    with pytest.warns(UserWarning, match="RANDOM"):
        load_clip(f"local-dir:{folder}", pretrained=None)
    with pytest.raises(WeightsUnavailableError, match="open_clip_config.json"):
        load_clip(f"local-dir:{tmp_path}")


# -- VFMs ------------------------------------------------------------------------------------------------------------
def test_vfm_random_and_local_file(tmp_path):
    with pytest.warns(UserWarning, match="RANDOM"):
        vfm = load_vfm("dino_vits8", None, depth=1)
    with torch.no_grad():
        feats = vfm(torch.randn(1, 3, 48, 64))
    assert feats.shape == (1, 384, 6, 8)  # patch 8: a 6 x 8 grid, 384 channels
    path = tmp_path / "dino.safetensors"
    save_file({k: v.contiguous() for k, v in vfm.model.state_dict().items()}, path)
    again = load_vfm("dino_vits8", str(path), depth=1)
    assert same_weights(again, vfm)


def test_vfm_unreachable_weights():
    with pytest.raises(WeightsUnavailableError) as err:
        load_vfm("dinov2_vitb14")
    assert "vit_base_patch14_dinov2.lvd142m" in str(err.value) and "--vfm-pretrained" in str(err.value)
    with pytest.raises(UnknownNameError, match="dino_vitb8"):
        load_vfm("dino_vitb9")


def test_dinov2_registers_are_dropped_and_sam_neck_is_used():
    with pytest.warns(UserWarning):
        reg = load_vfm("dinov2_vits14_reg", None, depth=1)
        sam = load_vfm("sam_vitb", None, img_size=64, depth=1, global_attn_indexes=(0,))
    with torch.no_grad():
        assert reg(torch.randn(2, 3, 56, 84)).shape == (2, 384, 4, 6)
        assert sam(torch.randn(1, 3, 40, 50)).shape == (1, 256, 4, 4)  # resized to its fixed 64 x 64 input


@pytest.mark.parametrize(
    ("arch", "tag", "forced"),
    [("ViT-B-16", "openai", True), ("ViT-B-16-quickgelu", "openai", False), ("ViT-B-16", "laion2b_s34b_b88k", False)],
)
def test_openai_tags_load_with_quick_gelu(monkeypatch, arch, tag, forced):
    """OpenAI weights were trained with QuickGELU: the plain ViT-B-16 config must not run them with GELU."""
    import open_clip

    from vocabseg.models.clip import load_clip, tag_needs_quick_gelu

    seen, create_model = {}, open_clip.create_model

    def fake_create_model(name, **kwargs):  # no weights can be downloaded: the tiny model, same flags
        seen.update(kwargs, name=name)
        return create_model("vocabseg-test-tiny", pretrained=None, force_quick_gelu=kwargs["force_quick_gelu"])

    monkeypatch.setattr(open_clip, "create_model", fake_create_model)
    load_clip(arch, tag)
    assert tag_needs_quick_gelu(arch, tag) is forced
    assert seen["name"] == arch and seen["force_quick_gelu"] is forced
    if forced:  # what the flag does in open_clip: QuickGELU activations in a plain ViT-B-16
        model = create_model(arch, pretrained=None, force_quick_gelu=True)
        assert type(model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
