"""Early stopping on a named metric (an ``eval_fn``'s), ``mode="max"/"min"``, ``min_delta``, and restoring the best
weights: a run whose metric is scripted to peak at a known step must stop ``patience`` evaluations later and end
with exactly the weights it had at that step."""

from dataclasses import replace

import pytest
import torch
from torch import nn

from companion.objectives import causal_lm_loss
from companion.pipeline import CausalLMCollator
from companion.training import TrainConfig, Trainer


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 17, dim: int = 12) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)  # (B, T, C)
        x = x + self.drop(torch.tanh(self.mix(x.cumsum(1) / torch.arange(1, idx.shape[1] + 1)[:, None])))
        return self.head(x)  # (B, T, V)


def lm_loss(model, batch):
    return causal_lm_loss(model(batch["input_ids"]), batch["labels"])


def data(n: int = 40, t: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(17, (n, 1), generator=g)
    return [{"input_ids": ((base[i] + torch.arange(t) * (i % 3 + 1)) % 17).tolist()} for i in range(n)]


BASE = TrainConfig(max_steps=12, batch_size=4, lr=3e-2, eval_every=1, progress=False, device="cpu", precision="fp32")


class Scripted:
    """An eval_fn whose metric follows a script by step, and which records the weights it was shown."""

    def __init__(self, values: dict[int, float], name: str = "f1") -> None:
        self.values, self.name, self.seen, self.trainer = values, name, {}, None

    def __call__(self, model: nn.Module) -> dict[str, float]:
        step = self.trainer.step
        self.seen[step] = {k: v.clone() for k, v in model.state_dict().items()}
        assert not model.training  # evaluated in eval mode
        return {self.name: self.values[step], "other": 0.0}


def make(config: TrainConfig, eval_fn=None, eval_data=None, model=None) -> Trainer:
    torch.manual_seed(0)
    trainer = Trainer(model or TinyLM(), config, data(), CausalLMCollator(), lm_loss, eval_data=eval_data,
                      eval_fn=eval_fn)
    if eval_fn is not None:
        eval_fn.trainer = trainer
    return trainer


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_restores_the_weights_of_the_peak_and_stops_after_patience():
    f1 = Scripted({1: 0.2, 2: 0.5, 3: 0.8, 4: 0.7, 5: 0.79, 6: 0.6, 7: 0.9, 8: 0.1})  # peak at 3 within patience
    trainer = make(replace(BASE, metric="f1", mode="max", patience=3, restore_best=True), eval_fn=f1)
    history = trainer.fit()
    assert trainer.step == 6  # evaluations 4, 5, 6 did not beat 0.8: stop; step 7's 0.9 is never reached
    assert trainer.best_step == 3 and trainer.best_metric == 0.8
    assert [r["f1"] for r in history.eval] == [0.2, 0.5, 0.8, 0.7, 0.79, 0.6]
    final = trainer.module.state_dict()
    assert same(final, f1.seen[3])  # exactly the weights evaluated at step 3
    assert not same(final, f1.seen[6])  # and not the last ones (training did change them)


def test_without_restore_best_keeps_the_last_weights():
    f1 = Scripted({s: [0.2, 0.8, 0.7, 0.6][min(s - 1, 3)] for s in range(1, 13)})
    trainer = make(replace(BASE, metric="f1", mode="max", patience=2), eval_fn=f1)
    trainer.fit()
    assert trainer.step == 4 and trainer.best_step == 2 and trainer.best_weights is None
    assert same(trainer.module.state_dict(), f1.seen[4])


def test_min_delta_and_min_mode():
    # with mode="min", 0.50 -> 0.45 improves by 0.05 (> min_delta 0.01); 0.445 by only 0.005: not an improvement
    err = Scripted({1: 0.6, 2: 0.5, 3: 0.45, 4: 0.445, 5: 0.4451, 6: 0.3}, name="error")
    trainer = make(replace(BASE, metric="error", mode="min", patience=2, min_delta=0.01, restore_best=True),
                   eval_fn=err)
    trainer.fit()
    assert trainer.step == 5 and trainer.best_step == 3
    assert same(trainer.module.state_dict(), err.seen[3])


def test_eval_fn_does_not_change_training_and_val_loss_stopping_is_unchanged():
    config = replace(BASE, max_steps=40, patience=2, lr=5.0, min_lr=5.0, max_grad_norm=None)  # loss gets worse
    plain = make(config, eval_data=data(12, seed=1))
    reference = plain.fit()
    calls = []
    extra = make(config, eval_data=data(12, seed=1),
                 eval_fn=lambda model: calls.append(torch.rand(1).item()) or {"acc": 0.5})
    history = extra.fit()
    assert history.losses() == reference.losses()  # eval_fn ran under a forked RNG: training untouched
    assert [r["val_loss"] for r in history.eval] == [r["val_loss"] for r in reference.eval]
    assert len(set(calls)) == 1  # and it always sees the same RNG state
    val = [r["val_loss"] for r in reference.eval]
    best = min(range(len(val)), key=val.__getitem__)
    assert plain.step < 40 and len(val) - 1 - best == 2  # the old rule: patience evaluations after the best
    assert plain.best_step == reference.eval[best]["step"] and plain.best_val_loss == val[best]


def test_restore_best_survives_a_resume(tmp_path):
    values = {1: 0.1, 2: 0.3, 3: 0.9, 4: 0.5, 5: 0.4, 6: 0.45, 7: 0.2, 8: 0.3, 9: 0.1, 10: 0.2, 11: 0.0, 12: 0.1}
    config = replace(BASE, metric="f1", mode="max", restore_best=True)
    full = make(replace(config, out_dir=str(tmp_path / "a"), checkpoint_every=5, keep_checkpoints=3),
                eval_fn=Scripted(values))
    full.fit()
    resumed = make(replace(config, out_dir=str(tmp_path / "b")), eval_fn=Scripted(values))
    resumed.fit(resume_from=tmp_path / "a" / "step-00000005")
    assert full.best_step == resumed.best_step == 3
    assert same(resumed.module.state_dict(), full.module.state_dict())


def test_frozen_parameters_are_not_copied():
    model = TinyLM()
    model.emb.weight.requires_grad_(False)
    f1 = Scripted({s: 1.0 - abs(s - 2) * 0.1 for s in range(1, 13)})
    trainer = make(replace(BASE, max_steps=4, metric="f1", mode="max", restore_best=True), eval_fn=f1, model=model)
    trainer.fit()
    assert "emb.weight" not in trainer.best_weights and "mix.weight" in trainer.best_weights
    assert trainer.best_step == 2 and same(trainer.module.state_dict(), f1.seen[2])


def test_errors():
    with pytest.raises(ValueError, match="mode must be 'min' or 'max', got 'maximum'"):
        replace(BASE, mode="maximum")
    with pytest.raises(ValueError, match="min_delta must be"):
        replace(BASE, min_delta=-0.1)
    with pytest.raises(ValueError, match=r"metric 'f1' is not among the evaluation results \['val_loss', 'val_ppl'\]"):
        make(replace(BASE, metric="f1", patience=3), eval_data=data(12, seed=1)).fit()
    with pytest.raises(ValueError, match=r"metric 'val_loss' is not among the evaluation results \['f1', 'other'\]"):
        make(replace(BASE, restore_best=True), eval_fn=Scripted({1: 0.5})).fit()
    quiet = make(replace(BASE, max_steps=2), eval_fn=Scripted({1: 0.5, 2: 0.6}))  # nothing watches the metric
    assert len(quiet.fit().eval) == 2 and quiet.best_step is None
    with pytest.raises(ValueError, match=r"eval_fn returned keys the trainer already reports: \['val_loss'\]"):
        make(BASE, eval_data=data(12, seed=1), eval_fn=lambda m: {"val_loss": 0.0}).fit()
    with pytest.raises(ValueError, match="needs eval_data or an eval_fn"):
        make(BASE).evaluate()
