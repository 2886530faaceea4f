"""One full training step (forward, loss, backward, AdamW) of our GPT vs transformers' GPT2LMHeadModel (SDPA) and a
minimal nanoGPT-style model written here, on the same shape, in fp32 and under bf16 autocast; tokens/s and MFU.

    .venv/bin/python benchmarks/train_step.py [--rounds 5] [--steps 3] [--threads 2] [--profile]

Shape: 6 layers, 6 heads, width 384, context 256, vocabulary 8,000, batch 8, dropout 0, tied head (about 14M
parameters). All use torch.optim.AdamW (lr 3e-4; ``--fused-adamw``: its fused kernel) and the next-token loss on
T - 1 positions, each computed its own way: ours by the fused head of the trainer (``model(ids, labels=ids)``,
`companion.objectives.linear_cross_entropy`), ``--models ours-logits`` by logits and `causal_lm_loss`, the minimal
model by logits and shifted labels, transformers by ``labels=``. bf16 runs only where the CPU has bfloat16
instructions (`companion.runtime.cpu_has_native_bf16`). The norms are nn.LayerNorm's kernel in all three (ours:
`companion.nn.LayerNorm`). Each round times every (model, precision) once, in alternating order; reported are the
medians over rounds of tokens/s and of the per-round ratios, so drift of a shared machine hits all sides alike. MFU
(PaLM, Appendix B) divides the model FLOP/s, `flops_per_token(config, head=True, full_attention=True)` per token, by
the fp32 matmul peak measured here (`companion.training.throughput.measure_matmul_peak`, the same thread count), and
for bf16 also by the bf16 matmul peak (a bf16 step can beat the fp32 peak). The peaks are measured in every round
and each round's MFU uses its own, so a busy neighbour lowers both sides of the ratio. ``--profile`` adds
torch.profiler's top operators of one step of each model and the bound they set: the share of ours' step spent in
matrix products and attention kernels, which no rewrite of the same model skips, and the ratios ours would reach
with nothing else. ``--compile`` adds torch.compile'd copies of ours and the minimal model, reported as separate
rows (the targets are for eager mode).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
# run as a script, benchmarks/ comes first on sys.path, and benchmarks/tokenizers.py would shadow the tokenizers
# package that transformers imports
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
from companion.models import GPT, GPTConfig  # noqa: E402
from companion.objectives import causal_lm_loss  # noqa: E402
from companion.runtime import choose_precision, cpu_has_native_bf16, environment_report  # noqa: E402
from companion.scaling import flops_per_token  # noqa: E402
from companion.training.throughput import measure_matmul_peak, measure_throughput, mfu  # noqa: E402

CONFIG = GPTConfig(vocab_size=8000, n_ctx=256, n_layers=6, d_model=384, n_heads=6, dropout=0.0)


# ------------------------------------------------------------------ a minimal nanoGPT-style model (Karpathy's layout)
class MiniAttention(nn.Module):
    def __init__(self, c: int, h: int) -> None:
        super().__init__()
        self.h = h
        self.c_attn = nn.Linear(c, 3 * c)  # fused q, k, v
        self.c_proj = nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)  # 3 x (B, T, C)
        q, k, v = (z.view(b, t, self.h, c // self.h).transpose(1, 2) for z in (q, k, v))  # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, c))  # (B, T, C)


class MiniBlock(nn.Module):
    def __init__(self, c: int, h: int) -> None:
        super().__init__()
        self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(c), MiniAttention(c, h), nn.LayerNorm(c)
        self.c_fc, self.c_proj = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class MiniGPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(cfg.vocab_size, cfg.d_model), nn.Embedding(cfg.n_ctx, cfg.d_model)
        self.blocks = nn.ModuleList(MiniBlock(cfg.d_model, cfg.n_heads) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # (B, T, V)


def mini_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Shift the labels, not the logits (nanoGPT's targets; transformers' ForCausalLMLoss): no (B, T-1, V) copy."""
    logits = model(ids)  # (B, T, V)
    labels = F.pad(ids[:, 1:], (0, 1), value=-100)  # (B, T): the last position has no target
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


