"""Loading when the hub cannot be reached (one quick message, cached weights still load), files that
are no checkpoint at all, and name suggestions that ignore case.

conftest sets HF_HUB_OFFLINE; the tests of an unreachable hub lift it and point huggingface_hub at a
closed local port instead, as on a machine without network.
"""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import TINY_CLIP, write_local_clip_dir
from huggingface_hub import constants
from safetensors.torch import save

from vocabseg.errors import UnknownNameError, WeightsUnavailableError
from vocabseg.models import clip as clip_module
from vocabseg.models import load_clip, load_vfm

CLOSED_PORT = "http://127.0.0.1:9"  # the discard port: connection refused at once


@pytest.fixture()
def unreachable_hub(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", CLOSED_PORT)
    clip_module._hub_answers.cache_clear()
    yield
    clip_module._hub_answers.cache_clear()


def test_unreachable_hub_is_one_message_without_retries(unreachable_hub, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    with pytest.raises(WeightsUnavailableError) as err:
        load_clip("ViT-B-16", pretrained="openai", cache_dir=str(tmp_path))
    msg = str(err.value)
    first = msg.splitlines()[0]
    assert first == (
        f"Could not load pretrained weights for ViT-B-16 (pretrained='openai'): they are not in the cache "
        f"{tmp_path} and the Hugging Face hub ({CLOSED_PORT}) cannot be reached."
    )
    assert "`--pretrained none --vfm-pretrained none`" in msg and "--pretrained /path/to/" in msg
    with pytest.raises(WeightsUnavailableError) as err:
        load_vfm("dino_vits8")
    assert "VFM 'dino_vits8'" in str(err.value) and "cannot be reached" in str(err.value)
    assert "`--pretrained none --vfm-pretrained none`" in str(err.value) and "--vfm-pretrained /path" in str(err.value)
    assert clip_module._hub_answers.cache_info().misses == 1  # the hub was asked once, not per file
    assert constants.HF_HUB_OFFLINE is False  # offline only while loading
    assert not [r for r in caplog.records if "Retry" in r.getMessage() or "Failed to download" in r.getMessage()]


def test_cached_weights_load_while_the_hub_is_unreachable(unreachable_hub, tmp_path, tiny_clip):
    repo = tmp_path / "models--someone--tiny"
    write_local_clip_dir(repo / "snapshots" / ("0" * 40), TINY_CLIP)  # the hub cache's layout
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    loaded = load_clip("hf-hub:someone/tiny", cache_dir=str(tmp_path))
    state, want = loaded.model.state_dict(), tiny_clip.state_dict()
    assert all(torch.equal(state[k], want[k]) for k in want)
    assert loaded.tokenizer(["a cat"]).shape == (1, 77)


def test_offline_environment_is_named(tmp_path):
    with pytest.raises(WeightsUnavailableError) as err:
        load_clip("ViT-B-16", pretrained="openai", cache_dir=str(tmp_path))
    assert str(err.value).splitlines()[0].endswith(f"not in the cache {tmp_path} and HF_HUB_OFFLINE is set.")


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("random.pt", bytes(range(256)) * 8),
        ("notes.pt", b"hello, these are not weights\n"),
        ("empty.bin", b""),
        ("bad.safetensors", b"hello"),
    ],
)
def test_a_file_that_is_no_checkpoint_is_named_with_the_formats(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(WeightsUnavailableError) as err:
        load_clip(TINY_CLIP, pretrained=str(path))
    assert str(err.value) == (
        f"--pretrained {path}: not a checkpoint file; expected a state dict saved with torch.save (.pt, .pth, "
        ".bin), a .safetensors file, or OpenAI's TorchScript .pt archive."
    )
    with pytest.raises(WeightsUnavailableError, match=f"--vfm-pretrained {path}: not a checkpoint file"):
        load_vfm("dino_vits8", str(path), depth=1)


def test_damaged_checkpoints_say_what_failed_in_one_line(tmp_path, tiny_clip):
    other = tmp_path / "other.pt"
    torch.save({"not_clip": torch.zeros(3)}, other)  # a real checkpoint, of something else
    blob = save({k: v.contiguous() for k, v in tiny_clip.state_dict().items()})
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(blob[: len(blob) // 2])  # the header is whole, the tensors are not
    pickle_junk = tmp_path / "junk.pt"
    pickle_junk.write_bytes(b"\x80\x02" + bytes(range(256)))  # a pickle's first opcode, then junk
    for path, detail in [
        (other, 'RuntimeError: Error(s) in loading state_dict for CLIP: Missing key(s) in state_dict: "'),
        (truncated, "SafetensorError: Error while deserializing header"),
        (pickle_junk, "UnpicklingError: torch.load(weights_only=True) cannot read it"),
    ]:
        with pytest.raises(WeightsUnavailableError) as err:
            load_clip(TINY_CLIP, pretrained=str(path))
        head, hint = str(err.value).split("\n")
        assert head.startswith(f"Could not load {TINY_CLIP} (open_clip/OpenAI) weights from {path}: {detail}")
        assert len(head) - len(str(path)) < 400  # one line, cut short
        assert hint.startswith("  - The file must be a checkpoint of this architecture: a state dict")


def test_model_name_suggestions_ignore_case():
    with pytest.raises(UnknownNameError, match="Unknown open_clip model 'vit-b-16'. Did you mean 'ViT-B-16'"):
        load_clip("vit-b-16", pretrained=None)
    with pytest.raises(UnknownNameError, match="Did you mean 'dino_vitb8'"):
        load_vfm("DINO_VITB8", None)


def test_a_missing_vfm_file_names_the_option(tmp_path):
    with pytest.raises(WeightsUnavailableError, match=r"--vfm-pretrained.*not found"):
        load_vfm("dino_vits16", pretrained=str(tmp_path / "missing.safetensors"))
