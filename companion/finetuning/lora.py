"""LoRA: low-rank adaptation of frozen linear layers, written from scratch and checked against PyPI ``peft``.

Hu et al. (2021), "LoRA: Low-Rank Adaptation of Large Language Models": a frozen weight W (out, in) gets a trainable
update ΔW = (α / r) B A with A (r, in) and B (out, r); A starts Kaiming-uniform (as ``peft``), B at zero, so the
model's output is unchanged at the start. Kalajdzievski (2023), "A Rank Stabilization Scaling Factor for Fine-Tuning
with LoRA" (rsLoRA): scale by α / √r instead, so the update's size does not shrink as the rank grows.
``LoRALinear`` *is* an ``nn.Linear`` that shares the base layer's weight and bias, so a model's state-dict keys stay
the same (``...q_proj.weight``) and only ``...q_proj.lora_A``/``lora_B`` are added. Merging adds ΔW into W for
serving (no extra matmul); unmerging subtracts it again. The adapter file holds only the LoRA matrices and the
parameters of the modules named in ``LoRAConfig.modules_to_save`` (a classifier head), written atomically.
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from companion.data import atomic_write_bytes

ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")  # names of the attention projections in companion.nn
ALL_LINEAR = (*ATTENTION, "up", "gate", "down")  # ... and of the feed-forward layers (GELU MLP or SwiGLU)


@dataclass(frozen=True)
class LoRAConfig:
    """Where LoRA goes and how big it is. Presets: `attention` (q/k/v/o), `all_linear` (also the MLP)."""

    rank: int = 8  # r, rank of the update B A
    alpha: float = 16.0  # α, the update is scaled by α / r (or α / √r with rslora)
    dropout: float = 0.0  # dropout on the input of the LoRA branch only (training)
    targets: tuple[str, ...] = ATTENTION  # module-name patterns: a suffix ("q_proj") or a glob ("blocks.0.*")
    rslora: bool = False  # rank-stabilised scaling α / √r (Kalajdzievski, 2023)
    modules_to_save: tuple[str, ...] = ()  # patterns of extra modules trained in full and saved with the adapter

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"rank must be > 0, got {self.rank!r}")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ValueError(f"alpha must be a finite number > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("targets", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(p, str) and p for p in value):
                raise ValueError(f"{name} must be a tuple of non-empty name patterns, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        if not self.targets:
            raise ValueError("targets must name at least one module pattern, got ()")

    @property
    def scaling(self) -> float:
        """The factor in front of B A: α / r, or α / √r with rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @classmethod
    def from_dict(cls, fields: dict) -> LoRAConfig:
        """The config from its JSON form (``asdict`` output, tuples stored as lists)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})

    @classmethod
    def attention(cls, rank: int = 8, alpha: float = 16.0, **kwargs) -> LoRAConfig:
        return cls(rank=rank, alpha=alpha, targets=ATTENTION, **kwargs)

    @classmethod
    def all_linear(cls, rank: int = 8, alpha: float = 16.0, **kwargs) -> LoRAConfig:
        return cls(rank=rank, alpha=alpha, targets=ALL_LINEAR, **kwargs)


class LoRALinear(nn.Linear):
    """``y = x Wᵀ + b + scaling · dropout(x) Aᵀ Bᵀ``; x (..., in) -> y (..., out). W and b are the base layer's own
    parameters (shared, frozen by :func:`apply_lora`); ``lora_A`` (r, in) and ``lora_B`` (out, r) are new."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False) -> None:
        nn.Module.__init__(self)  # no fresh weight: take the base layer's
        if not isinstance(base, nn.Linear) or isinstance(base, LoRALinear):
            raise TypeError(f"LoRALinear wraps a plain nn.Linear, got {type(base).__name__}")
        if not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"rank must be > 0, got {rank!r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same Parameter objects
        self.rank, self.alpha, self.rslora = rank, float(alpha), rslora
        self.scaling = alpha / (math.sqrt(rank) if rslora else rank)
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **kw))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **kw))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # peft's (and nn.Linear's) initialiser
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """ΔW = scaling · B A, shape (out, in)."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)  # (..., out)
        if self.merged:
            return y
        return y + self.scaling * F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + ΔW: the layer then costs one matmul, and gives the same output (up to rounding)."""
        if not self.merged:
            self.weight += self.delta_weight().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W - ΔW, undoing :meth:`merge` (so training can go on)."""
        if self.merged:
            self.weight -= self.delta_weight().to(self.weight.dtype)
            self.merged = False

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the merged weight (for serving without the LoRA code)."""
        w = self.weight + (0 if self.merged else self.delta_weight())
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=w.device, dtype=w.dtype)
        with torch.no_grad():
            out.weight.copy_(w)
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scaling={self.scaling:g}, merged={self.merged}"


