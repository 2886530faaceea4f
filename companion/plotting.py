"""Book-wide matplotlib style: a CJK-capable font (so Chinese labels render, no tofu), small figures.

The font is searched among installed families; CI and Colab install Noto Sans CJK (Debian
``fonts-noto-cjk``), macOS and Windows ship PingFang / Microsoft YaHei.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
from matplotlib import font_manager

CJK_FAMILIES = (
    "Noto Sans CJK SC",
    "Noto Sans SC",
    "Source Han Sans SC",
    "WenQuanYi Micro Hei",
    "WenQuanYi Zen Hei",
    "PingFang SC",
    "Heiti SC",
    "Microsoft YaHei",
    "SimHei",
    "Arial Unicode MS",
)
# Where Debian/Ubuntu (and so Colab) put Noto CJK; added explicitly in case matplotlib's font cache is stale.
_KNOWN_FILES = (
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
)


def cjk_font_family() -> str:
    """Return the first installed CJK-capable font family, or raise with how to install one."""
    for path in _KNOWN_FILES:
        if Path(path).is_file():
            font_manager.fontManager.addfont(path)
    installed = {f.name for f in font_manager.fontManager.ttflist}
    for family in CJK_FAMILIES:
        if family in installed:
            return family
    raise RuntimeError(
        "no CJK-capable font found for matplotlib (looked for "
        + ", ".join(CJK_FAMILIES)
        + "); on Debian/Ubuntu/Colab run `apt-get install fonts-noto-cjk`"
    )


def use_book_style() -> str:
    """Apply the book's matplotlib defaults and return the CJK font family in use."""
    family = cjk_font_family()
    matplotlib.rcParams.update(
        {
            "font.family": "sans-serif",
            "font.sans-serif": [family, "DejaVu Sans"],
            "axes.unicode_minus": False,  # CJK fonts may lack U+2212; use ASCII hyphen-minus
            "figure.dpi": 100,
            "savefig.dpi": 100,
            "figure.figsize": (6.0, 3.6),
            "axes.grid": True,
            "grid.alpha": 0.3,
            "svg.hashsalt": "companion",  # deterministic SVG ids
        }
    )
    return family
