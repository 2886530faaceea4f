"""Render check: headless Chromium opens the built book from a loopback server, with every request that
would leave the machine blocked and recorded. Math must be typeset by MathJax, the Colab launch link
present, figures loaded. Needs `_build/html` (`make html`) and Chromium; `make test` requires it."""

import functools
import http.server
import os
import shutil
import threading
from pathlib import Path
from urllib.parse import urlparse

import pytest

ROOT = Path(__file__).resolve().parent.parent
HTML = ROOT / "_build" / "html"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
REQUIRED = os.environ.get("COMPANION_REQUIRE_RENDER") == "1"
PAGE = "book/appendix/environment.html"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-features=MediaRouter,OptimizationHints"]


def _missing() -> str | None:
    if not (HTML / PAGE).is_file():
        return f"{HTML / PAGE} not built (run `make html`)"
    if CHROMIUM is None:
        return "no Chromium on PATH (apt-get install chromium)"
    return None


if _missing() and REQUIRED:
    pytest.fail(f"render check required but {_missing()}", pytrace=False)
pytestmark = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    handler = functools.partial(_QuietHandler, directory=str(HTML))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield browser
        browser.close()


def _open(browser, url):
    """Open url; abort and record any request that is not to the loopback server."""
    page = browser.new_page()
    outside, failed = [], []

    def route(r):
        host = urlparse(r.request.url).hostname
        if r.request.url.startswith(("data:", "blob:")) or host == "127.0.0.1":
            r.continue_()
        else:
            outside.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    page.on("requestfailed", lambda req: failed.append(req.url))
    page.goto(url, wait_until="networkidle", timeout=120_000)  # generous: CI shares 2 cores with other work
    return page, outside, failed


def test_math_is_typeset_offline_and_colab_link_present(browser, server):
    page, outside, failed = _open(browser, f"{server}/{PAGE}")
    page.wait_for_function("window.MathJax && MathJax.startup && MathJax.startup.promise", timeout=20_000)
    page.evaluate("MathJax.startup.promise")
    typeset = page.locator("mjx-container").count()
    assert typeset >= 2, "MathJax typeset no formula"
    assert page.locator("mjx-merror").count() == 0, "MathJax reported a TeX error"
    assert page.locator("mjx-container[display=true]").count() >= 1, "the display formula was not typeset"
    colab = page.locator("a[href^='https://colab.research.google.com/github/']").first.get_attribute("href")
    assert colab.endswith("/blob/main/book/appendix/environment.ipynb")
    assert "llm-book-zh/llm-theory-practice" in colab
    images = page.evaluate("[...document.images].map(i => [i.src, i.complete && i.naturalWidth > 0])")
    assert any(ok for _, ok in images) and all(ok for _, ok in images), images
    assert outside == [], f"requests that would leave the machine: {outside}"
    assert failed == [], f"failed requests: {failed}"
    page.close()


def test_chinese_search_finds_a_page(browser, server):
    page, outside, _ = _open(browser, f"{server}/search.html?q=温度")
    page.wait_for_selector("#search-results li", timeout=20_000)
    hits = page.locator("#search-results li a").all_inner_texts()
    assert any("环境与约定" in h for h in hits), hits
    assert outside == [], f"requests that would leave the machine: {outside}"
    page.close()


def _owner_repo() -> str:
    import companion

    return companion.REPOSITORY_URL.removeprefix("https://github.com/")


def test_every_page_loads_offline(browser, server):
    for html in sorted(HTML.rglob("*.html")):
        rel = html.relative_to(HTML).as_posix()
        if rel.startswith(("_", "genindex")):
            continue
        page, outside, failed = _open(browser, f"{server}/{rel}")
        source = ROOT / rel.replace(".html", ".ipynb")
        if source.is_file():  # every notebook page has a Colab button pointing at its own notebook
            href = f"https://colab.research.google.com/github/{_owner_repo()}/blob/main/{source.relative_to(ROOT).as_posix()}"
            assert page.locator(f"a[href='{href}']").count() == 1, f"{rel}: no Colab link {href}"
        page.close()
        assert outside == [], f"{rel}: requests that would leave the machine: {outside}"
        assert failed == [], f"{rel}: failed requests: {failed}"
