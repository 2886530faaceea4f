"""The serving engine: a model, its tokenizer and chat template, and one worker thread that runs requests from a
bounded queue, one at a time, with :func:`companion.inference.decoding.stream`.

Design (a minimal version of what vLLM/TGI do without batching): requests wait in a ``queue.Queue`` of fixed size
(full: the server answers 429); the worker decodes one token at a time and, between tokens, checks the request's
cancel flag, so a client that disconnects frees the worker at the next token. Text leaves the engine through
:class:`TextAssembler`, which never emits half a UTF-8 character (byte-level BPE can split one over two tokens)
and holds back the end of the text while it could still become a stop string.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from companion.serving.schemas import APIError

REPLACEMENT = "\ufffd"  # what a decoder gives for an incomplete UTF-8 sequence


@dataclass(frozen=True)
class EngineConfig:
    """Limits of one server."""

    max_tokens: int = 256  # largest max_tokens a request may ask for
    max_prompt_tokens: int | None = None  # longest prompt in tokens; None: the model's context minus one
    queue_size: int = 16  # requests waiting (not counting the one running) before the server answers 429

    def __post_init__(self) -> None:
        for name in ("max_tokens", "queue_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1 or None, got {self.max_prompt_tokens}")


class Codec:
    """Text <-> ids for one tokenizer: the book's :class:`~companion.CharTokenizer` (with ``<eos>`` as the start
    of every text, as in pretraining, and :class:`~companion.finetuning.sft.ChatTemplate` when the tokenizer has
    its ``<user>``/``<assistant>`` tokens) or a Hugging Face tokenizer (its own chat template)."""

    def __init__(self, tokenizer: Any) -> None:
        from companion.tokenization import CharTokenizer

        self.tokenizer = tokenizer
        self.is_char = isinstance(tokenizer, CharTokenizer)
        if self.is_char:
            from companion.finetuning.sft import ChatTemplate

            eos = tokenizer.special_tokens.get("<eos>")
            self.eos_ids: tuple[int, ...] = () if eos is None else (eos,)
            self.bos_ids: list[int] = [] if eos is None else [eos]
            template = ChatTemplate()
            has_chat = all(t in tokenizer.special_tokens for t in template.new_tokens)
            self.char_template = template if has_chat and eos is not None else None
        else:
            eos = tokenizer.eos_token_id
            self.eos_ids = () if eos is None else (int(eos),)
            self.bos_ids = []
            self.char_template = None

    def encode(self, text: str) -> list[int]:
        """Ids of a completion prompt (``<eos>`` first for the character tokenizer); 400 for unknown characters."""
        try:
            if self.is_char:
                return [*self.bos_ids, *self.tokenizer.encode(text)]
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        except ValueError as e:
            raise APIError(400, f"cannot tokenize the prompt: {e}", param="prompt", code="invalid_value") from None

    def decode(self, ids: Sequence[int]) -> str:
        if self.is_char:
            return self.tokenizer.decode([i for i in ids if i not in self.tokenizer.special_tokens.values()])
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    @property
    def has_chat_template(self) -> bool:
        return self.char_template is not None or bool(getattr(self.tokenizer, "chat_template", None))

    def chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Ids of the conversation followed by the start of the assistant's turn."""
        if not self.has_chat_template:
            raise APIError(400, "this model has no chat template (it was not chat-trained); use /v1/completions",
                           param="messages", code="no_chat_template")
        try:
            if self.char_template is not None:
                if len(messages) != 1 or messages[0]["role"] != "user":
                    raise APIError(400, "this model's chat template has exactly one user message, got roles "
                                   f"{[m['role'] for m in messages]}", param="messages", code="invalid_value")
                return self.char_template.prompt_ids(self.tokenizer, messages[0]["content"])
            text = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        except ValueError as e:
            raise APIError(400, f"cannot tokenize the messages: {e}", param="messages", code="invalid_value") from None


class TextAssembler:
    """Turns generated ids into text deltas: decodes all ids so far, holds back a trailing incomplete UTF-8
    character and any suffix that is the start of a stop string; cuts the text before the first stop string."""

    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = ()) -> None:
        self.decode, self.stop = decode, tuple(stop)
        self.ids: list[int] = []
        self.sent = 0  # characters already handed out
        self.stopped = False  # a stop string was found

    def add(self, token_id: int) -> str:
        """The new text that is safe to hand out after ``token_id``."""
        self.ids.append(token_id)
        text = self.decode(self.ids).rstrip(REPLACEMENT)
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._take(text[:min(hits)])
        hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return self._take(text[:len(text) - hold])

    def flush(self) -> str:
        """The rest of the text at the end of generation (no stop string can complete any more)."""
        return "" if self.stopped else self._take(self.decode(self.ids))

    def _take(self, text: str) -> str:
        delta = text[self.sent:]
        self.sent = max(self.sent, len(text))
        return delta


@dataclass
class Job:
    """One request in the engine: prompt ids, decoding settings, stop strings, and where its events go.
    ``emit`` receives ``("text", str)`` for each delta and finally ``("done", finish_reason, usage)`` or
    ``("error", message)``; it is called from the worker thread."""

    prompt_ids: list[int]
    max_tokens: int
    emit: Callable[..., None]
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))
    cancelled: threading.Event = field(default_factory=threading.Event)


