"""Instruction tuning (supervised fine-tuning, SFT): a chat template, loss on the assistant's tokens only, and a
check that fails loudly when (almost) nothing is supervised.

Ouyang et al. (2022), "Training language models to follow instructions with human feedback" (the SFT stage);
the masking follows Hugging Face trl's ``assistant_only_loss``. Design choices:

* The assistant span is found in the token ids by its markers (start marker -> end marker, the end marker
  included, so the model learns to stop), the same way for our character tokenizer and for a Hugging Face chat
  template (SmolLM2's ``<|im_start|>assistant\\n`` ... ``<|im_end|>``). A template whose marker never matches
  gives an all-zero mask; :func:`check_supervision` turns that silent failure (trl issue #4147) into an error.
* New special tokens are added to a :class:`~companion.tokenization.CharTokenizer` with
  :func:`add_special_tokens`, which rebuilds the embedding (and the tied head) row by row under the new ids;
  new rows start at the mean embedding (Hewitt, 2021), so the model's predictions over old tokens are unchanged.
* Batches are right-padded: with a causal mask no real token attends to the padding after it, so our models
  need no attention mask; padded positions get the label ``IGNORE_INDEX``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from companion.objectives import IGNORE_INDEX, causal_lm_loss
from companion.tokenization.char import CharTokenizer


# ----------------------------------------------------------------------------------------- special tokens
def add_special_tokens(model: nn.Module, tokenizer: CharTokenizer, tokens: Sequence[str]
                       ) -> tuple[nn.Module, CharTokenizer]:
    """Add ``tokens`` as special tokens of a character tokenizer and give ``model`` embedding rows for them.

    ``CharTokenizer`` numbers special tokens first, so the characters' ids shift by ``len(tokens)``: the
    embedding ``model.tok_emb`` and the head ``model.lm_head`` (tied or not) are rebuilt with each old token's
    row moved to its new id, and the new rows set to the mean of the old embedding rows (head rows of an untied
    head likewise). ``model.config.vocab_size`` is updated. Modifies ``model`` in place and returns it with the
    new tokenizer. Tokens already present are refused (name them)."""
    tokens = list(tokens)
    present = [t for t in tokens if t in tokenizer.special_tokens or t in tokenizer.stoi]
    if present:
        raise ValueError(f"tokens already in the vocabulary: {present!r}")
    if not tokens:
        raise ValueError("no tokens to add")
    for name in ("tok_emb", "lm_head", "config"):
        if not hasattr(model, name):
            raise TypeError(f"model must have tok_emb, lm_head and config (a companion GPT or Llama); "
                            f"{type(model).__name__} has no {name!r}")
    state = tokenizer.to_dict()
    new_tok = CharTokenizer(state["chars"], [*state["special_tokens"], *tokens])
    old_ids = [tokenizer.special_tokens[t] if t in tokenizer.special_tokens else tokenizer.stoi.get(t, -1)
               for t in new_tok.itos]  # old id of every new id, -1 for the added tokens
    index = torch.tensor(old_ids)  # (V_new,)
    is_new = index < 0  # (V_new,)
    if getattr(model.lm_head, "bias", None) is not None:
        raise TypeError("an output head with a bias is not supported")
    tied = model.lm_head.weight is model.tok_emb.weight

    def moved(weight: torch.Tensor) -> torch.Tensor:
        rows = weight.detach()[index.clamp(min=0)].clone()  # (V_new, C)
        rows[is_new] = weight.detach().mean(0)  # the mean row for every added token
        return rows

    old_emb = model.tok_emb.weight
    emb = nn.Embedding(new_tok.vocab_size, old_emb.shape[1], dtype=old_emb.dtype, device=old_emb.device)
    emb.weight.data.copy_(moved(old_emb))
    head = nn.Linear(old_emb.shape[1], new_tok.vocab_size, bias=False, dtype=old_emb.dtype, device=old_emb.device)
    if tied:
        head.weight = emb.weight
    else:
        head.weight.data.copy_(moved(model.lm_head.weight))
    model.tok_emb, model.lm_head = emb, head
    model.config = dataclasses.replace(model.config, vocab_size=new_tok.vocab_size)
    return model, new_tok


# ----------------------------------------------------------------------------------------- chat template
@dataclass(frozen=True)
class ChatTemplate:
    """The book's chat format for the character poetry model:
    ``<eos><user>{prompt}<assistant>{response}<eos>`` (``<eos>`` also begins a text, as in chapter 6)."""

    bos: str = "<eos>"  # token that starts every text (tang_gpt was pretrained with <eos> between poems)
    user: str = "<user>"  # marks the start of the user's turn
    assistant: str = "<assistant>"  # marks the start of the assistant's turn
    eos: str = "<eos>"  # ends the assistant's answer (supervised: the model must learn to stop)

    def __post_init__(self) -> None:
        for name in ("bos", "user", "assistant", "eos"):
            if not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty token, got {getattr(self, name)!r}")
        if self.assistant in (self.user, self.eos):
            raise ValueError(f"the assistant marker must differ from user and eos, got {self.assistant!r}")

    @property
    def new_tokens(self) -> tuple[str, ...]:
        """The tokens a pretrained poetry tokenizer lacks."""
        return (self.user, self.assistant)

    def prompt_ids(self, tokenizer: CharTokenizer, prompt: str) -> list[int]:
        """Ids of the text before the answer: bos, user marker, prompt, assistant marker."""
        return [tokenizer.token_id(self.bos), tokenizer.token_id(self.user), *tokenizer.encode(prompt),
                tokenizer.token_id(self.assistant)]

    def encode(self, tokenizer: CharTokenizer, prompt: str, response: str) -> list[int]:
        """Ids of a whole conversation: :meth:`prompt_ids` + the response + eos."""
        return [*self.prompt_ids(tokenizer, prompt), *tokenizer.encode(response), tokenizer.token_id(self.eos)]

    def markers(self, tokenizer: CharTokenizer) -> tuple[list[int], list[int]]:
        """(start, end) marker ids of the assistant span, for :func:`assistant_mask`."""
        return [tokenizer.token_id(self.assistant)], [tokenizer.token_id(self.eos)]


def _find(ids: Sequence[int], pattern: Sequence[int], start: int) -> int:
    n = len(pattern)
    for i in range(start, len(ids) - n + 1):
        if list(ids[i:i + n]) == list(pattern):
            return i
    return -1


def assistant_mask(ids: Sequence[int], start_marker: Sequence[int], end_marker: Sequence[int]) -> list[int]:
    """1 on the tokens of every assistant span, 0 elsewhere: each span begins right after an occurrence of
    ``start_marker`` and runs to the next ``end_marker`` *inclusive* (to the end of ``ids`` if there is none).
    A marker that never occurs gives all zeros; :func:`check_supervision` catches that."""
    if not start_marker or not end_marker:
        raise ValueError(f"markers must be non-empty, got start={list(start_marker)!r}, end={list(end_marker)!r}")
    mask = [0] * len(ids)
    i = _find(ids, start_marker, 0)
    while i >= 0:
        begin = i + len(start_marker)
        j = _find(ids, end_marker, begin)
        end = len(ids) if j < 0 else j + len(end_marker)
        mask[begin:end] = [1] * (end - begin)
        i = _find(ids, start_marker, end)
    return mask


def sft_example(ids: Sequence[int], start_marker: Sequence[int], end_marker: Sequence[int]) -> dict[str, list[int]]:
    """``{"input_ids", "labels"}``: labels are the ids on the assistant spans, ``IGNORE_INDEX`` elsewhere
    (unshifted, as :func:`companion.causal_lm_loss` expects)."""
    mask = assistant_mask(ids, start_marker, end_marker)
    return {"input_ids": list(ids), "labels": [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]}


def hf_chat_example(tokenizer, messages: Sequence[dict[str, str]], start: str = "<|im_start|>assistant\n",
                    end: str = "<|im_end|>") -> dict[str, list[int]]:
    """:func:`sft_example` for a Hugging Face tokenizer with a chat template: ``messages`` rendered by the
    tokenizer's own ``apply_chat_template``, the assistant spans found by the ids of ``start`` and ``end``
    (defaults: the ChatML markers of SmolLM2 and Qwen)."""
    rendered = tokenizer.apply_chat_template(list(messages), tokenize=True)
    ids = rendered["input_ids"] if hasattr(rendered, "keys") else rendered  # transformers 5 returns a BatchEncoding
    start_ids = tokenizer.encode(start, add_special_tokens=False)
    end_ids = tokenizer.encode(end, add_special_tokens=False)
    return sft_example(list(ids), start_ids, end_ids)


def collate_sft(rows: Sequence[dict[str, list[int]]], pad_id: int, max_length: int | None = None
                ) -> dict[str, torch.Tensor]:
    """Right-pad ``rows`` (from :func:`sft_example`) into ``input_ids``, ``labels`` and ``attention_mask``, all
    (B, T) int64; labels are ``IGNORE_INDEX`` on padding. A row longer than ``max_length`` is refused (cutting
    it could cut its whole answer)."""
    if not rows:
        raise ValueError("collate_sft needs at least one row")
    T = max(len(r["input_ids"]) for r in rows)
    if max_length is not None and T > max_length:
        raise ValueError(f"a row has {T} tokens, more than max_length={max_length}")
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), T), dtype=torch.long)  # (B, T)
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[b, :n] = torch.tensor(r["input_ids"])
        labels[b, :n] = torch.tensor(r["labels"])
        mask[b, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class SupervisionError(ValueError):
    """Too few tokens carry a label: the loss would be (nearly) empty and training would silently do nothing."""


def check_supervision(labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      min_fraction: float = 0.05) -> float:
    """The fraction of real tokens that are supervised (label not ``IGNORE_INDEX``); raise
    :class:`SupervisionError` with the counts when it is below ``min_fraction`` (e.g. an assistant marker that
    never matched the template). labels, attention_mask: (B, T)."""
    if not 0 < min_fraction <= 1:
        raise ValueError(f"min_fraction must be in (0, 1], got {min_fraction!r}")
    real = torch.ones_like(labels, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    n_real = int(real.sum())
    n_sup = int(((labels != IGNORE_INDEX) & real).sum())
    fraction = n_sup / max(n_real, 1)
    if fraction < min_fraction:
        raise SupervisionError(
            f"only {n_sup} of {n_real} tokens ({fraction:.1%}) are supervised, below min_fraction={min_fraction}: "
            "does the template's assistant marker occur in the token ids?")
    return fraction


@torch.no_grad()
def sample_completions(model: nn.Module, start_ids: Sequence[int], n: int, max_new_tokens: int, eos_id: int,
                       seed: int = 0, temperature: float = 1.0) -> list[list[int]]:
    """``n`` continuations of ``start_ids`` drawn from ``model`` (a companion GPT or Llama), each ending with
    ``eos_id`` (included) or after ``max_new_tokens``. Ancestral sampling by inverse CDF with one generator
    seeded by ``seed``, with a KV cache, as :func:`companion.poem_eval.sample_poems` (with a float64 model the
    draws are the same on every CPU)."""
    from companion.nn import KVCache

    if n < 1 or max_new_tokens < 1:
        raise ValueError(f"n and max_new_tokens must be >= 1, got n={n!r}, max_new_tokens={max_new_tokens!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    n_ctx = model.config.n_ctx
    if len(start_ids) + max_new_tokens - 1 > n_ctx:  # the last sampled token is never fed back
        raise ValueError(f"{len(start_ids)} start tokens + max_new_tokens={max_new_tokens} exceed the context "
                         f"length n_ctx={n_ctx}: use max_new_tokens <= {n_ctx - len(start_ids) + 1}")
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    caches = [KVCache() for _ in range(model.config.n_layers)]
    step_input = torch.tensor([list(start_ids)] * n)  # (n, T0)
    out, done = [], torch.zeros(n, dtype=torch.bool)  # done: (n,)
    for _ in range(max_new_tokens):
        logits = model(step_input, kv_caches=caches)[:, -1]  # (n, V)
        cdf = torch.softmax(logits / temperature, dim=-1).cumsum(-1)  # (n, V)
        u = torch.rand(n, 1, generator=g, dtype=cdf.dtype) * cdf[:, -1:]  # (n, 1)
        token = torch.searchsorted(cdf, u).clamp(max=cdf.shape[-1] - 1)  # (n, 1)
        out.append(token[:, 0])
        done |= token[:, 0] == eos_id
        step_input = token
        if bool(done.all()):
            break
    model.train(was_training)
    rows = torch.stack(out, dim=1).tolist()  # (n, t)
    return [row[:row.index(eos_id) + 1] if eos_id in row else row for row in rows]


def sample_answers(model: nn.Module, tokenizer: CharTokenizer, template: ChatTemplate, prompt: str, n: int,
                   seed: int = 0, max_new_tokens: int = 40) -> list[str]:
    """``n`` answers of ``model`` to ``prompt`` in ``template``'s format, decoded without the end token. Sampled
    from a float64 copy of the model (:func:`sample_completions`), so the answers are the same on every CPU."""
    import copy

    model64 = copy.deepcopy(model).double()
    eos = tokenizer.token_id(template.eos)
    outs = sample_completions(model64, template.prompt_ids(tokenizer, prompt), n, max_new_tokens, eos, seed=seed)
    return [tokenizer.decode([i for i in o if i != eos]) for o in outs]


def sft_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the supervised (assistant) tokens of ``batch``."""
    return causal_lm_loss(model(batch["input_ids"]), batch["labels"])  # logits (B, T, V)


