"""Sphinx configuration for the pyrovae documentation.

Build: ``python -m sphinx -W -b html docs docs/_build`` (CI builds with warnings as errors).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(".."))
os.environ.setdefault("MPLBACKEND", "Agg")

project = "pyrovae"
author = "pyrovae maintainers"
copyright = "pyrovae maintainers"
release = "0.1.0"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
# The snippets are written by benchmark scripts and included into pages; the gallery is images.
exclude_patterns = ["_build", "readme-snippets", "gallery"]

myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_typehints = "description"

html_theme = "alabaster"
html_title = "pyrovae"


# ---------------------------------------------------------------------------------------------
# Generated snippets. Benchmark scripts write summaries into ``docs/readme-snippets/`` (e.g.
# ``benchmarks/estimators_mnist.py``, ``benchmarks/mnist_nll.py --render``) with links relative
# to the repository root. A page pulls one in, current at every build, with a line
# ``<!-- snippet: NAME -->``; its links are rewritten to work from the page.
import re
from pathlib import Path

_DOCS = Path(__file__).resolve().parent
_SNIPPET = re.compile(r"<!-- snippet: ([A-Za-z0-9_-]+) -->")


def _snippet(match: re.Match) -> str:
    text = (_DOCS / "readme-snippets" / f"{match.group(1)}.md").read_text()
    text = re.sub(r"<!--.*?-->\n?", "", text, flags=re.S)
    # root-relative links, as the README would have them, seen from a page in docs/
    text = re.sub(r"\]\(benchmarks/results/([A-Za-z0-9_]+)\.md\)", r"](results/\1.md)", text)
    text = re.sub(r"\]\((benchmarks|examples|docs)/", lambda m: "](" + ("" if m.group(1) == "docs" else "../") + (m.group(1) + "/" if m.group(1) != "docs" else ""), text)
    return text


def _insert_snippets(app, docname: str, source: list[str]) -> None:
    if "/" not in docname:  # pages at the top of docs/ only
        source[0] = _SNIPPET.sub(_snippet, source[0])


def setup(app):
    app.connect("source-read", _insert_snippets)
