"""companion.dedup: MinHash against the exact Jaccard similarity, LSH banding against 1 - (1 - s^r)^b,
cleaning, quality rules and the n-gram contamination check."""

import math
import random

import numpy as np
import pytest

from companion.data import load_tang_poems
from companion.dedup import (MinHashConfig, MinHasher, QualityConfig, clean_poem, clusters, contamination,
                             decontaminate, deduplicate,
                             duplicate_groups, estimated_jaccard, fingerprint, jaccard, lsh_candidates,
                             lsh_probability, near_duplicate_pairs, quality_failures, shingles)


@pytest.fixture(scope="module")
def poems() -> list[str]:
    return [fingerprint(clean_poem(t)) for t in load_tang_poems()["text"][:400]]


def edited_pairs(poems: list[str], count: int = 40) -> list[tuple[str, str]]:
    """Real poems and copies of them with a growing share of characters replaced by those of another poem."""
    rng = random.Random(0)
    pairs = []
    for k in range(count):
        a, other = poems[k], poems[-1 - k]
        b = list(a)
        for i in rng.sample(range(len(b)), int(len(b) * (0.02 + 0.25 * k / count))):
            b[i] = other[i % len(other)]
        pairs.append((a, "".join(b)))
    return pairs


def test_minhash_estimate_within_four_standard_errors(poems):
    config = MinHashConfig(num_perm=256, bands=32, ngram=3)
    hasher = MinHasher(config)
    checked = 0
    for a, b in edited_pairs(poems) + list(zip(poems[100:120], poems[120:140])):
        sa, sb = shingles(a, 3), shingles(b, 3)
        exact = jaccard(sa, sb)
        estimate = estimated_jaccard(hasher.signature_of_set(sa), hasher.signature_of_set(sb))
        se = math.sqrt(exact * (1 - exact) / config.num_perm)
        assert abs(estimate - exact) <= 4 * se + 1e-12, (exact, estimate)
        checked += 0.1 < exact < 0.9
    assert checked >= 20  # the pairs span a range of similarities, not only 0 and 1


def test_minhash_identical_and_disjoint_sets():
    hasher = MinHasher(MinHashConfig(num_perm=64, bands=8))
    s = hasher.signature("床前明月光疑是地上霜")
    assert estimated_jaccard(s, hasher.signature("床前明月光疑是地上霜")) == 1.0
    assert estimated_jaccard(s, hasher.signature("abcdefghijklmnop")) < 0.1


def test_lsh_candidate_probability_matches_formula(poems):
    a, b = next((a, b) for a, b in edited_pairs(poems) if 0.45 < jaccard(shingles(a, 3), shingles(b, 3)) < 0.65)
    s = jaccard(shingles(a, 3), shingles(b, 3))
    bands, rows, trials = 8, 4, 300
    found = 0
    for seed in range(trials):
        hasher = MinHasher(MinHashConfig(num_perm=bands * rows, bands=bands, ngram=3, seed=seed))
        found += bool(lsh_candidates(np.stack([hasher.signature(a), hasher.signature(b)]), bands))
    p = float(lsh_probability(s, bands, rows))
    assert abs(found / trials - p) <= 4 * math.sqrt(p * (1 - p) / trials), (found / trials, p)


def test_lsh_probability_formula():
    assert lsh_probability(1.0, 20, 5) == pytest.approx(1.0)
    assert lsh_probability(0.0, 20, 5) == pytest.approx(0.0)
    assert lsh_probability(0.5, 2, 1) == pytest.approx(1 - 0.5 ** 2)


def test_near_duplicate_pairs_and_clusters(poems):
    a = poems[0]
    texts = [a, a[:-2] + "春风", poems[1], poems[2], a[:-1] + "x"]
    pairs = near_duplicate_pairs(texts, threshold=0.7, config=MinHashConfig(num_perm=128, bands=32, ngram=5))
    assert {(i, j) for i, j, _ in pairs} == {(0, 1), (0, 4), (1, 4)}
    assert all(jaccard(shingles(texts[i], 5), shingles(texts[j], 5)) == sim for i, j, sim in pairs)
    assert clusters(len(texts), pairs) == [[0, 1, 4]]
    assert clusters(4, [(0, 1), (2, 3), (1, 2)]) == [[0, 1, 2, 3]]