def build(name: str) -> tuple[nn.Module, Callable[[nn.Module, torch.Tensor], torch.Tensor]]:
    torch.manual_seed(0)
    if name == "ours":
        return GPT(CONFIG), lambda m, ids: m(ids, labels=ids)  # the trainer's path: the fused head, no logits
    if name == "ours-logits":  # the same model with the plain head: logits, then causal_lm_loss
        return GPT(CONFIG), lambda m, ids: causal_lm_loss(m(ids), ids)
    if name == "minimal":
        return MiniGPT(CONFIG), mini_loss
    from transformers import AutoModelForCausalLM, GPT2Config

    hf_config = GPT2Config(vocab_size=CONFIG.vocab_size, n_positions=CONFIG.n_ctx, n_embd=CONFIG.d_model,
                           n_layer=CONFIG.n_layers, n_head=CONFIG.n_heads, resid_pdrop=0.0, embd_pdrop=0.0,
                           attn_pdrop=0.0, activation_function="gelu_new")
    model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa")
    assert model.config._attn_implementation == "sdpa"
    return model, lambda m, ids: m(input_ids=ids, labels=ids).loss


def make_step(model: nn.Module, loss_fn, optimizer: torch.optim.Optimizer, ids: torch.Tensor, precision: str):
    ctx = choose_precision("cpu", prefer=precision)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with ctx.autocast():
            loss = loss_fn(model, ids)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