def _matches(name: str, pattern: str) -> bool:
    """peft's rule for a plain name (the full name or its last dotted parts equal it), a glob otherwise."""
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def apply_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Replace every ``nn.Linear`` whose name matches ``config.targets`` by a :class:`LoRALinear`, in place; freeze
    every other parameter except those of ``config.modules_to_save``. Returns ``model``."""
    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear)]
    chosen = [n for n in linear_names if any(_matches(n, p) for p in config.targets)]
    if not chosen:
        shown = ", ".join(linear_names[:12]) + (", ..." if len(linear_names) > 12 else "")
        raise ValueError(f"no nn.Linear matched targets {config.targets!r}; linear layers in the model: "
                         f"{shown or 'none'}")
    saved = [n for n, _ in model.named_modules() if n and any(_matches(n, p) for p in config.modules_to_save)]
    missing = [p for p in config.modules_to_save if not any(_matches(n, p) for n in saved)]
    if missing:
        raise ValueError(f"modules_to_save {missing!r} matched no module of the model")
    if set(chosen) & set(saved):
        raise ValueError(f"modules {sorted(set(chosen) & set(saved))!r} are both LoRA targets and modules_to_save")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in chosen:
        base = model.get_submodule(name)
        _set_module(model, name, LoRALinear(base, config.rank, config.alpha, config.dropout, config.rslora))
    for name in saved:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRA layers by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every LoRA layer's ΔW into its weight (in place; :func:`unmerge_lora` undoes it). Returns ``model``."""
    for layer in lora_layers(model).values():
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Subtract every merged LoRA layer's ΔW again. Returns ``model``."""
    for layer in lora_layers(model).values():
        layer.unmerge()
    return model


def unload_lora(model: nn.Module) -> nn.Module:
    """Replace each LoRA layer by a plain ``nn.Linear`` holding the merged weight (in place). Returns ``model``."""
    for name, layer in lora_layers(model).items():
        _set_module(model, name, layer.to_linear())
    return model


def lora_state_dict(model: nn.Module, modules_to_save: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """Only the adapter: every ``lora_A``/``lora_B``, plus the parameters of modules matching ``modules_to_save``."""
    if any(layer.merged for layer in lora_layers(model).values()):
        raise ValueError("unmerge_lora(model) before saving: merged weights would be counted twice on reload")
    out, seen = {}, set()
    for name, p in model.named_parameters(remove_duplicate=False):  # a tied head is found under its own name
        module = name.rpartition(".")[0]
        if id(p) not in seen and (name.endswith((".lora_A", ".lora_B"))
                                  or any(_matches(module, pat) for pat in modules_to_save)):
            out[name] = p.detach().clone().contiguous()
            seen.add(id(p))
    if not out:
        raise ValueError("the model has no LoRA layers (call apply_lora first) and modules_to_save matched nothing")
    return out


def save_lora(model: nn.Module, path: str | Path, config: LoRAConfig) -> Path:
    """Write the adapter (see :func:`lora_state_dict`) and its config to one safetensors file, atomically."""
    path = Path(path)
    tensors = lora_state_dict(model, config.modules_to_save)
    payload = save_safetensors_bytes(tensors, metadata={"lora_config": json.dumps(asdict(config))})
    atomic_write_bytes(path, payload)
    return path


def read_stored_json(path: str | Path, key: str, what: str) -> dict:
    """The JSON object stored under ``key`` in a safetensors file's metadata; ``what`` names the kind of file in the
    error raised when the key is absent."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if key not in meta:
        raise ValueError(f"{path} is not {what} (no {key!r} metadata)")
    return json.loads(meta[key])


def read_lora_config(path: str | Path) -> LoRAConfig:
    """The :class:`LoRAConfig` stored in an adapter file."""
    return LoRAConfig.from_dict(read_stored_json(path, "lora_config", "a LoRA adapter written by save_lora"))


def load_lora(model: nn.Module, path: str | Path) -> nn.Module:
    """Apply the stored config to a fresh base ``model`` (if it has no LoRA layers yet) and load the adapter into it;
    every stored tensor must find a parameter of the same shape. Returns ``model``."""
    config = read_lora_config(path)
    if not lora_layers(model):
        apply_lora(model, config)
    tensors = load_safetensors_bytes(Path(path).read_bytes())
    params = dict(model.named_parameters(remove_duplicate=False))
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise ValueError(f"adapter {path} holds tensors the model lacks: {unknown[:5]!r}")
    expected = set(lora_state_dict(model, config.modules_to_save))
    absent = sorted(expected - set(tensors))
    if absent:
        raise ValueError(f"adapter {path} lacks tensors the model's LoRA layers need: {absent[:5]!r}")
    with torch.no_grad():
        for name, value in tensors.items():
            if params[name].shape != value.shape:
                raise ValueError(f"{name}: shape {tuple(value.shape)} in {path}, {tuple(params[name].shape)} in the "
                                 "model")
            params[name].copy_(value)
    return model


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters), each shared parameter counted once (as ``peft`` does)."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total