def test_clean_and_exact_groups():
    raw = "逻人（一作「叉」）横鸟道，江祖出鱼梁。\n  \n水急客舟(一作行)疾，山花拂面香。 "
    assert clean_poem(raw) == "逻人横鸟道，江祖出鱼梁。\n水急客舟疾，山花拂面香。"
    assert clean_poem("甲（见《某书》（一作乙）卷三。\n）丁") == "甲丁"  # a nested note goes as a whole
    assert clean_poem("白日依山尽。\n（一作某）。\n黄河入海流。") == "白日依山尽。\n黄河入海流。"
    assert fingerprint("床前明月光，疑是地上霜。") == "床前明月光疑是地上霜"
    assert duplicate_groups(["a", "b", "a", "c", "b", "a"]) == [[0, 2, 5], [1, 4]]


def test_quality_rules():
    assert quality_failures("这家店的服务很好，菜也好吃，下次还来。") == []
    assert "too_short" in quality_failures("好")
    assert "symbols" in quality_failures("!!!!!!??????……~~~~ 好")
    assert "duplicate_lines" in quality_failures("好评好评\n好评好评\n好评好评\n真的不错")
    assert "top_ngram" in quality_failures("哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈")
    with pytest.raises(ValueError, match="max_symbol_ratio must be in"):
        QualityConfig(max_symbol_ratio=1.5)


def test_contamination_planted_and_disjoint(poems):
    train, evaluation = poems[:200], poems[300:340]
    clean = contamination(train, ["0123456789abcdefghij", "ABCDEFGHIJKLMNOPQRS"], n=8)
    assert clean.rate == 0.0 and clean.overlap == (0.0, 0.0)
    planted = list(evaluation)
    planted[3] = train[17]  # a verbatim copy
    planted[5] = planted[5][:10] + train[42][:20] + planted[5][10:]  # 20 characters of a training poem
    report = contamination(train, planted, n=13)
    base = contamination(train, evaluation, n=13)
    assert report.overlap[3] == 1.0
    assert report.contaminated[3] and report.contaminated[5]
    assert report.rate == pytest.approx(base.rate + (not base.contaminated[3]) / 40 + (not base.contaminated[5]) / 40)


def test_config_errors():
    with pytest.raises(ValueError, match="bands must divide num_perm"):
        MinHashConfig(num_perm=10, bands=3)
    with pytest.raises(ValueError, match="threshold must be in"):
        near_duplicate_pairs(["a"], threshold=0.0)
    with pytest.raises(ValueError, match="n must be >= 1"):
        shingles("abc", 0)
    with pytest.raises(ValueError, match="threshold must be in"):
        contamination(["a"], ["b"], threshold=1.0)


def test_deduplicate_keeps_the_first_of_each_cluster():
    base = "岁阴穷暮纪，献节启新芳。冬尽今宵促，年开明日长。冰消出镜水，梅散入风香。对此欢终宴，倾壶待曙光。"
    texts = [base, "甲乙丙丁戊己庚辛壬癸子丑寅卯辰巳午未申酉戌亥", base.replace("，", "。"),
             base.replace("消", "销"), "天地玄黄宇宙洪荒日月盈昃辰宿列张寒来暑往秋收冬藏"]
    assert deduplicate(texts) == [0, 1, 4]  # 2: same fingerprint as 0; 3: one character changed (J = 31/41)
    assert deduplicate(texts, threshold=0.95) == [0, 1, 3, 4]


def test_decontaminate_moves_held_out_texts_until_none_shares_an_ngram():
    a, b, c = "一二三四五六七八九十甲乙丙丁", "九十甲乙丙丁戊己庚辛壬癸子丑寅卯", "壬癸子丑寅卯辰巳午未申酉戌亥"
    splits = decontaminate([a, b, c, "天地玄黄宇宙洪荒日月盈昃辰宿"], ["train", "validation", "test", "test"], n=6)
    assert splits == ["train", "train", "train", "test"]  # c shares only with b, and b with a: both move
    assert decontaminate([a, c], ["train", "test"], n=6) == ["train", "test"]
    with pytest.raises(ValueError, match="differ in length: 2 vs 1"):
        decontaminate([a, b], ["train"])
