"""Requests/s and latency of the OpenAI-compatible server under a fixed load, beside decoding without a server.

    flock /tmp/bench.lock .venv/bin/python benchmarks/serve_load.py [--checkpoint tang_gpt] [--clients 8]
        [--requests 4] [--max-tokens 24] [--rounds 3]

The server (``companion.serving``, in a thread of this process, on 127.0.0.1) gets ``clients`` threads x
``requests`` greedy completions of distinct poem openings (non-streaming, ``max_tokens`` new tokens, no early
stop: ``--ignore-eos`` is not an API field, so lengths vary with the model's <eos>). The reference decodes the same
prompts one after the other with ``companion.inference.decoding.stream`` in-process (no HTTP, no queue). Each round
runs both, in alternating order; reported: the median over rounds of requests/s, p50/p99 latency per request
(from sending to the full answer) and the ratio server / direct requests/s. One worker decodes one request at a
time, so the ratio measures the cost of HTTP, JSON and the queue, not a batching speed-up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import httpx2 as httpx  # noqa: E402

from companion.inference.decoding import GenerationConfig, stream  # noqa: E402
from companion.serving import Engine, EngineConfig, ServerThread, create_app, load_for_serving  # noqa: E402

OPENINGS = "床前明月光春眠不觉晓白日依山尽红豆生南国千山鸟飞绝独在异乡为空山不见人移舟泊烟渚国破山河在好雨知时节"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def server_round(url: str, model_id: str, prompts: list[str], clients: int, max_tokens: int) -> tuple[float, list]:
    def one_client(k: int) -> list[float]:
        latencies = []
        with httpx.Client(base_url=url, timeout=300) as http:
            for prompt in prompts[k::clients]:
                start = time.perf_counter()
                r = http.post("/v1/completions", json={"model": model_id, "prompt": prompt,
                                                       "max_tokens": max_tokens, "temperature": 0})
                r.raise_for_status()
                latencies.append(time.perf_counter() - start)
        return latencies

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = [x for xs in pool.map(one_client, range(clients)) for x in xs]
    return len(prompts) / (time.perf_counter() - start), latencies


def direct_round(engine: Engine, prompts: list[str], max_tokens: int) -> float:
    config = GenerationConfig(max_new_tokens=max_tokens, eos_token_id=engine.codec.eos_ids or None)
    start = time.perf_counter()
    with torch.inference_mode():
        for prompt in prompts:
            for _ in stream(engine.model, torch.tensor([engine.codec.encode(prompt)]), config):
                pass
    return len(prompts) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="tang_gpt", help="tang_gpt, smollm2 or an exported folder")
    parser.add_argument("--clients", type=int, default=8, help="concurrent client threads")
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=24, help="max_tokens of every request")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are reported")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (one: a small model decoding one "
                        "token at a time gains nothing from more)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n = args.clients * args.requests
    prompts = [OPENINGS[i % len(OPENINGS):][:2 + i % 4] + "，" * (i // len(OPENINGS)) for i in range(n)]
    assert len(set(prompts)) == n, "prompts must be distinct"
    engine = Engine(lambda: load_for_serving(args.checkpoint), args.checkpoint,
                    EngineConfig(max_tokens=args.max_tokens, queue_size=max(16, n)))
    results: dict[str, list] = {"server": [], "direct": [], "p50": [], "p99": []}
    with ServerThread(create_app(engine)) as server:
        if not engine.wait_ready(120):
            raise SystemExit(f"the model did not load: {engine.load_error}")
        server_round(server.url, args.checkpoint, prompts[:2], 2, 2)  # warm-up
        for r in range(args.rounds):
            order = ("server", "direct") if r % 2 == 0 else ("direct", "server")
            for kind in order:
                if kind == "server":
                    rps, latencies = server_round(server.url, args.checkpoint, prompts, args.clients, args.max_tokens)
                    results["server"].append(rps)
                    results["p50"].append(percentile(latencies, 0.50))
                    results["p99"].append(percentile(latencies, 0.99))
                else:
                    results["direct"].append(direct_round(engine, prompts, args.max_tokens))
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"{args.checkpoint}: {args.clients} clients x {args.requests} requests, max_tokens={args.max_tokens}, "
          f"{args.rounds} rounds, torch threads={args.threads}, 0 errors")
    print(f"server: {med['server']:.1f} requests/s, latency p50 {med['p50'] * 1000:.0f} ms, "
          f"p99 {med['p99'] * 1000:.0f} ms")
    print(f"direct decoding (no server): {med['direct']:.1f} requests/s; server / direct = "
          f"{med['server'] / med['direct']:.2f}")


if __name__ == "__main__":
    main()
