"""Poetry tasks whose answers code can check, derived from the Tang-poem metadata (chapter 8).

* :func:`form_tasks`: "写一首五言绝句" / "写一首七言绝句" (write a five- / seven-character quatrain) paired with a
  real quatrain of that form from ``companion.tang_poem_splits()``; :func:`follows_form` checks an answer.
* :func:`preference_pairs`: for DPO, chosen = a real quatrain of the requested form, rejected = the same poem
  broken by code (:func:`break_form`: one clause loses or gains a character, or the last clause is dropped), so
  the preference is measurable: ``follows_form(chosen)`` is True and ``follows_form(rejected)`` is False.

All texts come from the corpus or are derived from it by code; nothing is written by hand. The quatrains are
short (at most 35 characters) so that prompt + answer fit ``tang_gpt``'s 64-token context.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from companion.poem_eval import CLAUSE_END, poem_clauses, poem_form

FORM_PROMPTS = {5: "写一首五言绝句", 7: "写一首七言绝句"}  # size of every clause -> the instruction
FORM_NAMES = {5: "五言绝句", 7: "七言绝句"}  # the metadata's name of each form
QUATRAIN_CLAUSES = 4  # a 绝句 has four clauses


def follows_form(text: str, form: int) -> bool:
    """True if ``text`` is a quatrain of ``form`` (5 or 7): exactly four clauses, each of ``form`` characters.
    Stricter than chapter 6's :func:`companion.poem_eval.poem_form` (which accepts four or more clauses)."""
    if form not in FORM_PROMPTS:
        raise ValueError(f"form must be one of {sorted(FORM_PROMPTS)}, got {form!r}")
    return poem_form(text) == form and len(poem_clauses(text)) == QUATRAIN_CLAUSES


@dataclass(frozen=True)
class FormTask:
    """One instruction with its reference answer."""

    prompt: str  # the user's instruction, e.g. "写一首五言绝句"
    response: str  # a real quatrain of the requested form
    form: int  # 5 or 7: the clause size the answer must have
    poem_id: str  # the corpus id of the poem


def form_tasks(rows: Sequence[dict] | object, forms: Sequence[int] = (5, 7), per_form: int | None = None,
               seed: int = 0) -> list[FormTask]:
    """Tasks from the quatrains in ``rows`` (a split of ``tang_poem_splits()`` or a list of its rows): every poem
    whose metadata says 五言绝句 / 七言绝句 *and* whose text passes :func:`follows_form`. With ``per_form``, at most
    that many per form (a seeded sample, so both forms can be balanced). Returned shuffled with ``seed``."""
    bad = [f for f in forms if f not in FORM_PROMPTS]
    if bad or not forms:
        raise ValueError(f"forms must be a non-empty subset of {sorted(FORM_PROMPTS)}, got {list(forms)!r}")
    if per_form is not None and per_form < 1:
        raise ValueError(f"per_form must be >= 1 or None, got {per_form!r}")
    rng = random.Random(seed)
    by_form: dict[int, list[FormTask]] = {f: [] for f in forms}
    if hasattr(rows, "column_names"):  # a datasets.Dataset: read whole columns (iterating rows is slow)
        columns = zip(rows["id"], rows["form"], rows["text"])
    else:
        columns = ((r["id"], r["form"], r["text"]) for r in rows)
    for poem_id, form_name, text in columns:
        for f in forms:
            if form_name == FORM_NAMES[f] and follows_form(text, f):
                by_form[f].append(FormTask(FORM_PROMPTS[f], text, f, poem_id))
    tasks = []
    for f in forms:
        chosen = by_form[f]
        if not chosen:
            raise ValueError(f"no {FORM_NAMES[f]} in the given rows")
        if per_form is not None and len(chosen) > per_form:
            chosen = rng.sample(chosen, per_form)
        tasks.extend(chosen)
    rng.shuffle(tasks)
    return tasks


_CLAUSE = re.compile(f"[^{re.escape(CLAUSE_END)}\\s]+")


def break_form(text: str, rng: random.Random) -> str:
    """``text`` with its form broken in one of three ways, chosen by ``rng``: a character deleted from one clause,
    a character of the poem repeated inside one clause, or the last clause (and what follows it) dropped.
    Punctuation and line breaks elsewhere stay; the result never passes :func:`follows_form`."""
    spans = [m.span() for m in _CLAUSE.finditer(text)]
    if len(spans) < 2:
        raise ValueError(f"need a poem of at least two clauses, got {text!r}")
    kind = rng.randrange(3)
    if kind == 2:  # drop the last clause: three clauses left
        start = spans[-1][0]
        return text[:start].rstrip("\n")
    s, e = spans[rng.randrange(len(spans))]
    i = rng.randrange(s, e)
    if kind == 0:  # one character fewer
        return text[:i] + text[i + 1:]
    return text[:i] + text[i] + text[i:]  # one character more (a repeated one)


@dataclass(frozen=True)
class PreferencePair:
    """A prompt with a preferred and a dispreferred answer."""

    prompt: str  # the instruction
    chosen: str  # a real quatrain of the requested form
    rejected: str  # the same poem with its form broken by :func:`break_form`
    form: int  # 5 or 7


def preference_pairs(tasks: Sequence[FormTask], seed: int = 0) -> list[PreferencePair]:
    """One pair per task: the task's poem as chosen, :func:`break_form` of it as rejected (seeded)."""
    rng = random.Random(seed)
    pairs = []
    for task in tasks:
        rejected = break_form(task.response, rng)
        assert not follows_form(rejected, task.form), rejected  # break_form's contract
        pairs.append(PreferencePair(task.prompt, task.response, rejected, task.form))
    return pairs


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson's (1927) score interval for a success rate ``successes / n`` (default z: 95 %). Unlike the normal
    approximation it stays inside [0, 1] and is sensible at rates near 0 or 1."""
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need n >= 1 and 0 <= successes <= n, got successes={successes!r}, n={n!r}")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)
