"""Greedy decoding speed: companion.generate vs transformers generate(use_cache=True), batch 1, as a share of the
memory-bandwidth roofline.

    flock /tmp/bench.lock .venv/bin/python benchmarks/decode.py [--model gpt smollm2] [--rounds 7] [--new 200] [--kernels]

"gpt": a GPT-2-shaped model (6 layers, width 384, 6 heads, vocab 8000, n_ctx 256) with random weights; "smollm2":
SmolLM2-135M (our Llama) against transformers' LlamaForCausalLM holding the same weights (written by our
save_pretrained). "ours" is `generate` on the model as built, "ours, optimized" the same after
`companion.inference.optimize_for_decoding` (kernel and layout per weight shape, fused q/k/v, one-kernel norms).
Each round runs every variant once, in alternating order; reported are the median over rounds of
tokens/s and of the per-round ratio ours / transformers, so drift of the machine affects both sides. Both decode
exactly ``--new`` tokens (no eos) from the same prompt, and the tokens are checked to agree.

Roofline: at batch 1 a decoding step must read every weight matrix once, so tokens/s <= bandwidth / weight bytes.
The weight bytes are those of every nn.Linear (the LM head included, embedding rows and the KV cache left out); the
bandwidth comes from a copy probe (torch copy of a 256 MiB buffer: bytes read + written per second, best of 5).

``--kernels`` also times one batch-1 matrix-vector product per weight shape of the model, with the weights coming
from DRAM (six matrices of a shape in turn, a 64 MiB read between repeats): F.linear (MKL) on the row-major (N, K) weight and on
the column-major one, each also split over the threads as `SplitLinear` does; the table is what
`optimize_for_decoding`'s choices rest on.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repo, not benchmarks/ (its tokenizers.py shadows the package)
from companion.inference import GenerationConfig, generate  # noqa: E402
from companion.inference.optimize import column_major, optimize_for_decoding, split_product  # noqa: E402
from companion.models import GPT, GPTConfig, save_pretrained  # noqa: E402


def copy_bandwidth(mib: int = 256, repeats: int = 5) -> float:
    """Bytes per second moved by dst.copy_(src) (read + write), best of ``repeats``."""
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all nn.Linear weights and biases (shared tensors once): what one batch-1 decoding step reads."""
    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            for p in (module.weight, module.bias):
                if p is not None and p.data_ptr() not in seen:
                    seen.add(p.data_ptr())
                    total += p.numel() * p.element_size()
    return total


def kernel_table(model: nn.Module, repeats: int = 9) -> None:
    """Microseconds per batch-1 product for each distinct nn.Linear shape, weights cold (from DRAM)."""
    import torch.nn.functional as F

    shapes = sorted({tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Linear)})
    flush = torch.ones(16 * 2**20)  # 64 MiB, more than the last-level cache
    def split(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # SplitLinear's product, P = threads
        return split_product(x, w, None, torch.get_num_threads())

    kernels = {"row-major": F.linear, "column-major": F.linear, "row-major, split": split,
               "column-major, split": split}
    print(f"  {'weight (N, K)':>14s}" + "".join(f"{k:>21s}" for k in kernels) + "   (us per product, weights cold)")
    with torch.inference_mode():
        for n, k in shapes:
            x = torch.randn(1, k)
            row = [torch.randn(n, k) for _ in range(6)]
            weights = {name: ([column_major(w) for w in row] if "column" in name else row) for name in kernels}
            times: dict[str, list[float]] = {name: [] for name in kernels}
            for _ in range(repeats):
                for name, kernel in kernels.items():
                    flush.sum()
                    start = time.perf_counter()
                    for w in weights[name]:
                        kernel(x, w)
                    times[name].append((time.perf_counter() - start) / len(row))
            print(f"  {str((n, k)):>14s}" + "".join(f"{1e6 * statistics.median(times[m]):21.0f}" for m in kernels))


def models(name: str) -> tuple[nn.Module, nn.Module]:
    """(ours, transformers') with the same weights, in eval mode."""
    import transformers as tr

    tr.logging.set_verbosity_error()
    tr.logging.disable_progress_bar()
    if name == "gpt":
        torch.manual_seed(0)
        ours = GPT(replace(GPTConfig(), vocab_size=8000, n_ctx=256, n_layers=6, d_model=384, n_heads=6))
    else:
        from companion.models import load_smollm2

        ours, _ = load_smollm2()
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(ours, tmp)
        cls = tr.GPT2LMHeadModel if name == "gpt" else tr.LlamaForCausalLM
        theirs = cls.from_pretrained(tmp)
    return ours.eval(), theirs.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["gpt", "smollm2"], choices=["gpt", "smollm2"],
                        help="which models to time")
    parser.add_argument("--new", type=int, default=200, help="new tokens per generation")
    parser.add_argument("--prompt", type=int, default=16, help="prompt length in tokens")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds; medians are reported")
    parser.add_argument("--uncached", action="store_true", help="also time our decoding without the KV cache")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--kernels", action="store_true", help="also time each weight shape's product per kernel")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*generation flags are not valid.*")  # eos=None on purpose
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth: {bandwidth / 1e9:.1f} GB/s, {args.threads} threads (machine shared with other jobs)")
    for name in args.model:
        ours, theirs = models(name)
        fast = optimize_for_decoding(copy.deepcopy(ours))
        prompt = torch.randint(0, ours.config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
        config = GenerationConfig(max_new_tokens=args.new)

        def run_ours(cfg: GenerationConfig = config, model: nn.Module = ours) -> torch.Tensor:
            return generate(model, prompt, config=cfg).sequences

        def run_theirs() -> torch.Tensor:
            with torch.inference_mode():
                return theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new,
                                       min_new_tokens=args.new, do_sample=False, use_cache=True, eos_token_id=None,
                                       pad_token_id=0)

        variants = {"ours": run_ours, "ours, optimized": lambda: run_ours(model=fast), "transformers": run_theirs}
        if args.uncached:
            variants["ours, no cache"] = lambda: run_ours(replace(config, use_cache=False))
        reference = run_theirs()  # also the warm-up
        same = {v: torch.equal(run(), reference) for v, run in variants.items()}
        seconds: dict[str, list[float]] = {v: [] for v in variants}
        for r in range(args.rounds):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            for v in order:
                start = time.perf_counter()
                variants[v]()
                seconds[v].append(time.perf_counter() - start)
        roofline = bandwidth / weight_bytes(ours)
        print(f"\n{name}: {weight_bytes(ours) / 2**20:.1f} MiB of weights per token, roofline {roofline:.0f} tokens/s, "
              f"same tokens as transformers: {same}")
        if args.kernels:
            kernel_table(ours)
        for v in variants:
            tps = args.new / statistics.median(seconds[v])
            ratio = statistics.median(t / s for t, s in zip(seconds["transformers"], seconds[v]))
            print(f"  {v:16s} {tps:7.1f} tokens/s  {tps / roofline:5.1%} of roofline  {ratio:5.2f}x transformers")


if __name__ == "__main__":
    main()
