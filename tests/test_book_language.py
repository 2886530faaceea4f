"""The built book speaks Chinese in its own interface too: ``<html lang="zh-CN">``, and the theme's labels (search
box, 目录, 作者, the toggle of hidden code) in Chinese, not the English defaults. Reads ``_build/html`` (``make html``;
``make test`` builds it first); skipped when it is missing, except under CI or ``COMPANION_REQUIRE_RENDER=1``."""

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HTML = ROOT / "_build" / "html"
PAGE = HTML / "book" / "appendix" / "environment.html"  # a notebook page with a hidden code cell and a sidebar ToC
REQUIRED = os.environ.get("CI") == "true" or os.environ.get("COMPANION_REQUIRE_RENDER") == "1"
CJK = re.compile(r"[\u4e00-\u9fff]")

# English interface strings of Jupyter Book, sphinx-book-theme, pydata-sphinx-theme and myst-nb that have a
# Chinese rendering here (a theme translation, or _config.yml / book/_ext for the two no catalog covers)
ENGLISH = ["Search this book", "Contents", "Show code cell", "Hide code cell", "By the", "Print to PDF",
           "Download this page", "Fullscreen mode", "Source repository", "On this page"]

if not PAGE.is_file() and REQUIRED:
    pytest.fail(f"{PAGE} not built (run `make html`)", pytrace=False)
pytestmark = pytest.mark.skipif(not PAGE.is_file(), reason=f"{PAGE} not built (run `make html`)")


@pytest.fixture(scope="module")
def soup():
    from bs4 import BeautifulSoup

    return BeautifulSoup(PAGE.read_text(encoding="utf-8"), "html.parser")


def _interface_text(soup) -> str:
    """Visible text and the labels a reader meets (placeholder, title, aria-label), without code and scripts."""
    from bs4 import BeautifulSoup, Comment

    page = BeautifulSoup(str(soup), "html.parser")
    for tag in page(["script", "style", "pre", "code"]):
        tag.decompose()
    for comment in page.find_all(string=lambda s: isinstance(s, Comment)):
        comment.extract()
    labels = [tag[a] for a in ("placeholder", "title", "aria-label") for tag in page.find_all(attrs={a: True})]
    return "\n".join([page.get_text("\n"), *labels])


def test_html_lang_is_chinese(soup):
    assert soup.html.get("lang", "").startswith("zh"), soup.html.attrs


def test_search_placeholder_is_chinese(soup):
    fields = soup.find_all("input", attrs={"placeholder": True})
    assert fields, "no search field on the page"
    for field in fields:
        assert CJK.search(field["placeholder"]) and "Search" not in field["placeholder"], field["placeholder"]


def test_theme_labels_are_chinese(soup):
    text = _interface_text(soup)
    for chinese in ["目录", "作者：", "显示代码", "隐藏代码", "搜索"]:  # Contents, By, Show/Hide code cell, Search
        assert chinese in text, chinese


def test_no_english_interface_strings(soup):
    text = _interface_text(soup)
    found = [s for s in ENGLISH if s in text]
    assert not found, f"English interface text in {PAGE.relative_to(ROOT)}: {found}"
