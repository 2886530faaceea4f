"""Put the search box placeholder in the book's language.

Jupyter Book 1.x sets ``html_theme_options["search_bar_text"] = "Search this book..."``, an English string that no
catalog translates (and sphinx-book-theme's own fallback, its catalog's "Search", has no zh_CN entry). This
replaces that default, and only it, with Sphinx's translation of "Search" + "..." (搜索... for ``zh_CN``); a
placeholder set on purpose in ``_config.yml`` stays.
"""

from __future__ import annotations

from sphinx.locale import _

JUPYTER_BOOK_DEFAULT = "Search this book..."


def _translate_placeholder(app, config) -> None:
    if config.html_theme_options.get("search_bar_text") == JUPYTER_BOOK_DEFAULT:
        config.html_theme_options = {**config.html_theme_options, "search_bar_text": _("Search") + "..."}


def setup(app):
    app.connect("config-inited", _translate_placeholder)  # after Sphinx loaded the catalogs of `language`
    return {"parallel_read_safe": True, "parallel_write_safe": True}
