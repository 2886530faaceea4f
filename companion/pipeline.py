"""From a text ``datasets.Dataset`` to training batches: tokenize and pack into fixed blocks with a batched
``Dataset.map`` (the ``group_texts`` recipe of Hugging Face's ``run_clm.py``), then a seeded ``DataLoader``
with a collator for causal LM, masked LM (BERT's 80/10/10, Devlin et al., 2019) or sequence pairs.

Fingerprints are computed from the input's fingerprint, the tokenizer's JSON state and the settings, so they
(and the cache file names under ``cache_dir``) are identical on every machine and every run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from companion.objectives import IGNORE_INDEX, MaskingConfig, mask_tokens
from companion.tokenization.base import Tokenizer, pad_rows


def _tokenizer_hash(tokenizer: Tokenizer) -> str:
    state = json.dumps({"kind": tokenizer.kind, **tokenizer.to_dict()}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(state.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class PackConfig:
    """How :func:`tokenize_and_pack` cuts a corpus into blocks."""

    block_size: int = 128  # tokens per block (T)
    text_column: str = "text"  # column holding the raw text
    separator_id: int | None = None  # appended after every document (e.g. <|endoftext|>); None = nothing
    batch_size: int = 1000  # documents per map batch; the leftover tokens of each batch are dropped

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {self.block_size!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")


class _Packer:
    """The batched map function: tokenize, join with the separator, cut into full blocks."""

    def __init__(self, tokenizer: Tokenizer, config: PackConfig) -> None:
        self.tokenizer, self.config = tokenizer, config

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        texts = batch[self.config.text_column]
        encode_many = getattr(self.tokenizer, "encode_many", None)
        rows = encode_many(texts) if encode_many else [self.tokenizer.encode(t) for t in texts]
        stream: list[int] = []
        for row in rows:
            stream.extend(row)
            if self.config.separator_id is not None:
                stream.append(self.config.separator_id)
        T = self.config.block_size
        n = len(stream) // T
        return {"input_ids": [stream[i * T:(i + 1) * T] for i in range(n)]}


def pack_fingerprint(dataset, tokenizer: Tokenizer, config: PackConfig) -> str:
    """The fingerprint of the packed dataset: a function of the input's fingerprint, tokenizer and config."""
    key = f"{dataset._fingerprint}:{_tokenizer_hash(tokenizer)}:{config!r}"
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def tokenize_and_pack(dataset, tokenizer: Tokenizer, config: PackConfig = PackConfig(),
                      cache_dir: str | Path | None = None):
    """A dataset with one column ``input_ids`` of ``config.block_size`` tokens per row.

    With ``cache_dir`` the result is written to (and later read back from) ``cache_dir/packed-<fp>.arrow``.
    """
    if config.text_column not in dataset.column_names:
        raise ValueError(f"column {config.text_column!r} not in the dataset; it has {dataset.column_names}")
    fingerprint = pack_fingerprint(dataset, tokenizer, config)
    cache_file = None
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        cache_file = str(Path(cache_dir) / f"packed-{fingerprint}.arrow")
    return dataset.map(_Packer(tokenizer, config), batched=True, batch_size=config.batch_size,
                       remove_columns=dataset.column_names, new_fingerprint=fingerprint,
                       cache_file_name=cache_file, load_from_cache_file=cache_file is not None,
                       desc=None)


@dataclass(frozen=True)
class CausalLMCollator:
    """Rows ``{"input_ids": [...]}`` -> ``input_ids``, ``attention_mask``, ``labels`` (all (B, T)).

    ``labels`` equal ``input_ids`` with padding set to -100; the model shifts them by one (the Hugging Face
    convention), so position t is trained to predict token t+1.
    """

    pad_id: int = 0  # id written into padded positions (masked out of attention and loss)

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        input_ids, mask = pad_rows([e["input_ids"] for e in examples], self.pad_id)  # (B, T) each
        labels = input_ids.masked_fill(mask == 0, IGNORE_INDEX)  # (B, T)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


@dataclass(frozen=True)
class MaskedLMCollator:
    """Pad rows, then BERT's masking (:func:`companion.objectives.mask_tokens`): choose ``probability`` of the
    non-special, non-padding tokens; of those 80% -> ``mask_id``, 10% -> a random token, 10% unchanged.
    ``labels`` hold the original id at chosen positions, -100 elsewhere."""

    mask_id: int  # id of [MASK]
    vocab_size: int  # random replacements are drawn from [0, vocab_size) minus special ids
    pad_id: int = 0  # padding id
    special_ids: tuple[int, ...] = ()  # never chosen for masking (e.g. [CLS], [SEP], [PAD])
    probability: float = 0.15  # fraction of tokens to predict
    generator: torch.Generator | None = None  # seeded generator for reproducible masks

    def __post_init__(self) -> None:
        if not 0 < self.probability < 1:
            raise ValueError(f"probability must be in (0, 1), got {self.probability!r}")
        if not 0 <= self.mask_id < self.vocab_size:
            raise ValueError(f"mask_id {self.mask_id!r} is outside the vocabulary [0, {self.vocab_size})")

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        input_ids, mask = pad_rows([e["input_ids"] for e in examples], self.pad_id)  # (B, T) each
        corrupted, labels = mask_tokens(input_ids, self.mask_id, self.vocab_size, self.special_ids, mask,
                                        MaskingConfig(probability=self.probability), self.generator)  # (B, T) each
        return {"input_ids": corrupted, "attention_mask": mask, "labels": labels}


@dataclass(frozen=True)
class PairCollator:
    """Rows ``{"first": ids, "second": ids, "label": int}`` -> ``[CLS] first [SEP] second [SEP]`` with
    ``token_type_ids`` 0/1, ``attention_mask`` and ``labels`` (B,). Longest-first truncation to ``max_length``
    (the BERT recipe for sentence pairs and next-sentence prediction)."""

    cls_id: int  # id of [CLS]
    sep_id: int  # id of [SEP]
    pad_id: int = 0  # padding id
    max_length: int = 128  # total length including the three special tokens

    def __post_init__(self) -> None:
        if self.max_length < 4:
            raise ValueError(f"max_length must leave room for 3 special tokens and text, got {self.max_length!r}")

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        ids, types = [], []
        for e in examples:
            a, b = list(e["first"]), list(e["second"])
            while len(a) + len(b) > self.max_length - 3:  # drop from the longer one, from its end
                (a if len(a) >= len(b) else b).pop()
            ids.append([self.cls_id, *a, self.sep_id, *b, self.sep_id])
            types.append([0] * (len(a) + 2) + [1] * (len(b) + 1))
        input_ids, mask = pad_rows(ids, self.pad_id)  # (B, T) each
        out = {"input_ids": input_ids, "token_type_ids": pad_rows(types, 0)[0], "attention_mask": mask}
        if all("label" in e for e in examples):
            out["labels"] = torch.tensor([int(e["label"]) for e in examples], dtype=torch.long)  # (B,)
        return out


def make_dataloader(dataset, batch_size: int, collate_fn, seed: int = 0, shuffle: bool = True,
                    drop_last: bool = False) -> DataLoader:
    """A ``DataLoader`` whose order depends only on ``seed`` (its own ``torch.Generator``)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate_fn,
                      generator=generator, drop_last=drop_last)
