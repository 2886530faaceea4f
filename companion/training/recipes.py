"""Pretraining recipes: what ``python -m companion train --config file.json`` builds from a config file —
corpus, tokenizer, model and loss — for the two tasks of chapter 6:

* ``causal_lm``: a GPT-2 style model on Tang poems, character tokenizer, packed blocks (GPT, Radford et al., 2018);
* ``bert``: a BERT encoder on Tang poems with masked LM + next-sentence prediction (Devlin et al., 2019); the
  "sentences" are a poem's lines, a "document" is one poem.

A finished run is exported as ``model.safetensors`` + ``tokenizer.json`` + ``config.json`` and loaded back with
:func:`load_pretrained` (one call).
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_model
from torch import nn

from companion.objectives import MaskingConfig, bert_pretraining_loss, mask_tokens, nsp_pairs
from companion.pipeline import CausalLMCollator, PackConfig, PairCollator, tokenize_and_pack
from companion.tokenization import CharTokenizer, load_tokenizer
from companion.training.checkpoint import WEIGHTS, CheckpointError, load_weights
from companion.training.trainer import TrainConfig

TASKS = ("causal_lm", "bert")
GPT_SPECIALS = ("<pad>", "<unk>", "<eos>")
BERT_SPECIALS = ("<pad>", "<unk>", "<cls>", "<sep>", "<mask>")
TOKENIZER, CARD = "tokenizer.json", "config.json"  # beside the weights (WEIGHTS) in an exported model
EXPORTED = (WEIGHTS, TOKENIZER, CARD)  # the files of an exported model, in this order


@dataclass(frozen=True)
class DataConfig:
    """Which corpus and how to cut it."""

    corpus: str = "tang"  # only Tang poems for now (companion.data.tang_poem_splits)
    max_chars: int = 3000  # character vocabulary: the most frequent characters of the training split
    block_size: int = 64  # tokens per training example (T)
    max_train_documents: int | None = None  # use only the first poems (None: all)
    max_eval_documents: int | None = 400  # validation poems used for evaluation


@dataclass(frozen=True)
class RunConfig:
    """A config file: ``{"task": ..., "model": {...}, "data": {...}, "train": {...}}``."""

    task: str  # "causal_lm" or "bert"
    model: dict[str, Any] = field(default_factory=dict)  # GPTConfig / BertConfig fields (vocab_size, n_ctx filled in)
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")

    @classmethod
    def from_json(cls, path: str | Path) -> RunConfig:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        unknown = set(raw) - {"task", "model", "data", "train", "comment"}
        if unknown:
            raise ValueError(f"{path}: unknown sections {sorted(unknown)}")
        train = dict(raw.get("train", {}))
        if "betas" in train:
            train["betas"] = tuple(train["betas"])
        try:
            return cls(raw["task"], raw.get("model", {}), DataConfig(**raw.get("data", {})), TrainConfig(**train))
        except TypeError as e:  # an unknown field name
            raise ValueError(f"{path}: {e}") from e


def build_model(task: str, model_fields: dict[str, Any]) -> nn.Module:
    from companion.models import GPT, BertConfig, BertForPreTraining, GPTConfig

    if task == "causal_lm":
        return GPT(GPTConfig(**model_fields))
    return BertForPreTraining(BertConfig(**model_fields))


# ----------------------------------------------------------------------------------- losses and collators
def causal_lm_step(model: nn.Module, batch: dict[str, torch.Tensor], z_loss: float = 0.0) -> torch.Tensor:
    """`causal_lm_loss` of the model's logits, computed by the model's fused head (``labels=``: no (B, T, V) logits)."""
    return model(batch["input_ids"], labels=batch["labels"], z_loss=z_loss)


def bert_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    mlm_logits, nsp_logits = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    return bert_pretraining_loss(mlm_logits, batch["mlm_labels"], nsp_logits, batch["labels"])


@dataclass(frozen=True)
class BertPretrainingCollator:
    """NSP rows -> ``<cls> A <sep> B <sep>`` (:class:`PairCollator`), then BERT masking (:func:`mask_tokens`).
    Masks draw from the global torch RNG, which checkpoints save and restore."""

    pairs: PairCollator
    mask_id: int
    vocab_size: int
    special_ids: tuple[int, ...]
    masking: MaskingConfig = MaskingConfig()

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.pairs(rows)
        batch["input_ids"], batch["mlm_labels"] = mask_tokens(batch["input_ids"], self.mask_id, self.vocab_size,
                                                              self.special_ids, batch["attention_mask"], self.masking)
        return batch


# ----------------------------------------------------------------------------------- data
@dataclass
class Prepared:
    """Everything a run needs besides the TrainConfig."""

    model: nn.Module
    tokenizer: CharTokenizer
    train_data: list
    eval_data: list
    collate_fn: Any
    loss_fn: Any
    model_fields: dict[str, Any]


def examples(task: str, tok: CharTokenizer, texts: list[str], block_size: int, seed: int) -> list[dict]:
    """Training rows: packed blocks of ``block_size`` tokens (causal LM; poems separated by ``<eos>``) or NSP
    pairs of poem lines (BERT; pairs drawn with ``random.Random(seed)``)."""
    if task == "causal_lm":
        import datasets

        pack = PackConfig(block_size=block_size, separator_id=tok.token_id("<eos>"))
        packed = tokenize_and_pack(datasets.Dataset.from_dict({"text": list(texts)}), tok, pack)
        return [{"input_ids": r} for r in packed["input_ids"]]
    docs = [[tok.encode(line) for line in t.split("\n") if line] for t in texts]
    return nsp_pairs(docs, random.Random(seed))


def collator(task: str, tok: CharTokenizer, block_size: int):
    if task == "causal_lm":
        return CausalLMCollator(tok.token_id("<pad>"))
    ids = {s: tok.token_id(s) for s in BERT_SPECIALS}
    return BertPretrainingCollator(PairCollator(ids["<cls>"], ids["<sep>"], ids["<pad>"], max_length=block_size),
                                   ids["<mask>"], tok.vocab_size, tuple(ids.values()))


LOSSES = {"causal_lm": causal_lm_step, "bert": bert_step}


def loss_function(task: str, z_loss: float = 0.0):
    """The ``loss_fn(model, batch)`` of ``task``; ``z_loss`` > 0 (causal LM only) adds the z-loss."""
    if not z_loss:
        return LOSSES[task]
    if task != "causal_lm":
        raise ValueError(f"z_loss is implemented for task 'causal_lm' only, got task {task!r} with z_loss={z_loss!r}")
    return functools.partial(causal_lm_step, z_loss=z_loss)


def prepare(config: RunConfig) -> Prepared:
    """Corpus -> tokenizer -> examples -> model, as the config says (deterministic: no RNG but seeded ones)."""
    from companion.data import tang_poem_splits

    if config.data.corpus != "tang":
        raise ValueError(f"data.corpus must be 'tang', got {config.data.corpus!r}")
    splits = tang_poem_splits()
    train_texts = splits["train"]["text"][: config.data.max_train_documents]
    eval_texts = splits["validation"]["text"][: config.data.max_eval_documents]
    specials = GPT_SPECIALS if config.task == "causal_lm" else BERT_SPECIALS
    tok = CharTokenizer.train(train_texts, special_tokens=list(specials), max_size=config.data.max_chars)
    T, seed = config.data.block_size, config.train.seed
    fields = {**config.model, "vocab_size": tok.vocab_size, "n_ctx": max(T, config.model.get("n_ctx", T))}
    torch.manual_seed(seed)  # model initialisation
    model = build_model(config.task, fields)
    return Prepared(model, tok, examples(config.task, tok, train_texts, T, seed),
                    examples(config.task, tok, eval_texts, T, seed + 1), collator(config.task, tok, T),
                    loss_function(config.task, config.train.z_loss), fields)


def validation_loss(model: nn.Module, tokenizer: CharTokenizer, card: dict[str, Any]) -> float:
    """Recompute, on the CPU in fp32, the validation loss recorded in an exported model's ``card`` (same
    examples, batches and evaluation masks as the run's last evaluation)."""
    from companion.data import tang_poem_splits
    from companion.training.trainer import Trainer

    data = DataConfig(**card["data"])
    texts = tang_poem_splits()["validation"]["text"][: data.max_eval_documents]
    rows = examples(card["task"], tokenizer, texts, data.block_size, card["seed"] + 1)
    config = TrainConfig(batch_size=card["eval_batch_size"], eval_batches=card["eval_batches"], seed=card["seed"],
                         device="cpu", precision="fp32", progress=False, max_steps=1)
    trainer = Trainer(model, config, rows, collator(card["task"], tokenizer, data.block_size), LOSSES[card["task"]],
                      eval_data=rows)
    return trainer.evaluate()["val_loss"]


