import warnings

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import font_manager  # noqa: E402
from matplotlib.ft2font import FT2Font  # noqa: E402

from companion.plotting import use_book_style  # noqa: E402


def test_book_style_font_has_chinese_glyphs():
    family = use_book_style()
    path = font_manager.findfont(font_manager.FontProperties(family=family), fallback_to_default=False)
    font = FT2Font(path)
    for ch in "大规模语言模型温度概率":
        assert font.get_char_index(ord(ch)) != 0, f"{family} ({path}) has no glyph for {ch!r}"


def test_chinese_labels_render_without_missing_glyph_warnings():
    use_book_style()
    fig, ax = plt.subplots()
    ax.plot([1, 2], [3, -4])
    ax.set_title("温度越高，分布越平坦")
    ax.set_xlabel("温度 τ")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig.canvas.draw()
    plt.close(fig)
    missing = [str(w.message) for w in caught if "missing from font" in str(w.message)]
    assert not missing, missing
