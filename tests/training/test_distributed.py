"""Data parallelism (DDP, FSDP2) against one process, and activation checkpointing against none.

The distributed tests launch this file under ``torchrun --nproc_per_node=2`` (gloo on the CPU): the ``__main__``
block at the bottom is the worker. Rank 0 writes what the ranks computed (gathered gradients, losses, gradient norms,
final weights, a resumed run) to a file the tests compare with a single process on the same global batch: 2 ranks
x batch 4 x 2 accumulation steps = 1 process x batch 8 x 2 steps. A variant that *sums* the ranks' gradients instead
of averaging them (pytorch#162338's bug) is computed too: its gradients are exactly twice the reference's, so the
comparison would fail on it (Adam alone would hide the factor: its update is nearly scale-invariant).
"""

import itertools
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from torchrun import run_torchrun  # noqa: E402

from companion.models import GPT, GPTConfig
from companion.objectives import causal_lm_loss
from companion.pipeline import CausalLMCollator
from companion.training import TrainConfig, Trainer
from companion.training.distributed import DistContext, checkpoint_activations, full_tensor, transformer_blocks

MODEL = GPTConfig(vocab_size=32, n_ctx=16, n_layers=2, d_model=32, n_heads=4, dropout=0.0)
GLOBAL_BATCH, WORLD = 8, 2
BASE = TrainConfig(max_steps=4, batch_size=GLOBAL_BATCH, grad_accum_steps=2, lr=1e-2, warmup_steps=0,
                   max_grad_norm=0.5, checkpoint_every=2, keep_checkpoints=2, device="cpu", precision="fp32",
                   progress=False)


def lm_loss(model, batch):
    return causal_lm_loss(model(batch["input_ids"]), batch["labels"])


def data(n: int = 48, t: int = 16):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": row.tolist()} for row in torch.randint(MODEL.vocab_size, (n, t), generator=g)]


def make(config: TrainConfig, model_seed: int = 0, model: GPTConfig = MODEL) -> Trainer:
    torch.manual_seed(model_seed)
    return Trainer(GPT(model), config, data(), CausalLMCollator(), lm_loss)


