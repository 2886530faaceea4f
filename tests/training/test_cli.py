"""``python -m companion train``: help on every flag, flags mapped onto TrainConfig, a tiny end-to-end run that
exports a model which loads back with one call and reproduces its recorded validation loss."""

import json

import pytest
import torch

from companion.__main__ import build_parser, main
from companion.training.cli import configure
from companion.training.recipes import RunConfig, load_pretrained, validation_loss

TINY = {
    "task": "causal_lm",
    "model": {"n_layers": 1, "d_model": 16, "n_heads": 2},
    "data": {"max_chars": 300, "block_size": 16, "max_train_documents": 60, "max_eval_documents": 10},
    "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-2, "eval_batches": 2, "progress": False, "device": "cpu",
              "precision": "fp32"},
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


def test_schedule_and_z_loss_flags(tmp_path):
    args = build_parser().parse_args(["train", "--config", str(write(tmp_path, TINY)), "--schedule", "wsd",
                                      "--z-loss", "1e-4"])
    config = configure(args)
    assert (config.train.schedule, config.train.z_loss) == ("wsd", 1e-4)
    assert config.train.optimizer().schedule == "wsd"
    plain = configure(build_parser().parse_args(["train", "--config", str(write(tmp_path, TINY))]))
    assert (plain.train.schedule, plain.train.z_loss) == ("cosine", 0.0)  # defaults: what the configs had before


