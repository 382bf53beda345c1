"""Text encoding at the prompts' real length: the same embeddings as open_clip's ``encode_text``
wherever truncation is used, a fallback to ``encode_text`` wherever it would not be exact, and the
``TextEncoder`` paths (cached and with gradients) unchanged by it."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import ASSETS, TINY_CLIP, make_tiny_clip

import vocabseg.text.encoder as encoder_module
from vocabseg.models.clip import default_tokenizer
from vocabseg.text import TEMPLATE_SETS, TextEncoder
from vocabseg.text.tower import _run_tower, encode_text_fast, token_embeddings, truncated_length

LONG_NAME = " ".join(["extraordinarily"] * 60) + " cat"  # far past 77 tokens: the tokenizer truncates it
NAMES = ["cat", "tv monitor", "a very small red bicycle leaning on a wall", LONG_NAME]


def longest_name(templates: tuple[str, ...]) -> str:
    """The longest name of repeated one-token words whose longest prompt still fits CLIP's 77 tokens
    exactly (the ``TextEncoder`` refuses names the tokenizer would cut, such as ``LONG_NAME``)."""
    tok = open_clip.SimpleTokenizer()
    words = 75 - max(len(tok.encode(t.format(""))) for t in templates)  # 75: start and end take two
    return "cat " * words


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


def variant_clip(folder: Path, name: str, seed: int = 0, custom_text: bool = False, **text_cfg) -> torch.nn.Module:
    """The tiny test CLIP with some text-tower settings changed, registered from a config in ``folder``."""
    cfg = json.loads((ASSETS / f"{TINY_CLIP}.json").read_text())
    cfg["text_cfg"].update(text_cfg)
    if custom_text:
        cfg["custom_text"] = True
    path = folder / f"{name}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return open_clip.create_model(name, pretrained=None).eval()


def assert_same_as_encode_text(clip: torch.nn.Module, tokens: torch.Tensor) -> None:
    with torch.no_grad():
        got = unit_rows(encode_text_fast(clip, tokens))
        want = unit_rows(clip.encode_text(tokens))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# -- encode_text_fast equals encode_text ---------------------------------------------------------------------------
@pytest.mark.parametrize("template_set", ["openai80", "beyond_labels12", "name"])
def test_same_embeddings_for_every_template_set_and_name_length(tiny_clip, template_set):
    tok = default_tokenizer(tiny_clip)
    templates = TEMPLATE_SETS[template_set]
    for name in NAMES:  # one batch per name: the short ones really are truncated
        tokens = tok([t.format(name) for t in templates])
        assert_same_as_encode_text(tiny_clip, tokens)
        length = truncated_length(tiny_clip, tokens)
        assert length == int(tokens.argmax(dim=-1).max()) + 1
        assert (length == 77) == (name == LONG_NAME)  # only the truncated-by-the-tokenizer name needs it all
    assert truncated_length(tiny_clip, tok(["cat"])) == 3  # start, "cat", end of text
    assert_same_as_encode_text(tiny_clip, tok([t.format(n) for n in NAMES for t in templates]))  # mixed lengths


def test_the_embeddings_differ_between_prompts(tiny_clip):
    """Guards the equality tests: a tower whose output ignored the prompt would pass them trivially."""
    with torch.no_grad():
        out = unit_rows(encode_text_fast(tiny_clip, default_tokenizer(tiny_clip)(NAMES)))
    assert (out[:, None] - out[None]).abs().amax(dim=-1).fill_diagonal_(1).min() > 1e-3


def test_normalize_and_gradients_as_encode_text():
    clip = make_tiny_clip(seed=5)
    clip.requires_grad_(False)
    clip.transformer.resblocks[0].requires_grad_(True)
    tokens = default_tokenizer(clip)(["a photo of a cat.", "tv monitor", LONG_NAME[:40]])
    direction = torch.randn(32, generator=torch.Generator().manual_seed(0))
    grads = []
    for fn in (encode_text_fast, lambda c, t, normalize: c.encode_text(t, normalize=normalize)):
        clip.zero_grad()
        out = fn(clip, tokens, normalize=True)
        (out @ direction).sum().backward()
        grads.append([p.grad.clone() for p in clip.transformer.resblocks[0].parameters()])
        torch.testing.assert_close(out.norm(dim=-1), torch.ones(3))
    assert truncated_length(clip, tokens) < 77
    for fast, full in zip(*grads):
        assert fast.abs().sum() > 0
        torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-4)


def test_other_context_length(tmp_path):
    clip = variant_clip(tmp_path, "vocabseg-test-tiny-ctx32", context_length=32)
    assert clip.context_length == 32 and clip.positional_embedding.shape[0] == 32
    tok = default_tokenizer(clip)
    tokens = tok([t.format(n) for n in NAMES for t in TEMPLATE_SETS["beyond_labels12"]])
    assert tokens.shape[1] == 32
    assert_same_as_encode_text(clip, tokens)
    assert truncated_length(clip, tok([LONG_NAME])) == 32  # capped at the model's own context
    assert truncated_length(clip, tok(["cat"])) == 3


def test_eos_pooling_is_exact_too(tmp_path):
    """MetaCLIP-2-style towers pool at the first end-of-text id instead of the largest id."""
    clip = variant_clip(tmp_path, "vocabseg-test-tiny-eos", pool_type="eos", eos_id=49407)
    assert clip.text_pool_type == "eos"
    tokens = default_tokenizer(clip)([t.format(n) for n in NAMES for t in TEMPLATE_SETS["openai80"][:10]])
    assert_same_as_encode_text(clip, tokens)
    assert truncated_length(clip, tokens[:10]) < 77


# -- where truncation is not exact, encode_text runs ---------------------------------------------------------------
def forced_truncation(clip: torch.nn.Module, tokens: torch.Tensor, length: int) -> torch.Tensor:
    with torch.no_grad():
        return unit_rows(
            _run_tower(clip, tokens[:, :length], token_embeddings(clip, tokens[:, :length]), truncated=True)
        )


def test_last_token_pooling_falls_back(monkeypatch):
    clip = make_tiny_clip(seed=6)
    monkeypatch.setattr(clip, "text_pool_type", "last")
    tokens = default_tokenizer(clip)(["a photo of a cat.", "tv monitor"])
    assert truncated_length(clip, tokens) is None
    assert_same_as_encode_text(clip, tokens)
    with torch.no_grad():
        full = unit_rows(clip.encode_text(tokens))
    assert (forced_truncation(clip, tokens, 8) - full).abs().max() > 1e-3  # truncating here would be wrong


def test_non_causal_tower_falls_back(tmp_path):
    """CLIPA-style towers attend both ways: every padding position changes the pooled token."""
    clip = variant_clip(tmp_path, "vocabseg-test-tiny-bidir", no_causal_mask=True)
    assert clip.attn_mask is None and clip.text_pool_type == "argmax"
    tokens = default_tokenizer(clip)(["a photo of a cat.", "tv monitor"])
    assert truncated_length(clip, tokens) is None
    assert_same_as_encode_text(clip, tokens)
    with torch.no_grad():
        full = unit_rows(clip.encode_text(tokens))
    assert (forced_truncation(clip, tokens, 8) - full).abs().max() > 1e-3


def test_a_mask_that_lets_a_token_see_later_ones_falls_back():
    clip = make_tiny_clip(seed=7)
    clip.attn_mask[3, 40] = 0.0  # one query may now look past any short prompt's end
    tokens = default_tokenizer(clip)(["a cat", "a dog"])
    assert truncated_length(clip, tokens) is None
    assert_same_as_encode_text(clip, tokens)


def test_custom_text_towers_and_overridden_encode_text_fall_back(tmp_path):
    custom = variant_clip(tmp_path, "vocabseg-test-tiny-custom", custom_text=True)
    assert not hasattr(custom, "token_embedding")
    tokens = default_tokenizer(custom)(["a photo of a cat.", "tv monitor"])
    assert truncated_length(custom, tokens) is None
    assert_same_as_encode_text(custom, tokens)

    clip = make_tiny_clip(seed=8)
    original = clip.encode_text
    clip.encode_text = lambda text, normalize=False: original(text, normalize=normalize) * 2.0
    assert truncated_length(clip, tokens) is None
    with torch.no_grad():
        torch.testing.assert_close(encode_text_fast(clip, tokens), clip.encode_text(tokens))


# -- TextEncoder ---------------------------------------------------------------------------------------------------
def reference_embeddings(clip: torch.nn.Module, names: list[str], templates: tuple[str, ...]) -> torch.Tensor:
    """(K, P, D) unit embeddings, one ``encode_text`` call per prompt, in name-major order."""
    tok = default_tokenizer(clip)
    with torch.no_grad():
        rows = [unit_rows(clip.encode_text(tok([t.format(n) for t in templates]))) for n in names]
    return torch.stack(rows)


@pytest.mark.parametrize("per_template", [False, True])
def test_text_encoder_results_unchanged(tiny_clip, per_template):
    templates = TEMPLATE_SETS["openai80"][:9]
    names = ["cat", longest_name(templates), "tv monitor", "sky", "a very small red bicycle leaning on a wall"]
    # 7 per batch: batches straddle names, so sorting and restoring the order is exercised
    enc = TextEncoder(tiny_clip, default_tokenizer(tiny_clip), templates, cache_dir=None, prompts_per_batch=7)
    got = enc.encode(names, per_template=per_template)
    ref = reference_embeddings(tiny_clip, names, templates)
    want = ref if per_template else unit_rows(ref.mean(dim=1))
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_text_encoder_gradient_path_is_fast_exact_and_differentiable():
    clip = make_tiny_clip(seed=9)
    clip.requires_grad_(False)
    clip.ln_final.requires_grad_(True)
    templates = TEMPLATE_SETS["beyond_labels12"]
    names = ["cat", "tv monitor", longest_name(templates)]
    enc = TextEncoder(clip, default_tokenizer(clip), templates, cache_dir=None, prompts_per_batch=5)
    live = enc.encode_with_grad(names, per_template=True)
    assert live.grad_fn is not None
    torch.testing.assert_close(live.detach(), reference_embeddings(clip, names, templates), atol=1e-5, rtol=0)
    live[:, :, 0].sum().backward()
    fast_grad = clip.ln_final.weight.grad.clone()
    clip.zero_grad()
    tok = default_tokenizer(clip)
    full = torch.stack([unit_rows(clip.encode_text(tok([t.format(n) for t in templates]))) for n in names])
    full[:, :, 0].sum().backward()
    assert fast_grad.abs().sum() > 0
    torch.testing.assert_close(fast_grad, clip.ln_final.weight.grad, atol=1e-5, rtol=1e-4)


def test_batches_are_sorted_by_length(tiny_clip, monkeypatch):
    lengths = []

    def spy(clip, tokens):
        lengths.append(truncated_length(clip, tokens))
        return encode_text_fast(clip, tokens)

    monkeypatch.setattr(encoder_module, "encode_text_fast", spy)
    templates = ("{}", "a photo of a {}.")
    names = [longest_name(templates), "cat", "a very small red bicycle leaning on a wall", "sky"]
    enc = TextEncoder(tiny_clip, default_tokenizer(tiny_clip), templates, cache_dir=None)
    enc.prompts_per_batch = 2
    enc.encode(names)
    # unsorted, the first batch would hold the 77-token name; sorted, it pairs the two shortest prompts
    assert lengths == sorted(lengths) and lengths[0] == 3 and lengths[-1] == 77


def test_progress_bar_only_for_large_vocabularies(tiny_clip, monkeypatch, capsys):
    monkeypatch.setattr(encoder_module, "PROGRESS_PROMPTS", 5)
    enc = TextEncoder(tiny_clip, default_tokenizer(tiny_clip), ("{}", "a photo of a {}."), cache_dir=None)
    enc.encode(["cat", "dog"])  # 4 prompts
    assert "prompt" not in capsys.readouterr().err
    enc.encode(["sky", "tree", "road"])  # 6 prompts
    err = capsys.readouterr().err
    assert "text" in err and "6/6" in err
