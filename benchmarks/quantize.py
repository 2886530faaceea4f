"""Weight quantization of the poetry model (and SmolLM2): saved size, perplexity change, logits SNR, and prefill and
decode speed of every kernel path, against torch.ao.quantization.quantize_dynamic (int8, part of torch).

    flock /tmp/bench.lock .venv/bin/python benchmarks/quantize.py [--model tang_gpt smollm2] [--rounds 5] [--optimize]

Size: bytes of ``torch.save(model.state_dict())`` (quantize_dynamic's packed weights included), ratio fp32 / variant.
Perplexity: tang_gpt on the first ``--poems`` validation poems (window 64, stride 32, <eos> as prefix, as in 9.2);
SmolLM2 on the same poems with its own tokenizer (window 256). SNR: 10 log10 of the fp32 logits' energy over the
error's, on those texts' first window. Speed: each round runs every variant once (order alternating) on one prompt:
a prefill of ``--prompt`` tokens, then greedy decoding of ``--new`` tokens with the KV cache, whose time is taken
without the prefill it starts with (the generate call's time minus the prefill just measured); reported are medians
over rounds of the times and of the per-round ratio against quantize_dynamic and against fp32. ``--optimize`` applies
`companion.inference.optimize_for_decoding` to every variant before timing (quantize_dynamic's modules are not
touched by it; ours get their q/k/v fused).
"""

from __future__ import annotations

import argparse
import copy
import io
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repo, not benchmarks/ (its tokenizers.py shadows the package)
from companion.inference import GenerationConfig, generate, optimize_for_decoding  # noqa: E402
from companion.inference.quantize import QuantConfig, quantize_model, snr_db  # noqa: E402


def variants(model: nn.Module) -> dict:
    """name -> QuantConfig (None: fp32; "dynamic": torch.ao quantize_dynamic). The int4 group is 128 where it divides
    every input width (tang_gpt), else the largest power of two that does (SmolLM2's width 576 = 9 x 64)."""
    widths = {m.weight.shape[1] for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding))}
    group = next(g for g in (128, 64, 32, 16, 8, 4, 2) if all(w % g == 0 for w in widths))
    return {
        "fp32": None,
        "torch.ao dynamic int8": "dynamic",
        "int8 weight-only (dequantize)": QuantConfig(bits=8, kernel="dequantize"),
        "int8 weight-only (int8pack_mm)": QuantConfig(bits=8, kernel="fused"),
        "int8 W8A8 (fbgemm)": QuantConfig(bits=8, dynamic_activations=True),
        f"int4 g{group} (dequantize)": QuantConfig(bits=4, group_size=group, kernel="dequantize"),
        f"int4 g{group} (int4pack_mm)": QuantConfig(bits=4, group_size=group, kernel="fused"),
        "int4 g32 (dequantize)": QuantConfig(bits=4, group_size=32, kernel="dequantize"),
    }


def quantized(model: nn.Module, spec) -> nn.Module:
    model = copy.deepcopy(model)
    if spec is None:
        return model
    if spec == "dynamic":
        from torch.ao.quantization import quantize_dynamic

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation (it points to torchao) and a quantize_per_tensor note
            return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    return quantize_model(model, spec)


def saved_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def load(name: str):
    """(model, encode, prefix ids, window, stride)."""
    import companion

    if name == "tang_gpt":
        model, tok, _ = companion.load_pretrained("tang_gpt")
        return model.eval(), tok.encode, [tok.token_id("<eos>")], 64, 32
    from companion.models import load_smollm2

    model, tok = load_smollm2()
    return model.eval(), tok.encode, [0], 256, 128  # a transformers tokenizer: encode(str) -> list of ids (as in 9.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["tang_gpt", "smollm2"], choices=["tang_gpt", "smollm2"])
    parser.add_argument("--poems", type=int, default=200, help="validation poems scored for perplexity")
    parser.add_argument("--prompt", type=int, default=16, help="prompt length in tokens")
    parser.add_argument("--new", type=int, default=48, help="new tokens per generation")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; medians are reported")
    parser.add_argument("--only", nargs="+", default=None,
                        help="time only the variants whose names contain one of these strings (fp32 and torch.ao always)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--optimize", action="store_true", help="optimize_for_decoding on every variant")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    import companion
    from companion.evaluation import evaluate_perplexity

    poems = companion.tang_poem_splits()["validation"]["text"][: args.poems]
    print(f"{args.threads} threads, {args.poems} validation poems, machine shared with other jobs")
    for name in args.model:
        base, encode, prefix, window, stride = load(name)
        models = {v: quantized(base, spec) for v, spec in variants(base).items()
                  if args.only is None or v in ("fp32", "torch.ao dynamic int8") or any(s in v for s in args.only)}
        if args.optimize:
            models = {v: optimize_for_decoding(m) for v, m in models.items()}
        ids = torch.tensor([prefix + encode("\n".join(poems))[: window - 1]])  # (1, window)
        reference_logits = base(ids)
        prompt = ids[:, : args.prompt]
        config = GenerationConfig(max_new_tokens=args.new)
        fp32_bytes = saved_bytes(models["fp32"])
        rows = {}
        for v, m in models.items():
            ppl = evaluate_perplexity(m, encode, poems, window, stride, prefix_ids=prefix).perplexity
            rows[v] = {"bytes": saved_bytes(m), "ppl": ppl, "snr": snr_db(reference_logits, m(ids)),
                       "tokens": generate(m, prompt, config=config).sequences}  # also the warm-up
        timings: dict[str, dict[str, list[float]]] = {v: {"prefill": [], "decode": []} for v in models}
        for r in range(args.rounds):
            for v in (list(models) if r % 2 == 0 else list(reversed(models))):
                start = time.perf_counter()
                models[v](prompt)
                middle = time.perf_counter()
                generate(models[v], prompt, config=config)
                end = time.perf_counter()
                timings[v]["prefill"].append(middle - start)
                timings[v]["decode"].append(end - middle - (middle - start))  # generate's own prefill left out
        base_ppl = rows["fp32"]["ppl"]
        print(f"\n{name}: fp32 {fp32_bytes / 2**20:.1f} MiB, validation perplexity {base_ppl:.2f} "
              f"(window {window}, stride {stride}); prompt {args.prompt}, {args.new} new tokens, {args.rounds} rounds")
        print(f"  {'variant':31s} {'size':>7s} {'smaller':>8s} {'ppl change':>10s} {'SNR dB':>7s} {'same tokens':>11s}"
              f" {'prefill':>9s} {'decode tok/s':>12s} {'vs torch.ao':>11s} {'vs fp32':>8s}")
        for v, row in rows.items():
            t = timings[v]
            decode_ratio = statistics.median(a / b for a, b in zip(timings["torch.ao dynamic int8"]["decode"], t["decode"]))
            fp32_ratio = statistics.median(a / b for a, b in zip(timings["fp32"]["decode"], t["decode"]))
            same = torch.equal(row["tokens"], rows["fp32"]["tokens"])
            snr = "-" if v == "fp32" else f"{row['snr']:.1f}"
            print(f"  {v:31s} {row['bytes'] / 2**20:6.2f}M {fp32_bytes / row['bytes']:7.2f}x "
                  f"{100 * (row['ppl'] / base_ppl - 1):+9.2f}% {snr:>7s} {str(same):>11s} "
                  f"{1000 * statistics.median(t['prefill']):7.1f}ms {args.new / statistics.median(t['decode']):12.1f} "
                  f"{decode_ratio:10.2f}x {fp32_ratio:7.2f}x")


if __name__ == "__main__":
    main()
