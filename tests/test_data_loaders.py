"""Corpus loaders built from data/ and the byte-reproducible prepare-data pieces that need no download."""

import gzip
import json

import pytest

from companion import data
from companion.dedup import NOTE_PATTERN, clean_poem, fingerprint
from companion import prepare_data as prep


def test_tang_poems():
    poems = data.load_tang_poems()
    assert poems.column_names == ["id", "title", "author", "dynasty", "form", "text"]
    assert poems.num_rows == 57603
    row = poems[0]
    assert row["author"] == "太宗皇帝" and row["text"].startswith("秦川雄帝宅，函谷壮皇居。")  # t2s applied
    assert set(poems["dynasty"]) == {"唐"}
    assert poems._fingerprint == data.load_tang_poems()._fingerprint


def _shares_13gram(train: list[str], held: list[str]) -> list[bool]:
    """Per held-out text: does one of its 13-character n-grams occur in a training text (written out here, not
    with companion.dedup.contamination)."""
    grams = {t[i:i + 13] for t in held for i in range(len(t) - 12)}
    seen = {t[i:i + 13] for t in train for i in range(len(t) - 12) if t[i:i + 13] in grams}
    return [any(t[i:i + 13] in seen for i in range(len(t) - 12)) for t in held]


def test_tang_splits_clean_deduplicated_decontaminated():
    splits = data.tang_poem_splits()
    raw = {r["id"]: r["text"] for r in data.read_jsonl(data.TANG_POEMS)}
    sizes = {k: v.num_rows for k, v in splits.items()}
    total = sum(sizes.values())
    assert 0.93 < total / len(raw) < 0.99  # fragments, lost characters and duplicates dropped, nothing else
    assert all(0.04 < sizes[k] / total < 0.05 for k in ("validation", "test"))  # 5% less the moved poems
    for split in splits.values():
        assert split["text"] == [clean_poem(raw[i]) for i in split["id"]]
        assert not any(NOTE_PATTERN.search(t) for t in split["text"])
        assert split["form"] == [prep.poem_form(t) for t in split["text"]]
    prints = {k: [fingerprint(t) for t in v["text"]] for k, v in splits.items()}
    everything = [p for k in data.SPLITS for p in prints[k]]
    assert len(set(everything)) == len(everything)  # no two poems equal up to punctuation, in or across splits
    for name in ("validation", "test"):
        assert not any(_shares_13gram(prints["train"], prints[name]))
    # the check can fail: the split of the raw text by its hash alone shares 13-grams in more than 5% of poems
    buckets = [data.split_bucket(t, *data.TANG_HELD_OUT) for t in raw.values()]
    raw_prints = [fingerprint(clean_poem(t)) for t in raw.values()]
    raw_train = [p for p, b in zip(raw_prints, buckets) if b == "train"]
    raw_validation = [p for p, b in zip(raw_prints, buckets) if b == "validation"]
    assert sum(_shares_13gram(raw_train, raw_validation)) > 0.05 * len(raw_validation)
    assert splits["train"]._fingerprint == data.tang_poem_splits()["train"]._fingerprint


def test_split_errors():
    with pytest.raises(ValueError, match=r"validation \+ test must be < 1, got 0.6 \+ 0.5"):
        data.split_bucket("x", 0.6, 0.5)
    with pytest.raises(ValueError, match="test fraction must be in"):
        data.split_bucket("x", 0.1, -0.1)


def test_reviews():
    reviews = data.load_reviews()
    assert {k: v.num_rows for k, v in reviews.items()} == {"train": 13891, "validation": 1736, "test": 1736}
    texts = [t for split in reviews.values() for t in split["text"]]
    assert len(texts) == len(set(texts))  # deduplicated, no text in two splits
    train = reviews["train"]
    assert 0.4 < sum(train["label"]) / train.num_rows < 0.6
    with pytest.raises(ValueError, match="split must be one of"):
        data.load_reviews("dev")


def test_shakespeare():
    works = data.load_shakespeare()
    assert works.num_rows == 42 and "hamlet" in works["id"]
    assert works[works["id"].index("hamlet")]["text"].startswith("HAMLET, PRINCE OF DENMARK")


def test_jsonl_gz_is_byte_stable():
    rows = [{"b": "二", "a": 1}, {"a": 2, "b": "x"}]
    payload = prep.jsonl_gz_bytes(rows)
    assert payload == prep.jsonl_gz_bytes([dict(reversed(list(r.items()))) for r in rows])
    assert payload[4:8] == b"\0\0\0\0"  # gzip header mtime = 0
    assert gzip.decompress(payload).decode().splitlines()[0] == json.dumps({"a": 1, "b": "二"}, ensure_ascii=False)


def test_poem_form():
    assert prep.poem_form("床前明月光，疑是地上霜。\n举头望明月，低头思故乡。") == "五言绝句"
    assert prep.poem_form("朝辞白帝彩云间，千里江陵一日还。\n两岸猿声啼不住，轻舟已过万重山。") == "七言绝句"
    assert prep.poem_form("一二三四五，一二三四五。") == "其他"


def test_regenerated_files_match_manifest(tmp_path):
    """Re-derive the files that need no download and compare their sums with the committed manifest;
    entries generated elsewhere survive a regeneration."""
    manifest = data.load_manifest()
    foreign = data.DataFile("models/other.csv", "0" * 64, 1, "another chapter", "CC0")
    data.write_manifest({**{k: v for k, v in manifest.items()}, foreign.name: foreign}, tmp_path / "manifest.json")
    only = {data.TANG_SPLITS, data.REVIEWS, data.GPT2_ENCODER, data.GPT2_MERGES}
    assert prep.prepare_data(tmp_path, only=only, check=True) == []
    prep.prepare_data(tmp_path, only=only)
    after = data.load_manifest(tmp_path / "manifest.json")
    assert after[foreign.name] == foreign
    for name in only:
        assert after[name].sha256 == manifest[name].sha256
        assert data.sha256sum(tmp_path / name) == manifest[name].sha256
    with pytest.raises(ValueError, match="does not generate"):
        prep.prepare_data(tmp_path, only={"models/other.csv"}, check=True)


def test_tang_lines_are_the_lines_of_one_form_in_one_split():
    splits = data.tang_poem_splits()
    lines = data.tang_lines("五言绝句", "validation")
    poems = [t for f, t in zip(splits["validation"]["form"], splits["validation"]["text"]) if f == "五言绝句"]
    assert lines == [list(line) for t in poems for line in t.split("\n")]
    assert len(poems) > 100 and sum(map(len, lines)) == sum(len(t) - t.count("\n") for t in poems)
    assert all("\n" not in line and len(line) % 12 == 0 for line in lines)  # whole couplets: 5 + ，+ 5 + 。
    with pytest.raises(ValueError, match="split must be one of"):
        data.tang_lines("五言绝句", "dev")
    with pytest.raises(ValueError, match="no poem of form"):
        data.tang_lines("六言绝句", "train")