# the kernels no implementation of the same model can skip: its matrix products and the attention itself
FLOOR_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm",
             "aten::_scaled_dot_product_flash_attention_for_cpu",
             "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def profile(steps: dict[str, Callable[[], float]], top: int) -> dict[str, float]:
    """Print torch.profiler's top operators of one step each; return the share of each step's self CPU time spent
    in `FLOOR_OPS`."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    floors = {}
    for name, step in steps.items():
        step()  # warm-up outside the trace
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        floors[name] = sum(e.self_cpu_time_total for e in events if e.key in FLOOR_OPS) / total
        print(f"\nprofile {name}: {total / 1e3:,.0f} ms self CPU in one step, {100 * floors[name]:.0f}% in matrix "
              f"products and attention kernels; top {top} operators")
        for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]:
            print(f"  {e.key:<44} {e.self_cpu_time_total / 1e3:8.1f} ms {100 * e.self_cpu_time_total / total:5.1f}%"
                  f"  calls {e.count}")
    return floors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (medians over rounds are reported)")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per (model, precision) and round")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    parser.add_argument("--models", nargs="+", default=["ours", "minimal", "transformers"],
                        choices=["ours", "ours-logits", "minimal", "transformers"],
                        help="implementations to time (ours-logits: our GPT with logits and causal_lm_loss)")
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler's top operators")
    parser.add_argument("--fused-adamw", action="store_true",
                        help="AdamW(fused=True) for every model (default: PyTorch's default AdamW, a per-tensor loop)")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile'd copies of ours and the minimal model (reported separately)")
    parser.add_argument("--profile-top", type=int, default=12, help="operators listed per profile")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    precisions = ["fp32", "bf16"] if cpu_has_native_bf16() else ["fp32"]
    adamw = {"fused": True} if args.fused_adamw else {}
    ids = torch.randint(CONFIG.vocab_size, (args.batch_size, CONFIG.n_ctx), generator=torch.Generator().manual_seed(0))
    tokens = ids.numel()
    steps: dict[tuple[str, str], Callable[[], float]] = {}
    for name in args.models:
        model, loss_fn = build(name)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, **adamw)
        n = sum(p.numel() for p in model.parameters())
        first = make_step(model, loss_fn, optimizer, ids, "fp32")()
        print(f"{name:<13} {n:,} parameters, first loss {first:.3f} (ln V = {math.log(CONFIG.vocab_size):.3f})")
        for p in precisions:
            steps[name, p] = make_step(model, loss_fn, optimizer, ids, p)
        if args.compile and name != "transformers":  # a second copy of the same model, compiled (Inductor)
            model, loss_fn = build(name)
            compiled, optimizer = torch.compile(model), torch.optim.AdamW(model.parameters(), lr=3e-4, **adamw)
            for p in precisions:
                steps[f"{name}+compile", p] = step = make_step(compiled, loss_fn, optimizer, ids, p)
                step(), step()  # the first call compiles; both run outside the timed rounds

    report = environment_report()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    per_token = flops_per_token(CONFIG, head=True, full_attention=True)
    print(f"torch {report['torch']}, {args.threads} threads, {report['platform']}, load average {load:.1f}; "
          f"batch {args.batch_size} x {CONFIG.n_ctx} = {tokens} tokens, {per_token / 1e6:.1f} MFLOPs/token; "
          f"AdamW {'fused' if args.fused_adamw else 'default (a per-tensor loop on CPU)'}"
          + ("" if "bf16" in precisions else "; this CPU has no bfloat16 instructions: bf16 not timed"))

    def measure_peaks() -> dict[str, float]:  # the matmul peak of each precision, measured once per round
        return {p: measure_matmul_peak(torch.float32 if p == "fp32" else torch.bfloat16, n=1024, repeats=10)
                for p in precisions}

    rates: dict[tuple[str, str], list[float]] = {key: [] for key in steps}
    peaks: list[dict[str, float]] = []
    keys = list(steps)
    for r in range(args.rounds):
        peaks.append(measure_peaks())
        for key in keys if r % 2 == 0 else keys[::-1]:
            rates[key].append(measure_throughput(steps[key], tokens, warmup=1, repeats=args.steps))

    def round_mfu(key: tuple[str, str], peak: str) -> float:  # median over rounds of a round's rate / its peak
        return statistics.median(mfu(rate, per_token, at[peak]) for rate, at in zip(rates[key], peaks))

    print("matmul peak (1024^3, median of one measurement per round): "
          + ", ".join(f"{p} {statistics.median(q[p] for q in peaks) / 1e9:.0f} GFLOP/s" for p in precisions))
    print(f"\n{'model':<16} {'precision':<9} {'tokens/s':>9} {'MFU vs fp32 peak':>17} {'vs own peak':>12}"
          f"  {'ours / this':>11}")
    for (name, p), values in rates.items():
        tps = statistics.median(values)
        ratio = statistics.median(a / b for a, b in zip(rates["ours", p], values)) if ("ours", p) in rates else math.nan
        print(f"{name:<16} {p:<9} {tps:9,.0f} {100 * round_mfu((name, p), 'fp32'):16.1f}%"
              f" {100 * round_mfu((name, p), p):11.1f}%  {ratio:11.2f}")
    if hasattr(os, "getloadavg"):
        print(f"load average after the timed rounds {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)")
    if "bf16" in precisions:
        for name in dict.fromkeys(name for name, _ in rates):
            speedup = statistics.median(b / a for a, b in zip(rates[name, "fp32"], rates[name, "bf16"]))
            print(f"bf16 / fp32 {name}: {speedup:.2f}x")
    if args.profile:
        floors = profile({f"{name} {p}": steps[name, p] for name in ("ours", "minimal", "transformers")
                          if name in args.models for p in precisions}, args.profile_top)
        if "ours" in args.models:  # an upper bound on any speed-up of ours that keeps the model and its kernels
            print("\nours with nothing but its matrix products and attention kernels would run at most:")
            for p in precisions:
                floor_rate = statistics.median(rates["ours", p]) / floors[f"ours {p}"]  # tokens/s
                print(f"  {p}: " + ", ".join(f"{floor_rate / statistics.median(rates[name, p]):.2f}x {name}"
                                             for name in args.models if (name, p) in rates))


if __name__ == "__main__":
    main()
