"""Recipes: typed overrides with clear errors, validation naming the field, JSON round trip, registry."""

from __future__ import annotations

import json

import pytest

from vocabseg.errors import UnknownNameError
from vocabseg.train import ModelConfig, OptimConfig, Recipe, RecipeError, get_recipe, list_recipes, register_recipe
from vocabseg.train.recipe import recipe_differences

from .toy import toy_recipe


def test_overrides_reach_nested_dataclasses_and_dicts():
    base = toy_recipe()
    r = base.with_overrides(
        [
            "optim.lr=1e-2",
            "max_iters=10",
            "data.options.fold=2",
            "optim.lr_mult.clip=0.01",
            "model.pretrained=null",
            "data.scale=[0.75, 1.5]",
            "clip_grad_norm=1",
            "name=123",
            'model.options.head={"depth": 2}',
            "schedule.name=poly",
        ]
    )
    assert r.optim.lr == 1e-2 and r.max_iters == 10 and r.data.options == {"fold": 2}
    assert r.optim.lr_mult == {"body": 0.5, "clip": 0.01}
    assert r.model.pretrained is None and r.data.scale == (0.75, 1.5)
    assert r.clip_grad_norm == 1.0 and isinstance(r.clip_grad_norm, float)
    assert r.name == "123" and r.model.options == {"head": {"depth": 2}} and r.schedule.name == "poly"
    assert base.optim.lr == 0.05 and base.data.options == {}  # the original is untouched
    assert r.with_overrides(["model.options.head.depth=3"]).model.options == {"head": {"depth": 3}}


def test_unknown_override_key_lists_the_valid_keys_at_that_level():
    with pytest.raises(RecipeError, match=r"'optim\.lrr'.*Did you mean 'lr'.*Valid keys at optim:.*weight_decay"):
        toy_recipe().with_overrides(["optim.lrr=1"])
    with pytest.raises(RecipeError, match=r"Valid keys at the top level:.*max_iters"):
        toy_recipe().with_overrides(["max_iter=1"])
    with pytest.raises(RecipeError, match="single value"):
        toy_recipe().with_overrides(["optim.lr.x=1"])
    with pytest.raises(RecipeError, match="key=value"):
        toy_recipe().with_overrides(["optim.lr"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=abc", r"optim\.lr: expected float, got 'abc'"),
        ("max_iters=1.5", r"max_iters: expected int"),
        ("data.flip=yes", r"data\.flip: expected bool"),
        ("data.scale=[1]", r"data\.scale: expected 2 values"),
        ("optim.lr_mult.clip=fast", r"optim\.lr_mult\.clip: expected float"),
        ("max_iters=0", r"max_iters must be > 0, got 0"),
        ("optim.name=lion", r"optim\.name must be one of adamw, adam, sgd, got 'lion'"),
        ("amp=fp8", r"amp must be one of none, bf16, fp16"),
        ("schedule.name=step", r"schedule\.name must be one of cosine, poly, constant"),
        ("schedule.min_lr=1", r"schedule\.min_lr \(1\.0\) is above optim\.lr"),
        ("batch_size=-2", r"batch_size must be > 0"),
    ],
)
def test_bad_values_are_errors_naming_the_field(override, message):
    with pytest.raises(RecipeError, match=message):
        toy_recipe().with_overrides([override])


def test_to_dict_from_dict_round_trip_through_json():
    r = toy_recipe().with_overrides(["data.options.fold=1", "ema_decay=0.99", "val_every=5"])
    data = json.loads(json.dumps(r.to_dict()))
    assert Recipe.from_dict(data) == r
    assert data["data"]["scale"] == [0.5, 2.0] and data["optim"]["betas"] == [0.9, 0.999]
    with pytest.raises(RecipeError, match=r"Unknown recipe key 'optim\.learning_rate'"):
        Recipe.from_dict({**data, "optim": {**data["optim"], "learning_rate": 1}})
    del data["max_iters"]
    with pytest.raises(RecipeError, match="missing required key.*max_iters"):
        Recipe.from_dict(data)


def test_direct_construction_is_type_checked():
    with pytest.raises(RecipeError, match=r"optim\.lr: expected float, got 'fast'"):
        OptimConfig(lr="fast", weight_decay=0.0)
    assert OptimConfig(lr=1, weight_decay=0, betas=[0.5, 0.6]).betas == (0.5, 0.6)  # JSON lists become tuples
    with pytest.raises(RecipeError, match=r"optim: expected OptimConfig, got 3"):
        Recipe.from_dict({**toy_recipe().to_dict(), "optim": 3})
    with pytest.raises(RecipeError, match=r"model\.options\.x: .* is not JSON-serialisable"):
        ModelConfig(method="toy", options={"x": object()})


def test_differences_are_listed_by_dotted_key():
    a, b = toy_recipe().to_dict(), toy_recipe().with_overrides(["optim.lr=0.01", "data.options.fold=3"]).to_dict()
    assert recipe_differences(a, b) == {"data.options.fold": (None, 3), "optim.lr": (0.05, 0.01)}
    assert toy_recipe().flat["optim.lr_mult.body"] == 0.5


def test_registry_lookup_with_suggestions():
    recipe = register_recipe(toy_recipe(name="test-toy-recipe"), replace=True)
    assert get_recipe("test-toy-recipe") is recipe and "test-toy-recipe" in list_recipes()
    with pytest.raises(RecipeError, match="already registered"):
        register_recipe(toy_recipe(name="test-toy-recipe"))
    with pytest.raises(UnknownNameError, match="Did you mean 'test-toy-recipe'"):
        get_recipe("test-toy-recipes")
