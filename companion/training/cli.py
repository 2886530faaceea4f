"""``python -m companion train --config configs/tang_gpt.json``: pretraining from the command line.

The config file gives task, model, data and :class:`TrainConfig`; flags override single ``TrainConfig`` fields
(``dataclasses.replace``, no ``exec``). CPU by default when no GPU is present, the GPU (bf16) when one is.
Data parallel: ``torchrun --nproc_per_node=N -m companion train --config ... --parallel ddp`` (or ``fsdp``); each
rank takes ``--batch-size`` rows of a global batch N times larger, and only rank 0 prints and writes files.
Bad input (a missing file, ``--max-steps 0``, an unknown precision, a config that does not load) stops before any
work with argparse's one-line ``error:`` and exit status 2: flags are typed, the rest raises ``UsageError``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from dataclasses import asdict, replace
from pathlib import Path

from companion.errors import UsageError
from companion.runtime import PRECISIONS

SCHEDULES = ("cosine", "wsd")  # what companion.training.optim.lr_at accepts (TrainConfig.schedule)
PARALLEL = ("none", "ddp", "fsdp")  # what companion.training.distributed accepts (TrainConfig.parallel)
_DEVICE = re.compile(r"(cpu|mps|cuda(:\d+)?)")  # the device types companion.runtime.choose_device picks from


# ------------------------------------------------------------------ argparse types: each names the bad value
def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def device_name(text: str) -> str:
    if not _DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"must be cpu, mps, cuda or cuda:N, got {text!r}")
    return text


def existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text!r}")
    return path


def existing_path(text: str) -> Path:
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"no such file or directory: {text!r}")
    return path


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


# flag -> (TrainConfig field, argparse type, help); enumerations get ``choices`` (_CHOICES)
_OVERRIDES = {
    "--max-steps": ("max_steps", positive_int, "optimizer steps to train for"),
    "--batch-size": ("batch_size", positive_int, "examples per micro-batch"),
    "--grad-accum-steps": ("grad_accum_steps", positive_int, "micro-batches accumulated per optimizer step"),
    "--lr": ("lr", positive_float, "peak learning rate (after warm-up)"),
    "--warmup-steps": ("warmup_steps", non_negative_int, "linear warm-up steps"),
    "--schedule": ("schedule", str, "learning-rate schedule after the warm-up: cosine or wsd (warmup-stable-decay)"),
    "--z-loss": ("z_loss", non_negative_float, "z-loss coefficient of a causal LM (0: off)"),
    "--eval-every": ("eval_every", non_negative_int, "evaluate every N steps (0: only at the end)"),
    "--checkpoint-every": ("checkpoint_every", non_negative_int, "save a checkpoint every N steps (0: only at the end)"),
    "--seed": ("seed", non_negative_int, "seed of the data order, model initialisation and masks"),
    "--device": ("device", device_name, "cpu, cuda, cuda:1, mps (default: best available)"),
    "--precision": ("precision", str, f"one of {', '.join(PRECISIONS)} (default: chosen for the device)"),
    "--out-dir": ("out_dir", str, "run directory for checkpoints, metrics.json and loss_curve.png"),
    "--parallel": ("parallel", str, "data parallelism under torchrun: none, ddp (DistributedDataParallel) or fsdp "
                   "(FSDP2 fully_shard per block)"),
}
_CHOICES = {"--precision": PRECISIONS, "--parallel": PARALLEL, "--schedule": SCHEDULES}
# switch -> (TrainConfig field set to True, help)
_SWITCHES = {
    "--activation-checkpointing": ("activation_checkpointing", "recompute each Transformer block in backward "
                                   "(less activation memory, about one more forward of compute)"),
    "--compile": ("compile", "run the model through torch.compile"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=existing_file, required=True,
                        help="JSON file with task, model, data and train sections (see configs/)")
    for flag, (_, kind, text) in _OVERRIDES.items():
        parser.add_argument(flag, type=kind, default=None, choices=_CHOICES.get(flag),
                            help=f"{text}; overrides the config file")
    for flag, (_, text) in _SWITCHES.items():
        parser.add_argument(flag, action="store_true", help=f"{text}; overrides the config file")
    parser.add_argument("--resume", type=existing_path, default=None,
                        help="continue exactly from this checkpoint or run directory")
    parser.add_argument("--no-progress", action="store_true", help="do not draw the progress bar")
    parser.add_argument("--export", type=Path, default=None,
                        help="write the final model.safetensors, tokenizer.json and config.json to this folder")
    parser.add_argument("--update-manifest", action="store_true",
                        help="with --export inside the checkout's data/: record the exported files in data/manifest.json")


def configure(args: argparse.Namespace):
    """The :class:`RunConfig` of the file with the flags applied; :class:`UsageError` when the file does not load
    or its values and the flags do not fit together."""
    from companion.training.recipes import RunConfig

    try:
        config = RunConfig.from_json(args.config)
    except (OSError, ValueError, TypeError, KeyError) as e:  # unreadable, not JSON, unknown or missing fields
        raise UsageError(f"--config {args.config}: {type(e).__name__}: {e}") from e
    changes = {field: getattr(args, flag[2:].replace("-", "_")) for flag, (field, _, _) in _OVERRIDES.items()}
    changes = {k: v for k, v in changes.items() if v is not None}
    changes.update({field: True for flag, (field, _) in _SWITCHES.items() if getattr(args, flag[2:].replace("-", "_"))})
    if args.no_progress:
        changes["progress"] = False
    try:
        return replace(config, train=replace(config.train, **changes))
    except ValueError as e:  # e.g. --warmup-steps above the config's max_steps
        raise UsageError(f"--config {args.config} with the flags given: {e}") from e


def check_environment(config, args: argparse.Namespace) -> None:
    """Refuse, before any work, what this machine or checkout cannot do: an absent device, fp16 on the CPU,
    --update-manifest without --export or outside the checkout's data/, --parallel outside torchrun."""
    import os

    from companion.runtime import choose_precision

    try:
        choose_precision(config.train.device, config.train.precision)
    except (ValueError, RuntimeError) as e:
        raise UsageError(f"device {config.train.device!r}, precision {config.train.precision!r}: {e}") from e
    if config.train.parallel != "none" and not {"RANK", "WORLD_SIZE"} <= set(os.environ):
        raise UsageError(f"--parallel {config.train.parallel} needs torchrun: torchrun --nproc_per_node=N "
                         f"-m companion train --config {args.config} --parallel {config.train.parallel}")
    if args.update_manifest:
        if args.export is None:
            raise UsageError("--update-manifest needs --export")
        _data_root(args.export)