# ----------------------------------------------------------------------------------- export / load
def export_pretrained(directory: str | Path, model: nn.Module, tokenizer: CharTokenizer, task: str,
                      model_fields: dict[str, Any], info: dict[str, Any]) -> list[Path]:
    """Write ``model.safetensors``, ``tokenizer.json`` and ``config.json`` (task, model fields, ``info`` such as
    the validation loss); returns the three paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_model(model, str(directory / WEIGHTS))
    tokenizer.save(directory / TOKENIZER)
    card = {"task": task, "model": model_fields, **info}
    (directory / CARD).write_text(json.dumps(card, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return [directory / n for n in EXPORTED]


REFERENCE_MODELS = {"tang_gpt": "checkpoints/tang_gpt", "tang_bert": "checkpoints/tang_bert"}


def load_pretrained(name_or_dir: str | Path) -> tuple[nn.Module, CharTokenizer, dict[str, Any]]:
    """``model, tokenizer, card = load_pretrained("tang_gpt")``: a reference checkpoint of ``data/``
    (verified against the manifest) or an exported directory. The model is in eval mode, on the CPU."""
    if str(name_or_dir) in REFERENCE_MODELS:
        from companion.data import data_path

        base = REFERENCE_MODELS[str(name_or_dir)]
        files = {n: data_path(f"{base}/{n}") for n in EXPORTED}
    else:
        directory = Path(name_or_dir)
        files = {n: directory / n for n in EXPORTED}
        missing = [str(p) for p in files.values() if not p.is_file()]
        if missing:
            raise CheckpointError(f"not an exported model (missing {missing}); reference names: {sorted(REFERENCE_MODELS)}")
    card = json.loads(files[CARD].read_text(encoding="utf-8"))
    model = build_model(card["task"], card["model"])
    load_weights(model, load_file(str(files[WEIGHTS])), source=files[WEIGHTS])
    return model.eval(), load_tokenizer(files[TOKENIZER]), card