def first_step_grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The gradient of step 1 (before clipping), gathered whole; then cleared again."""
    batches = trainer.micro_batches()
    trainer.backward([next(batches) for _ in range(trainer.config.grad_accum_steps)])
    grads = {n: full_tensor(p.grad).clone() for n, p in trainer.module.named_parameters()}
    trainer.optimizer.zero_grad(set_to_none=True)
    return grads


# ----------------------------------------------------------------------------- the torchrun worker
def worker(parallel: str, out: Path) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    config = replace(BASE, parallel=parallel, batch_size=GLOBAL_BATCH // WORLD, out_dir=str(out / "run"))
    trainer = make(config)
    result = {"grads": first_step_grads(trainer)}
    history = trainer.fit()
    result.update(losses=history.losses(), grad_norms=[r["grad_norm"] for r in history.train],
                  tokens=trainer.tokens, weights={n: full_tensor(p).detach().clone()
                                                  for n, p in trainer.module.named_parameters()})
    resumed = make(replace(config, out_dir=str(out / "resumed")), model_seed=1)  # other weights: all must come back
    result["resumed_losses"] = resumed.fit(resume_from=out / "run" / "step-00000002").losses()
    summed = make(replace(config, out_dir=None))  # the bug: ranks' gradients added, not averaged
    if parallel == "ddp":
        def sum_hook(state, bucket):
            return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda f: f.value()[0])
        summed.model.register_comm_hook(None, sum_hook)
    else:
        for module in (*transformer_blocks(summed.module), summed.module):
            module.set_gradient_divide_factor(1.0)
    result["summed_grads"] = first_step_grads(summed)
    if parallel == "fsdp":  # checkpointed blocks inside fully_shard: the same gradients
        result["checkpointed_grads"] = first_step_grads(make(replace(config, out_dir=None,
                                                                     activation_checkpointing=True)))
    if parallel == "fsdp":  # fp16 overflow: ShardedGradScaler all-reduces found-inf, so every rank skips the step
        from companion.runtime import Precision

        torch.manual_seed(0)
        fp16 = Trainer(GPT(MODEL), replace(config, out_dir=None), data(), CausalLMCollator(), lm_loss,
                       precision=Precision(torch.device("cpu"), torch.float16, grad_scaler=True), scaler_init=2.0**24)
        before = {n: full_tensor(p).detach().clone() for n, p in fp16.module.named_parameters()}
        record = fp16.train_step(list(itertools.islice(fp16.micro_batches(), config.grad_accum_steps)))
        after = {n: full_tensor(p).detach() for n, p in fp16.module.named_parameters()}
        result["fp16_skip"] = trainer.dist.gather((record["grad_norm"], fp16.scaler.get_scale(),
                                                   max_diff(before, after), type(fp16.scaler).__name__))
    if trainer.dist.is_main:
        torch.save(result, out / "result.pt")


@pytest.fixture(scope="module")
def reference():
    """One process, batch 8: step-1 gradients, losses and gradient norms of 4 steps, final weights."""
    trainer = make(BASE)
    grads = first_step_grads(trainer)
    history = trainer.fit()
    assert history.train[0]["grad_norm"] > BASE.max_grad_norm  # clipping is active: the global norm matters
    return {"grads": grads, "losses": history.losses(), "grad_norms": [r["grad_norm"] for r in history.train],
            "tokens": trainer.tokens, "weights": {n: p.detach().clone() for n, p in trainer.module.named_parameters()}}


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def ranks(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    run_torchrun([__file__, request.param, str(out)], cwd=out)
    return request.param, out, torch.load(out / "result.pt", weights_only=False)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
def test_gradients_equal_one_process_on_the_global_batch(ranks, reference):
    parallel, _, result = ranks
    diff = max_diff(result["grads"], reference["grads"])
    print(f"{parallel}: max |grad - single process grad| = {diff:.2e}")
    assert diff < 1e-6
    if parallel == "fsdp":  # activation-checkpointed blocks inside fully_shard: the same gradients
        assert max_diff(result["checkpointed_grads"], reference["grads"]) < 1e-6
    # the sum-instead-of-average bug gives twice the gradient, which the comparison above rejects
    ratio = {k: result["summed_grads"][k].norm() / reference["grads"][k].norm() for k in reference["grads"]}
    assert all(abs(r - WORLD) < 1e-4 for r in ratio.values()), ratio
    low, high = min(ratio.values()), max(ratio.values())
    print(f"{parallel}: summed variant |grad| / reference |grad| = {low:.6f}..{high:.6f}")
    assert max_diff(result["summed_grads"], reference["grads"]) > 100 * 1e-6


@pytest.mark.slow
def test_fsdp_fp16_overflow_is_skipped_on_every_rank(ranks):
    parallel, _, result = ranks
    if parallel != "fsdp":
        pytest.skip("the FSDP worker checks it")
    (norm0, scale0, moved0, kind), (norm1, scale1, moved1, _) = result["fp16_skip"]
    assert kind == "ShardedGradScaler" and not math.isfinite(norm0) and not math.isfinite(norm1)
    assert scale0 == scale1 == 2.0**23 and moved0 == moved1 == 0.0


@pytest.mark.slow
def test_losses_norms_and_weights_follow_one_process(ranks, reference):
    parallel, _, result = ranks
    loss_diff = max(abs(a - b) for a, b in zip(result["losses"], reference["losses"]))
    norm_diff = max(abs(a - b) for a, b in zip(result["grad_norms"], reference["grad_norms"]))
    print(f"{parallel}: max |loss diff| over 4 steps = {loss_diff:.2e}, grad norm {norm_diff:.2e}")
    assert len(result["losses"]) == 4 and loss_diff < 1e-5 and norm_diff < 1e-5
    assert result["tokens"] == reference["tokens"]  # tokens of all ranks are counted
    weight_diff = max_diff(result["weights"], reference["weights"])
    print(f"{parallel}: max |weight diff| after 4 steps = {weight_diff:.2e}")
    assert weight_diff < 1e-4  # Adam divides by sqrt(v): parameters with tiny gradients amplify rounding (~1e-5)


@pytest.mark.slow
def test_resume_under_torchrun_continues_exactly(ranks):
    _, _, result = ranks
    assert result["resumed_losses"] == result["losses"]  # float for float, steps 1-2 from the checkpoint history


@pytest.mark.slow
def test_checkpoint_of_two_ranks_loads_in_one_process(ranks, reference):
    _, out, result = ranks
    single = make(BASE, model_seed=3)
    single.load(out / "run")  # the step-4 checkpoint rank 0 wrote
    assert single.step == 4
    for name, p in single.module.named_parameters():
        assert torch.equal(p, result["weights"][name]), name
    # and a single process continues a 2-rank run from step 2 like the 2 ranks did
    resumed = make(BASE, model_seed=3)
    losses = resumed.fit(resume_from=out / "run" / "step-00000002").losses()
    assert losses == pytest.approx(result["losses"], abs=1e-5)
    assert {p.name for p in out.glob("run/*")} >= {"step-00000002", "step-00000004", "LATEST", "metrics.json"}


def test_each_rank_takes_its_slice_of_the_global_batch():
    """DistributedSampler-style split: within an epoch no example twice; the ranks' rows of micro-batch j are
    exactly the rows of one process's micro-batch j with a batch twice as large."""
    single = make(BASE)
    config = replace(BASE, batch_size=GLOBAL_BATCH // WORLD)
    shards = []
    for rank in range(WORLD):
        trainer = make(config)
        trainer.dist = DistContext("ddp", rank=rank, world_size=WORLD)
        shards.append(trainer.micro_batches())
    per_epoch = len(data()) // GLOBAL_BATCH
    seen = []
    whole = single.micro_batches()
    for _ in range(per_epoch + 1):  # into the next epoch
        rows = [next(s)["input_ids"] for s in shards]
        assert torch.equal(torch.cat(rows), next(whole)["input_ids"])
        seen.extend(tuple(r.tolist()) for r in torch.cat(rows))
    assert len(set(seen[:per_epoch * GLOBAL_BATCH])) == per_epoch * GLOBAL_BATCH  # none twice in epoch 0


def test_parallel_needs_torchrun_and_a_known_mode(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(RuntimeError, match="needs the environment torchrun sets"):
        make(replace(BASE, parallel="ddp"))
    with pytest.raises(ValueError, match="parallel must be one of \\('none', 'ddp', 'fsdp'\\), got 'zero'"):
        replace(BASE, parallel="zero")


@pytest.mark.slow
def test_torchrun_command_line_fsdp_matches_one_process(tmp_path, capsys):
    """A real ``torchrun --nproc_per_node=2 -m companion train --parallel fsdp`` run of a tiny config: one set of
    prints (rank 0), the files written once, and the losses of one process with the doubled batch."""
    from companion.__main__ import main

    config = {"task": "causal_lm", "model": {"n_layers": 2, "d_model": 32, "n_heads": 4},
              "data": {"max_chars": 200, "block_size": 16, "max_train_documents": 40, "max_eval_documents": 8},
              "train": {"max_steps": 3, "batch_size": 2, "lr": 1e-2, "eval_batches": 1, "progress": False,
                        "device": "cpu", "precision": "fp32"}}
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(config))
    done = run_torchrun(["-m", "companion", "train", "--config", str(path), "--parallel", "fsdp",
                         "--out-dir", str(tmp_path / "fsdp")], cwd=tmp_path)
    assert done.stdout.count('{"step": 3') == 1 and "fsdp on 2 ranks" in done.stdout
    assert main(["train", "--config", str(path), "--batch-size", "4", "--out-dir", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    fsdp, one = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("fsdp", "one"))
    assert [r["loss"] for r in fsdp["train"]] == pytest.approx([r["loss"] for r in one["train"]], abs=1e-5)
    assert fsdp["eval"][-1]["val_loss"] == pytest.approx(one["eval"][-1]["val_loss"], abs=1e-5)


# ----------------------------------------------------------------------------- activation checkpointing
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_activation_checkpointing_gives_identical_losses_and_gradients(dropout):
    """Recomputation in backward must reproduce the forward exactly, dropout masks included (the RNG state is
    saved and restored around the recomputation)."""
    model = replace(MODEL, dropout=dropout)
    config = replace(BASE, max_steps=3, checkpoint_every=0)
    plain, checkpointed = make(config, model=model), make(replace(config, activation_checkpointing=True), model=model)
    torch.manual_seed(5)
    a = first_step_grads(plain), plain.fit().losses()
    torch.manual_seed(5)
    b = first_step_grads(checkpointed), checkpointed.fit().losses()
    assert max_diff(a[0], b[0]) == 0.0 and a[1] == b[1]
    # names unchanged: the checkpointed model's weights load into a plain one
    assert [n for n, _ in checkpointed.module.named_parameters()] == [n for n, _ in plain.module.named_parameters()]


def test_activation_checkpointing_saves_activations_and_recomputes():
    """The test above can fail only if checkpointing does something: fewer tensors kept for backward, and each
    block's forward runs twice per step."""
    def saved_and_calls(model):
        calls = []
        for block in transformer_blocks(model):  # the recomputation calls the block's children again
            block.ffn.register_forward_pre_hook(lambda *_: calls.append(1))
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss = model(torch.randint(32, (2, 16))).sum()
        loss.backward()
        return sum(saved), len(calls)

    torch.manual_seed(0)
    plain_saved, plain_calls = saved_and_calls(GPT(MODEL))
    torch.manual_seed(0)
    model = GPT(MODEL)
    assert checkpoint_activations(model) == 2
    ckpt_saved, ckpt_calls = saved_and_calls(model)
    assert ckpt_saved < plain_saved / 2 and (plain_calls, ckpt_calls) == (2, 4)


def test_activation_checkpointing_needs_transformer_blocks():
    with pytest.raises(ValueError, match="Linear has no TransformerBlock"):
        checkpoint_activations(torch.nn.Linear(2, 2))


if __name__ == "__main__":  # torchrun --nproc_per_node=2 tests/training/test_distributed.py {ddp,fsdp} OUT_DIR
    worker(sys.argv[1], Path(sys.argv[2]))
