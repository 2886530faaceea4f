"""The training stack on a real CUDA device: fp16 + GradScaler, bf16 autocast against fp32, the memory estimate
against the caching allocator, NCCL DDP/FSDP against one process, and the precision choice for this GPU.

Every test here is marked ``gpu`` and skipped without CUDA (``pytest -m gpu`` selects them; on a CPU machine they
report "needs a CUDA device"). Each is meant to finish within a minute on an H100; ``benchmarks/gpu_check.py`` runs
them and then measures throughput. The data-parallel tests launch this file under ``torchrun`` with one process per
GPU: the ``__main__`` block at the bottom is the worker, as in tests/training/test_distributed.py.
"""

from __future__ import annotations

import gc
import math
import os
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
from companion.runtime import Precision, choose_precision, cuda_has_native_bf16
from companion.training import TrainConfig, Trainer
from companion.training.memory import estimate_memory
from companion.training.optim import OptimizerConfig, build_optimizer
from companion.training.throughput import GPU_PEAK_FLOPS, gpu_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TINY = GPTConfig(vocab_size=64, n_ctx=32, n_layers=2, d_model=64, n_heads=4, dropout=0.0)
STEPS = 30
BASE = TrainConfig(max_steps=STEPS, batch_size=8, lr=3e-3, warmup_steps=0, device="cuda", precision="fp32",
                   progress=False)


def lm_loss(model, batch):
    return causal_lm_loss(model(batch["input_ids"]), batch["labels"])


def data(n: int = 64, t: int = TINY.n_ctx, vocab: int = TINY.vocab_size):
    """Learnable rows: arithmetic sequences mod V with a random start and a stride of 1, 2 or 3 (a model that has
    seen a few tokens of a row predicts the rest, so the loss falls well below ln V within a few dozen steps)."""
    g = torch.Generator().manual_seed(0)
    start = torch.randint(vocab, (n, 1), generator=g)
    return [{"input_ids": ((start[i] + torch.arange(t) * (i % 3 + 1)) % vocab).tolist()} for i in range(n)]


def make(config: TrainConfig, precision: Precision | None = None, n_rows: int = 64) -> Trainer:
    torch.manual_seed(0)  # the same initial weights in every run
    return Trainer(GPT(TINY), config, data(n_rows), CausalLMCollator(), lm_loss, precision=precision)


def snapshot(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.module.named_parameters()}


# ----------------------------------------------------------------------------- (a) fp16 + GradScaler
def test_fp16_with_grad_scaler_trains_and_skips_an_overflowing_step():
    """fp16 autocast forced on the GPU (``precision="fp16"``, as a V100 or T4 gets by default): 30 steps with finite
    losses that fall by more than 1 nat (from about ln 64 = 4.2 on the learnable rows). At step 16 a hook replaces
    one gradient by inf, as an fp16 overflow would: GradScaler must skip that update (weights and AdamW's step
    count unchanged) and halve the scale (backoff factor 0.5; its growth interval of 2000 steps cannot interfere).
    On the CPU (fp16 CPU autocast through an explicit Precision) the same run passes, its 5-step mean loss falling
    from 3.82 to 2.24."""
    trainer = make(replace(BASE, precision="fp16"))
    assert trainer.precision.dtype == torch.float16 and trainer.scaler.is_enabled()
    x = torch.randint(TINY.vocab_size, (2, 8), device=trainer.precision.device)
    with torch.no_grad(), trainer.precision.autocast():
        assert trainer.model(x).dtype == torch.float16  # the forward really runs in fp16

    poisoned = trainer.module.blocks[0].self_attn.out_proj.weight
    armed = [False]

    def poison(grad: torch.Tensor) -> torch.Tensor:
        if armed[0]:
            armed[0] = False
            return torch.full_like(grad, math.inf)
        return grad

    handle = poisoned.register_hook(poison)
    batches = trainer.micro_batches()
    records = []
    try:
        for step in range(STEPS):
            if step == STEPS // 2:
                armed[0] = True
                scale, weights = trainer.scaler.get_scale(), snapshot(trainer)
                adam_steps = [float(s["step"]) for s in trainer.optimizer.state.values()]
                record = trainer.train_step([next(batches)])
                assert not armed[0], "the hook did not run"
                assert not math.isfinite(record["grad_norm"])
                assert trainer.scaler.get_scale() == scale / 2
                after = snapshot(trainer)
                assert all(torch.equal(weights[n], after[n]) for n in weights), "the overflowing step was applied"
                assert [float(s["step"]) for s in trainer.optimizer.state.values()] == adam_steps
            else:
                record = trainer.train_step([next(batches)])
            records.append(record)
    finally:
        handle.remove()
    losses = [r["loss"] for r in records]
    assert all(math.isfinite(v) for v in losses), losses
    assert all(torch.isfinite(p).all() for p in trainer.module.parameters())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"fp16 + GradScaler: loss {first:.2f} -> {last:.2f}, final scale {trainer.scaler.get_scale():g}")
    assert last < first - 1.0, losses


