"""Sphinx configuration for captum-gig."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))
from captum_gig import __version__  # noqa: E402

project = "captum-gig"
author = "captum-gig developers"
release = version = __version__
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax", "sphinx.ext.viewcode"]
autodoc_member_order = "bysource"
napoleon_google_docstring = True
exclude_patterns = ["_build"]
html_theme = "alabaster"
