"""The loop: exact resume on CPU, gradient accumulation == one larger batch, clipping, evaluation and early
stopping, the files a run writes, config errors. The model is a tiny one defined here (dropout on, so a
resume that forgot the RNG state would diverge)."""

import json
import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from companion.objectives import causal_lm_loss
from companion.pipeline import CausalLMCollator
from companion.training import CheckpointError, TrainConfig, Trainer


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 17, dim: int = 12, dropout: float = 0.1) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)  # (B, T, C)
        x = x + self.drop(torch.tanh(self.mix(x.cumsum(1) / torch.arange(1, idx.shape[1] + 1)[:, None])))
        return self.head(self.norm(x))  # (B, T, V)


def lm_loss(model, batch):
    return causal_lm_loss(model(batch["input_ids"]), batch["labels"])


def data(n: int = 40, t: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(17, (n, 1), generator=g)
    return [{"input_ids": ((base[i] + torch.arange(t) * (i % 3 + 1)) % 17).tolist()} for i in range(n)]


def make(config: TrainConfig, model_seed: int = 0, dropout: float = 0.1) -> Trainer:
    torch.manual_seed(model_seed)
    return Trainer(TinyLM(dropout=dropout), config, data(), CausalLMCollator(), lm_loss, eval_data=data(12, seed=1))


BASE = TrainConfig(max_steps=10, batch_size=4, lr=3e-2, warmup_steps=2, min_lr=3e-3, eval_every=5,
                   progress=False, device="cpu", precision="fp32")


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    full = make(replace(BASE, out_dir=str(tmp_path / "a"), checkpoint_every=5, keep_checkpoints=2))
    reference = full.fit()
    assert len(reference.train) == 10 and [r["step"] for r in reference.eval] == [5, 10]
    resumed = make(replace(BASE, out_dir=str(tmp_path / "b")), model_seed=123)  # different init: all must come back
    torch.manual_seed(999)  # and a different global RNG state
    history = resumed.fit(resume_from=tmp_path / "a" / "step-00000005")
    assert history.losses() == reference.losses()  # exactly, float for float
    assert history.eval == reference.eval
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name


def test_interrupted_with_until_then_resumed_from_the_run_directory(tmp_path):
    reference = make(BASE).fit()
    first = make(replace(BASE, out_dir=str(tmp_path)))
    first.fit(until=7)
    assert first.step == 7 and (tmp_path / "LATEST").read_text().strip() == "step-00000007"
    second = make(replace(BASE, out_dir=str(tmp_path)), model_seed=5)
    assert second.fit(resume_from=tmp_path).losses() == reference.losses()


def test_without_rng_restore_a_resume_would_differ(tmp_path):
    """The resume test can fail: skipping the RNG state changes the dropout masks and so the losses."""
    reference = make(BASE).fit()
    first = make(replace(BASE, out_dir=str(tmp_path)))
    first.fit(until=5)
    second = make(BASE, model_seed=5)
    from companion.training.checkpoint import load_checkpoint

    state = load_checkpoint(tmp_path, second.model, second.optimizer, restore_rng=False)
    second.step, second.tokens = state["step"], state["tokens"]
    torch.manual_seed(999)
    assert second.fit().losses()[-5:] != reference.losses()[-5:]


def test_gradient_accumulation_equals_one_larger_batch():
    config = replace(BASE, eval_every=0, max_grad_norm=None)
    big = make(replace(config, batch_size=8, grad_accum_steps=1), dropout=0.0)
    small = make(replace(config, batch_size=2, grad_accum_steps=4), dropout=0.0)
    big_batches = list(next(big.micro_batches()) for _ in range(1))
    small_iter = small.micro_batches()
    assert torch.equal(torch.cat([next(small_iter)["input_ids"] for _ in range(4)]), big_batches[0]["input_ids"])
    big.eval_data = small.eval_data = None
    a, b = big.fit(), small.fit()
    assert a.losses() == pytest.approx(b.losses(), rel=1e-5, abs=1e-6)
    for p, q in zip(big.model.parameters(), small.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # and with a different effective batch the run really differs
    other = make(replace(config, batch_size=2, grad_accum_steps=1), dropout=0.0)
    other.eval_data = None
    assert other.fit().losses()[1:] != pytest.approx(a.losses()[1:], rel=1e-3)


def test_gradient_clipping_bounds_the_update_norm():
    trainer = make(replace(BASE, max_grad_norm=1e-3, eval_every=0), dropout=0.0)
    trainer.eval_data = None
    batch = next(trainer.micro_batches())
    record = trainer.train_step([batch])
    assert record["grad_norm"] > 1e-3  # the norm before clipping is reported
    trainer.model.zero_grad()
    trainer.loss_fn(trainer.model, batch).backward()
    raw = torch.nn.utils.get_total_norm([p.grad for p in trainer.model.parameters()])
    clipped = torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), 1e-3)
    assert clipped == pytest.approx(raw.item()) and torch.nn.utils.get_total_norm(
        [p.grad for p in trainer.model.parameters()]).item() == pytest.approx(1e-3, rel=1e-4)


