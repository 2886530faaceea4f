"""Sequence classification on a pretrained backbone: full fine-tuning, head only, or LoRA.

Decoders (GPT-2 style, Radford et al., 2018/2019, who fine-tuned with a linear head on the last token; LLaMA): the
head reads the final hidden state at the *last real token*. With right padding a causal model's earlier positions
never see the pads, so that state is the one the unpadded text gives. Encoders (BERT, Devlin et al., 2019): the
tanh-pooled [CLS] state or the mean over real tokens (Reimers & Gurevych, 2019), with the padding mask in attention.
The classifier is an ordinary ``nn.Module``: train it with :class:`companion.Trainer` and :func:`classification_loss`,
pick the best checkpoint by :func:`classification_eval_fn` (validation macro-F1). Saving writes only what training
changed (the LoRA matrices and the head, or the head, or everything) to one safetensors file, atomically.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from companion.data import atomic_write_bytes
from companion.finetuning.lora import LoRAConfig, apply_lora, lora_state_dict, read_stored_json
from companion.models.bert import Bert, BertForPreTraining, mean_pool

MODES = ("full", "head", "lora")
POOLINGS = ("last", "mean", "cls")


@dataclass(frozen=True)
class ClassifierConfig:
    """A classification head and what is trained."""

    num_labels: int = 2  # classes
    mode: str = "full"  # "full": every weight; "head": backbone frozen; "lora": LoRA adapters + the head
    pooling: str = "last"  # "last" real token (decoders), "mean" over real tokens, "cls" (BERT's pooled [CLS])
    dropout: float = 0.0  # dropout on the pooled features before the head (training only)
    lora: LoRAConfig | None = None  # with mode="lora" (None: LoRAConfig() on q/k/v/o)

    def __post_init__(self) -> None:
        if not isinstance(self.num_labels, int) or self.num_labels < 2:
            raise ValueError(f"num_labels must be an int >= 2, got {self.num_labels!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.lora is not None and self.mode != "lora":
            raise ValueError(f"a LoRA config is only used with mode='lora', got mode={self.mode!r}")
        if self.mode == "lora":
            lora = self.lora or LoRAConfig()
            saved = tuple(sorted({*lora.modules_to_save, "head"}))  # the new head always trains and is saved
            object.__setattr__(self, "lora", replace(lora, modules_to_save=saved))


class SequenceClassifier(nn.Module):
    """forward(input_ids (B, T), attention_mask (B, T) 1 = real token) -> logits (B, num_labels).

    ``backbone``: a decoder with ``features(idx) -> (B, T, C)`` (:class:`companion.GPT`, :class:`companion.Llama`) or
    a :class:`companion.Bert` (or the ``BertForPreTraining`` around one). Pads must be on the right.
    """

    def __init__(self, backbone: nn.Module, config: ClassifierConfig) -> None:
        super().__init__()
        if isinstance(backbone, BertForPreTraining):
            backbone = backbone.bert
        self.encoder = isinstance(backbone, Bert)
        if not self.encoder and not hasattr(backbone, "features"):
            raise TypeError(f"backbone must be a Bert or a decoder with features(idx), got {type(backbone).__name__}")
        if not self.encoder and config.pooling == "cls":
            raise ValueError("pooling='cls' needs a bidirectional encoder (Bert); a causal decoder's first token sees "
                             "nothing after it: use pooling='last' or 'mean'")
        self.config = config
        self.backbone = backbone
        width = backbone.config.d_model  # C
        param = next(backbone.parameters())
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(width, config.num_labels, device=param.device, dtype=param.dtype)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        if config.mode == "head":
            for p in self.backbone.parameters():
                p.requires_grad_(False)
        elif config.mode == "lora":
            apply_lora(self, config.lora)

    @property
    def n_ctx(self) -> int:
        return self.backbone.config.n_ctx

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The features the head reads, (B, C)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if input_ids.shape != attention_mask.shape:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
                             "must have the same shape (B, T)")
        lengths = attention_mask.sum(dim=1)  # (B,)
        if bool((lengths < 1).any()):
            raise ValueError("every row needs at least one real token (attention_mask all zero in a row)")
        if self.encoder:
            hidden, cls = self.backbone(input_ids, attention_mask=attention_mask)  # (B, T, C), (B, C)
            if self.config.pooling == "cls":
                return cls
        else:
            hidden = self.backbone.features(input_ids)  # (B, T, C); causal: right pads do not reach real tokens
        if self.config.pooling == "mean":
            return mean_pool(hidden, attention_mask)  # (B, C)
        last = (lengths - 1).to(torch.long)  # (B,) index of the last real token
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, C)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.drop(self.pooled(input_ids, attention_mask)))  # (B, num_labels)


class ClassificationCollator:
    """Examples ``{"text": str, "label": int}`` -> ``input_ids`` (B, T) right-padded with ``pad_id``,
    ``attention_mask`` (B, T) and ``labels`` (B,); each text is encoded and cut to its first ``max_length`` tokens
    (the model's context, e.g. ``classifier.n_ctx``); T is the longest row of the batch."""

    def __init__(self, encode: Callable[[str], Sequence[int]], max_length: int, pad_id: int = 0,
                 text_key: str = "text", label_key: str = "label") -> None:
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length!r}")
        self.encode, self.max_length, self.pad_id = encode, max_length, pad_id
        self.text_key, self.label_key = text_key, label_key

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        rows = [list(self.encode(e[self.text_key]))[:self.max_length] for e in examples]
        empty = [i for i, r in enumerate(rows) if not r]
        if empty:
            raise ValueError(f"examples {empty[:5]} encode to no tokens; drop empty texts before batching")
        t = max(len(r) for r in rows)
        ids = torch.full((len(rows), t), self.pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(rows), t), dtype=torch.long)  # (B, T)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = 1
        labels = torch.tensor([int(e[self.label_key]) for e in examples], dtype=torch.long)  # (B,)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def classification_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the batch's labels: the ``loss_fn`` for :class:`companion.Trainer`."""
    logits = model(batch["input_ids"], batch["attention_mask"])  # (B, num_labels)
    return F.cross_entropy(logits.float(), batch["labels"])


