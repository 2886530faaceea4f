"""Serve MathJax 3 from the build output so that math renders with no network.

MathJax comes from the PyPI package ``django-static-mathjax`` (MathJax 3.2.2, Apache-2.0). Only the
CommonHTML TeX component and its web fonts are copied to ``_build/html/_static/mathjax``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import mathjax  # django-static-mathjax

SOURCE = Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"
TARGET = "_static/mathjax"
NEEDED = ("tex-chtml.js", "output/chtml/fonts/woff-v2")


def _set_path(app, config) -> None:
    config.mathjax_path = f"mathjax/tex-chtml.js"


def _copy(app, exception) -> None:
    if exception is not None or app.builder.format != "html":
        return
    out = Path(app.outdir) / TARGET
    for item in NEEDED:
        src, dst = SOURCE / item, out / item
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        else:
            shutil.copy2(src, dst)


def setup(app):
    if not (SOURCE / "tex-chtml.js").is_file():
        raise RuntimeError(f"MathJax not found at {SOURCE}; install django-static-mathjax")
    app.connect("config-inited", _set_path)
    app.connect("build-finished", _copy)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