# ----------------------------------------------------------------------------------------- training
@dataclass(frozen=True)
class SFTConfig:
    """A short full fine-tuning run with AdamW and a constant learning rate after a linear warm-up."""

    steps: int = 60  # optimizer steps
    batch_size: int = 16  # conversations per step
    lr: float = 1e-3  # peak learning rate
    warmup: int = 10  # steps of linear warm-up
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # clip the global gradient norm (0: off)
    min_supervised: float = 0.05  # check_supervision threshold, checked on every batch
    seed: int = 0  # order of the examples

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.warmup < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(f"warmup, weight_decay and grad_clip must be >= 0, got {self.warmup!r}, "
                             f"{self.weight_decay!r}, {self.grad_clip!r}")


def train_sft(model: nn.Module, examples: Sequence[dict[str, list[int]]], pad_id: int, config: SFTConfig
              ) -> list[float]:
    """Fine-tune ``model`` on ``examples`` (from :func:`sft_example`) for ``config.steps`` steps, cycling through
    a seeded permutation; every batch passes :func:`check_supervision`. Returns the loss of every step."""
    if not examples:
        raise ValueError("train_sft needs examples")
    g = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(len(examples), generator=g).tolist()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                            weight_decay=config.weight_decay)
    device = next(model.parameters()).device
    model.train()
    losses, pos = [], 0
    for step in range(config.steps):
        idx = [order[(pos + i) % len(order)] for i in range(config.batch_size)]
        pos += config.batch_size
        batch = collate_sft([examples[i] for i in idx], pad_id)
        check_supervision(batch["labels"], batch["attention_mask"], config.min_supervised)
        batch = {k: v.to(device) for k, v in batch.items()}  # to the model's device (a GPU run: model.to("cuda"))
        for group in opt.param_groups:
            group["lr"] = config.lr * min(1.0, (step + 1) / max(config.warmup, 1))
        loss = sft_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def poetry_sft(config: SFTConfig | None = None, per_form: int = 3000, template: ChatTemplate | None = None):
    """The SFT of section 8.3, as a recipe: ``tang_gpt`` + the chat tokens, fine-tuned on
    :func:`companion.finetuning.tasks.form_tasks` of the training split (``per_form`` of each form).
    Returns ``(model, tokenizer, template, losses)``; the same seeds give the same model."""
    from companion.data import tang_poem_splits
    from companion.finetuning.tasks import form_tasks
    from companion.runtime import seed_everything
    from companion.training.recipes import load_pretrained

    config = config or SFTConfig()
    template = template or ChatTemplate()
    seed_everything(config.seed)
    model, tokenizer, _ = load_pretrained("tang_gpt")
    model, tokenizer = add_special_tokens(model, tokenizer, template.new_tokens)
    tasks = form_tasks(tang_poem_splits()["train"], per_form=per_form, seed=config.seed)
    start, end = template.markers(tokenizer)
    examples = [sft_example(template.encode(tokenizer, t.prompt, t.response), start, end) for t in tasks]
    losses = train_sft(model, examples, tokenizer.token_id("<pad>"), config)
    return model, tokenizer, template, losses
