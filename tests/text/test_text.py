"""Vocabulary syntax and errors, template sets, prompt-ensembled encoding and its disk cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vocabseg.errors import UnknownNameError, VocabularyError
from vocabseg.models.clip import default_tokenizer
from vocabseg.text import TEMPLATE_SETS, TextEncoder, Vocabulary, resolve_templates
from vocabseg.text.encoder import text_tower_fingerprint


# -- vocabulary --------------------------------------------------------------------------------------------------
def test_parse_classes_and_synonyms():
    v = Vocabulary.parse("car, road ,  person; man;woman , tv  monitor")
    assert v.class_names == ["car", "road", "person", "tv monitor"]
    assert v.prompt_names == ["car", "road", "person", "man", "woman", "tv monitor"]
    assert v.name_to_class == [0, 1, 2, 2, 2, 3]
    assert v.background_index is None


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("cat,,dog", "Empty class name"),
        ("cat, dog,", "Empty class name"),
        ("cat; ; kitty", "empty synonym"),
        ("cat, Cat", "Duplicate class name 'Cat'"),
        ("cat, dog; kitty, kitty", "in classes 1 and 2"),
        ("cat; cat", "twice in the same class"),
    ],
)
def test_bad_class_lists_are_refused_clearly(text, message):
    with pytest.raises(VocabularyError, match=message):
        Vocabulary.parse(text)


def test_from_list_accepts_synonym_lists():
    v = Vocabulary.from_list(["sky", ["tv", "television"], "person; man"])
    assert v.class_names == ["sky", "tv", "person"]
    assert v.prompt_names == ["sky", "tv", "television", "person", "man"]
    with pytest.raises(VocabularyError, match="empty"):
        Vocabulary.from_list([])


def test_class_files_in_both_lineage_formats(tmp_path):
    sclip_style = tmp_path / "cls_sclip.txt"
    sclip_style.write_text("sky, wall, tree\naeroplane\nperson, person in shirt\n\ntv monitor, screen\n")
    proxy_style = tmp_path / "cls_proxy.txt"
    proxy_style.write_text("sky; wall; tree\naeroplane\nperson; person in shirt\ntv monitor; screen\n")
    a = Vocabulary.from_file(sclip_style, background_index=0)
    b = Vocabulary.from_file(proxy_style, background_index=0)
    assert a == b
    assert a.class_names == ["background", "aeroplane", "person", "tv monitor"]
    assert a.prompt_names[:3] == ["sky", "wall", "tree"]
    with pytest.raises(VocabularyError, match="not found"):
        Vocabulary.from_file(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(VocabularyError, match="no classes"):
        Vocabulary.from_file(tmp_path / "empty.txt")


def test_every_class_file_format_reads_the_same_vocabulary(tmp_path):
    """One reader serves `segment --classes-file` and `eval --classes-file` (JSON, index: name, lines)."""
    (tmp_path / "cls.json").write_text('["cat", "sofa; couch", "tv monitor"]')
    (tmp_path / "labels.txt").write_text("2: sofa; couch\n1: cat\n3: tv monitor\n")
    (tmp_path / "cls.txt").write_text("cat\nsofa, couch\ntv monitor\n")
    vocabs = [Vocabulary.from_file(tmp_path / f) for f in ("cls.json", "labels.txt", "cls.txt")]
    assert vocabs[0] == vocabs[1] == vocabs[2]
    assert vocabs[0].prompt_names == ["cat", "sofa", "couch", "tv monitor"]
    (tmp_path / "bad.json").write_text('{"cat": 1}')
    with pytest.raises(VocabularyError, match="JSON list"):
        Vocabulary.from_file(tmp_path / "bad.json")
    with pytest.raises(VocabularyError, match="directory"):
        Vocabulary.from_file(tmp_path)


def test_background_class():
    v = Vocabulary.parse("cat, sofa").with_background(["sky", "wall"])
    assert v.class_names == ["cat", "sofa", "background"]
    assert v.prompt_names == ["cat", "sofa", "sky", "wall"]
    assert v.background_index == 2
    nameless = Vocabulary.parse("cat, sofa").with_background()
    assert nameless.class_names == ["cat", "sofa", "background"]
    assert nameless.prompt_names == ["cat", "sofa"]
    with pytest.raises(VocabularyError, match="already named 'background'"):
        Vocabulary.parse("cat, background").with_background()
    with pytest.raises(VocabularyError, match="Duplicate"):
        Vocabulary.parse("cat, sky").with_background(["sky"])


# -- templates ------------------------------------------------------------------------------------------------------
def test_template_sets():
    assert len(resolve_templates()) == 80
    assert resolve_templates()[0] == "a bad photo of a {}."
    assert len(resolve_templates("beyond_labels12")) == 12
    assert resolve_templates(["a photo of {}."]) == ("a photo of {}.",)
    assert set(TEMPLATE_SETS) >= {"openai80", "openai7", "beyond_labels12", "name"}
    with pytest.raises(UnknownNameError, match="openai80"):
        resolve_templates("openai81")
    with pytest.raises(ValueError, match="exactly once"):
        resolve_templates(["no placeholder"])


# -- encoding and cache -------------------------------------------------------------------------------------------
def manual_embedding(clip, name, templates):
    tok = default_tokenizer(clip)
    with torch.no_grad():
        per_template = F.normalize(clip.encode_text(tok([t.format(name) for t in templates])), dim=-1)
    return F.normalize(per_template.mean(0), dim=-1)


def test_prompt_ensemble_is_mean_of_normalised_embeddings(tiny_clip):
    templates = resolve_templates("openai7")
    enc = TextEncoder(tiny_clip, default_tokenizer(tiny_clip), templates, cache_dir=None, prompts_per_batch=5)
    got = enc.encode(["cat", "tv monitor", "cat"])
    assert enc.last_encoded == 2  # the duplicate is encoded once
    torch.testing.assert_close(got[0], manual_embedding(tiny_clip, "cat", templates), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got[1], manual_embedding(tiny_clip, "tv monitor", templates), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got[2], got[0])
    # a different template set gives a different embedding
    other = TextEncoder(tiny_clip, default_tokenizer(tiny_clip), ("a photo of a {}.",), cache_dir=None)
    assert (other.encode(["cat"])[0] - got[0]).abs().max() > 1e-4


def test_disk_cache_hits_and_keys(tiny_clip, tmp_path):
    from conftest import make_tiny_clip

    templates = resolve_templates("openai7")
    tok = default_tokenizer(tiny_clip)
    first = TextEncoder(tiny_clip, tok, templates, cache_dir=tmp_path)
    a = first.encode(["cat", "dog"])
    assert first.last_encoded == 2
    assert len(list((tmp_path / "text").glob("*.safetensors"))) == 1
    second = TextEncoder(tiny_clip, tok, templates, cache_dir=tmp_path)  # a fresh process would do this
    b = second.encode(["dog", "cat"])
    assert second.last_encoded == 0
    torch.testing.assert_close(b, a.flip(0))
    assert second.encode(["cat", "bird"]).shape == (2, 32) and second.last_encoded == 1
    # other templates or other weights never reuse those entries
    third = TextEncoder(tiny_clip, tok, templates[:3], cache_dir=tmp_path)
    third.encode(["cat"])
    assert third.last_encoded == 1
    other_weights = make_tiny_clip(seed=1)
    assert text_tower_fingerprint(other_weights) != text_tower_fingerprint(tiny_clip)
    fourth = TextEncoder(other_weights, tok, templates, cache_dir=tmp_path)
    fourth.encode(["cat"])
    assert fourth.last_encoded == 1


def test_corrupt_cache_is_rebuilt(tiny_clip, tmp_path):
    tok = default_tokenizer(tiny_clip)
    enc = TextEncoder(tiny_clip, tok, ("{}",), cache_dir=tmp_path)
    want = enc.encode(["cat"])
    enc.cache_file.write_bytes(b"not a safetensors file")
    again = TextEncoder(tiny_clip, tok, ("{}",), cache_dir=tmp_path)
    torch.testing.assert_close(again.encode(["cat"]), want)
    assert again.last_encoded == 1
    healed = TextEncoder(tiny_clip, tok, ("{}",), cache_dir=tmp_path)  # the rebuilt file is valid again
    torch.testing.assert_close(healed.encode(["cat"]), want)
    assert healed.last_encoded == 0


def test_memory_cache_is_bounded_and_disk_still_serves(tiny_clip, tmp_path):
    tok = default_tokenizer(tiny_clip)
    enc = TextEncoder(tiny_clip, tok, ("{}",), cache_dir=tmp_path, memory_entries=2)
    first = enc.encode(["a", "b", "c"])  # more names than the cap in one call: all are returned
    assert len(enc._memory) == 3
    enc.encode(["d"])
    assert len(enc._memory) == 2  # the least recently used entries ("a", "b") left memory
    again = enc.encode(["a"])  # evicted from memory, read back from disk without encoding
    assert enc.last_encoded == 0
    torch.testing.assert_close(again[0], first[0])


def test_fingerprint_tells_gelu_from_quick_gelu_with_the_same_weights():
    """Cached text embeddings of a GELU tower must not be served to the QuickGELU tower with its weights."""
    import json

    import open_clip
    from conftest import ASSETS, TINY_CLIP

    cfg = json.loads((ASSETS / f"{TINY_CLIP}.json").read_text())
    quick, plain = (open_clip.CLIP(**{**cfg, "quick_gelu": q}) for q in (True, False))
    plain.load_state_dict(quick.state_dict())
    kinds = [{type(m).__name__ for m in model.transformer.modules()} for model in (quick, plain)]
    assert kinds[0] ^ kinds[1] == {"QuickGELU", "GELU"}  # the only difference between the two models
    assert text_tower_fingerprint(quick) != text_tower_fingerprint(plain)