def main(args: argparse.Namespace) -> int:
    config = configure(args)
    check_environment(config, args)
    try:
        return _train(config, args)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _train(config, args: argparse.Namespace) -> int:
    from companion.runtime import seed_everything
    from companion.training.checkpoint import load_weights
    from companion.training.distributed import model_state
    from companion.training.recipes import build_model, export_pretrained, prepare, validation_loss
    from companion.training.trainer import Trainer

    import torch

    import datasets

    datasets.disable_progress_bars()
    seed_everything(config.train.seed)  # the same initial weights on every rank
    run = prepare(config)
    n_params = sum(p.numel() for p in run.model.parameters())
    trainer = Trainer(run.model, config.train, run.train_data, run.collate_fn, run.loss_fn, run.eval_data)
    if args.resume is not None:
        trainer.load(args.resume)
    resumed_from = trainer.step  # 0 unless resumed
    main_rank, world = trainer.dist.is_main, trainer.dist.world_size
    if main_rank:
        ranks = f", {config.train.parallel} on {world} ranks" if config.train.parallel != "none" else ""
        print(f"task {config.task}: {n_params:,} parameters, "
              f"{len(run.train_data):,} training / {len(run.eval_data):,} validation examples, "
              f"{trainer.precision.name} on {trainer.precision.device}{ranks}")
    started = time.perf_counter()
    history = trainer.fit()
    seconds = time.perf_counter() - started  # this process's training time (a resumed run: the part after resuming)
    final = history.eval[-1] if history.eval else trainer.evaluate()
    if main_rank:
        print(json.dumps({"step": trainer.step, "val_loss": round(final["val_loss"], 4),
                          "val_ppl": round(final["val_ppl"], 2)}))
    if args.export is not None:
        weights = model_state(trainer.module)  # full weights, gathered from every rank under FSDP
        if main_rank:
            model = build_model(config.task, run.model_fields)
            load_weights(model, weights)
            info = {"steps": trainer.step, "tokens": trainer.tokens,
                    "config_file": args.config.as_posix(), "data": asdict(config.data),
                    "eval_batch_size": config.train.batch_size * world, "eval_batches": config.train.eval_batches,
                    "seed": config.train.seed}
            # the card's val_loss is recomputed on the CPU in fp32 (what load_pretrained users get); the run's own
            # evaluation, in its precision (bf16 autocast on a bf16 CPU or GPU), is kept beside it
            val_loss = validation_loss(model, run.tokenizer, {"task": config.task, **info})
            info = {"val_loss": val_loss, "val_loss_in_run": final["val_loss"], **info,
                    "precision": trainer.precision.name, "device": str(trainer.precision.device),
                    "torch_threads": torch.get_num_threads(), "train_seconds": round(seconds, 1),
                    "resumed_from_step": resumed_from}
            paths = export_pretrained(args.export, model, run.tokenizer, config.task, run.model_fields, info)
            if args.update_manifest:
                _record(paths, config)
            print(f"exported to {args.export}")
    return 0


def _data_root(export: Path) -> Path:
    """The checkout's data/ folder, which must hold ``export``; else :class:`UsageError`."""
    from companion.data import MANIFEST_NAME, checkout_data_dir

    root = checkout_data_dir()
    if root is None:
        raise UsageError(f"--update-manifest needs a source checkout with data/{MANIFEST_NAME}")
    if not export.resolve().is_relative_to(root.resolve()):
        raise UsageError(f"--update-manifest: --export {export} is not inside {root}")
    return root


def _record(paths: list[Path], config) -> None:
    from companion.data import MANIFEST_NAME, describe, load_manifest, write_manifest

    root = _data_root(paths[0].parent)
    manifest_path = root / MANIFEST_NAME
    manifest = load_manifest(manifest_path)  # read-modify-write: keep every other entry
    for path in paths:
        name = path.resolve().relative_to(root.resolve()).as_posix()
        manifest[name] = describe(path, name, source=f"trained by `python -m companion train --config "
                                  f"{config_path_hint(paths)}` (companion, this repository)",
                                  license="MIT (weights derived from chinese-poetry, MIT)",
                                  description=f"{config.task} reference model, {path.name}")
    write_manifest(manifest, manifest_path)


def config_path_hint(paths: list[Path]) -> str:
    card = json.loads(paths[-1].read_text(encoding="utf-8"))
    return card.get("config_file", "?")
