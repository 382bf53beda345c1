"""The text cache's limits: random weights stay off the disk, the disk cache is capped (least
recently used files go first), and prompts longer than the tokenizer's context are refused."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from conftest import TINY_CLIP
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from vocabseg.cli.main import main
from vocabseg.errors import SettingsError, VocabularyError
from vocabseg.models import load_clip
from vocabseg.models.clip import default_tokenizer, has_random_weights
from vocabseg.text.encoder import CACHE_MAX_ENV, TextEncoder, default_cache_max_bytes

LONG_TEMPLATE = "a blurry low resolution photograph of the {} taken at night in the rain from far away."


def cache_files(folder) -> set[str]:
    return {p.name for p in (folder / "text").glob("*.safetensors")} if (folder / "text").is_dir() else set()


def random_clip() -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_clip(TINY_CLIP, pretrained=None).model


# -- random weights ---------------------------------------------------------------------------------------------------
def test_random_weights_are_cached_in_memory_only(tmp_path):
    clip = random_clip()
    assert has_random_weights(clip)
    enc = TextEncoder(clip, default_tokenizer(clip), ("{}",), cache_dir=tmp_path)
    first = enc.encode(["cat", "dog"])
    assert enc.last_encoded == 2 and enc.cache_file is None and cache_files(tmp_path) == set()
    torch.testing.assert_close(enc.encode(["dog"])[0], first[1])
    assert enc.last_encoded == 0  # memory still serves


def test_loading_weights_into_a_random_model_clears_the_mark(tmp_path, tiny_clip):
    clip = random_clip()
    holder = nn.Module()  # as a trained method holds its CLIP
    holder.clip, holder.head = clip, nn.Linear(2, 2)
    holder.load_state_dict({f"head.{k}": v for k, v in holder.head.state_dict().items()}, strict=False)
    assert has_random_weights(clip)  # only the head was loaded
    holder.load_state_dict({f"clip.{k}": v for k, v in tiny_clip.state_dict().items()}, strict=False)
    assert not has_random_weights(clip)
    enc = TextEncoder(clip, default_tokenizer(clip), ("{}",), cache_dir=tmp_path)
    enc.encode(["cat"])
    assert cache_files(tmp_path) == {enc.cache_file.name}


def test_local_dir_without_weights_is_marked_random(tmp_path, tiny_clip_dir):
    folder = tmp_path / "noweights"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text((tiny_clip_dir / "open_clip_config.json").read_text())
    with pytest.warns(UserWarning, match="RANDOM"):
        assert has_random_weights(load_clip(f"local-dir:{folder}", pretrained=None).model)
    assert not has_random_weights(load_clip(f"local-dir:{tiny_clip_dir}").model)


# -- the disk cap -----------------------------------------------------------------------------------------------------
def test_disk_cache_evicts_the_least_recently_used_file(tmp_path, tiny_clip):
    tok = default_tokenizer(tiny_clip)

    def encoder(template: str, cap: int | None = None) -> TextEncoder:
        return TextEncoder(tiny_clip, tok, (template,), cache_dir=tmp_path, cache_max_bytes=cap)

    a, b, c = encoder("a {}"), encoder("b {}"), encoder("c {}")
    a.encode(["cat"])
    b.encode(["cat"])
    size = a.cache_file.stat().st_size
    assert b.cache_file.stat().st_size == size  # one entry each: the same size
    os.utime(a.cache_file, (1000, 1000))
    os.utime(b.cache_file, (2000, 2000))  # b was used after a ...
    assert encoder("a {}").encode(["cat"]).shape == (1, 32)  # ... until a is read again (a hit touches it)
    c.cache_max_bytes = int(2.5 * size)
    c.encode(["cat"])
    assert cache_files(tmp_path) == {a.cache_file.name, c.cache_file.name}  # b, the least recently used, went
    again = encoder("b {}")
    again.encode(["cat"])
    assert again.last_encoded == 1  # re-encoded, and written again


def test_a_file_over_the_cap_starts_again_and_zero_keeps_nothing(tmp_path, tiny_clip):
    tok = default_tokenizer(tiny_clip)
    enc = TextEncoder(tiny_clip, tok, ("{}",), cache_dir=tmp_path)
    enc.encode(["cat"])
    one_entry = enc.cache_file.stat().st_size
    enc.cache_max_bytes = one_entry + 64  # room for one entry, not two
    enc.encode(["dog"])
    assert len(load_file(enc.cache_file)) == 1  # only the new entry is kept
    fresh = TextEncoder(tiny_clip, tok, ("{}",), cache_dir=tmp_path)
    fresh.encode(["dog", "cat"])
    assert fresh.last_encoded == 1  # dog from disk, cat encoded again

    off = TextEncoder(tiny_clip, tok, ("x {}",), cache_dir=tmp_path / "off", cache_max_bytes=0)
    off.encode(["cat"])
    assert off.cache_file is None and cache_files(tmp_path / "off") == set()


def test_the_cap_comes_from_the_environment(monkeypatch, tiny_clip):
    monkeypatch.delenv(CACHE_MAX_ENV, raising=False)
    assert default_cache_max_bytes() == 2**30
    monkeypatch.setenv(CACHE_MAX_ENV, "0.5")
    assert default_cache_max_bytes() == 2**19
    assert TextEncoder(tiny_clip, default_tokenizer(tiny_clip), ("{}",)).cache_max_bytes == 2**19
    for bad in ("-1", "lots", "nan"):
        monkeypatch.setenv(CACHE_MAX_ENV, bad)
        with pytest.raises(SettingsError, match=f"{CACHE_MAX_ENV}='{bad}'.*MiB"):
            default_cache_max_bytes()


# -- prompt length ----------------------------------------------------------------------------------------------------
def test_a_prompt_that_fills_the_context_exactly_is_accepted(tiny_clip):
    enc = TextEncoder(tiny_clip, default_tokenizer(tiny_clip), ("{}",), cache_dir=None)
    assert enc.encode(["cat " * 75]).shape == (1, 32)  # start + 75 + end = 77 tokens: nothing cut
    with pytest.raises(VocabularyError, match=r"Class name 'cat cat .*\.\.\.' is too long.*77 tokens"):
        enc.encode(["dog", "cat " * 76])


def test_templates_count_towards_the_limit(tiny_clip):
    name = "cat " * 65  # fits alone (67 tokens), not in the long template
    tok = default_tokenizer(tiny_clip)
    assert TextEncoder(tiny_clip, tok, ("{}",), cache_dir=None).encode([name]).shape == (1, 32)
    enc = TextEncoder(tiny_clip, tok, ("{}", LONG_TEMPLATE), cache_dir=None)
    with pytest.raises(VocabularyError) as err:
        enc.encode(["dog", name, name + "bird"])
    msg = str(err.value)
    assert repr(LONG_TEMPLATE) in msg and "(and 1 other name(s))" in msg and "--templates name" in msg
    assert len(msg) < 400  # the names are abbreviated
    with pytest.raises(VocabularyError):
        enc.encode_with_grad([name])  # the training path is checked too


def test_the_command_line_names_the_long_name(tmp_path, rgb_image, tiny_clip_dir, capsys):
    Image.fromarray(rgb_image).save(tmp_path / "x.png")
    code = main(["segment", str(tmp_path / "x.png"), "-c", "dog, " + "cat " * 90, "-o", str(tmp_path / "o"),
                 "--model", f"local-dir:{tiny_clip_dir}", "--method", "sclip", "--short-side", "64"])  # fmt: skip
    assert code == 2  # refused once, up front, before any image
    captured = capsys.readouterr()
    assert "Class name 'cat cat" in captured.err and "77 tokens" in captured.err
    assert captured.err.count("Class name") == 1
    assert not (tmp_path / "o" / "x").exists()
