"""``python -m companion train --config configs/tang_gpt.json``: pretraining from the command line.

The config file gives task, model, data and :class:`TrainConfig`; flags override single ``TrainConfig`` fields
(``dataclasses.replace``, no ``exec``). CPU by default when no GPU is present, the GPU (bf16) when one is.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace
from pathlib import Path

# flag -> (TrainConfig field, type, help)
_OVERRIDES = {
    "--max-steps": ("max_steps", int, "optimizer steps to train for"),
    "--batch-size": ("batch_size", int, "examples per micro-batch"),
    "--grad-accum-steps": ("grad_accum_steps", int, "micro-batches accumulated per optimizer step"),
    "--lr": ("lr", float, "peak learning rate (after warm-up)"),
    "--warmup-steps": ("warmup_steps", int, "linear warm-up steps"),
    "--eval-every": ("eval_every", int, "evaluate every N steps (0: only at the end)"),
    "--checkpoint-every": ("checkpoint_every", int, "save a checkpoint every N steps (0: only at the end)"),
    "--seed": ("seed", int, "seed of the data order, model initialisation and masks"),
    "--device": ("device", str, "cpu, cuda, cuda:1… (default: best available)"),
    "--precision": ("precision", str, "fp32, bf16 or fp16 (default: chosen for the device)"),
    "--out-dir": ("out_dir", str, "run directory for checkpoints, metrics.json and loss_curve.png"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True,
                        help="JSON file with task, model, data and train sections (see configs/)")
    for flag, (_, kind, text) in _OVERRIDES.items():
        parser.add_argument(flag, type=kind, default=None, help=f"{text}; overrides the config file")
    parser.add_argument("--resume", type=Path, default=None,
                        help="continue exactly from this checkpoint or run directory")
    parser.add_argument("--no-progress", action="store_true", help="do not draw the progress bar")
    parser.add_argument("--export", type=Path, default=None,
                        help="write the final model.safetensors, tokenizer.json and config.json to this folder")
    parser.add_argument("--update-manifest", action="store_true",
                        help="with --export inside the checkout's data/: record the exported files in data/manifest.json")


def configure(args: argparse.Namespace):
    """The :class:`RunConfig` of the file with the flags applied."""
    from companion.training.recipes import RunConfig

    config = RunConfig.from_json(args.config)
    changes = {field: getattr(args, flag[2:].replace("-", "_")) for flag, (field, _, _) in _OVERRIDES.items()}
    changes = {k: v for k, v in changes.items() if v is not None}
    if args.no_progress:
        changes["progress"] = False
    return replace(config, train=replace(config.train, **changes))


def main(args: argparse.Namespace) -> int:
    from companion.runtime import seed_everything
    from companion.training.recipes import export_pretrained, prepare
    from companion.training.trainer import Trainer

    import datasets

    datasets.disable_progress_bars()
    config = configure(args)
    seed_everything(config.train.seed)
    run = prepare(config)
    trainer = Trainer(run.model, config.train, run.train_data, run.collate_fn, run.loss_fn, run.eval_data)
    print(f"task {config.task}: {sum(p.numel() for p in run.model.parameters()):,} parameters, "
          f"{len(run.train_data):,} training / {len(run.eval_data):,} validation examples, "
          f"{trainer.precision.name} on {trainer.precision.device}")
    history = trainer.fit(resume_from=args.resume)
    final = history.eval[-1] if history.eval else trainer.evaluate()
    print(json.dumps({"step": trainer.step, "val_loss": round(final["val_loss"], 4), "val_ppl": round(final["val_ppl"], 2)}))
    if args.export is not None:
        info = {"val_loss": final["val_loss"], "steps": trainer.step, "tokens": trainer.tokens,
                "config_file": args.config.as_posix(), "data": asdict(config.data),
                "eval_batch_size": config.train.batch_size, "eval_batches": config.train.eval_batches,
                "seed": config.train.seed}
        paths = export_pretrained(args.export, trainer.model.cpu(), run.tokenizer, config.task, run.model_fields, info)
        if args.update_manifest:
            _record(paths, config)
        print(f"exported to {args.export}")
    return 0


def _record(paths: list[Path], config) -> None:
    from companion.data import checkout_data_dir, describe, load_manifest, write_manifest

    root = checkout_data_dir()
    if root is None:
        raise SystemExit("--update-manifest needs a source checkout with data/manifest.json")
    manifest_path = root / "manifest.json"
    manifest = load_manifest(manifest_path)  # read-modify-write: keep every other entry
    for path in paths:
        try:
            name = path.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            raise SystemExit(f"--update-manifest: {path} is not inside {root}") from None
        manifest[name] = describe(path, name, source=f"trained by `python -m companion train --config "
                                  f"{config_path_hint(paths)}` (companion, this repository)",
                                  license="MIT (weights derived from chinese-poetry, MIT)",
                                  description=f"{config.task} reference model, {path.name}")
    write_manifest(manifest, manifest_path)


def config_path_hint(paths: list[Path]) -> str:
    card = json.loads(paths[-1].read_text(encoding="utf-8"))
    return card.get("config_file", "?")
