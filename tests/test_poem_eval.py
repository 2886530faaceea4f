"""Form adherence of generated poems, and the perplexity over chapter 2's closed-vocabulary events
(checked against a hand computation with plain probabilities, and against an n-gram model of chapter 2)."""

import math

import pytest
import torch
from torch import nn

from companion.lm_basics import EOS, UNK, NGramConfig, NGramLM
from companion.poem_eval import comparable_perplexity, form_adherence, poem_clauses, poem_form, sample_poems
from companion.tokenization import CharTokenizer

JUEJU_5 = "白日依山尽，黄河入海流。\n欲穷千里目，更上一层楼。"
JUEJU_7 = "朝辞白帝彩云间，千里江陵一日还。\n两岸猿声啼不住，轻舟已过万重山。"


def test_poem_form_of_real_and_broken_poems():
    assert poem_clauses(JUEJU_5) == ["白日依山尽", "黄河入海流", "欲穷千里目", "更上一层楼"]
    assert poem_form(JUEJU_5) == 5 and poem_form(JUEJU_7) == 7
    assert poem_form("明月照高楼，不人。一日无山有云，何风。") is None  # 5, 2, 6, 2 characters
    assert poem_form("白日依山尽，黄河入海流。") is None  # only 2 clauses: not a whole quatrain
    assert poem_form("白日依山尽，黄河入海流。", min_clauses=2) == 5
    assert poem_form("白日依山尽，黄河入海流。\n两岸猿声啼不住，轻舟已过万重山。") is None  # 5 and 7 mixed
    assert poem_form("一二三四，五六七八，一二三四，五六七八。") is None  # 4-character clauses are not a form here
    assert form_adherence([JUEJU_5, JUEJU_7, "明月照高楼，不人。", ""]) == 0.5


def test_form_errors():
    with pytest.raises(ValueError, match="at least one poem"):
        form_adherence([])
    with pytest.raises(ValueError, match="min_clauses must be >= 1, got 0"):
        poem_form(JUEJU_5, min_clauses=0)


