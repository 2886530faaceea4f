"""Tokenizer benchmark: encode throughput with GPT-2's vocabulary, and BPE training time on 1 MB.

    python benchmarks/tokenizers.py [--mb 1.0] [--rounds 5] [--train-rounds 1] [--vocab 2000]

Encode: the same text (Tang poems + Shakespeare, about --mb MB of UTF-8) through our teaching encoder
(pure Python, chunk cache cleared every round), our fast path (``BPETokenizer.encode_many`` via tokenizers),
``tokenizers`` directly and ``tiktoken`` (both built offline from the same GPT-2 files). The methods run in
alternating order each round; we report the median time and the ratio to tiktoken. Training: ours
(``BPETokenizer.train``) vs ``tokenizers``' BpeTrainer (``train_fast``) on the same text, same merges checked.
Not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

# This file is named like the `tokenizers` package: keep its own folder off the import path.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from companion.data import load_shakespeare, load_tang_poems
from companion.tokenization import BPETokenizer, gpt2_tiktoken_encoding, load_gpt2_tokenizer


def corpus(megabytes: float) -> list[str]:
    texts, size = [], 0
    poems, plays = load_tang_poems()["text"], load_shakespeare()["text"]
    for i in range(max(len(poems), len(plays))):
        for source in (poems, plays):
            if i < len(source) and size < megabytes * 1e6:
                text = source[i] if source is poems else source[i][:20000]
                texts.append(text)
                size += len(text.encode("utf-8"))
    return texts


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=1.0, help="megabytes of UTF-8 text to encode / train on")
    parser.add_argument("--rounds", type=int, default=5, help="encode rounds (median reported)")
    parser.add_argument("--train-rounds", type=int, default=1, help="training rounds (median reported)")
    parser.add_argument("--vocab", type=int, default=2000, help="vocabulary size for the training benchmark")
    args = parser.parse_args()

    texts = corpus(args.mb)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    ours = load_gpt2_tokenizer()
    hf = ours.to_hf()
    tik = gpt2_tiktoken_encoding()
    ids = [ours.encode(t) for t in texts]
    assert ids == ours.encode_many(texts) == [e.ids for e in hf.encode_batch(texts)] == tik.encode_ordinary_batch(texts)

    def ours_python():
        ours._encode_chunk.cache_clear()
        [ours.encode(t) for t in texts]

    methods = {
        "ours (pure Python)": ours_python,
        "ours fast path (encode_many)": lambda: ours.encode_many(texts),
        "tokenizers encode_batch (ids)": lambda: [e.ids for e in hf.encode_batch(texts)],
        "tiktoken encode_ordinary_batch": lambda: tik.encode_ordinary_batch(texts),
    }
    times: dict[str, list[float]] = {name: [] for name in methods}
    for r in range(args.rounds):
        order = list(methods) if r % 2 == 0 else list(reversed(methods))
        for name in order:
            times[name].append(timed(methods[name]))
    base = statistics.median(times["tiktoken encode_ordinary_batch"])
    print(f"encode {n_bytes / 1e6:.2f} MB ({len(texts)} texts, {sum(map(len, ids))} GPT-2 tokens), "
          f"median of {args.rounds} rounds")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:<32} {med:8.3f} s  {n_bytes / med / 1e6:8.2f} MB/s  {med / base:7.2f}x tiktoken")

    train_times = {"ours (BPETokenizer.train)": [], "tokenizers (train_fast)": []}
    for r in range(args.train_rounds):
        start = time.perf_counter()
        a = BPETokenizer.train(texts, args.vocab)
        train_times["ours (BPETokenizer.train)"].append(time.perf_counter() - start)
        start = time.perf_counter()
        b = BPETokenizer.train_fast(texts, args.vocab)
        train_times["tokenizers (train_fast)"].append(time.perf_counter() - start)
        assert a.merges == b.merges, "training paths disagree"
    base = statistics.median(train_times["tokenizers (train_fast)"])
    print(f"train vocab {args.vocab} on {n_bytes / 1e6:.2f} MB (same merges), median of {args.train_rounds}")
    for name, ts in train_times.items():
        print(f"  {name:<32} {statistics.median(ts):8.2f} s  {statistics.median(ts) / base:7.1f}x tokenizers")


if __name__ == "__main__":
    main()
