"""Tables in README.md and docs/ state facts the registries own: each is checked against its source."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from vocabseg.data.registry import DATASETS
from vocabseg.methods import get_method_spec, list_methods

ROOT = Path(__file__).parents[1]


def _section(path: Path, heading: str) -> str:
    text = path.read_text(encoding="utf-8")
    return text.split(f"{heading}\n", 1)[1].split("\n## ", 1)[0]


def _rows(body: str) -> dict[str, list[str]]:
    """Markdown table rows keyed by their first cell's backticked name."""
    rows = {}
    for line in body.splitlines():
        m = re.match(r"^\| `([^`]+)`[^|]*\|(.*)\|\s*$", line)
        if m:
            rows[m.group(1)] = [c.strip() for c in m.group(2).split("|")]
    return rows


@pytest.mark.parametrize("method", list_methods())
def test_readme_methods_table_matches_each_methods_defaults(method):
    """Short side, window / stride and logit scale columns are the registered defaults."""
    row = _rows(_section(ROOT / "README.md", "## Methods"))[method]
    short_side, window, scale = row[2], row[3], row[4]
    d = get_method_spec(method).defaults
    assert short_side == str(d.short_side)
    assert window == ("whole image" if d.crop == 0 else f"{d.crop} / {d.stride}")
    assert float(scale.split()[0]) == d.logit_scale


def test_evaluation_doc_benchmark_table_matches_the_dataset_registry():
    rows = _rows(_section(ROOT / "docs" / "evaluation.md", "## Benchmarks"))
    fixed = {n: s for n, s in DATASETS.items() if s.num_images and not n.startswith("pascal5i")}
    assert set(fixed) <= set(rows)
    for name, spec in fixed.items():
        classes, images = rows[name][1], rows[name][3]
        assert int(classes.split()[0]) == spec.classes.num_classes, name
        assert int(images) == spec.num_images, name


def test_serve_doc_lists_every_server_flag():
    """Every flag of `vocabseg serve` that is not a shared model option has a row in docs/serve.md."""
    help_text = subprocess.run(
        [sys.executable, "-m", "vocabseg", "serve", "--help"], capture_output=True, text=True, check=True
    ).stdout
    server_group = help_text.split("server:", 1)[1].split("\n\n", 1)[0]
    flags = set(re.findall(r"^\s+(--[a-z][a-z-]*)", server_group, flags=re.M))
    documented = set(_rows(_section(ROOT / "docs" / "serve.md", "## Server options")))
    assert flags and flags <= documented, flags - documented
    assert all(re.search(rf"\[{flag}[ \]]", help_text) for flag in documented), "a documented flag is gone"