class Engine:
    """Loads the model in the background (``start``), then serves :class:`Job` objects in submission order.

    ``loader()`` returns ``(model, tokenizer)``; the model is any causal LM of the decoding contract
    (``config.n_ctx``, ``config.n_layers``)."""

    def __init__(self, loader: Callable[[], tuple[torch.nn.Module, Any]], model_id: str,
                 config: EngineConfig = EngineConfig()) -> None:
        self.loader, self.model_id, self.config = loader, model_id, config
        self.model: torch.nn.Module | None = None
        self.codec: Codec | None = None
        self.load_error: str | None = None
        self._ready = threading.Event()
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=config.queue_size)
        self._lock = threading.Lock()
        self._active = 0
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start loading and the worker (both in daemon threads); returns at once."""
        for target, name in ((self._load, "engine-load"), (self._work, "engine-worker")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel what is queued, let the running request see its cancel flag, stop the worker."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancelled.set()
                self._finish(job, ("error", "server shutting down"))
        self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout)

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self.load_error is None

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout) and self.load_error is None

    @property
    def pending(self) -> int:
        """Requests queued or running."""
        with self._lock:
            return self._active

    @property
    def n_ctx(self) -> int:
        assert self.model is not None
        return int(self.model.config.n_ctx)

    # ------------------------------------------------------------------ requests
    def budget(self, prompt_ids: Sequence[int], max_tokens: int | None, param: str) -> int:
        """The number of new tokens for a prompt: ``max_tokens`` or what fits the context (at most the server's
        limit); 400 ``context_length_exceeded`` as in the OpenAI API when prompt + max_tokens do not fit."""
        n_ctx, n = self.n_ctx, len(prompt_ids)
        max_prompt = min(self.config.max_prompt_tokens or n_ctx - 1, n_ctx - 1)
        if n > max_prompt:
            raise APIError(400, f"the prompt has {n} tokens, more than this server's limit of {max_prompt} "
                           f"(the model's context is {n_ctx} tokens)", param=param, code="context_length_exceeded")
        if max_tokens is None:
            return min(self.config.max_tokens, n_ctx - n)
        if n + max_tokens > n_ctx:
            raise APIError(400, f"this model's maximum context length is {n_ctx} tokens, but you requested "
                           f"{n + max_tokens} tokens ({n} in the prompt, {max_tokens} for the completion)",
                           param=param, code="context_length_exceeded")
        return max_tokens

    def submit(self, job: Job) -> None:
        """Queue a job; 503 while loading, 429 when the queue is full."""
        if not self.ready:
            raise APIError(503, "the model is not ready: " + (self.load_error or "still loading"),
                           type="server_error", code="model_not_ready")
        with self._lock:
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                raise APIError(429, f"the server's queue is full ({self.config.queue_size} requests waiting); "
                               "retry later", type="rate_limit_error", code="queue_full") from None
            self._active += 1

    # ------------------------------------------------------------------ threads
    def _load(self) -> None:
        try:
            model, tokenizer = self.loader()
            self.model, self.codec = model.eval(), Codec(tokenizer)
        except Exception as e:  # noqa: BLE001 - reported by /health and every request, the server keeps running
            self.load_error = f"{type(e).__name__}: {e}"
        self._ready.set()

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            try:
                if job.cancelled.is_set():
                    self._finish(job, ("error", "cancelled"))
                else:
                    self._finish(job, self._run(job))
            except Exception as e:  # noqa: BLE001 - one failing request must not stop the worker
                self._finish(job, ("error", f"{type(e).__name__}: {e}"))

    def _finish(self, job: Job, event: tuple) -> None:
        with self._lock:
            self._active -= 1
        job.emit(*event)

    def _run(self, job: Job) -> tuple:
        from companion.inference.decoding import GenerationConfig, stream

        assert self.model is not None and self.codec is not None
        sample = job.temperature > 0
        config = GenerationConfig(max_new_tokens=job.max_tokens, do_sample=sample,
                                  temperature=job.temperature if sample else 1.0,
                                  top_p=job.top_p if sample and job.top_p < 1 else None,
                                  eos_token_id=self.codec.eos_ids or None, seed=job.seed)
        text = TextAssembler(self.codec.decode, job.stop)
        n_new, finish = 0, "length"
        with torch.inference_mode():
            ids = torch.tensor([job.prompt_ids], dtype=torch.long)  # (1, T)
            for token in stream(self.model, ids, config):
                if job.cancelled.is_set():
                    return ("error", "cancelled")
                if token in self.codec.eos_ids:
                    finish = "stop"
                    break
                n_new += 1
                if delta := text.add(int(token)):
                    job.emit("text", delta)
                if text.stopped:
                    finish = "stop"
                    break
            else:
                finish = "length" if n_new >= job.max_tokens else "stop"
        if rest := text.flush():
            job.emit("text", rest)
        usage = {"prompt_tokens": len(job.prompt_ids), "completion_tokens": n_new,
                 "total_tokens": len(job.prompt_ids) + n_new}
        return ("done", finish, usage)
