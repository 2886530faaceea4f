"""``python -m companion evaluate``: --help lists every flag, bad input ends with one ``error:`` line and status
2, and a small run prints and writes the same JSON as calling the package directly."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from companion.__main__ import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
FLAGS = ["--checkpoint", "--split", "--poems", "--window", "--stride", "--questions", "--choices", "--bootstrap",
         "--seed", "--output"]


def test_help_lists_every_flag():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "companion", "evaluate", "--help"], capture_output=True,
                            text=True, cwd=ROOT, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    for flag in FLAGS:
        assert flag in result.stdout
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["evaluate"]
    flags = [a for a in sub._actions if a.option_strings and a.dest != "help"]
    assert sorted(f.option_strings[0] for f in flags) == sorted(FLAGS)
    assert all(a.help for a in flags)


@pytest.mark.parametrize("argv,message", [
    (["--window", "65"], "--window must be in 2..64 (the model's context length), got 65"),
    (["--window", "16", "--stride", "17"], "--stride must be <= --window (16), got 17"),
    (["--checkpoint", "tang_bert"], "is a 'bert' model; evaluate needs a causal language model"),
    (["--checkpoint", "no/such/dir"], "--checkpoint no/such/dir: not an exported model"),
    (["--choices", "1"], "--choices must be >= 2, got 1"),
    (["--poems", "0"], "argument --poems: must be a positive integer, got '0'"),
])
def test_bad_input_exits_2_with_one_error_line(capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        main(["evaluate", *argv])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("python -m companion evaluate: error: ") and message in last, last


def test_small_run_matches_the_package(capsys, tmp_path):
    out = tmp_path / "result.json"
    argv = ["evaluate", "--poems", "3", "--questions", "8", "--bootstrap", "50", "--window", "32",
            "--output", str(out)]
    assert main(argv) == 0
    import torch

    assert torch.is_grad_enabled()  # the command leaves autograd as it found it (callers share the process)
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text(encoding="utf-8"))

    from companion import load_pretrained, tang_poem_splits
    from companion.evaluation import evaluate_perplexity, next_line_questions, score_multiple_choice

    model, tok, _ = load_pretrained("tang_gpt")
    poems = tang_poem_splits()["test"]["text"]
    ppl = evaluate_perplexity(model, tok.encode, poems[:3], 32, 16, prefix_ids=[tok.token_id("<eos>")])
    p = printed["perplexity"]
    assert (p["window"], p["stride"], p["tokens"]) == (32, 16, ppl.tokens)
    assert p["perplexity"] == pytest.approx(ppl.perplexity, rel=1e-6)
    assert p["bits_per_character"] == pytest.approx(ppl.nll / math.log(2) / sum(map(len, poems[:3])), rel=1e-6)
    n_bytes = sum(len(t.encode("utf-8")) for t in poems[:3])  # 3 per Chinese character, 1 per newline
    assert p["bits_per_byte"] == pytest.approx(ppl.nll / math.log(2) / n_bytes, rel=1e-6)
    mc = printed["multiple_choice"]
    items = next_line_questions(poems, 8, 4, seed=0)
    scores = score_multiple_choice(model, tok.encode, items, 64, prefix_ids=[tok.token_id("<eos>")])
    assert mc["chance"] == 0.25 and mc["questions"] == 8
    assert mc["acc"] == scores.accuracy() and mc["acc_norm_chars"] == scores.accuracy("chars")
    assert mc["acc_ci95"][0] <= mc["acc"] <= mc["acc_ci95"][1]
