"""The README's tables name exactly what the registries hold (one source of truth, checked here)."""

from __future__ import annotations

import re
from pathlib import Path

from vocabseg.methods import list_methods
from vocabseg.train import list_recipes

README = (Path(__file__).parents[1] / "README.md").read_text()


def _table_names(section: str) -> set[str]:
    body = README.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([a-z0-9_]+)`", body, flags=re.M))


def test_methods_table_lists_every_registered_method():
    assert _table_names("Methods") == set(list_methods())


def test_training_table_lists_every_recipe():
    assert _table_names("Training") == set(list_recipes())
