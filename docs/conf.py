"""Sphinx configuration for captum-gig (built with ``sphinx-build -W`` in CI)."""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
os.environ.setdefault("CAPTUM_GIG_DOCS_BUILD", "1")  # tutorials: no network, small data

from captum_gig import __version__  # noqa: E402

project = "captum-gig"
author = "captum-gig developers"
copyright = "captum-gig developers"
release = version = __version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx.ext.intersphinx",
    "sphinx_gallery.gen_gallery",
]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
intersphinx_mapping = {}  # offline build: no inventories are fetched
exclude_patterns = ["_build", "_generated/*.txt", "auto_tutorials/*.ipynb", "sg_execution_times.rst"]
suppress_warnings = ["config.cache"]
nitpicky = False

html_theme = "furo"
html_title = f"captum-gig {release}"
html_static_path = ["_static"] if os.path.isdir(os.path.join(HERE, "_static")) else []

# -- math without network: Debian's libjs-mathjax (MathJax 2.7, installed by install.sh) -------
# The default MathJax comes from a CDN, which an offline reader (and CI) cannot reach. We copy
# the few files the TeX input and SVG output need (~2.5 MB; SVG output needs no web fonts, so
# pages also render from file://) into the built site's _static/mathjax.
MATHJAX_DIR = os.environ.get("CAPTUM_GIG_MATHJAX", "/usr/share/javascript/mathjax")
MATHJAX_FILES = [
    "MathJax.js", "config/TeX-AMS_SVG.js", "extensions", "localization/en", "jax/input/TeX", "jax/element",
    "jax/output/SVG/jax.js", "jax/output/SVG/config.js", "jax/output/SVG/autoload", "jax/output/SVG/fonts/TeX",
]
if os.path.exists(os.path.join(MATHJAX_DIR, "MathJax.js")):
    mathjax_path = "mathjax/MathJax.js?config=TeX-AMS_SVG"  # relative to the built _static/
else:  # not an error: the pages still work online
    print(f"note: {MATHJAX_DIR} not found (Debian package libjs-mathjax); math loads MathJax from its CDN")
    MATHJAX_DIR = None


def _copy_mathjax(app, exception) -> None:
    import shutil

    if exception is not None or MATHJAX_DIR is None or app.builder.format != "html":
        return
    dest = os.path.join(app.outdir, "_static", "mathjax")
    for rel in MATHJAX_FILES:
        src, dst = os.path.join(MATHJAX_DIR, rel), os.path.join(dest, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if os.path.isdir(src):
            shutil.copytree(src, dst, dirs_exist_ok=True)
        else:
            shutil.copy2(src, dst)


# -- tutorials (sphinx-gallery): every script under tutorials/ runs at build time -------------
sphinx_gallery_conf = {
    "examples_dirs": os.path.join(ROOT, "tutorials"),
    "gallery_dirs": "auto_tutorials",
    "filename_pattern": r"tutorial_",
    "ignore_pattern": r"__init__\.py|_helpers\.py",
    "abort_on_example_error": True,
    "only_warn_on_example_error": False,
    "download_all_examples": False,
    "within_subsection_order": "FileNameSortKey",
    "remove_config_comments": True,
    "plot_gallery": "True",
    "show_memory": False,
    "matplotlib_animations": False,
    "image_scrapers": ("matplotlib",),
    "write_computation_times": False,
}

# -- generated pages: CLI help text, optional pages written by other parts of the project -----
GEN = os.path.join(HERE, "_generated")
os.makedirs(GEN, exist_ok=True)


def _write(name: str, text: str) -> None:
    path = os.path.join(GEN, name)
    old = open(path, encoding="utf-8").read() if os.path.exists(path) else None
    if old != text:  # keep mtimes stable so Sphinx does not rebuild everything
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)


def _cli_help() -> None:
    from captum_gig.cli import build_parser

    parser = build_parser()
    _write("cli_main.txt", parser.format_help())
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, p in sub.choices.items():
        _write(f"cli_{name}.txt", p.format_help())


def _optional_pages() -> None:
    """The toctree entries of pages other parts of the project provide, and the reproduction report."""
    entries = [p for p in ("performance", "guarantees") if os.path.exists(os.path.join(HERE, f"{p}.rst"))]
    lines = [".. toctree::", "   :maxdepth: 1", "   :caption: Performance and guarantees", ""] + [f"   {e}" for e in entries]
    _write("reports_toc.rst.inc", "\n".join(lines) + "\n" if entries else "\n")
    report = os.path.join(ROOT, "benchmarks", "paper", "REPORT.md")
    if os.path.exists(report):
        with open(report, encoding="utf-8") as f:
            _write("reproduction_body.md", f.read())
        text = ("The report below is ``benchmarks/paper/REPORT.md``, written by the scripts in\n"
                "``benchmarks/paper/`` (shown as written, in Markdown).\n\n"
                ".. literalinclude:: _generated/reproduction_body.md\n   :language: markdown\n")
    else:
        text = ("The reproduction report (``benchmarks/paper/REPORT.md``) has not been written in this\n"
                "checkout yet; run the scripts in ``benchmarks/paper/`` to produce it.\n")
    _write("reproduction.rst.inc", text)


def _api_pages() -> None:
    """autodoc directives for every name in ``captum_gig.__all__`` and the public submodules."""
    import importlib
    import inspect

    import captum_gig

    titles = {
        "pfv": "PFVs", "concepts": "Concept bases", "decompose": "Sparse decomposition",
        "gig": "Generalized Integrated Gradients", "aggregate": "Dataset-wide aggregation",
        "graph": "Concept graphs", "atlas": "Concept atlases", "ierf": "Effective receptive fields",
        "metrics": "Evaluation metrics", "preactivation": "Pre-activations", "extractors": "Alternative concept extractors",
        "zoo": "Offline models and data", "distributed": "Distributed helpers", "pipeline": "The pipeline as a Python API",
        "cli": "Command line (Python entry points)",
    }
    top = [n for n in captum_gig.__all__ if n != "__version__"]
    groups = {}
    for name in top:
        obj = getattr(captum_gig, name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        mod = getattr(obj, "__module__", "captum_gig").split(".")[-1]
        groups.setdefault(mod, []).append(("captum_gig." + name, obj))
    for mod in ("aggregate", "extractors", "zoo", "distributed", "pipeline", "cli"):
        try:
            module = importlib.import_module(f"captum_gig.{mod}")
        except ImportError:
            continue
        exported = {id(o) for _, o in sum(groups.values(), [])}
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if id(obj) in exported or not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            groups.setdefault(mod, []).append((f"captum_gig.{mod}.{name}", obj))
    lines = []
    order = [m for m in titles if m in groups] + [m for m in groups if m not in titles]
    for mod in order:
        title = f"{titles.get(mod, mod)} (``captum_gig.{mod}``)"
        lines += [title, "-" * len(title), ""]
        for path, obj in groups[mod]:
            if inspect.isclass(obj) and issubclass(obj, tuple):  # NamedTuple: fields are in the docstring
                lines += [f".. autoclass:: {path}", ""]
            elif inspect.isclass(obj):
                lines += [f".. autoclass:: {path}", "   :members:", ""]
            else:
                lines += [f".. autofunction:: {path}", ""]
    _write("api_body.rst.inc", "\n".join(lines) + "\n")


_cli_help()
_optional_pages()
_api_pages()


def setup(app):
    app.connect("build-finished", _copy_mathjax)
    return {"parallel_read_safe": True}