def test_evaluation_perplexity_and_determinism():
    trainer = make(BASE)
    first, second = trainer.evaluate(), trainer.evaluate()
    assert first == second
    assert first["val_ppl"] == pytest.approx(math.exp(first["val_loss"]))
    # weighted by batch size: 12 examples in batches of 4, 4, 4 -> plain mean of all rows
    trainer.model.eval()
    batch = CausalLMCollator()(data(12, seed=1))
    with torch.no_grad():
        assert first["val_loss"] == pytest.approx(lm_loss(trainer.model, batch).item(), rel=1e-6)


def test_early_stopping_stops_after_patience():
    config = replace(BASE, max_steps=40, eval_every=1, patience=2, lr=5.0, warmup_steps=0, min_lr=5.0,
                     max_grad_norm=None)  # a learning rate that makes the loss worse
    trainer = make(config)
    history = trainer.fit()
    val = [r["val_loss"] for r in history.eval]
    assert trainer.step < 40
    best = min(range(len(val)), key=val.__getitem__)
    assert len(val) - 1 - best == 2  # stopped exactly `patience` evaluations after the best


def test_run_directory_files(tmp_path):
    trainer = make(replace(BASE, out_dir=str(tmp_path), max_steps=3, eval_every=0))
    trainer.fit()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["step"] for r in metrics["train"]] == [1, 2, 3] and metrics["eval"][0]["step"] == 3
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000
    assert metrics["train"][-1]["tokens"] == 3 * 4 * 8


def test_progress_bar_on_stdout(capsys):
    make(replace(BASE, max_steps=2, progress=True)).fit()
    out = capsys.readouterr()
    assert "step 2/2 [" in out.out and "val_loss" in out.out and out.err == ""
    make(replace(BASE, max_steps=2, progress=False)).fit()
    assert capsys.readouterr().out == ""


def test_resume_with_a_different_batch_size_is_refused(tmp_path):
    make(replace(BASE, out_dir=str(tmp_path), max_steps=2)).fit()
    other = make(replace(BASE, batch_size=5))
    with pytest.raises(CheckpointError, match="batch_size: 4 in the checkpoint, 5 now"):
        other.fit(resume_from=tmp_path)


def test_config_errors():
    with pytest.raises(ValueError, match="max_steps must be a positive int, got 0"):
        TrainConfig(max_steps=0)
    with pytest.raises(ValueError, match="max_grad_norm must be positive or None, got -1"):
        TrainConfig(max_grad_norm=-1)
    with pytest.raises(ValueError, match="warmup_steps=20, decay_steps=10"):
        TrainConfig(max_steps=10, warmup_steps=20)
    with pytest.raises(ValueError, match="fewer than batch_size=64"):
        Trainer(TinyLM(), TrainConfig(batch_size=64), data(), CausalLMCollator(), lm_loss)


def test_fp16_overflow_skips_the_step_and_halves_the_scale():
    """fp16 autocast with a GradScaler (on the CPU through an explicit Precision; choose_precision refuses fp16 there):
    with a first scale of 2**24 the scaled fp16 gradients overflow, so GradScaler skips the update (weights and
    AdamW moments unchanged) and halves the scale, step after step, until the gradients fit and training starts."""
    import copy

    from companion.runtime import Precision

    fp16 = Precision(torch.device("cpu"), torch.float16, grad_scaler=True)
    trainer = Trainer(TinyLM(dropout=0.0), replace(BASE, eval_every=0), data(), CausalLMCollator(), lm_loss,
                      precision=fp16, scaler_init=2.0**24)
    batches = trainer.micro_batches()
    before = copy.deepcopy(trainer.model.state_dict())
    record = trainer.train_step([next(batches)])
    assert not math.isfinite(record["grad_norm"])  # the unscaled gradient holds inf/nan
    assert trainer.scaler.get_scale() == 2.0**23
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert trainer.optimizer.state_dict()["state"] == {}  # AdamW never stepped: no moments, no step count
    scales = [trainer.scaler.get_scale()]
    while not math.isfinite(trainer.train_step([next(batches)])["grad_norm"]):
        scales.append(trainer.scaler.get_scale())
        assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert scales == [2.0**(23 - i) for i in range(len(scales))] and trainer.scaler.get_scale() == scales[-1]
    assert not torch.equal(before["mix.weight"], trainer.model.mix.weight)  # the first finite step updates
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    # without a scaler, the same overflowing gradient would have been applied: nan weights
    plain = make(replace(BASE, eval_every=0), dropout=0.0)
    (plain.loss_fn(plain.model, next(plain.micro_batches())) * math.inf).backward()
    plain.optimizer.step()
    assert not torch.isfinite(plain.model.mix.weight).all()


@pytest.mark.slow
def test_compile_gives_the_same_losses():
    config = replace(BASE, max_steps=3, eval_every=0)
    eager, compiled = make(config, dropout=0.0), make(replace(config, compile=True), dropout=0.0)
    eager.eval_data = compiled.eval_data = None
    assert type(compiled.model).__name__ == "OptimizedModule" and compiled.module is not compiled.model
    assert compiled.fit().losses() == pytest.approx(eager.fit().losses(), rel=1e-5, abs=1e-6)
    for p, q in zip(eager.module.parameters(), compiled.module.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_new_config_fields_are_validated():
    with pytest.raises(ValueError, match="parallel must be one of \\('none', 'ddp', 'fsdp'\\), got 'zero3'"):
        TrainConfig(parallel="zero3")
