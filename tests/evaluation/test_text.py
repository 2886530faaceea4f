"""BLEU and chrF equal sacrebleu (13a, zh, none); ROUGE equals rouge_score on English and is right on Chinese."""

import random

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from companion.evaluation import corpus_bleu, corpus_chrf, lcs_length, rouge

EN_REFS = ["The cat is on the mat.", "There is a cat on the mat!", "A quick brown fox jumps over the lazy dog.",
           "It was the best of times, it was the worst of times.", "Hello, world."]
ZH_REFS = ["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。", "白日依山尽，黄河入海流。", "欲穷千里目，更上一层楼。",
           "今天天气很好，我们去公园散步吧。"]


def perturb(text: str, rng: random.Random, words: bool) -> str:
    units = text.split() if words else list(text)
    out = [u for u in units if rng.random() > 0.2]  # drop some
    for _ in range(rng.randint(0, 2)):
        out.insert(rng.randint(0, len(out)), rng.choice(units))  # duplicate some
    return (" " if words else "").join(out)


@pytest.mark.parametrize("tokenize,refs,words", [("13a", EN_REFS, True), ("zh", ZH_REFS, False),
                                                 ("none", EN_REFS, True), ("none", ZH_REFS, False)])
def test_bleu_and_chrf_equal_sacrebleu(tokenize, refs, words):
    rng = random.Random(0)
    for trial in range(30):
        k = rng.randint(1, len(refs))
        r1 = refs[:k]
        hyps = [perturb(r, rng, words) for r in r1]
        r2 = [perturb(r, rng, words) for r in r1]  # a second reference stream
        ours = corpus_bleu(hyps, [[a, b] for a, b in zip(r1, r2)], tokenize=tokenize)
        ref = sacrebleu.corpus_bleu(hyps, [r1, r2], tokenize=tokenize)
        assert ours.score == pytest.approx(ref.score, abs=1e-9), (hyps, r1)
        assert ours.ref_len == ref.ref_len and ours.hyp_len == ref.sys_len
        assert ours.brevity_penalty == pytest.approx(ref.bp, abs=1e-12)
        assert corpus_chrf(hyps, r1) == pytest.approx(sacrebleu.corpus_chrf(hyps, [r1]).score, abs=1e-9)
        assert corpus_chrf(hyps, [[a, b] for a, b in zip(r1, r2)]) == pytest.approx(
            sacrebleu.corpus_chrf(hyps, [r1, r2]).score, abs=1e-9)


def test_bleu_by_hand():
    # hypothesis = reference: every precision 100 %, no brevity penalty
    assert corpus_bleu(["a b c d e"], ["a b c d e"]).score == pytest.approx(100.0)
    # 6 hypothesis tokens vs 7 reference tokens: brevity penalty exp(1 - 7/6)
    r = corpus_bleu(["a b c d e f"], ["a b c d e f g"])
    assert r.brevity_penalty == pytest.approx(2.718281828459045 ** (1 - 7 / 6))
    # clipping: "the the the" against "the cat": unigram precision 1/3, not 3/3
    r = corpus_bleu(["the the the"], ["the cat"], max_order=1)
    assert r.precisions[0] == pytest.approx(100 / 3)


def test_bleu_on_unsegmented_chinese_needs_the_zh_tokenizer():
    hyp, ref = ["床前明月光，疑似地上霜。"], ["床前明月光，疑是地上霜。"]
    assert corpus_bleu(hyp, ref, tokenize="none").score == 0.0  # one "word" each side, and they differ
    assert corpus_bleu(hyp, ref, tokenize="zh").score > 50


def test_rouge_equals_rouge_score_on_english():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    rng = random.Random(1)
    for _ in range(40):
        target = rng.choice(EN_REFS)
        pred = perturb(target, rng, words=True)
        ref = scorer.score(target, pred)
        for kind in ("rouge1", "rouge2", "rougeL"):
            ours = rouge(target, pred, kind, tokenize="default")
            assert (ours.precision, ours.recall, ours.fmeasure) == pytest.approx(tuple(ref[kind]), abs=1e-12)


def test_rouge_on_chinese():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"])
    same = "床前明月光"
    assert scorer.score(same, same)["rouge1"].fmeasure == 0.0  # rouge_score's tokenizer drops every Chinese char
    for kind in ("rouge1", "rouge2", "rougeL"):
        assert rouge(same, same, kind).fmeasure == 1.0
        assert rouge("床前明月光", "白日依山尽", kind).fmeasure == 0.0
    # by hand: target 床前明月光 (5 chars), prediction 床前月光好 (5 chars)
    # unigrams shared 床 前 月 光 = 4 -> P = R = F = 4/5; bigrams shared 床前, 月光 = 2 of 4 -> 1/2
    # LCS 床前月光 = 4 -> 4/5
    assert rouge("床前明月光", "床前月光好", "rouge1").fmeasure == pytest.approx(0.8)
    assert rouge("床前明月光", "床前月光好", "rouge2").fmeasure == pytest.approx(0.5)
    assert rouge("床前明月光", "床前月光好", "rougeL").fmeasure == pytest.approx(0.8)
    # unequal lengths: target 明月光 (3), prediction 明月 (2): P = 1, R = 2/3, F = 0.8
    s = rouge("明月光", "明月", "rouge1")
    assert (s.precision, s.recall, s.fmeasure) == pytest.approx((1.0, 2 / 3, 0.8))
    assert lcs_length("ABCBDAB", "BDCABA") == 4  # CLRS's example


def test_bad_input():
    with pytest.raises(ValueError, match="same length, got 2 and 1"):
        corpus_bleu(["a", "b"], ["a"])
    with pytest.raises(ValueError, match=r"hypotheses \[1\] have no reference"):
        corpus_chrf(["a", "b"], [["a"], []])
    with pytest.raises(ValueError, match="empty corpus"):
        corpus_bleu([], [])
    with pytest.raises(ValueError, match="tokenize must be one of"):
        corpus_bleu(["a"], ["a"], tokenize="char13")
    with pytest.raises(ValueError, match="kind must be"):
        rouge("a", "a", "rougeX")