class Bigram(nn.Module):
    """logits of the next token = a table row chosen by the current token: (B, T) -> (B, T, V)."""

    def __init__(self, vocab_size: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter(torch.randn(vocab_size, vocab_size, generator=g, dtype=torch.float64) * 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids]  # (B, T, V)


def _tokenizer() -> CharTokenizer:
    return CharTokenizer(list("\n，。甲乙丙丁戊"), ["<pad>", "<unk>", "<eos>"])


def test_comparable_perplexity_by_hand():
    tok = _tokenizer()
    model = Bigram(tok.vocab_size)
    known = ["甲", "乙", "，", EOS, UNK]  # chapter 2's closed vocabulary: everything else is <unk>
    lines = [list("甲丙，"), list("乙"), list("己甲")]  # 丙 is outside known, 己 outside the model's vocabulary too
    p = torch.softmax(model.table.detach(), -1)  # (V, V): P(next | current), plain probabilities

    symbols = [tok.decode([j]) for j in range(tok.vocab_size)]
    i = symbols.index
    other = [j for j, sym in enumerate(symbols) if sym not in {"甲", "乙", "，", "\n", "<eos>"}]  # <unk>, <pad>, 丙...
    logs = []
    for line in lines:
        prev = i("<eos>")
        for ch in line:
            row = p[prev]
            logs.append(math.log(row[i(ch)] if ch in known else sum(row[j] for j in other)))
            prev = tok.encode(ch)[0]  # 己 is read as the model's <unk>
        logs.append(math.log(p[prev][i("\n")] + p[prev][i("<eos>")]))
    expected = math.exp(-sum(logs) / len(logs))
    assert len(logs) == 9  # 6 characters + 3 line ends
    assert comparable_perplexity(model, tok, lines, known) == pytest.approx(expected, rel=1e-12)
    assert comparable_perplexity(model, tok, lines, known, batch_size=1) == pytest.approx(expected, rel=1e-12)


def test_the_events_partition_the_probability():
    # with known = every character of the model, "unknown" gets only the special tokens' mass; each position's
    # events must sum to 1, so a model that is uniform over its V tokens has perplexity below V
    tok = _tokenizer()

    class Uniform(nn.Module):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return torch.zeros(*ids.shape, tok.vocab_size)  # (B, T, V)

    V = tok.vocab_size  # 11
    # line "甲": P(甲) = 1/V, P(end) = P(\n) + P(<eos>) = 2/V
    assert comparable_perplexity(Uniform(), tok, [["甲"]], ["甲"]) == pytest.approx(math.sqrt(V * V / 2))
    # character 丙 not in known: P(unknown) = every token but 甲, \n, <eos> = (V - 3)/V
    assert comparable_perplexity(Uniform(), tok, [["丙"]], ["甲"]) == pytest.approx(math.sqrt(V / (V - 3) * V / 2))


def test_an_ngram_model_scored_through_it_gives_its_own_perplexity():
    # a bigram NGramLM wrapped as logits: comparable_perplexity must reproduce NGramLM.perplexity exactly
    lines = [list("甲乙丙，"), list("乙甲，"), list("丙丙甲"), list("甲乙，")]
    lm = NGramLM(NGramConfig(order=2, smoothing="kneser_ney", min_count=2)).fit(lines)
    tok = CharTokenizer(["\n"] + [t for t in lm.vocab if len(t) == 1], ["<pad>", "<unk>", "<eos>"])
    symbols = [tok.decode([j]) for j in range(tok.vocab_size)]

    class Wrapped(nn.Module):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            out = torch.full((*ids.shape, tok.vocab_size), -1e9, dtype=torch.float64)  # (B, T, V)
            for b in range(ids.shape[0]):
                for t in range(ids.shape[1]):
                    s = symbols[int(ids[b, t])]
                    ctx = [] if s == "<eos>" else [s if s in lm.vocab else UNK]
                    dist = lm.distribution(ctx)
                    for j, sym in enumerate(symbols):
                        key = {"<eos>": EOS, "<unk>": UNK}.get(sym, sym)
                        if key in dist and sym != "\n":
                            out[b, t, j] = math.log(dist[key])
            return out

    valid = [list("甲丙乙，"), list("丁甲")]  # 丁 unseen, 丙 seen once (< min_count: <unk> for the n-gram)
    assert comparable_perplexity(Wrapped(), tok, valid, lm.vocab) == pytest.approx(lm.perplexity(valid), rel=1e-9)


def test_comparable_perplexity_errors():
    tok = _tokenizer()
    with pytest.raises(ValueError, match="not in the model's vocabulary"):
        comparable_perplexity(Bigram(tok.vocab_size), tok, [["甲"]], ["甲", "庚"])
    with pytest.raises(ValueError, match="no lines to score"):
        comparable_perplexity(Bigram(tok.vocab_size), tok, [], ["甲"])
    with pytest.raises(ValueError, match=r"tokens \['<bos>'\] are not in the model's vocabulary"):
        comparable_perplexity(Bigram(tok.vocab_size), tok, [["甲"]], ["甲"], bos="<bos>")


def test_sample_poems_draws_from_the_model_distribution_and_stops_at_eos():
    from companion.models import GPT, GPTConfig

    tok = _tokenizer()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_ctx=64, n_layers=1, d_model=16, n_heads=2)).double()
    a = sample_poems(model, tok, 5, max_new_tokens=30, seed=3)
    assert a == sample_poems(model, tok, 5, max_new_tokens=30, seed=3)  # seeded
    assert a != sample_poems(model, tok, 5, max_new_tokens=30, seed=4)
    assert all("<eos>" not in t and len(t) <= 30 + 5 * 4 for t in a)  # specials decode to several characters

    # the KV-cached draws are those of the full recomputation: replay seed 3 by hand, without a cache
    g = torch.Generator().manual_seed(3)
    ids = torch.full((5, 1), tok.token_id("<eos>"))
    for _ in range(30):
        cdf = torch.softmax(model(ids)[:, -1], -1).cumsum(-1)
        u = torch.rand(5, 1, generator=g, dtype=torch.float64) * cdf[:, -1:]
        ids = torch.cat([ids, torch.searchsorted(cdf, u).clamp(max=tok.vocab_size - 1)], 1)
    for text, row in zip(a, ids[:, 1:].tolist()):
        eos = tok.token_id("<eos>")
        assert text == tok.decode(row[:row.index(eos)] if eos in row else row)

    # a model whose distribution is one token: every draw is that token
    class Always(nn.Module):
        config = GPTConfig(vocab_size=tok.vocab_size, n_ctx=64, n_layers=1, d_model=16, n_heads=2)

        def forward(self, ids, kv_caches=None):
            out = torch.full((*ids.shape, tok.vocab_size), -1e4, dtype=torch.float64)
            out[..., tok.encode("甲")[0]] = 0.0
            return out

    assert sample_poems(Always(), tok, 2, max_new_tokens=4, prompt="乙") == ["乙甲甲甲甲"] * 2


def test_sample_errors():
    tok = _tokenizer()
    with pytest.raises(ValueError, match="temperature must be a positive finite number, got 0"):
        sample_poems(Bigram(tok.vocab_size), tok, 1, temperature=0)
    with pytest.raises(ValueError, match="n=0"):
        sample_poems(Bigram(tok.vocab_size), tok, 0)
    from companion.models import GPT, GPTConfig

    small = GPT(GPTConfig(vocab_size=tok.vocab_size, n_ctx=8, n_layers=1, d_model=16, n_heads=2)).double()
    with pytest.raises(ValueError, match="exceed the context length n_ctx=8: use max_new_tokens <= 8"):
        sample_poems(small, tok, 1, max_new_tokens=9)
    assert len(sample_poems(small, tok, 1, max_new_tokens=8)) == 1  # exactly fills the context
