"""Training throughput of our GPT on the CPU: tokens/s of a full step (forward, backward, AdamW) in fp32 and
under bf16 autocast, alternating rounds, median of the rounds, and the bf16/fp32 ratio.

    .venv/bin/python benchmarks/train_throughput.py [--rounds 5] [--steps 5] [--threads 2]

Precision comes from ``companion.runtime.choose_precision`` (the trainer's path). The side-by-side comparison
with ``transformers`` belongs to chapter 7 (mixed precision).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from companion.models import GPT, GPTConfig
from companion.objectives import causal_lm_loss
from companion.runtime import choose_precision, environment_report, seed_everything, set_threads
from companion.training import TrainConfig, Trainer


def make_trainer(precision: str, config: GPTConfig, batch_size: int) -> Trainer:
    seed_everything(0)
    rows = [{"input_ids": torch.randint(config.vocab_size, (config.n_ctx,)).tolist()} for _ in range(batch_size * 4)]

    def collate(examples):
        ids = torch.tensor([e["input_ids"] for e in examples])  # (B, T)
        return {"input_ids": ids, "labels": ids}

    def loss_fn(model, batch):
        return causal_lm_loss(model(batch["input_ids"]), batch["labels"])

    train = TrainConfig(max_steps=10_000, batch_size=batch_size, device="cpu", precision=precision, progress=False)
    return Trainer(GPT(config), train, rows, collate, loss_fn)


def tokens_per_second(trainer: Trainer, steps: int) -> float:
    batches = trainer.micro_batches()
    trainer.train_step([next(batches)])  # warm-up (allocations, autocast caches)
    start = time.perf_counter()
    tokens = 0
    for _ in range(steps):
        batch = next(batches)
        trainer.train_step([batch])
        tokens += batch["input_ids"].numel()
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="alternating fp32/bf16 rounds (median reported)")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per round")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    parser.add_argument("--d-model", type=int, default=256, help="model width C (4 layers, 4 heads, T=128, V=4096)")
    args = parser.parse_args()
    set_threads(args.threads)
    config = GPTConfig(vocab_size=4096, n_ctx=128, n_layers=4, d_model=args.d_model, n_heads=4)
    trainers = {p: make_trainer(p, config, args.batch_size) for p in ("fp32", "bf16")}
    assert choose_precision("cpu", "bf16").dtype == torch.bfloat16
    results: dict[str, list[float]] = {p: [] for p in trainers}
    for _ in range(args.rounds):
        for p, trainer in trainers.items():
            results[p].append(tokens_per_second(trainer, args.steps))
    report = environment_report()
    print(f"torch {report['torch']}, {report['threads']} threads, {report['platform']}")
    print(f"GPT {sum(p.numel() for p in trainers['fp32'].model.parameters()):,} parameters, "
          f"batch {args.batch_size} x {config.n_ctx} tokens")
    for p, values in results.items():
        print(f"{p}: median {statistics.median(values):,.0f} tokens/s (rounds: {', '.join(f'{v:,.0f}' for v in values)})")
    print(f"bf16 / fp32: {statistics.median(results['bf16']) / statistics.median(results['fp32']):.2f}x")


if __name__ == "__main__":
    main()
