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
