"""``python -m companion finetune``: --help lists every flag, bad input ends with one ``error:`` line and status 2,
and short runs of the three recipes write what they promise (a classifier that reloads to the same logits and the
test metrics recomputed from it; an SFT export with the chat tokens that the DPO recipe starts from, where DPO's
held-out accuracy and margin are exactly 0 before training because the policy equals the reference)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from companion.__main__ import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
FLAGS = ["--config", "--steps", "--batch-size", "--lr", "--seed", "--base", "--out-dir", "--no-progress"]


def test_help_lists_every_flag():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "companion", "finetune", "--help"], capture_output=True,
                            text=True, cwd=ROOT, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    for flag in FLAGS:
        assert flag in result.stdout
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["finetune"]
    flags = [a for a in sub._actions if a.option_strings and a.dest != "help"]
    assert sorted(f.option_strings[0] for f in flags) == sorted(FLAGS)
    assert all(a.help for a in flags)


def write(tmp_path: Path, name: str, config: dict) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(config), encoding="utf-8")
    return str(path)


def error_line(capsys, argv) -> str:
    with pytest.raises(SystemExit) as stop:
        main(["finetune", *argv])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("python -m companion finetune: error: "), last
    return last


@pytest.mark.parametrize("config,flags,message", [
    ({"recipe": "rlhf"}, [], "recipe must be one of ('classification', 'sft', 'dpo'), got 'rlhf'"),
    ({"recipe": "sft", "train": {}}, [], "unknown keys ['train'] for recipe 'sft'"),
    ({"recipe": "sft", "sft": {"stepz": 3}}, [], "unexpected keyword argument 'stepz'"),
    ({"recipe": "classification", "classifier": {"mode": "prefix"}}, [], "mode must be one of"),
    ({"recipe": "classification", "data": {"max_rows": 3}}, [], "data accepts max_train and max_eval"),
    ({"recipe": "classification", "train": {"warmup_steps": 50}}, ["--steps", "10"], "with the flags given"),
    ({"recipe": "dpo"}, [], "base 'tang_gpt' has no chat tokens ['<user>', '<assistant>']"),
    ({"recipe": "sft", "base": "no/such/dir"}, [], "base 'no/such/dir': not an exported model"),
])
def test_bad_config_exits_2_with_one_error_line(capsys, tmp_path, config, flags, message):
    path = write(tmp_path, "bad.json", config)
    last = error_line(capsys, ["--config", path, "--out-dir", str(tmp_path / "out"), *flags])
    assert message in last, last


@pytest.mark.parametrize("argv,message", [
    (["--config", "configs/no_such.json"], "argument --config: no such file: 'configs/no_such.json'"),
    (["--config", "configs/finetune_poetry_sft.json", "--steps", "0"], "argument --steps: must be a positive integer"),
    (["--config", "configs/finetune_poetry_sft.json", "--lr", "-1"], "argument --lr: must be a positive finite"),
    (["--config", "README.md"], "JSONDecodeError"),
])
def test_bad_flags_exit_2(capsys, tmp_path, argv, message):
    last = error_line(capsys, [*argv, "--out-dir", str(tmp_path / "out")])
    assert message in last, last


@pytest.mark.parametrize("name,recipe", [("finetune_sentiment_lora.json", "classification"),
                                         ("finetune_poetry_sft.json", "sft"), ("finetune_poetry_dpo.json", "dpo")])
def test_shipped_configs_load(name, recipe):
    from companion.finetuning.cli import load_config

    assert load_config(ROOT / "configs" / name).recipe == recipe


def test_classification_run_saves_a_classifier_that_reloads(capsys, tmp_path):
    from companion.data import load_reviews
    from companion.finetuning import ClassificationCollator, accuracy_and_macro_f1, load_classifier, predict
    from companion.training.recipes import load_pretrained

    config = {"recipe": "classification", "classifier": {"mode": "lora", "lora": {"rank": 2, "alpha": 4}},
              "data": {"max_train": 64, "max_eval": 32},
              "train": {"max_steps": 2, "batch_size": 8, "eval_every": 1, "device": "cpu", "precision": "fp32"}}
    out = tmp_path / "clf"
    assert main(["finetune", "--config", write(tmp_path, "c.json", config), "--out-dir", str(out),
                 "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert printed["trainable_parameters"] < printed["parameters"] and printed["best_step"] in (1, 2)
    backbone, tok, _ = load_pretrained("tang_gpt")
    model = load_classifier(backbone, out / "classifier.safetensors")
    collate = ClassificationCollator(tok.encode, model.n_ctx, pad_id=tok.token_id("<pad>"))
    test = accuracy_and_macro_f1(*predict(model, load_reviews("test"), collate), 2)
    assert printed["test_accuracy"] == round(test["accuracy"], 4)
    assert printed["test_macro_f1"] == round(test["macro_f1"], 4)


def test_sft_export_then_dpo(capsys, tmp_path):
    from companion.training.recipes import load_pretrained

    sft = {"recipe": "sft", "per_form": 40, "lora": {"rank": 2, "alpha": 4},
           "sft": {"steps": 2, "batch_size": 4, "warmup": 1}}
    assert main(["finetune", "--config", write(tmp_path, "s.json", sft), "--out-dir", str(tmp_path / "sft")]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["examples"] == 80 and printed["trainable_parameters"] < printed["parameters"]
    model, tok, card = load_pretrained(tmp_path / "sft")
    assert {"<user>", "<assistant>"} <= set(tok.special_tokens) and card["recipe"] == "sft"
    assert not any("lora" in name for name, _ in model.named_parameters())  # merged and unloaded before export
    assert model.config.vocab_size == tok.vocab_size

    dpo = {"recipe": "dpo", "base": str(tmp_path / "sft"), "per_form": 8, "held_out": 4,
           "dpo": {"steps": 1, "batch_size": 4}}
    assert main(["finetune", "--config", write(tmp_path, "d.json", dpo), "--out-dir", str(tmp_path / "dpo")]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["pairs"] == 16 and printed["held_out_pairs"] == 8
    assert printed["before"]["accuracy"] == 0.0 and printed["before"]["margin"] == 0.0  # policy == reference
    after, _, _ = load_pretrained(tmp_path / "dpo")
    changed = [not torch.equal(a, b) for a, b in zip(after.state_dict().values(), model.state_dict().values())]
    assert any(changed)
