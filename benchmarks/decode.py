"""Greedy decoding speed: companion.generate vs transformers generate(use_cache=True), batch 1, as a share of the
memory-bandwidth roofline.

    flock /tmp/bench.lock .venv/bin/python benchmarks/decode.py [--model gpt smollm2] [--rounds 7] [--new 200]

"gpt": a GPT-2-shaped model (6 layers, width 384, 6 heads, vocab 8000, n_ctx 256) with random weights; "smollm2":
SmolLM2-135M (our Llama) against transformers' LlamaForCausalLM holding the same weights (written by our
save_pretrained). Each round runs every variant once, in alternating order; reported are the median over rounds of
tokens/s and of the per-round ratio ours / transformers, so drift of the machine affects both sides. Both decode
exactly ``--new`` tokens (no eos) from the same prompt, and the tokens are checked to agree.

Roofline: at batch 1 a decoding step must read every weight matrix once, so tokens/s <= bandwidth / weight bytes.
The weight bytes are those of every nn.Linear (the LM head included, embedding rows and the KV cache left out); the
bandwidth comes from a copy probe (torch copy of a 256 MiB buffer: bytes read + written per second, best of 5).
"""

from __future__ import annotations

import argparse
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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*generation flags are not valid.*")  # eos=None on purpose
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth: {bandwidth / 1e9:.1f} GB/s, {args.threads} threads (machine shared with other jobs)")
    for name in args.model:
        ours, theirs = models(name)
        prompt = torch.randint(0, ours.config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
        config = GenerationConfig(max_new_tokens=args.new)

        def run_ours(cfg: GenerationConfig = config) -> torch.Tensor:
            return generate(ours, prompt, config=cfg).sequences

        def run_theirs() -> torch.Tensor:
            with torch.inference_mode():
                return theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new,
                                       min_new_tokens=args.new, do_sample=False, use_cache=True, eos_token_id=None,
                                       pad_token_id=0)

        variants = {"ours": run_ours, "transformers": run_theirs}
        if args.uncached:
            variants["ours, no cache"] = lambda: run_ours(replace(config, use_cache=False))
        same = torch.equal(run_ours(), run_theirs())  # also the warm-up
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
        for v in variants:
            tps = args.new / statistics.median(seconds[v])
            ratio = statistics.median(t / s for t, s in zip(seconds["transformers"], seconds[v]))
            print(f"  {v:16s} {tps:7.1f} tokens/s  {tps / roofline:5.1%} of roofline  {ratio:5.2f}x transformers")


if __name__ == "__main__":
    main()
