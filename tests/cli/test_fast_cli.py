"""``vocabseg --help`` / ``--version`` and ``import vocabseg`` never import torch (they answer at once);
the heavy names arrive on first use, and the lazy top-level help is the full parser's."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

import vocabseg
from vocabseg.cli.main import SUBCOMMANDS, build_parser, main
from vocabseg.methods import list_methods

HEAVY = ("torch", "open_clip", "timm", "numpy")


def _loaded_after(code: str) -> set[str]:
    """The heavy modules in ``sys.modules`` after running ``code`` in a fresh interpreter."""
    probe = f"import sys\n{code}\nprint('LOADED:', *[m for m in {HEAVY!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    return set(out.stdout.rsplit("LOADED:", 1)[1].split())


@pytest.mark.parametrize("flag", ["--version", "--help"])
def test_version_and_help_import_no_heavy_module(flag):
    code = f"""
import vocabseg.cli.main as m
try:
    m.main([{flag!r}])
except SystemExit as exc:
    assert exc.code == 0, exc.code
"""
    assert _loaded_after(code) == set()


def test_importing_the_package_is_light_and_names_load_on_first_use():
    assert _loaded_after("import vocabseg") == set()
    assert "torch" in _loaded_after("import vocabseg\nvocabseg.Segmenter")
    assert vocabseg.Segmenter.__module__ == "vocabseg.segmenter"
    assert vocabseg.list_methods is list_methods
    assert {"Segmenter", "Vocabulary", "create_method"} <= set(dir(vocabseg))
    with pytest.raises(AttributeError, match="no attribute 'Segmentr'"):
        vocabseg.Segmentr  # noqa: B018


def test_version_is_printed(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"vocabseg {vocabseg.__version__}"


def test_pyproject_reads_the_version_from_the_package():
    config = pytest.importorskip("setuptools.config.pyprojecttoml")
    from pathlib import Path

    pyproject = Path(__file__).parents[2] / "pyproject.toml"
    assert config.read_configuration(pyproject)["project"]["version"] == vocabseg.__version__


def test_lazy_top_level_help_is_the_full_parsers():
    lazy = build_parser(commands=()).format_help()
    assert lazy == build_parser().format_help()  # every command's module imported
    for name, (_, summary) in SUBCOMMANDS.items():
        assert re.search(rf"^\s+{name}\s+{re.escape(summary)}$", lazy, flags=re.M), name


def test_segment_help_offers_every_registered_method(capsys):
    with pytest.raises(SystemExit):
        main(["segment", "--help"])
    choices = re.search(r"--method \{([^}]*)\}", capsys.readouterr().out).group(1)
    assert choices.split(",") == list_methods()
