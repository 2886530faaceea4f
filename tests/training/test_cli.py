"""``python -m companion train``: help on every flag, flags mapped onto TrainConfig, a tiny end-to-end run that
exports a model which loads back with one call and reproduces its recorded validation loss."""

import json

import pytest

from companion.__main__ import build_parser, main
from companion.training.cli import configure
from companion.training.recipes import RunConfig, load_pretrained, validation_loss

TINY = {
    "task": "causal_lm",
    "model": {"n_layers": 1, "d_model": 16, "n_heads": 2},
    "data": {"max_chars": 300, "block_size": 16, "max_train_documents": 60, "max_eval_documents": 10},
    "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-2, "eval_batches": 2, "progress": False, "device": "cpu"},
}


def write(tmp_path, config):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(config))
    return path


def test_every_flag_has_help():
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    for action in train._actions:
        assert action.help, action.option_strings


def test_flags_override_the_config_file(tmp_path):
    args = build_parser().parse_args(["train", "--config", str(write(tmp_path, TINY)), "--max-steps", "7",
                                      "--lr", "0.5", "--no-progress"])
    config = configure(args)
    assert (config.train.max_steps, config.train.lr, config.train.batch_size) == (7, 0.5, 4)
    assert config.data.block_size == 16 and config.model["d_model"] == 16


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown sections \\['optimiser'\\]"):
        RunConfig.from_json(write(tmp_path, {**TINY, "optimiser": {}}))
    with pytest.raises(ValueError, match="unexpected keyword argument 'max_step'"):
        RunConfig.from_json(write(tmp_path, {**TINY, "train": {"max_step": 3}}))
    with pytest.raises(ValueError, match="task must be one of"):
        RunConfig.from_json(write(tmp_path, {**TINY, "task": "gpt"}))


@pytest.mark.slow
@pytest.mark.parametrize("task", ["causal_lm", "bert"])
def test_train_export_load(tmp_path, capsys, task):
    config = {**TINY, "task": task}
    if task == "bert":
        config["model"] = {"n_layers": 1, "d_model": 16, "n_heads": 2, "d_ff": 32}
    out = tmp_path / "export"
    assert main(["train", "--config", str(write(tmp_path, config)), "--out-dir", str(tmp_path / "run"),
                 "--export", str(out)]) == 0
    printed = capsys.readouterr().out
    recorded = json.loads(printed.splitlines()[-2])["val_loss"]
    model, tokenizer, card = load_pretrained(out)
    assert card["task"] == task and card["steps"] == 3 and round(card["val_loss"], 4) == recorded
    assert validation_loss(model, tokenizer, card) == pytest.approx(card["val_loss"], abs=1e-5)
    assert (tmp_path / "run" / "LATEST").is_file() and (tmp_path / "run" / "loss_curve.png").is_file()
