"""Concurrency: a bounded load of parallel clients gets, for each request, exactly what greedy decoding gives for
that prompt alone; a client that disconnects mid-stream frees the worker; a full queue answers 429."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx

from companion.serving import EngineConfig

from .conftest import ALPHABET, MODEL_ID, Slowed, reference_text, serve

CLIENTS, PER_CLIENT, MAX_TOKENS = 8, 4, 10


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def first_data_line(lines) -> str:
    while not (line := next(lines)).startswith("data: "):
        pass
    return line


def test_concurrent_clients_each_get_their_own_answer(server, tiny):
    thread, engine = server
    model, tokenizer = tiny
    prompts = [ALPHABET[i:i + 3 + i % 4] for i in range(CLIENTS * PER_CLIENT)]  # 32 distinct prompts
    assert len(set(prompts)) == len(prompts)
    expected = {p: reference_text(model, tokenizer, engine.codec.encode(p), MAX_TOKENS) for p in prompts}

    def one_client(k: int) -> list[tuple[str, int, str]]:
        results = []
        with httpx.Client(base_url=thread.url, timeout=60) as http:
            for prompt in prompts[k::CLIENTS]:
                body = {"model": MODEL_ID, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
                if k % 2:  # half the clients stream
                    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                        text = "".join(json.loads(line[6:])["choices"][0]["text"]
                                       for line in r.iter_lines() if line.startswith("data: {"))
                        results.append((prompt, r.status_code, text))
                else:
                    r = http.post("/v1/completions", json=body)
                    results.append((prompt, r.status_code, r.json()["choices"][0]["text"]))
        return results

    with ThreadPoolExecutor(CLIENTS) as pool:
        results = [x for rs in pool.map(one_client, range(CLIENTS), timeout=120) for x in rs]
    assert len(results) == CLIENTS * PER_CLIENT
    assert [s for _, s, _ in results] == [200] * len(results)
    assert {p: t for p, _, t in results} == expected
    assert wait_until(lambda: engine.pending == 0, 5)


def test_client_disconnect_mid_stream_frees_the_worker(tiny):
    slow = Slowed(tiny[0], delay=0.05)  # 40 tokens would take >= 2 s
    thread, engine = serve(lambda: (slow.model, tiny[1]))
    with thread:
        assert engine.wait_ready(30)
        body = {"model": MODEL_ID, "prompt": "春", "max_tokens": 40, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{thread.url}/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")  # opening chunk
            assert '"text"' in first_data_line(lines)  # a token (not an error) has been generated
        # the connection is closed after about two tokens
        assert wait_until(lambda: engine.pending == 0, 1.5), "the cancelled request still holds the worker"
        calls = slow.calls
        assert calls < 20, f"{calls} forward calls: the generation was not stopped"
        ok = httpx.post(f"{thread.url}/v1/completions", json={**body, "stream": False, "max_tokens": 3}, timeout=30)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 3, ok.text
        assert engine.pending == 0


def test_full_queue_answers_429_and_recovers(tiny):
    slow = Slowed(tiny[0], delay=0.05)
    thread, engine = serve(lambda: (slow.model, tiny[1]), EngineConfig(max_tokens=48, queue_size=1))
    with thread:
        assert engine.wait_ready(30)
        body = {"model": MODEL_ID, "prompt": "春", "max_tokens": 30, "temperature": 0}
        with httpx.stream("POST", f"{thread.url}/v1/completions", json={**body, "stream": True}, timeout=30) as r:
            lines = r.iter_lines()
            next(lines)
            assert '"text"' in first_data_line(lines)  # the first request is running in the worker
            waiting = threading.Thread(target=httpx.post, args=(f"{thread.url}/v1/completions",),
                                       kwargs={"json": {**body, "max_tokens": 2}, "timeout": 30})
            waiting.start()  # the second one fills the queue
            assert wait_until(lambda: engine.pending == 2, 5)
            full = httpx.post(f"{thread.url}/v1/completions", json=body, timeout=30)
            assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full"
        waiting.join(30)
        assert wait_until(lambda: engine.pending == 0, 5)
        assert httpx.post(f"{thread.url}/v1/completions", json={**body, "max_tokens": 2}, timeout=30).status_code == 200
