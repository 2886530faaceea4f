"""Forward+backward time of companion.nn attention vs torch.nn.functional.scaled_dot_product_attention.

    .venv/bin/python benchmarks/attention.py [--seq 256 1024] [--rounds 15] [--device cpu]

Three variants on the same causal (B, H, T, D) problem: `F.scaled_dot_product_attention` (reference),
our `scaled_dot_product_attention(backend="torch")` (validation + dispatch to SDPA) and our math path (the formula).
Each round times every variant once, in alternating order; the reported ratio is the median over rounds of
(ours / torch), so drift of the machine affects both sides. Target: the SDPA path within 5% of torch.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from companion.nn.attention import scaled_dot_product_attention  # noqa: E402


def step(fn, q, k, v) -> None:
    out = fn(q, k, v)
    out.backward(torch.ones_like(out))
    q.grad = k.grad = v.grad = None


def timed(fn, q, k, v, repeats: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        step(fn, q, k, v)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[256, 1024], help="sequence lengths T to time")
    parser.add_argument("--batch", type=int, default=2, help="batch size B")
    parser.add_argument("--heads", type=int, default=8, help="heads H")
    parser.add_argument("--head-dim", type=int, default=64, help="head dim D")
    parser.add_argument("--rounds", type=int, default=15, help="alternating rounds; the median ratio is reported")
    parser.add_argument("--repeats", type=int, default=3, help="forward+backward calls per timing")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)

    variants = {
        "torch SDPA": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "ours, SDPA path": lambda q, k, v: scaled_dot_product_attention(q, k, v, is_causal=True, backend="torch"),
        "ours, math path": lambda q, k, v: scaled_dot_product_attention(q, k, v, is_causal=True, backend="math"),
    }
    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"B={args.batch} H={args.heads} D={args.head_dim} causal fp32, forward+backward")
    for t in args.seq:
        shape = (args.batch, args.heads, t, args.head_dim)
        q, k, v = (torch.randn(shape, device=device, requires_grad=True) for _ in range(3))
        for fn in variants.values():  # warm-up
            step(fn, q, k, v)
        times: dict[str, list[float]] = {name: [] for name in variants}
        names = list(variants)
        for r in range(args.rounds):
            order = names if r % 2 == 0 else names[::-1]
            for name in order:
                times[name].append(timed(variants[name], q, k, v, args.repeats, device))
        ref = times["torch SDPA"]
        print(f"T={t}: torch SDPA median {statistics.median(ref) * 1e3:.2f} ms")
        for name in names[1:]:
            ratio = statistics.median(a / b for a, b in zip(times[name], ref))
            print(f"  {name:<16} {statistics.median(times[name]) * 1e3:8.2f} ms   ratio to torch {ratio:.3f}")


if __name__ == "__main__":
    main()