# ----------------------------------------------------------------------------- (b) bf16 autocast vs fp32
BF16_FIRST_TOL = 0.01  # step 1, the same weights: only the forward's bf16 rounding separates the two losses
BF16_TOL = 0.05  # any step of 30: the trajectories also drift apart through the updates


def test_bf16_autocast_losses_follow_fp32():
    """bf16 autocast (the default on compute capability >= 8.0) against fp32 from the same weights and batches.

    bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2%), but the matmuls accumulate in fp32 and the loss
    is computed in fp32 and averaged over 8 x 31 tokens, so the rounding errors mostly cancel in the loss. On the CPU
    the same comparison (bf16 CPU autocast against fp32, this model and data) gives 2e-5 at step 1 and 2e-3 at
    most over the 30 steps; the bounds, BF16_FIRST_TOL = 0.01 and BF16_TOL = 0.05 nat (about 1% of ln 64), leave a
    factor of 25 or more for other kernels (flash attention, cuBLAS). The difference must not be 0: that would mean
    autocast did nothing."""
    if not cuda_has_native_bf16():
        pytest.skip(f"bf16 needs compute capability >= 8.0, this GPU has {torch.cuda.get_device_capability()}")
    fp32 = make(BASE).fit().losses()
    bf16_trainer = make(replace(BASE, precision="bf16"))
    assert bf16_trainer.precision.dtype == torch.bfloat16 and not bf16_trainer.scaler.is_enabled()
    bf16 = bf16_trainer.fit().losses()
    diffs = [abs(a - b) for a, b in zip(fp32, bf16)]
    print(f"bf16 vs fp32 over {STEPS} steps: step 1 |diff| {diffs[0]:.1e}, max |diff| {max(diffs):.1e}; "
          f"final {bf16[-1]:.2f} vs {fp32[-1]:.2f}")
    assert len(bf16) == len(fp32) == STEPS
    assert diffs[0] < BF16_FIRST_TOL and max(diffs) < BF16_TOL, diffs
    assert max(diffs) > 0.0
    assert fp32[-1] < fp32[0] - 1.0  # both runs learn: the comparison is between two trajectories that move


# ----------------------------------------------------------------------------- (c) memory accounting
MEMORY_MODEL = GPTConfig(vocab_size=2048, n_ctx=256, n_layers=6, d_model=384, n_heads=6, dropout=0.0)
MEMORY_BATCH = 16
PEAK_TOL = 0.15  # peak of a step vs estimate_memory(...).total
STATES_TOL = 0.05  # weights + gradients + AdamW moments after the step
ACTIVATIONS_TOL = 0.10  # what the forward leaves for the backward


def _one_step(model, optimizer, idx, precision: Precision) -> int:
    """Forward, loss, backward, AdamW step (gradients kept); returns memory_allocated right after the forward."""
    with precision.autocast():
        loss = causal_lm_loss(model(idx), idx)
    after_forward = torch.cuda.memory_allocated()
    loss.backward()
    optimizer.step()
    return after_forward