def test_resumed_wsd_run_with_a_shorter_length_equals_a_fresh_run(tmp_path, capsys):
    # WSD is constant until its decay begins: a run started for 12 steps, resumed from step 4 with --max-steps 8
    # (decay from step 6 on), exports the same model as a run configured for 8 steps from the start
    config = {**TINY, "train": {**TINY["train"], "max_steps": 12, "schedule": "wsd", "decay_fraction": 0.25,
                                "warmup_steps": 2, "checkpoint_every": 4, "keep_checkpoints": 5}}
    path = str(write(tmp_path, config))
    main(["train", "--config", path, "--out-dir", str(tmp_path / "long"), "--max-steps", "12"])
    assert main(["train", "--config", path, "--out-dir", str(tmp_path / "long"), "--max-steps", "8",
                 "--resume", str(tmp_path / "long" / "step-00000004"), "--export", str(tmp_path / "a")]) == 0
    assert main(["train", "--config", path, "--max-steps", "8", "--export", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    (ma, _, card_a), (mb, _, card_b) = load_pretrained(tmp_path / "a"), load_pretrained(tmp_path / "b")
    assert all(torch.equal(p, q) for p, q in zip(ma.parameters(), mb.parameters()))
    assert (card_a["resumed_from_step"], card_b["resumed_from_step"], card_a["steps"]) == (4, 0, 8)
    assert card_a["precision"] == "fp32" and card_a["train_seconds"] >= 0


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


def _usage_error(capsys, argv) -> str:
    """Run ``python -m companion`` in-process; it must stop like argparse: SystemExit(2), one error line."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("python -m companion train: error: ")
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize(("flags", "message"), [
    ([], "the following arguments are required: --config"),
    (["--max-steps", "0"], "argument --max-steps: must be a positive integer, got '0'"),
    (["--batch-size", "-4"], "argument --batch-size: must be a positive integer, got '-4'"),
    (["--grad-accum-steps", "2.5"], "argument --grad-accum-steps: must be an integer, got '2.5'"),
    (["--warmup-steps", "-1"], "argument --warmup-steps: must be an integer >= 0, got '-1'"),
    (["--eval-every", "-2"], "argument --eval-every: must be an integer >= 0, got '-2'"),
    (["--seed", "-1"], "argument --seed: must be an integer >= 0, got '-1'"),
    (["--lr", "-0.1"], "argument --lr: must be a positive finite number, got '-0.1'"),
    (["--lr", "nan"], "argument --lr: must be a positive finite number, got 'nan'"),
    (["--lr", "fast"], "argument --lr: must be a number, got 'fast'"),
    (["--precision", "fp64"], "argument --precision: invalid choice: 'fp64'"),
    (["--device", "tpu"], "argument --device: must be cpu, mps, cuda or cuda:N, got 'tpu'"),
    (["--resume", "no/such/run"], "argument --resume: no such file or directory: 'no/such/run'"),
    (["--parallel", "zero3"], "argument --parallel: invalid choice: 'zero3'"),
    (["--schedule", "linear"], "argument --schedule: invalid choice: 'linear'"),
    (["--z-loss", "nan"], "argument --z-loss: must be a finite number >= 0, got 'nan'"),
])
def test_bad_flags_end_with_a_usage_error(tmp_path, capsys, flags, message):
    config = [] if not flags else ["--config", str(write(tmp_path, TINY))]
    assert message in _usage_error(capsys, ["train", *config, *flags])


def test_bad_config_files_end_with_a_usage_error(tmp_path, capsys):
    assert "argument --config: no such file: " in _usage_error(capsys, ["train", "--config", str(tmp_path / "x.json")])
    (tmp_path / "broken.json").write_text("{not json")
    assert "JSONDecodeError" in _usage_error(capsys, ["train", "--config", str(tmp_path / "broken.json")])
    line = _usage_error(capsys, ["train", "--config", str(write(tmp_path, {**TINY, "optimiser": {}}))])
    assert "unknown sections ['optimiser']" in line
    line = _usage_error(capsys, ["train", "--config", str(write(tmp_path, {**TINY, "task": "gpt"}))])
    assert "task must be one of" in line
    # each value is fine alone; together they are not (warm-up longer than the run)
    line = _usage_error(capsys, ["train", "--config", str(write(tmp_path, TINY)), "--warmup-steps", "10"])
    assert "warmup_steps=10, decay_steps=3" in line


def test_unusable_device_or_manifest_target_ends_with_a_usage_error(tmp_path, capsys):
    config = ["train", "--config", str(write(tmp_path, TINY))]
    assert "fp16 autocast on the CPU" in _usage_error(capsys, [*config, "--device", "cpu", "--precision", "fp16"])
    assert "--update-manifest needs --export" in _usage_error(capsys, [*config, "--update-manifest"])
    line = _usage_error(capsys, [*config, "--export", str(tmp_path / "out"), "--update-manifest"])
    assert f"--export {tmp_path / 'out'} is not inside" in line or "needs a source checkout" in line
    if not torch.cuda.is_available():
        assert "CUDA is not available" in _usage_error(capsys, [*config, "--device", "cuda"])


def test_enumerated_flags_have_choices():
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    precision = next(a for a in train._actions if "--precision" in a.option_strings)
    assert tuple(precision.choices) == ("fp32", "bf16", "fp16")
    parallel = next(a for a in train._actions if "--parallel" in a.option_strings)
    assert tuple(parallel.choices) == ("none", "ddp", "fsdp")


def test_parallel_and_switches_map_onto_the_config(tmp_path, monkeypatch):
    path = str(write(tmp_path, TINY))
    config = configure(build_parser().parse_args(["train", "--config", path]))
    train = config.train
    assert (train.parallel, train.activation_checkpointing, train.compile) == ("none", False, False)
    args = build_parser().parse_args(["train", "--config", path, "--parallel", "fsdp", "--activation-checkpointing",
                                      "--compile"])
    config = configure(args)
    assert (config.train.parallel, config.train.activation_checkpointing, config.train.compile) == ("fsdp", True, True)


def test_parallel_outside_torchrun_ends_with_a_usage_error(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    line = _usage_error(capsys, ["train", "--config", str(write(tmp_path, TINY)), "--parallel", "ddp"])
    assert "--parallel ddp needs torchrun: torchrun --nproc_per_node=N -m companion train" in line


def test_the_fsdp_config_is_tang_gpt_split_over_two_ranks():
    from dataclasses import asdict

    one, fsdp = RunConfig.from_json("configs/tang_gpt.json"), RunConfig.from_json("configs/tang_gpt_fsdp.json")
    assert (fsdp.train.parallel, fsdp.train.activation_checkpointing) == ("fsdp", True)
    assert fsdp.train.batch_size * 2 == one.train.batch_size  # 2 ranks: the same global batch
    differ = {k for k, v in asdict(fsdp.train).items() if asdict(one.train)[k] != v}
    assert differ == {"batch_size", "parallel", "activation_checkpointing"}
    assert (fsdp.model, fsdp.data) == (one.model, one.data)