@torch.no_grad()
def predict(model: nn.Module, data: Sequence, collate_fn: Callable, batch_size: int = 64) -> tuple[list[int], list[int]]:
    """(labels, argmax predictions) over ``data`` in order, in eval mode (the mode is restored afterwards)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    labels, preds = [], []
    for start in range(0, len(data), batch_size):
        batch = collate_fn([data[i] for i in range(start, min(start + batch_size, len(data)))])
        logits = model(batch["input_ids"].to(device), batch["attention_mask"].to(device))  # (B, num_labels)
        labels += batch["labels"].tolist()
        preds += logits.argmax(dim=-1).tolist()
    model.train(was_training)
    return labels, preds


def accuracy_and_macro_f1(labels: Sequence[int], preds: Sequence[int], num_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 (the unweighted mean of each class's F1; a class never predicted nor present gets 0,
    as ``sklearn.metrics.f1_score(average="macro", zero_division=0)``)."""
    y, p = torch.as_tensor(list(labels)), torch.as_tensor(list(preds))
    confusion = torch.bincount(y * num_labels + p, minlength=num_labels**2).reshape(num_labels, num_labels)
    tp = confusion.diag().double()
    denominator = confusion.sum(0).double() + confusion.sum(1).double()  # 2 TP + FP + FN
    f1 = torch.where(denominator > 0, 2 * tp / denominator.clamp(min=1), torch.zeros_like(tp))
    return {"accuracy": float(tp.sum() / max(len(y), 1)), "macro_f1": float(f1.mean())}


def classification_eval_fn(data: Sequence, collate_fn: Callable, num_labels: int = 2,
                           batch_size: int = 64) -> Callable[[nn.Module], dict[str, float]]:
    """An ``eval_fn`` for :class:`companion.Trainer`: ``{"accuracy", "macro_f1"}`` on ``data``."""
    def eval_fn(model: nn.Module) -> dict[str, float]:
        return accuracy_and_macro_f1(*predict(model, data, collate_fn, batch_size), num_labels)
    return eval_fn


def classifier_state_dict(model: SequenceClassifier) -> dict[str, torch.Tensor]:
    """What training changed: LoRA matrices + head ("lora"), the head ("head"), or every weight ("full")."""
    mode = model.config.mode
    if mode == "lora":
        return lora_state_dict(model, model.config.lora.modules_to_save)
    if mode == "head":
        return {f"head.{k}": v.detach().clone() for k, v in model.head.state_dict().items()}
    seen, out = set(), {}
    for k, v in model.state_dict(keep_vars=True).items():  # tied weights once
        if id(v) not in seen:
            seen.add(id(v))
            out[k] = v.detach().clone().contiguous()
    return out


def save_classifier(model: SequenceClassifier, path: str | Path) -> Path:
    """Write :func:`classifier_state_dict` and the :class:`ClassifierConfig` to one safetensors file, atomically."""
    path = Path(path)
    meta = {"classifier_config": json.dumps(asdict(model.config))}
    atomic_write_bytes(path, save_safetensors_bytes(classifier_state_dict(model), metadata=meta))
    return path


def read_classifier_config(path: str | Path) -> ClassifierConfig:
    fields = read_stored_json(path, "classifier_config", "a classifier written by save_classifier")
    lora = fields.pop("lora")
    if lora is not None:
        lora = LoRAConfig.from_dict(lora)
    return ClassifierConfig(**fields, lora=lora)


def load_classifier(backbone: nn.Module, path: str | Path) -> SequenceClassifier:
    """Rebuild the classifier saved at ``path`` on ``backbone`` (the same pretrained model it was trained from;
    with mode "full" any model of that shape) and load the saved tensors into it, each by name and shape."""
    model = SequenceClassifier(backbone, read_classifier_config(path))
    tensors = load_safetensors_bytes(Path(path).read_bytes())
    params = model.state_dict(keep_vars=True)
    unknown = sorted(set(tensors) - set(params))
    missing = sorted(set(classifier_state_dict(model)) - set(tensors))
    if unknown or missing:
        raise ValueError(f"{path} does not fit the classifier: unknown {unknown[:5]}, missing {missing[:5]}")
    with torch.no_grad():
        for name, value in tensors.items():
            if params[name].shape != value.shape:
                raise ValueError(f"{name}: shape {tuple(value.shape)} in {path}, {tuple(params[name].shape)} in the "
                                 "model")
            params[name].copy_(value)
    return model
