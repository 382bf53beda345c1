"""The text paths trained methods use: the tower as a function of token embeddings, per-template and
gradient encodings, a cache that is never stale after the weights change, and the background parser."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_clip

from vocabseg.errors import VocabularyError
from vocabseg.models.clip import default_tokenizer
from vocabseg.text import TextEncoder, Vocabulary
from vocabseg.text.tower import encode_token_embeddings, token_embeddings
from vocabseg.text.vocabulary import parse_background

PROMPTS = ["a photo of a cat.", "tv monitor", "a very long description of a small red bicycle on a road", ""]
TEMPLATES = ("a photo of a {}.", "{}", "an image of the {} within the context.")
NAMES = ["cat", "tv monitor", "sky"]


@pytest.fixture()
def clip():
    """A private tiny CLIP: these tests change its weights."""
    return make_tiny_clip(seed=3)


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


# -- encode_token_embeddings -------------------------------------------------------------------------------------
def test_token_embedding_path_equals_encode_text(tiny_clip):
    tokens = default_tokenizer(tiny_clip)(PROMPTS)
    with torch.no_grad():
        got = encode_token_embeddings(tiny_clip, tokens)
        want = tiny_clip.encode_text(tokens)
        same_table = encode_token_embeddings(tiny_clip, tokens, embeddings=tiny_clip.token_embedding(tokens))
    assert got.shape == (len(PROMPTS), 32)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(same_table, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(token_embeddings(tiny_clip, tokens), tiny_clip.token_embedding.weight[tokens])
    assert (want[0] - want[1]).abs().max() > 1e-3  # the prompts give different embeddings


def test_learnable_vectors_get_gradients_and_the_causal_mask_holds(clip):
    clip.requires_grad_(False)
    tokens = default_tokenizer(clip)(["X X a photo of a cat.", "X X tv monitor"])
    eot = tokens.argmax(dim=-1)  # the end-of-text token has the largest id
    base = token_embeddings(clip, tokens).detach()
    context = torch.nn.Parameter(torch.randn(2, 64, generator=torch.Generator().manual_seed(0)) * 0.02)
    embeddings = torch.cat([base[:, :1], context.expand(2, -1, -1), base[:, 3:]], dim=1)  # over the two X's
    out = encode_token_embeddings(clip, tokens, embeddings=embeddings)
    out.square().sum().backward()
    assert context.grad is not None and context.grad.abs().sum() > 0
    assert torch.isfinite(context.grad).all()
    with torch.no_grad():
        assert (out - clip.encode_text(tokens)).abs().max() > 1e-4  # the vectors replaced the X tokens
        # causal attention, pooled at end-of-text: positions after it change nothing, positions before do
        after = base.clone()
        after[0, eot[0] + 1 :] += 1.0
        torch.testing.assert_close(
            encode_token_embeddings(clip, tokens, embeddings=after), clip.encode_text(tokens), atol=1e-6, rtol=1e-6
        )
        before = base.clone()
        before[0, 1] += 1.0
        assert (encode_token_embeddings(clip, tokens, embeddings=before)[0] - clip.encode_text(tokens)[0]).abs().max()
        assert (
            encode_token_embeddings(clip, tokens, embeddings=before)[1] - clip.encode_text(tokens)[1]
        ).abs().max() < 1e-6


def test_gradients_reach_text_tower_parameters_that_require_them(clip):
    clip.requires_grad_(False)
    clip.ln_final.requires_grad_(True)
    tokens = default_tokenizer(clip)(["a cat"])
    encode_token_embeddings(clip, tokens).sum().backward()
    assert clip.ln_final.weight.grad is not None and clip.ln_final.weight.grad.abs().sum() > 0
    assert clip.token_embedding.weight.grad is None  # frozen parameters get nothing


def test_a_model_without_a_text_tower_is_refused():
    with pytest.raises(TypeError, match="token_embedding"):
        encode_token_embeddings(torch.nn.Linear(2, 2), torch.zeros(1, 77, dtype=torch.long))


# -- TextEncoder: per template and with gradients ----------------------------------------------------------------
def test_per_template_embeddings(tiny_clip):
    enc = TextEncoder(tiny_clip, default_tokenizer(tiny_clip), TEMPLATES, cache_dir=None, prompts_per_batch=4)
    per = enc.encode(NAMES, per_template=True)
    assert per.shape == (3, 3, 32) and per.dtype == torch.float32
    torch.testing.assert_close(per.norm(dim=-1), torch.ones(3, 3))
    tok = default_tokenizer(tiny_clip)
    with torch.no_grad():
        for k, name in enumerate(NAMES):
            for p, template in enumerate(TEMPLATES):
                want = unit_rows(tiny_clip.encode_text(tok([template.format(name)])))[0]
                torch.testing.assert_close(per[k, p], want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(unit_rows(per.mean(1)), enc.encode(NAMES), atol=1e-6, rtol=1e-5)
    assert (per[:, 0] - per[:, 1]).abs().max() > 1e-3  # the templates really differ


def test_per_template_and_mean_entries_share_one_cache_without_mixing(tiny_clip, tmp_path):
    tok = default_tokenizer(tiny_clip)
    enc = TextEncoder(tiny_clip, tok, TEMPLATES, cache_dir=tmp_path)
    mean = enc.encode(NAMES)
    per = enc.encode(NAMES, per_template=True)
    assert enc.last_encoded == 3  # a mean entry is no per-template entry
    again = TextEncoder(tiny_clip, tok, TEMPLATES, cache_dir=tmp_path)
    torch.testing.assert_close(again.encode(NAMES, per_template=True), per, atol=0, rtol=0)
    assert again.last_encoded == 0
    torch.testing.assert_close(again.encode(NAMES), mean, atol=0, rtol=0)
    assert again.last_encoded == 0


def test_encode_with_grad_equals_encode_and_has_gradients(clip):
    enc = TextEncoder(clip, default_tokenizer(clip), TEMPLATES, cache_dir=None)
    for per_template in (False, True):
        cached = enc.encode(NAMES, per_template=per_template)
        assert cached.grad_fn is None
        live = enc.encode_with_grad(NAMES, per_template=per_template)
        assert live.grad_fn is not None
        torch.testing.assert_close(live.detach(), cached, atol=1e-6, rtol=1e-5)
    clip.zero_grad()
    enc.encode_with_grad(["cat"]).sum().backward()
    grad = clip.token_embedding.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert clip.visual.proj.grad is None  # the image tower is not involved


# -- the cache is never stale -------------------------------------------------------------------------------------
def fresh(clip) -> torch.Tensor:
    return TextEncoder(clip, default_tokenizer(clip), TEMPLATES, cache_dir=None).encode(NAMES)


@pytest.mark.parametrize("change", ["data_add", "no_grad_add", "load_state_dict", "optimizer_step"])
def test_changed_text_weights_are_never_served_stale_embeddings(clip, tmp_path, change):
    enc = TextEncoder(clip, default_tokenizer(clip), TEMPLATES, cache_dir=tmp_path)
    old = enc.encode(NAMES)
    old_per = enc.encode(NAMES, per_template=True)
    enc.encode(NAMES)
    assert enc.last_encoded == 0
    original = {k: v.clone() for k, v in clip.state_dict().items()}
    if change == "data_add":  # bypasses the version counter (a constant shift would be undone by LayerNorm)
        clip.token_embedding.weight.data.add_(0.1 * torch.randn(clip.token_embedding.weight.shape))
    elif change == "no_grad_add":
        with torch.no_grad():
            clip.ln_final.bias.add_(0.1)
    elif change == "load_state_dict":
        clip.load_state_dict(make_tiny_clip(seed=4).state_dict())
    elif change == "optimizer_step":
        opt = torch.optim.SGD(clip.transformer.parameters(), lr=1.0)
        direction = torch.randn(32, generator=torch.Generator().manual_seed(1))  # unit rows: |x|^2 is constant
        (enc.encode_with_grad(NAMES) @ direction).sum().backward()
        opt.step()
    new = enc.encode(NAMES)
    assert enc.last_encoded == 3
    assert (new - old).abs().max() > 1e-4
    torch.testing.assert_close(new, fresh(clip), atol=1e-6, rtol=1e-5)
    assert (enc.encode(NAMES, per_template=True) - old_per).abs().max() > 1e-4
    assert enc.last_encoded == 3
    # another encoder on the same cache folder sees the new weights too
    other = TextEncoder(clip, default_tokenizer(clip), TEMPLATES, cache_dir=tmp_path)
    torch.testing.assert_close(other.encode(NAMES), new, atol=0, rtol=0)
    assert other.last_encoded == 0
    # back to the original weights: the original entries are served from disk again
    clip.load_state_dict(original)
    torch.testing.assert_close(enc.encode(NAMES), old, atol=0, rtol=0)
    assert enc.last_encoded == 0


def test_image_tower_changes_keep_the_text_cache(clip, tmp_path):
    enc = TextEncoder(clip, default_tokenizer(clip), TEMPLATES, cache_dir=tmp_path)
    old = enc.encode(NAMES)
    with torch.no_grad():
        clip.visual.proj.add_(1.0)
    clip.visual.conv1.weight.data.mul_(2.0)
    torch.testing.assert_close(enc.encode(NAMES), old, atol=0, rtol=0)
    assert enc.last_encoded == 0


# -- background names --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "given, want",
    [
        ("sky; wall", ("sky", "wall")),
        ("  sky  ;wall   tile ", ("sky", "wall tile")),
        ("sky", ("sky",)),
        ("", ()),
        ("   ", ()),
        (None, ()),
        (["sky", " wall "], ("sky", "wall")),
        (("floor",), ("floor",)),
        ([], ()),
    ],
)
def test_parse_background(given, want):
    assert parse_background(given) == want


@pytest.mark.parametrize("given", [";;", ";", "sky;;wall", "sky; ", ["sky", ""], ["  "]])
def test_parse_background_refuses_empty_names(given):
    with pytest.raises(VocabularyError, match="Empty background name"):
        parse_background(given)


def test_without_background_names():
    vocab = Vocabulary.parse("cat, dog; puppy").with_background(parse_background("sky; wall"))
    assert vocab.prompt_names == ["cat", "dog", "puppy", "sky", "wall"]
    bare = vocab.without_background_names()
    assert bare.class_names == ["cat", "dog", "background"] and bare.background_index == 2
    assert bare.prompt_names == ["cat", "dog", "puppy"]
    assert bare.name_to_class == [0, 1, 1]
    assert bare.classes[:2] == vocab.classes[:2] and bare.classes[2].names == ()
    plain = Vocabulary.parse("cat, dog")
    assert plain.without_background_names() is plain  # no background: unchanged
    assert bare.without_background_names() is bare  # already nameless: unchanged
