"""Sphinx configuration of the pyro-lag documentation.

Build with warnings as errors (what ``make docs`` and ``make test`` run)::

    sphinx-build -W --keep-going -b html docs docs/_build/html
"""
from __future__ import annotations

import importlib.util

import pyro_lag  # imports nothing heavy: public names load on first use

project = "pyro-lag"
author = "the pyro-lag authors"
copyright = "the pyro-lag authors"
release = pyro_lag.__version__
version = release

extensions = [
    "myst_parser",  # the guide and results pages are Markdown
    "sphinx.ext.autodoc",  # the API reference, from the docstrings
    "sphinx.ext.viewcode",  # links from the API reference to the source
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# Markdown: `#section` anchors for headings down to ###, so pages can link to sections.
myst_heading_anchors = 3

# Docstrings are reST with :param: fields; members in source order, type hints in the text.
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
# Lightning is an optional extra: document its module without it installed.
autodoc_mock_imports = [] if importlib.util.find_spec("lightning") else ["lightning"]

html_theme = "furo"
html_title = f"pyro-lag {release}"

# Methods without a docstring of their own (Lightning hooks, say) say nothing rather than repeat
# their base class's text, whose roles and labels belong to another project's docs.
autodoc_inherit_docstrings = False
# A public package re-exports its classes (``pyro_lag.lightning.LightningSettings`` is
# ``pyro_lag.lightning.settings.LightningSettings``): both names are right, so an unqualified
# type hint that finds both is not an error.
suppress_warnings = ["ref.python"]
