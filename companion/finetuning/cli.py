"""``python -m companion finetune --config configs/finetune_sentiment_lora.json``: chapter 8's recipes from a config.

Three recipes, chosen by the config's ``recipe`` field:

- ``classification``: a :class:`SequenceClassifier` (full / head / LoRA) on a pretrained backbone, trained on the
  review sentiment data with :class:`companion.Trainer`, early stopping on validation macro-F1 with the best weights
  restored; writes ``classifier.safetensors`` (only what training changed) and ``metrics.json`` (test accuracy and
  macro-F1).
- ``sft``: instruction tuning of the poetry model on the form tasks (:func:`companion.finetuning.sft.poetry_sft`'s
  data and template), optionally with LoRA (merged before export); writes an exported model directory that
  ``load_pretrained`` and the ``dpo`` recipe read.
- ``dpo``: DPO on the broken-form preference pairs, from an exported SFT model (``base``), with a frozen copy of it
  as the reference; writes the exported policy and the held-out preference metrics before and after.

Flags override single fields of the recipe's training section (``dataclasses.replace``). Bad input (a missing file,
an unknown recipe or field, ``--steps 0``) stops before any work with argparse's one-line ``error:`` and status 2.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from companion.errors import UsageError
from companion.training.cli import existing_file, non_negative_int, positive_float, positive_int

RECIPES = ("classification", "sft", "dpo")
_SECTION = {"classification": "train", "sft": "sft", "dpo": "dpo"}  # the training section of each recipe
_KEYS = {  # the keys a config may have, per recipe
    "classification": {"comment", "recipe", "base", "classifier", "data", "train"},
    "sft": {"comment", "recipe", "base", "per_form", "lora", "sft"},
    "dpo": {"comment", "recipe", "base", "per_form", "held_out", "dpo"},
}
# flag -> (field name in the recipe's training section, type, help)
_OVERRIDES = {
    "--steps": ("steps", positive_int, "optimizer steps (TrainConfig.max_steps for classification)"),
    "--batch-size": ("batch_size", positive_int, "examples (conversations, preference pairs) per step"),
    "--lr": ("lr", positive_float, "peak learning rate"),
    "--seed": ("seed", non_negative_int, "seed of the data order and of the new weights"),
}


@dataclass(frozen=True)
class FinetuneConfig:
    """A parsed config file: the recipe, its base model and its sections (validated dataclasses)."""

    recipe: str  # one of RECIPES
    base: str  # a reference checkpoint name ("tang_gpt") or an exported model directory
    sections: dict[str, Any] = field(default_factory=dict)  # recipe-specific: classifier/train, sft/lora, dpo


def load_config(path: Path) -> FinetuneConfig:
    """Read and validate a config file; :class:`UsageError` naming the file and the problem otherwise."""
    from companion.finetuning.classification import ClassifierConfig
    from companion.finetuning.dpo import DPOConfig
    from companion.finetuning.lora import LoRAConfig
    from companion.finetuning.sft import SFTConfig
    from companion.training.trainer import TrainConfig

    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UsageError(f"--config {path}: {type(e).__name__}: {e}") from e
    if not isinstance(raw, dict):
        raise UsageError(f"--config {path}: expected a JSON object, got {type(raw).__name__}")
    recipe = raw.get("recipe")
    if recipe not in RECIPES:
        raise UsageError(f"--config {path}: recipe must be one of {RECIPES}, got {recipe!r}")
    unknown = sorted(set(raw) - _KEYS[recipe])
    if unknown:
        raise UsageError(f"--config {path}: unknown keys {unknown} for recipe {recipe!r} (allowed: "
                         f"{sorted(_KEYS[recipe])})")

    def lora(value: dict | None) -> LoRAConfig | None:
        if value is None:
            return None
        return LoRAConfig.from_dict(value)

    try:
        if recipe == "classification":
            clf = dict(raw.get("classifier", {}))
            clf["lora"] = lora(clf.get("lora"))
            train = dict(raw.get("train", {}))
            train.setdefault("metric", "macro_f1")
            train.setdefault("mode", "max")
            train.setdefault("restore_best", True)
            data = {"max_train": None, "max_eval": None, **raw.get("data", {})}
            if set(data) - {"max_train", "max_eval"}:
                raise ValueError(f"data accepts max_train and max_eval, got {sorted(data)}")
            sections = {"classifier": ClassifierConfig(**clf), "train": TrainConfig(**train), "data": data}
        elif recipe == "sft":
            sections = {"sft": SFTConfig(**raw.get("sft", {})), "lora": lora(raw.get("lora")),
                        "per_form": int(raw.get("per_form", 3000))}
        else:
            sections = {"dpo": DPOConfig(**raw.get("dpo", {})), "per_form": int(raw.get("per_form", 1000)),
                        "held_out": int(raw.get("held_out", 200))}
    except (TypeError, ValueError) as e:  # unknown or bad fields of a section
        raise UsageError(f"--config {path}: {type(e).__name__}: {e}") from e
    return FinetuneConfig(recipe=recipe, base=str(raw.get("base", "tang_gpt")), sections=sections)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=existing_file, required=True,
                        help=f"JSON file with a recipe ({', '.join(RECIPES)}), a base model and its sections "
                             "(see configs/finetune_*.json)")
    for flag, (_, kind, text) in _OVERRIDES.items():
        parser.add_argument(flag, type=kind, default=None, help=f"{text}; overrides the config file")
    parser.add_argument("--base", default=None,
                        help="base model: a reference name (tang_gpt) or an exported directory; overrides the config")
    parser.add_argument("--out-dir", type=Path, required=True,
                        help="folder for the result: classifier.safetensors or an exported model, and metrics.json")
    parser.add_argument("--no-progress", action="store_true", help="do not draw the progress bar (classification)")


def configure(args: argparse.Namespace) -> FinetuneConfig:
    """The config file with the flags applied."""
    config = load_config(args.config)
    if args.base is not None:
        config = replace(config, base=args.base)
    section = _SECTION[config.recipe]
    changes = {name: getattr(args, flag[2:].replace("-", "_")) for flag, (name, _, _) in _OVERRIDES.items()}
    changes = {k: v for k, v in changes.items() if v is not None}
    if config.recipe == "classification" and "steps" in changes:
        changes["max_steps"] = changes.pop("steps")
    if config.recipe == "classification":
        changes["progress"] = not args.no_progress and config.sections["train"].progress
    try:
        updated = replace(config.sections[section], **changes)
    except ValueError as e:  # e.g. --steps below the config's warm-up
        raise UsageError(f"--config {args.config} with the flags given: {e}") from e
    return replace(config, sections={**config.sections, section: updated})


def main(args: argparse.Namespace) -> int:
    config = configure(args)
    if args.out_dir.exists() and not args.out_dir.is_dir():
        raise UsageError(f"--out-dir {args.out_dir} exists and is not a directory")
    from companion.training.checkpoint import CheckpointError
    from companion.training.recipes import load_pretrained

    try:
        model, tokenizer, card = load_pretrained(config.base)
    except (CheckpointError, OSError) as e:
        raise UsageError(f"base {config.base!r}: {e}") from e
    args.out_dir.mkdir(parents=True, exist_ok=True)
    run = {"classification": _classification, "sft": _sft, "dpo": _dpo}[config.recipe]
    started = time.perf_counter()
    metrics = run(config, model, tokenizer, card, args.out_dir)
    metrics = {"recipe": config.recipe, "base": config.base, **metrics,
               "seconds": round(time.perf_counter() - started, 1)}
    (args.out_dir / "metrics.json").write_text(json.dumps(metrics, ensure_ascii=False, indent=1) + "\n",
                                               encoding="utf-8")
    print(json.dumps(metrics, ensure_ascii=False))
    return 0


def _subset(dataset, n: int | None):
    return dataset if n is None or n >= len(dataset) else dataset.select(range(n))


def _classification(config: FinetuneConfig, backbone, tokenizer, card, out_dir: Path) -> dict[str, Any]:
    import datasets

    from companion.data import load_reviews
    from companion.finetuning.classification import (ClassificationCollator, SequenceClassifier,
                                                     accuracy_and_macro_f1, classification_eval_fn,
                                                     classification_loss, predict, save_classifier)
    from companion.finetuning.lora import count_trainable
    from companion.runtime import seed_everything
    from companion.training.trainer import Trainer

    datasets.disable_progress_bars()
    s = config.sections
    train_cfg = s["train"]
    seed_everything(train_cfg.seed)
    model = SequenceClassifier(backbone, s["classifier"])
    reviews = load_reviews()
    train = _subset(reviews["train"].shuffle(seed=train_cfg.seed), s["data"]["max_train"])
    val = _subset(reviews["validation"], s["data"]["max_eval"])
    collate = ClassificationCollator(tokenizer.encode, model.n_ctx, pad_id=tokenizer.token_id("<pad>"))
    trainer = Trainer(model, train_cfg, train, collate, classification_loss,
                      eval_fn=classification_eval_fn(val, collate, s["classifier"].num_labels))
    trainer.fit()
    path = save_classifier(trainer.module, out_dir / "classifier.safetensors")
    test = accuracy_and_macro_f1(*predict(trainer.module, reviews["test"], collate), s["classifier"].num_labels)
    trainable, total = count_trainable(trainer.module)
    return {"mode": s["classifier"].mode, "trainable_parameters": trainable, "parameters": total,
            "best_step": trainer.best_step, "best_val_macro_f1": round(trainer.best_metric, 4),
            "steps": trainer.step, "test_accuracy": round(test["accuracy"], 4),
            "test_macro_f1": round(test["macro_f1"], 4), "saved": str(path)}


def _export(out_dir: Path, model, tokenizer, card, info: dict[str, Any]) -> None:
    from companion.training.recipes import export_pretrained

    fields = {**card["model"], "vocab_size": model.config.vocab_size}
    export_pretrained(out_dir, model, tokenizer, card["task"], fields, info)


def _form_adherence(model, tokenizer, template, n: int = 64, seed: int = 0) -> dict[str, float]:
    """Share of ``n`` sampled answers per form that follow the requested form (temperature 1)."""
    from companion.finetuning.sft import sample_completions
    from companion.finetuning.tasks import FORM_PROMPTS, follows_form

    rates = {}
    for form, prompt in FORM_PROMPTS.items():
        start = template.prompt_ids(tokenizer, prompt)
        eos = tokenizer.token_id("<eos>")
        rows = sample_completions(model, start, n, model.config.n_ctx - len(start) + 1, eos, seed=seed)
        texts = [tokenizer.decode([t for t in row if t != eos]) for row in rows]
        rates[f"form_{form}"] = round(sum(follows_form(t, form) for t in texts) / n, 4)
    return rates


def _sft(config: FinetuneConfig, model, tokenizer, card, out_dir: Path) -> dict[str, Any]:
    from companion.data import tang_poem_splits
    from companion.finetuning.lora import apply_lora, count_trainable, merge_lora, unload_lora
    from companion.finetuning.sft import ChatTemplate, add_special_tokens, sft_example, train_sft
    from companion.finetuning.tasks import form_tasks
    from companion.runtime import seed_everything

    s = config.sections
    seed_everything(s["sft"].seed)
    template = ChatTemplate()
    model, tokenizer = add_special_tokens(model, tokenizer, template.new_tokens)
    if s["lora"] is not None:
        apply_lora(model, s["lora"])
    trainable, total = count_trainable(model)
    tasks = form_tasks(tang_poem_splits()["train"], per_form=s["per_form"], seed=s["sft"].seed)
    start, end = template.markers(tokenizer)
    examples = [sft_example(template.encode(tokenizer, t.prompt, t.response), start, end) for t in tasks]
    losses = train_sft(model, examples, tokenizer.token_id("<pad>"), s["sft"])
    if s["lora"] is not None:
        unload_lora(merge_lora(model))  # plain nn.Linear layers again, with the update merged in
    info = {"finetuned_from": config.base, "recipe": "sft", "steps": s["sft"].steps, "examples": len(examples)}
    _export(out_dir, model, tokenizer, card, info)
    return {"trainable_parameters": trainable, "parameters": total, "examples": len(examples),
            "first_loss": round(losses[0], 3), "last_loss": round(losses[-1], 3),
            **_form_adherence(model, tokenizer, template), "exported": str(out_dir)}


def _dpo(config: FinetuneConfig, model, tokenizer, card, out_dir: Path) -> dict[str, Any]:
    import copy

    from companion.data import tang_poem_splits
    from companion.finetuning.dpo import evaluate_pairs, train_dpo
    from companion.finetuning.sft import ChatTemplate
    from companion.finetuning.tasks import form_tasks, preference_pairs
    from companion.runtime import seed_everything

    s = config.sections
    template = ChatTemplate()
    missing = [t for t in template.new_tokens if t not in tokenizer.special_tokens]
    if missing:
        raise UsageError(f"base {config.base!r} has no chat tokens {missing}: DPO starts from a model exported "
                         "by the sft recipe (python -m companion finetune --config configs/finetune_poetry_sft.json)")
    seed_everything(s["dpo"].seed)
    splits = tang_poem_splits()

    def encoded(rows, per_form, seed):
        pairs = preference_pairs(form_tasks(rows, per_form=per_form, seed=seed), seed=seed)
        chosen = [_pair_row(template, tokenizer, p.prompt, p.chosen) for p in pairs]
        rejected = [_pair_row(template, tokenizer, p.prompt, p.rejected) for p in pairs]
        return chosen, rejected

    chosen, rejected = encoded(splits["train"], s["per_form"], s["dpo"].seed)
    held_c, held_r = encoded(splits["validation"], s["held_out"], s["dpo"].seed)
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    pad = tokenizer.token_id("<pad>")
    before = evaluate_pairs(model, reference, held_c, held_r, pad, beta=s["dpo"].beta)
    train_dpo(model, chosen, rejected, pad, s["dpo"], reference=reference)
    after = evaluate_pairs(model, reference, held_c, held_r, pad, beta=s["dpo"].beta)
    info = {"finetuned_from": config.base, "recipe": "dpo", "steps": s["dpo"].steps, "pairs": len(chosen)}
    _export(out_dir, model, tokenizer, card, info)
    keep = ("accuracy", "margin", "chosen_logp", "rejected_logp")
    return {"pairs": len(chosen), "held_out_pairs": len(held_c),
            "before": {k: round(before[k], 4) for k in keep}, "after": {k: round(after[k], 4) for k in keep},
            **_form_adherence(model, tokenizer, template), "exported": str(out_dir)}


def _pair_row(template, tokenizer, prompt: str, response: str) -> dict[str, list[int]]:
    from companion.finetuning.sft import sft_example

    start, end = template.markers(tokenizer)
    return sft_example(template.encode(tokenizer, prompt, response), start, end)


__all__ = ["RECIPES", "FinetuneConfig", "add_arguments", "configure", "load_config", "main"]
