"""Distillation: the KD term equals F.kl_div's, the mixed loss its definition; a distilled student moves
towards the teacher."""

import pytest
import torch
import torch.nn.functional as F

from companion import GPT, GPTConfig, TrainConfig
from companion.inference.distill import DistillConfig, distillation_loss, kd_kl, train_student
from companion.pipeline import CausalLMCollator


def test_kd_equals_f_kl_div():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(10, 7, generator=g), torch.randn(10, 7, generator=g)
    for temp in (1.0, 2.0, 4.0):
        ref = F.kl_div(F.log_softmax(s / temp, -1), F.log_softmax(t / temp, -1), log_target=True,
                       reduction="batchmean") * temp**2
        torch.testing.assert_close(kd_kl(s, t, temp), ref)
    assert float(kd_kl(s, s, 2.0)) == pytest.approx(0.0, abs=1e-6)


def test_distillation_loss_mixes_kd_and_ce():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    labels[1, 3:] = -100  # padding: excluded from both terms
    cfg = DistillConfig(temperature=3.0, alpha=0.3)
    keep = (labels[:, 1:] != -100).reshape(-1)
    kd = F.kl_div(F.log_softmax(s[:, :-1].reshape(-1, 11)[keep] / 3, -1),
                  F.log_softmax(t[:, :-1].reshape(-1, 11)[keep] / 3, -1), log_target=True, reduction="batchmean") * 9
    ce = F.cross_entropy(s[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(distillation_loss(s, t, labels, cfg), 0.3 * kd + 0.7 * ce)
    torch.testing.assert_close(distillation_loss(s, t, labels, DistillConfig(alpha=0.0)), ce)


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="temperature must be positive, got 0"):
        DistillConfig(temperature=0)
    with pytest.raises(ValueError, match="alpha must lie in \\[0, 1\\], got 1.5"):
        DistillConfig(alpha=1.5)
    with pytest.raises(ValueError, match="same shape"):
        distillation_loss(torch.zeros(1, 3, 4), torch.zeros(1, 3, 5), torch.zeros(1, 3, dtype=torch.long))


def test_student_moves_towards_teacher():
    torch.manual_seed(0)
    teacher = GPT(GPTConfig.tiny()).eval()
    rows = [{"input_ids": torch.randint(0, 256, (16,), generator=torch.Generator().manual_seed(i)).tolist()}
            for i in range(32)]
    batch = CausalLMCollator()(rows[:8])

    def gap(student):
        with torch.no_grad():
            return float(kd_kl(student(batch["input_ids"]).flatten(0, 1), teacher(batch["input_ids"]).flatten(0, 1),
                               1.0))

    torch.manual_seed(1)
    student = GPT(GPTConfig.tiny())
    start = gap(student.eval())
    config = TrainConfig(max_steps=30, batch_size=8, lr=3e-3, progress=False, device="cpu", precision="fp32")
    train_student(student, teacher, rows, CausalLMCollator(), config, DistillConfig(temperature=1.0, alpha=1.0))
    assert gap(student.eval()) < 0.5 * start