@pytest.mark.parametrize("precision", ["fp32", "gpu default"])
def test_memory_estimate_matches_the_cuda_allocator(precision):
    """`estimate_memory` against `torch.cuda.max_memory_allocated` for 6 layers, width 384, context 256, batch 16.

    The baseline is taken after a throwaway step of the same model: cuBLAS's workspaces (one per handle, and the
    autograd engine's backward thread has a handle of its own; up to 32 MiB each on Hopper) come from the caching
    allocator and stay allocated, so they would otherwise be counted as the step's memory. The measured step is the
    second one of the measured model, so AdamW's moments already exist, as at every step but the first.

    * Model states: after the step, allocated - baseline = weights + gradients + moments (+ the batch's token ids),
      each tensor rounded up to the allocator's 512-byte blocks: STATES_TOL = 5% is generous.
    * Activations: allocated after the forward minus before it = the tensors saved for the backward, which
      tests/training/test_memory.py checks to 2% on the CPU; the CUDA kernels save the same tensors (flash or
      memory-efficient attention: q, k, v, output, float32 log-sum-exp) plus a few bytes of RNG state:
      ACTIVATIONS_TOL = 10%.
    * Peak: the estimate is weights + gradients + moments + activations. The real peak comes at the start of the
      backward, before any gradient exists, with what the estimate leaves out: the loss's two float32 (B (T-1), V)
      gradient buffers in flight (2 x 4 bytes x 16 x 255 x 2048 = 64 MiB) instead of the 44 MiB of gradients; so
      the peak should be the estimate + 20 MiB, 1.02x-1.03x (the vocabulary is small on purpose: at V = 50257 the
      loss buffers dominate). On the CPU, `torch.distributed._tools.mem_tracker.MemTracker` measures exactly that
      for this step: 972.6 MiB vs 952.7 estimated in fp32, 775.1 vs 755.4 under bf16 autocast. PEAK_TOL = 15%
      leaves room for what the CUDA kernels allocate as scratch (flash attention's float32 dq accumulator, a few MiB
      here) and for allocator rounding.
    """
    device = torch.device("cuda")
    p = choose_precision(device, "fp32" if precision == "fp32" else None)
    config, b, t = MEMORY_MODEL, MEMORY_BATCH, MEMORY_MODEL.n_ctx
    torch.manual_seed(0)
    idx = torch.randint(config.vocab_size, (b, t), device=device)  # (B, T)

    throwaway = GPT(config).to(device)
    _one_step(throwaway, build_optimizer(throwaway, OptimizerConfig(lr=1e-4)), idx, p)
    del throwaway
    gc.collect()  # nothing of the throwaway step may be freed later, during the measured one
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()

    model = GPT(config).to(device)
    optimizer = build_optimizer(model, OptimizerConfig(lr=1e-4))
    _one_step(model, optimizer, idx, p)  # creates AdamW's moments
    optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    after_forward = _one_step(model, optimizer, idx, p)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - baseline
    extra = idx.numel() * idx.element_size() + sum(x.numel() * x.element_size() for x in model.buffers())
    states = torch.cuda.memory_allocated() - baseline - extra
    activations = after_forward - before

    est = estimate_memory(config, b, t, precision=p.name)
    est_states = est.weights + est.grads + est.optimizer
    mib = 2**20
    print(f"{p.describe()}: states {states / mib:.1f} MiB vs {est_states / mib:.1f} estimated; activations "
          f"{activations / mib:.1f} vs {est.activations / mib:.1f}; peak {peak / mib:.1f} vs total "
          f"{est.total / mib:.1f}")
    assert abs(states / est_states - 1) < STATES_TOL
    assert abs(activations / est.activations - 1) < ACTIVATIONS_TOL
    assert abs(peak / est.total - 1) < PEAK_TOL


# ----------------------------------------------------------------------------- (d) NCCL DDP and FSDP
PER_RANK = 4  # rows per rank per micro-batch; one process takes PER_RANK * world_size
DIST_TOL = 1e-4
DIST_BASE = replace(BASE, max_steps=4, grad_accum_steps=2, max_grad_norm=0.5)


