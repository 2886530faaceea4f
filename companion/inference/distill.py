"""Knowledge distillation (Hinton, Vinyals & Dean, 2015, "Distilling the Knowledge in a Neural Network").

The student matches the teacher's temperature-softened next-token distribution,
KL(softmax(z_t / T) || softmax(z_s / T)) * T^2 (the T^2 keeps its gradient scale independent of T), mixed with
the ordinary cross-entropy on the data: loss = alpha * KD + (1 - alpha) * CE. Training reuses
`companion.training.Trainer` with a ``loss_fn`` that runs the frozen teacher under ``torch.no_grad``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from companion.objectives import IGNORE_INDEX, causal_lm_loss
from companion.training import History, TrainConfig, Trainer


@dataclass(frozen=True)
class DistillConfig:
    """How the distillation loss mixes the teacher's soft targets with the hard labels."""

    temperature: float = 2.0  # T: softens both distributions (1 = plain softmax)
    alpha: float = 0.5  # weight of the KD term; 1 - alpha goes to cross-entropy on the labels (1: KD only)

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {self.alpha!r}")


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
          weight: torch.Tensor | None = None) -> torch.Tensor:
    """T^2 * mean over rows of KL(softmax(teacher / T) || softmax(student / T)).

    logits: (N, V); weight: (N,) bool of the rows that count (None: all)."""
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (N, V)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (N, V)
    kl = (log_t.exp() * (log_t - log_s)).sum(dim=-1)  # (N,)
    if weight is not None:
        kl = kl[weight]
    return kl.mean() * temperature**2


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      config: DistillConfig = DistillConfig(), ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """alpha * KD + (1 - alpha) * CE for causal LMs: position t predicts label t + 1, on both terms.

    student_logits, teacher_logits: (B, T, V); labels: (B, T) (unshifted input ids, padding = ignore_index)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student and teacher logits must have the same shape, got {tuple(student_logits.shape)} "
                         f"and {tuple(teacher_logits.shape)}")
    v = student_logits.shape[-1]
    counted = (labels[:, 1:] != ignore_index).reshape(-1)  # (B * (T-1),)
    kd = kd_kl(student_logits[:, :-1].reshape(-1, v), teacher_logits[:, :-1].reshape(-1, v), config.temperature,
               counted)
    if config.alpha == 1.0:
        return kd
    return config.alpha * kd + (1 - config.alpha) * causal_lm_loss(student_logits, labels, ignore_index)


def distillation_step(teacher: nn.Module, config: DistillConfig = DistillConfig()
                      ) -> Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]:
    """A Trainer ``loss_fn(student, batch)``: the teacher (kept in eval mode, no gradients) scores the batch."""
    teacher.eval().requires_grad_(False)

    def step(student: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = teacher(batch["input_ids"])  # (B, T, V)
        return distillation_loss(student(batch["input_ids"]), teacher_logits, batch["labels"], config)

    return step


def train_student(student: nn.Module, teacher: nn.Module | None, train_data: Sequence, collate_fn: Callable,
                  config: TrainConfig, distill: DistillConfig = DistillConfig()) -> History:
    """Train ``student`` with the Trainer: from ``teacher`` by distillation, or (teacher None) on the hard labels
    only, the baseline with the same data, steps and optimizer."""
    if teacher is not None and getattr(teacher, "config", None) is not None and hasattr(student, "config"):
        if teacher.config.vocab_size != student.config.vocab_size:
            raise ValueError(f"teacher and student need one vocabulary, got vocab_size "
                             f"{teacher.config.vocab_size} and {student.config.vocab_size}")
    if teacher is None:
        def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return causal_lm_loss(model(batch["input_ids"]), batch["labels"])
    else:
        loss_fn = distillation_step(teacher, distill)
    return Trainer(student, config, train_data, collate_fn, loss_fn).fit()
