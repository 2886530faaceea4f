import functools
import http.server
import threading
from pathlib import Path

import pytest

import companion.data as cd
from companion.data import DataChecksumError, DataError, DataFile, data_path, describe, load_manifest, write_manifest

ROOT = Path(__file__).resolve().parent.parent
PAYLOAD = "春眠不觉晓，处处闻啼鸟。\n".encode() * 100


def test_every_manifest_entry_matches_its_file():
    manifest = load_manifest()
    for name, entry in manifest.items():
        path = data_path(name, manifest)
        assert path.stat().st_size == entry.size, name
        assert entry.source and entry.license, f"{name}: source and licence must be documented"


def test_every_data_file_is_in_the_manifest():
    manifest = load_manifest()
    skip = {"manifest.json"}
    on_disk = {p.relative_to(ROOT / "data").as_posix() for p in (ROOT / "data").rglob("*")
               if p.is_file() and p.name not in skip and not p.name.endswith(".md")}
    assert on_disk <= set(manifest), f"files in data/ without a manifest entry: {sorted(on_disk - set(manifest))}"


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A fake checkout data/ directory holding one file and its manifest."""
    root = tmp_path / "data"
    (root / "poems").mkdir(parents=True)
    (root / "poems" / "a.txt").write_bytes(PAYLOAD)
    entry = describe(root / "poems" / "a.txt", "poems/a.txt", "written for the test", "CC0", "two lines")
    write_manifest({"poems/a.txt": entry}, root / "manifest.json")
    monkeypatch.setattr(cd, "checkout_data_dir", lambda: root)
    return root


def test_checkout_path_is_verified(checkout):
    assert data_path("poems/a.txt").read_bytes() == PAYLOAD


def test_corrupted_checkout_file_names_file_sums_and_fix(checkout):
    manifest = load_manifest()
    (checkout / "poems" / "a.txt").write_bytes(PAYLOAD[:-1] + b"!")
    expected = manifest["poems/a.txt"].sha256
    actual = cd.sha256sum(checkout / "poems" / "a.txt")
    with pytest.raises(DataChecksumError) as err:
        data_path("poems/a.txt")
    message = str(err.value)
    assert "'poems/a.txt'" in message and expected in message and actual in message
    assert "git checkout -- data/poems/a.txt" in message and "prepare-data" in message


def test_missing_and_unknown_files(checkout):
    (checkout / "poems" / "a.txt").unlink()
    with pytest.raises(DataError, match="missing at"):
        data_path("poems/a.txt")
    with pytest.raises(DataError, match=r"unknown data file 'nope.txt'.*poems/a.txt"):
        data_path("nope.txt")


def test_manifest_round_trip(tmp_path):
    entry = DataFile("x/y.bin", "ab" * 32, 3, "src", "MIT", "desc")
    write_manifest({"x/y.bin": entry}, tmp_path / "m.json")
    assert load_manifest(tmp_path / "m.json") == {"x/y.bin": entry}
    assert not list(tmp_path.glob("*.part"))


@pytest.fixture
def remote(tmp_path, monkeypatch):
    """No checkout: files come from a 'remote' directory into an empty cache."""
    served, cache = tmp_path / "served", tmp_path / "cache"
    (served / "poems").mkdir(parents=True)
    (served / "poems" / "a.txt").write_bytes(PAYLOAD)
    manifest = {"poems/a.txt": describe(served / "poems" / "a.txt", "poems/a.txt", "test", "CC0")}
    monkeypatch.setattr(cd, "checkout_data_dir", lambda: None)
    monkeypatch.setenv("COMPANION_DATA_DIR", str(cache))
    monkeypatch.setenv("COMPANION_DATA_URL", served.as_uri())
    return served, cache, manifest


def test_download_verifies_and_caches(remote):
    served, cache, manifest = remote
    path = data_path("poems/a.txt", manifest)
    assert path == cache / "poems" / "a.txt" and path.read_bytes() == PAYLOAD
    (served / "poems" / "a.txt").unlink()  # second call must use the verified cache
    assert data_path("poems/a.txt", manifest).read_bytes() == PAYLOAD


def test_corrupted_download_leaves_nothing_behind(remote):
    served, cache, manifest = remote
    (served / "poems" / "a.txt").write_bytes(PAYLOAD + b"tampered")
    with pytest.raises(DataChecksumError) as err:
        data_path("poems/a.txt", manifest)
    message = str(err.value)
    assert manifest["poems/a.txt"].sha256 in message and cd.sha256sum(served / "poems" / "a.txt") in message
    assert "Nothing was kept" in message
    assert [p for p in cache.rglob("*") if p.is_file()] == []


def test_damaged_cache_is_fetched_again(remote):
    served, cache, manifest = remote
    (cache / "poems").mkdir(parents=True)
    (cache / "poems" / "a.txt").write_bytes(b"truncated")
    assert data_path("poems/a.txt", manifest).read_bytes() == PAYLOAD


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_download_over_http(remote, monkeypatch):
    served, cache, manifest = remote
    handler = functools.partial(_QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("COMPANION_DATA_URL", f"http://127.0.0.1:{server.server_port}/")
        assert data_path("poems/a.txt", manifest).read_bytes() == PAYLOAD
    finally:
        server.shutdown()


def test_default_url_points_at_the_repository(monkeypatch):
    monkeypatch.delenv("COMPANION_DATA_URL", raising=False)
    monkeypatch.setenv("COMPANION_DATA_REVISION", "v1")
    owner_repo = cd.REPOSITORY_URL.removeprefix("https://github.com/")
    assert cd.base_url() == f"https://raw.githubusercontent.com/{owner_repo}/v1/data"