def worker(parallel: str, out: Path) -> None:
    """One rank: train DIST_BASE with ``parallel`` on its own GPU, rank 0 saves the losses."""
    import torch.distributed as dist

    world = int(os.environ["WORLD_SIZE"])
    trainer = make(replace(DIST_BASE, parallel=parallel, batch_size=PER_RANK), n_rows=16 * PER_RANK * world)
    history = trainer.fit()
    result = {"losses": history.losses(), "grad_norms": [r["grad_norm"] for r in history.train],
              "tokens": trainer.tokens, "backend": dist.get_backend(), "world_size": trainer.dist.world_size,
              "device": str(trainer.precision.device)}
    devices = trainer.dist.gather(result["device"])
    if trainer.dist.is_main:
        result["devices"] = devices
        torch.save(result, out / "result.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_nccl_data_parallel_matches_one_process(parallel, tmp_path):
    """All GPUs present, one rank each, NCCL: 4 fp32 steps (2 accumulated micro-batches of PER_RANK rows per rank,
    clipping active) give the losses and gradient norms of one process with PER_RANK * world_size rows, within
    DIST_TOL = 1e-4 (the all-reduce adds the ranks' gradients in another order than one process's matmul does; on
    the CPU with gloo the same comparison holds to 1e-5, tests/training/test_distributed.py)."""
    world = torch.cuda.device_count()
    if world < 2:
        pytest.skip(f"needs at least 2 GPUs, found {world}")
    run_torchrun([__file__, parallel, str(tmp_path)], cwd=tmp_path, nproc=world)
    result = torch.load(tmp_path / "result.pt", weights_only=False)
    assert result["backend"] == "nccl" and result["world_size"] == world
    assert result["devices"] == [f"cuda:{r}" for r in range(world)]  # one GPU per rank
    single = make(replace(DIST_BASE, batch_size=PER_RANK * world), n_rows=16 * PER_RANK * world)
    history = single.fit()
    reference, norms = history.losses(), [r["grad_norm"] for r in history.train]
    loss_diff = max(abs(a - b) for a, b in zip(result["losses"], reference))
    norm_diff = max(abs(a - b) for a, b in zip(result["grad_norms"], norms))
    print(f"{parallel} on {world} GPUs: max |loss diff| {loss_diff:.1e}, grad norm {norm_diff:.1e}")
    assert len(result["losses"]) == len(reference) == DIST_BASE.max_steps
    assert loss_diff < DIST_TOL and norm_diff < DIST_TOL
    assert norms[0] > DIST_BASE.max_grad_norm  # clipping is active: the global norm matters
    assert result["tokens"] == single.tokens  # every rank's tokens are counted


# ----------------------------------------------------------------------------- (e) the precision choice
def test_choose_precision_follows_this_gpus_compute_capability():
    """bf16 from compute capability 8.0 on, else fp16 with a GradScaler; autocast really computes in that dtype;
    and the datasheet table of `companion.training.throughput` has a peak for the chosen dtype on this GPU."""
    capability = torch.cuda.get_device_capability()
    native = capability >= (8, 0)
    p = choose_precision("cuda")
    assert p.device.type == "cuda" and (p.name, p.grad_scaler) == (("bf16", False) if native else ("fp16", True))
    assert cuda_has_native_bf16() == native
    if native:
        assert torch.cuda.is_bf16_supported(including_emulation=False)
    x = torch.randn(16, 16, device="cuda")
    with p.autocast():
        assert (x @ x).dtype == p.dtype
    assert (x @ x).dtype == torch.float32  # outside autocast: fp32 again
    try:
        row = gpu_model()
    except ValueError:  # a GPU the datasheet table does not list: nothing to compare with
        return
    assert p.name in GPU_PEAK_FLOPS[row], (torch.cuda.get_device_name(), row)


if __name__ == "__main__":  # torchrun --nproc_per_node=N tests/training/test_gpu.py {ddp,fsdp} OUT_DIR
    worker(sys.argv[1], Path(sys.argv[2]))
