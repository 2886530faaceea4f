"""``python -m companion serve --checkpoint tang_gpt``: an OpenAI-compatible HTTP server for a causal LM.

``--checkpoint`` is a reference name (``tang_gpt``), a folder written by ``train --export`` / ``finetune``
(an SFT export has the ``<user>``/``<assistant>`` tokens, so its chat endpoint uses the book's chat template),
or ``smollm2`` (SmolLM2-135M-Instruct with its own chat template). ``tang_gpt`` itself was never chat-trained:
``/v1/completions`` continues a poem, ``/v1/chat/completions`` answers 400 ``no_chat_template``.
The model loads in the background: ``/health`` is 503 until it is ready. Runs on the CPU in float32.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from companion.errors import UsageError
from companion.training.cli import positive_int

if TYPE_CHECKING:
    import torch


def _port(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port 1..65535, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", default="tang_gpt",
                        help="tang_gpt, smollm2, or a folder exported by `train --export` or `finetune` "
                             "(default: tang_gpt)")
    parser.add_argument("--model-name", default=None,
                        help="model id clients must send (default: the checkpoint's name)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=_port, default=8000, help="TCP port to listen on (default: 8000)")
    parser.add_argument("--max-tokens", type=positive_int, default=256,
                        help="largest max_tokens a request may ask for (default: 256)")
    parser.add_argument("--max-prompt-tokens", type=positive_int, default=None,
                        help="longest prompt in tokens (default: the model's context length minus one)")
    parser.add_argument("--queue-size", type=positive_int, default=16,
                        help="requests that may wait for the worker before the server answers 429 (default: 16)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (default: torch's choice)")


def load_for_serving(checkpoint: str) -> tuple[torch.nn.Module, Any]:
    """``(model, tokenizer)`` of ``checkpoint`` (see the module docstring), in eval mode on the CPU, with
    `companion.inference.optimize.optimize_for_decoding` applied (the same tokens, faster batch-1 steps)."""
    from companion.inference.optimize import optimize_for_decoding

    if checkpoint == "smollm2":
        from companion.models import load_smollm2

        model, tokenizer = load_smollm2()
        return optimize_for_decoding(model.eval()), tokenizer
    from companion.training.recipes import load_pretrained

    model, tokenizer, card = load_pretrained(checkpoint)
    if card.get("task") != "causal_lm":
        raise ValueError(f"{checkpoint} is a {card.get('task')!r} model; serving needs a causal language model")
    return optimize_for_decoding(model.eval()), tokenizer


def main(args: argparse.Namespace) -> int:
    import uvicorn

    from companion.serving.app import create_app
    from companion.serving.engine import Engine, EngineConfig

    if args.checkpoint not in ("tang_gpt", "smollm2") and not Path(args.checkpoint).is_dir():
        raise UsageError(f"--checkpoint {args.checkpoint}: neither tang_gpt, smollm2 nor an exported folder")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    config = EngineConfig(max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens,
                          queue_size=args.queue_size)
    name = args.model_name or Path(args.checkpoint).name
    engine = Engine(lambda: load_for_serving(args.checkpoint), name, config)
    uvicorn.run(create_app(engine), host=args.host, port=args.port, log_level="info")
    return 0
