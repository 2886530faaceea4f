"""Multiple-choice sets derived by code from data, with the key computed, never typed: the next line of a Tang poem
among lines of other poems, and integer arithmetic in English (for SmolLM2). Seeded: the same set everywhere."""

from __future__ import annotations

import random
from collections.abc import Sequence

from companion.evaluation.likelihood import MultipleChoice


DISTRACTORS = ("other_poems", "shuffled")


def next_line_questions(poems: Sequence[str], n_questions: int, n_choices: int = 4, same_length: bool = True,
                        seed: int = 0, distractors: str = "other_poems") -> list[MultipleChoice]:
    """Question: one line (couplet) of a poem and a newline; choices: its true next line and ``n_choices - 1``
    distractors, in a seeded random order. ``distractors="other_poems"``: lines drawn from *other* poems (of the
    same number of characters when ``same_length``, so length gives nothing away) — a test of coherence;
    ``"shuffled"``: the true line's own characters in random orders — a test of fluency (every choice has the
    same characters, so all length normalisations agree). Poems are ``text`` fields (lines split by newlines)."""
    if n_questions < 1 or n_choices < 2:
        raise ValueError(f"need n_questions >= 1 and n_choices >= 2, got {n_questions!r} and {n_choices!r}")
    if distractors not in DISTRACTORS:
        raise ValueError(f"distractors must be one of {DISTRACTORS}, got {distractors!r}")
    rng = random.Random(seed)
    lines = [p.split("\n") for p in poems]
    pool = [(i, line) for i, ls in enumerate(lines) for line in ls]
    by_length: dict[int, list[tuple[int, str]]] = {}
    for i, line in pool:
        by_length.setdefault(len(line), []).append((i, line))
    candidates = [(i, j) for i, ls in enumerate(lines) for j in range(len(ls) - 1)]
    if not candidates:
        raise ValueError("no poem has two lines")
    rng.shuffle(candidates)
    items = []
    for i, j in candidates:
        question, answer = lines[i][j], lines[i][j + 1]
        if distractors == "shuffled":
            others = set()
            for _ in range(20 * n_choices):  # shuffles until n_choices - 1 distinct orders (short lines may fail)
                others.add("".join(rng.sample(answer, len(answer))))
                others.discard(answer)
                if len(others) == n_choices - 1:
                    break
            others = sorted(others)
        else:
            source = by_length.get(len(answer), []) if same_length else pool
            others = sorted({line for k, line in source if k != i and line != answer})
        if len(others) < n_choices - 1:
            continue
        choices = rng.sample(others, n_choices - 1) + [answer]
        rng.shuffle(choices)
        items.append(MultipleChoice(question + "\n", tuple(choices), choices.index(answer)))
        if len(items) == n_questions:
            return items
    raise ValueError(f"only {len(items)} questions can be built from {len(poems)} poems, asked {n_questions}")


def arithmetic_questions(n_questions: int, n_choices: int = 4, low: int = 10, high: int = 49, shots: int = 0,
                         seed: int = 0) -> list[MultipleChoice]:
    """"Question: What is a + b?\\nAnswer:" with a, b drawn from low..high; the key is a + b (computed), the
    distractors a + b +/- 1, +/- 10 (distinct), each choice preceded by a space. ``shots`` solved examples
    (drawn from the same generator) go before each question, separated by blank lines (few-shot prompting)."""
    if n_questions < 1 or not 2 <= n_choices <= 5:
        raise ValueError(f"need n_questions >= 1 and 2 <= n_choices <= 5, got {n_questions!r} and {n_choices!r}")
    if not 0 <= low <= high:
        raise ValueError(f"need 0 <= low <= high, got low={low!r}, high={high!r}")
    rng = random.Random(seed)
    items = []
    for _ in range(n_questions):
        prompt = ""
        for _ in range(shots):
            a, b = rng.randint(low, high), rng.randint(low, high)
            prompt += f"Question: What is {a} + {b}?\nAnswer: {a + b}\n\n"
        a, b = rng.randint(low, high), rng.randint(low, high)
        total = a + b
        wrong = rng.sample([total - 10, total - 1, total + 1, total + 10], n_choices - 1)
        choices = [f" {v}" for v in wrong + [total]]
        rng.shuffle(choices)
        items.append(MultipleChoice(f"{prompt}Question: What is {a} + {b}?\nAnswer:", tuple(choices),
                                    choices.index(f" {total}")))
    return items
