"""A tiny scaling study on Tang poems: train GPTs of several sizes for several token budgets and record the
final validation loss of each run in ``data/results/scaling_tang.csv`` (read by book/ch06_pretraining/04_scaling).

Each (size, budget) pair is its own run with a cosine schedule that ends at its budget, as in Hoffmann et al.
2022 (Approach 1: a schedule tuned to the run's length; a truncated longer schedule would overstate the loss).
N counts all parameters (token embeddings included, as Chinchilla does; the tied output head does real compute),
compute is C = 6 N D (:func:`companion.scaling.training_flops`).

    .venv/bin/python scripts/scaling_study.py            # ~5 minutes on one CPU core
    .venv/bin/python scripts/scaling_study.py --help
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch

from companion.data import tang_poem_splits
from companion.models import GPT, GPTConfig
from companion.scaling import training_flops
from companion.tokenization import CharTokenizer
from companion.training import TrainConfig, Trainer
from companion.training.recipes import GPT_SPECIALS, causal_lm_step, collator, examples

# (n_layers, d_model, n_heads): widths and depths growing together, from ~20k to ~1M parameters
SIZES = [(1, 16, 2), (1, 32, 2), (2, 48, 4), (2, 64, 4), (3, 96, 4), (4, 128, 4)]
FIELDS = ["n_layers", "d_model", "n_heads", "n_params", "n_params_non_embedding", "tokens", "steps", "flops",
          "val_loss", "seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/results/scaling_tang.csv", help="CSV file to write (one row per run)")
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 300, 900],
                        help="token budgets, in optimizer steps of batch_size * block_size tokens")
    parser.add_argument("--sizes", type=int, default=len(SIZES), help=f"use the first this many of {SIZES}")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per optimizer step")
    parser.add_argument("--block-size", type=int, default=32, help="tokens per sequence (T)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (cosine to lr/10, 10%% warm-up)")
    parser.add_argument("--max-chars", type=int, default=1000, help="character vocabulary size")
    parser.add_argument("--train-poems", type=int, default=8000,
                        help="training poems (enough that no run repeats data)")
    parser.add_argument("--eval-poems", type=int, default=200, help="validation poems for the final loss")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: tiny models gain little from more; robust on a busy machine)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    splits = tang_poem_splits()
    train_texts = splits["train"]["text"][: args.train_poems]
    eval_texts = splits["validation"]["text"][: args.eval_poems]
    tok = CharTokenizer.train(train_texts, special_tokens=list(GPT_SPECIALS), max_size=args.max_chars)
    T = args.block_size
    train_rows = examples("causal_lm", tok, train_texts, T, seed=0)
    eval_rows = examples("causal_lm", tok, eval_texts, T, seed=1)
    needed = max(args.steps) * args.batch_size
    if len(train_rows) < needed:
        raise ValueError(f"{len(train_rows)} training blocks, but the largest budget needs {needed}: "
                         "raise --train-poems")
    print(f"vocabulary {tok.vocab_size}, {len(train_rows)} training and {len(eval_rows)} validation blocks of {T}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with out.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        for n_layers, d_model, n_heads in SIZES[: args.sizes]:
            for steps in args.steps:
                t0 = time.perf_counter()
                torch.manual_seed(0)
                model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_ctx=T, n_layers=n_layers, d_model=d_model,
                                      n_heads=n_heads, dropout=0.0))
                n_params = sum(p.numel() for p in model.parameters())
                n_embed = model.tok_emb.weight.numel() + model.pos_emb.weight.numel()
                config = TrainConfig(max_steps=steps, batch_size=args.batch_size, lr=args.lr, min_lr=args.lr / 10,
                                     warmup_steps=max(1, steps // 10), weight_decay=0.1, progress=False,
                                     device="cpu", precision="fp32", seed=0)
                trainer = Trainer(model, config, train_rows, collator("causal_lm", tok, T), causal_lm_step, eval_rows)
                history = trainer.fit()  # evaluates once, at the last step, on all validation blocks
                tokens = steps * args.batch_size * T
                row = {"n_layers": n_layers, "d_model": d_model, "n_heads": n_heads, "n_params": n_params,
                       "n_params_non_embedding": n_params - n_embed, "tokens": tokens, "steps": steps,
                       "flops": f"{training_flops(n_params, tokens):.4g}",
                       "val_loss": f"{history.eval[-1]['val_loss']:.4f}", "seconds": f"{time.perf_counter() - t0:.1f}"}
                writer.writerow(row)
                f.flush()
                print(", ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    print(f"wrote {out} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
