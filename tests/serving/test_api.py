"""The OpenAI-compatible API over real HTTP on loopback: the official openai client (streaming and not, both
endpoints), the SSE wire format, error objects for bad requests (and the server keeps going), /health, /v1/models."""

import json

import httpx2 as httpx
import openai
import pytest

from .conftest import MODEL_ID, reference_text, serve

PROMPT = "床前明月光"


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=30)


def sse_events(response: httpx.Response) -> list[str]:
    """The ``data:`` payloads of a server-sent event stream; every event is one line and a blank line."""
    body = response.read().decode("utf-8")
    blocks = body.split("\n\n")
    assert blocks[-1] == "", "the stream must end with a blank line"
    assert all(b.startswith("data: ") and "\n" not in b for b in blocks[:-1]), blocks
    return [b[len("data: "):] for b in blocks[:-1]]


def test_completion_with_the_openai_client_equals_greedy_decoding(server, tiny):
    thread, engine = server
    model, tokenizer = tiny
    result = client(thread.url).completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=20, temperature=0)
    expected = reference_text(model, tokenizer, engine.codec.encode(PROMPT), 20)
    assert result.choices[0].text == expected
    assert result.object == "text_completion" and result.model == MODEL_ID
    assert result.usage.prompt_tokens == 1 + len(PROMPT)  # <eos> + one token per character
    assert result.choices[0].finish_reason == ("length" if result.usage.completion_tokens == 20 else "stop")

    chunks = list(client(thread.url).completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=20,
                                                        temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == result.choices[0].finish_reason
    assert len({c.id for c in chunks}) == 1


def test_chat_with_the_openai_client_uses_the_chat_template(server, tiny):
    thread, engine = server
    model, tokenizer = tiny
    messages = [{"role": "user", "content": "春眠"}]
    ids = engine.codec.chat(messages)
    assert tokenizer.decode(ids) == "<eos><user>春眠<assistant>"
    expected = reference_text(model, tokenizer, ids, 16)
    result = client(thread.url).chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=16,
                                                        temperature=0)
    assert result.choices[0].message.role == "assistant" and result.choices[0].message.content == expected
    assert result.usage.prompt_tokens == len(ids)
    chunks = list(client(thread.url).chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=16,
                                                             temperature=0, stream=True,
                                                             stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == result.usage.completion_tokens


def test_sse_wire_format(server):
    thread, _ = server
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "月"}], "max_tokens": 5, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", f"{thread.url}/v1/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    for c in chunks:
        assert set(c) >= {"id", "object", "created", "model", "choices"}
        assert c["object"] == "chat.completion.chunk" and c["model"] == MODEL_ID and c["id"].startswith("chatcmpl-")
        assert len(c["choices"]) == 1 and c["choices"][0]["index"] == 0
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(set(c["choices"][0]["delta"]) == {"content"} for c in chunks[1:-1])
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")

    text_body = {"model": MODEL_ID, "prompt": "月", "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{thread.url}/v1/completions", json=text_body, timeout=30) as response:
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    assert {json.loads(e)["object"] for e in events[:-1]} == {"text_completion"}


def test_stop_strings_cut_the_text(server, tiny):
    thread, engine = server
    model, tokenizer = tiny
    full = reference_text(model, tokenizer, engine.codec.encode(PROMPT), 20)
    stop = full[3:5]  # two characters the model is known to produce
    result = client(thread.url).completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=20, temperature=0,
                                                   stop=[stop])
    assert result.choices[0].text == full[:full.index(stop)] and result.choices[0].finish_reason == "stop"


def test_sampling_with_a_seed_is_reproducible(server):
    thread, _ = server
    kwargs = dict(model=MODEL_ID, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=7)
    texts = [client(thread.url).completions.create(**kwargs).choices[0].text for _ in range(2)]
    assert texts[0] == texts[1]


BAD_REQUESTS = [
    ("/v1/completions", b'{"model": "tiny-gpt", "prompt": ', 400, None, None),
    ("/v1/completions", {"model": "nope", "prompt": "a"}, 404, "model", "model_not_found"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "a", "temperature": 5}, 400, "temperature", "invalid_value"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "a", "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "a", "max_tokens": 49}, 400, "max_tokens", "invalid_value"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "月" * 64}, 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "月" * 40, "max_tokens": 30}, 400, "prompt",
     "context_length_exceeded"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": 5}, 400, "prompt", "invalid_value"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "a", "stream": "yes"}, 400, "stream", "invalid_value"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "a", "n": 3}, 400, "n", "invalid_value"),
    ("/v1/completions", {"prompt": "a"}, 400, "model", "invalid_value"),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": "hi"}, 400, "messages", "invalid_value"),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": [{"role": "user", "content": "a"}] * 2}, 400,
     "messages", "invalid_value"),
    ("/v1/nothing", {}, 404, None, "not_found"),
]


@pytest.mark.parametrize("path, body, status, param, code", BAD_REQUESTS)
def test_bad_requests_get_openai_error_objects_and_the_server_keeps_going(server, path, body, status, param, code):
    thread, engine = server
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{thread.url}{path}", content=content, headers={"content-type": "application/json"},
                          timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["code"] == code
    if body == BAD_REQUESTS[0][1]:
        assert "not valid JSON" in error["message"]
    ok = httpx.post(f"{thread.url}/v1/completions", json={"model": MODEL_ID, "prompt": "春", "max_tokens": 2},
                    timeout=30)
    assert ok.status_code == 200 and engine.pending == 0


def test_openai_client_raises_its_typed_errors(server):
    thread, _ = server
    with pytest.raises(openai.NotFoundError, match="does not exist") as missing:
        client(thread.url).completions.create(model="nope", prompt="a")
    assert missing.value.code == "model_not_found" and missing.value.param == "model"
    with pytest.raises(openai.BadRequestError, match="context") as overflow:
        client(thread.url).completions.create(model=MODEL_ID, prompt="月" * 64)
    assert overflow.value.code == "context_length_exceeded"


def test_models_endpoint(server):
    thread, _ = server
    assert [m.id for m in client(thread.url).models.list()] == [MODEL_ID]
    assert client(thread.url).models.retrieve(MODEL_ID).id == MODEL_ID


def test_health_is_503_while_loading_then_200(tiny, gate):
    def loader():
        assert gate.wait(30)
        return tiny

    thread, engine = serve(loader)
    with thread:
        health = httpx.get(f"{thread.url}/health", timeout=10)
        assert health.status_code == 503 and health.json()["status"] == "loading"
        early = httpx.post(f"{thread.url}/v1/completions", json={"model": MODEL_ID, "prompt": "a"}, timeout=10)
        assert early.status_code == 503 and early.json()["error"]["code"] == "model_not_ready"
        assert [m["id"] for m in httpx.get(f"{thread.url}/v1/models", timeout=10).json()["data"]] == [MODEL_ID]
        gate.set()
        assert engine.wait_ready(30)
        assert httpx.get(f"{thread.url}/health", timeout=10).status_code == 200


def test_a_loader_that_fails_is_reported_by_health():
    def loader():
        raise FileNotFoundError("no weights here")

    thread, engine = serve(loader)
    with thread:
        engine.wait_ready(30)
        health = httpx.get(f"{thread.url}/health", timeout=10)
        assert health.status_code == 503 and "no weights here" in health.json()["error"]
