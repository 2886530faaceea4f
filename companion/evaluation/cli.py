"""``python -m companion evaluate --checkpoint tang_gpt``: chapter 9's evaluations of a causal character model.

``--checkpoint`` is a reference name (``tang_gpt``) or a folder written by ``python -m companion train --export``.
Two evaluations on held-out Tang poems (``tang_poem_splits()``, ``--split``):

* perplexity, bits per character and per UTF-8 byte of the first ``--poems`` poems, each after one ``<eos>``,
  with sliding windows (``--window``, ``--stride``);
* multiple choice: ``--questions`` "next line" questions derived from the same poems (true next line vs lines of
  other poems with as many characters), ``acc`` and the normalised accuracies beside chance, with a percentile
  bootstrap interval of ``acc``.

The result is printed as JSON and written to ``--output`` if given. Runs on the CPU in float32.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from companion.errors import UsageError
from companion.training.cli import positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", default="tang_gpt",
                        help="reference model name (tang_gpt) or a folder exported by `train --export` "
                             "(default: tang_gpt)")
    parser.add_argument("--split", default="test", choices=("validation", "test"),
                        help="held-out split of the Tang poems to evaluate on (default: test)")
    parser.add_argument("--poems", type=positive_int, default=100,
                        help="number of poems scored for perplexity (default: 100)")
    parser.add_argument("--window", type=positive_int, default=None,
                        help="tokens the model reads at once, at most its context length (default: its context)")
    parser.add_argument("--stride", type=positive_int, default=None,
                        help="tokens the window moves by, 1..window (default: half the window)")
    parser.add_argument("--questions", type=positive_int, default=100,
                        help="number of derived next-line questions (default: 100)")
    parser.add_argument("--choices", type=positive_int, default=4, help="choices per question, >= 2 (default: 4)")
    parser.add_argument("--bootstrap", type=positive_int, default=1000,
                        help="bootstrap resamples for the interval of acc (default: 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the question set and the bootstrap (default: 0)")
    parser.add_argument("--output", type=Path, default=None, help="also write the JSON result to this file")


def evaluate(args: argparse.Namespace) -> dict:
    """The result dictionary (see the module docstring); raises :class:`UsageError` for values that do not fit."""
    import torch

    from companion.data import tang_poem_splits
    from companion.evaluation.bootstrap import bootstrap_ci
    from companion.evaluation.likelihood import score_multiple_choice
    from companion.evaluation.perplexity import evaluate_perplexity
    from companion.evaluation.questions import next_line_questions
    from companion.training.recipes import load_pretrained

    if args.choices < 2:
        raise UsageError(f"--choices must be >= 2, got {args.choices}")
    try:
        model, tok, card = load_pretrained(args.checkpoint)
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError; a missing data file an OSError
        raise UsageError(f"--checkpoint {args.checkpoint}: {e}") from None
    if card.get("task") != "causal_lm":
        raise UsageError(f"--checkpoint {args.checkpoint} is a {card.get('task')!r} model; evaluate needs a "
                         "causal language model (task 'causal_lm')")
    n_ctx = model.config.n_ctx
    window = args.window or n_ctx
    if not 2 <= window <= n_ctx:
        raise UsageError(f"--window must be in 2..{n_ctx} (the model's context length), got {window}")
    stride = args.stride or max(1, window // 2)
    if stride > window:
        raise UsageError(f"--stride must be <= --window ({window}), got {stride}")
    poems = tang_poem_splits()[args.split]["text"]
    eos = tok.token_id("<eos>")
    ppl = evaluate_perplexity(model, tok.encode, poems[:args.poems], window, stride, prefix_ids=[eos])
    try:
        items = next_line_questions(poems, args.questions, args.choices, seed=args.seed)
    except ValueError as e:
        raise UsageError(f"--questions {args.questions}: {e}") from None
    scores = score_multiple_choice(model, tok.encode, items, n_ctx, prefix_ids=[eos], pad_id=tok.token_id("<pad>"))
    correct = (scores.predictions() == scores.answers).astype(float)
    ci = bootstrap_ci(lambda c: c.mean(), correct, n_resamples=args.bootstrap, seed=args.seed)
    result = {
        "checkpoint": str(args.checkpoint), "split": args.split,
        "perplexity": {"poems": min(args.poems, len(poems)), "tokens": ppl.tokens, "window": window,
                       "stride": stride, "perplexity": ppl.perplexity,
                       "bits_per_character": ppl.bits_per_character if not ppl.unscored else None,
                       "bits_per_byte": ppl.bits_per_byte if not ppl.unscored else None},
        "multiple_choice": {"task": "next_line", "questions": len(items), "choices": args.choices,
                            "chance": scores.chance, "acc": scores.accuracy("none"),
                            "acc_norm_chars": scores.accuracy("chars"), "acc_norm_bytes": scores.accuracy("bytes"),
                            "acc_norm_tokens": scores.accuracy("tokens"), "acc_ci95": [ci.low, ci.high]},
    }
    return result


def main(args: argparse.Namespace) -> int:
    import torch

    with torch.no_grad():  # a context, not set_grad_enabled(False): callers in the same process keep autograd
        result = evaluate(args)
    text = json.dumps(result, ensure_ascii=False, indent=1)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0
