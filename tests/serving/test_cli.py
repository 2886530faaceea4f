"""``python -m companion serve`` end to end: the real tang_gpt in a subprocess on loopback, called with the
openai client, stopped with SIGTERM; bad flags end as argparse ends them."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from companion.__main__ import main
from companion.serving import free_port, wait_healthy
from companion.training.recipes import load_pretrained

from .conftest import reference_text

ROOT = Path(__file__).resolve().parents[2]


def test_serve_tang_gpt_in_a_subprocess(tmp_path):
    port = free_port()
    log = (tmp_path / "server.log").open("w")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "companion", "serve", "--checkpoint", "tang_gpt", "--port",
                                str(port), "--max-tokens", "32", "--threads", "1"], stdout=log,
                               stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", timeout=60)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=30)
        result = client.completions.create(model="tang_gpt", prompt="床前明月光，", max_tokens=24, temperature=0)
        model, tokenizer, _ = load_pretrained("tang_gpt")
        prompt_ids = [tokenizer.token_id("<eos>"), *tokenizer.encode("床前明月光，")]
        assert result.choices[0].text == reference_text(model, tokenizer, prompt_ids, 24)
        with pytest.raises(openai.BadRequestError) as no_chat:  # tang_gpt was never chat-trained
            client.chat.completions.create(model="tang_gpt", messages=[{"role": "user", "content": "春"}])
        assert no_chat.value.code == "no_chat_template"
        with pytest.raises(openai.BadRequestError, match="at most 32"):
            client.completions.create(model="tang_gpt", prompt="春", max_tokens=33)
    finally:
        process.terminate()
        code = process.wait(timeout=30)
        log.close()
    text = (tmp_path / "server.log").read_text()
    # uvicorn shuts down cleanly on SIGTERM, then re-raises the signal (exit status -15)
    assert code in (0, -signal.SIGTERM) and "Application shutdown complete" in text, text
    assert "Traceback" not in text


@pytest.mark.parametrize("argv, message", [
    (["serve", "--port", "70000"], "must be a TCP port 1..65535"),
    (["serve", "--max-tokens", "0"], "must be a positive integer"),
    (["serve", "--checkpoint", "no/such/dir"], "neither tang_gpt, smollm2 nor an exported folder"),
])
def test_bad_flags_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2 and message in capsys.readouterr().err
