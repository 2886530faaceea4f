"""Request bodies of the OpenAI-compatible API (``/v1/completions``, ``/v1/chat/completions``) as pydantic models,
and the OpenAI error object.

Follows the OpenAI API reference (https://platform.openai.com/docs/api-reference): the fields this server
implements are validated here (types strictly: ``"0.5"`` is not a number), the server's own limits
(``max_tokens``, prompt length) in :func:`check_max_tokens` and the engine. Unknown fields are ignored, as the
OpenAI API does for fields it does not use. Only ``n == 1`` is served (one choice per request).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP_STRINGS = 4  # the OpenAI API accepts at most 4 stop sequences


class APIError(Exception):
    """An error the server answers with ``{"error": {"message", "type", "param", "code"}}`` and ``status``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """The OpenAI error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = False  # send one more chunk with the token counts (and empty choices) before [DONE]


class _SamplingRequest(BaseModel):
    """Fields shared by both endpoints."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str  # must be the served model's id (see /v1/models)
    max_tokens: int | None = Field(default=None, ge=1)  # new tokens at most; default: what fits the context
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)  # 0 means greedy decoding
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)  # nucleus sampling; 1 keeps the whole distribution
    n: int = 1  # choices per request; this server serves exactly one
    stop: str | list[str] | None = None  # up to 4 strings that end the text (not included in it)
    stream: bool = False  # answer as server-sent events
    stream_options: StreamOptions | None = None  # only with stream=True
    seed: int | None = None  # seeds sampling (reproducible with the same seed)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"only n=1 is supported by this server, got {n}")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: str | list[str] | None) -> str | list[str] | None:
        strings = [stop] if isinstance(stop, str) else (stop or [])
        if len(strings) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop sequences, got {len(strings)}")
        if any(s == "" for s in strings):
            raise ValueError("stop sequences must be non-empty strings")
        return stop

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingRequest):
    """Body of ``POST /v1/completions``: a text prompt (a string, or a list holding one string)."""

    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str]) -> str | list[str]:
        if isinstance(prompt, list) and len(prompt) != 1:
            raise ValueError(f"only one prompt per request is supported, got a list of {len(prompt)}")
        return prompt

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "user", "assistant"]  # who speaks
    content: str  # what is said (text only)


class ChatCompletionRequest(_SamplingRequest):
    """Body of ``POST /v1/chat/completions``: the conversation so far; ``max_completion_tokens`` (the newer
    name) is accepted as ``max_tokens``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def check_max_tokens(requested: int | None, limit: int) -> None:
    """The server's upper bound on ``max_tokens`` (its ``--max-tokens``); raises a 400 :class:`APIError`."""
    if requested is not None and requested > limit:
        raise APIError(400, f"max_tokens must be at most {limit} on this server, got {requested}",
                       param="max_tokens", code="invalid_value")
