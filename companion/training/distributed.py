"""How the Trainer wraps a model for scale: activation checkpointing, DDP and FSDP, launched by ``torchrun``.

* DDP (Li et al., 2020, "PyTorch Distributed: Experiences on Accelerating Data Parallel Training"): every rank keeps
  the whole model; ``DistributedDataParallel`` all-reduces (averages) the gradients in buckets during ``backward``.
* FSDP (ZeRO stage 3, Rajbhandari et al., 2020; Zhao et al., 2023, "PyTorch FSDP"): FSDP2's ``fully_shard`` on each
  Transformer block, then on the root, over an explicit 1-D device mesh; parameters, gradients and AdamW states are
  sharded, a block's weights are all-gathered just before it runs and gradients reduce-scattered after.

Design: one process per device (gloo on CPU, NCCL on CUDA, chosen from the device); rank ``r`` of ``W`` takes the
``r``-th slice of each global micro-batch, so ``W`` ranks with batch ``B`` see exactly the rows of one process with
batch ``B * W``. Gradients are reduced in float32 (gloo has no bf16 all-reduce); on gloo FSDP2 is told to SUM and divide
by ``W`` itself instead of trusting the backend's AVG (pytorch#162338). Checkpoints hold full, unsharded state dicts,
so one process loads what ``W`` ranks saved. Activation checkpointing recomputes each block in ``backward``
(``torch.utils.checkpoint``, non-reentrant, RNG state preserved) without renaming any parameter.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from companion.runtime import Precision

PARALLEL = ("none", "ddp", "fsdp")  # what TrainConfig.parallel and --parallel accept


def backend_for(device: torch.device) -> str:
    """The collective backend for ``device``: NCCL for CUDA, gloo for everything else (CPU)."""
    return "nccl" if device.type == "cuda" else "gloo"


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank among ``world_size`` processes (1 and rank 0 without parallelism)."""

    parallel: str = "none"  # "none", "ddp" or "fsdp"
    rank: int = 0  # global rank
    world_size: int = 1  # number of processes
    local_rank: int = 0  # rank on this machine (selects the GPU)

    @property
    def is_main(self) -> bool:
        """Only rank 0 prints, draws progress bars and writes files."""
        return self.rank == 0

    def place(self, precision: Precision) -> Precision:
        """Each rank on its own GPU (``cuda:local_rank``); CPU ranks share the CPU."""
        if self.parallel == "none" or precision.device.type != "cuda":
            return precision
        torch.cuda.set_device(self.local_rank)
        return replace(precision, device=torch.device("cuda", self.local_rank))

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sum over ranks (the values themselves without parallelism)."""
        if self.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` on rank 0 (``[obj]`` without parallelism), None on the other ranks."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out


def init_distributed(parallel: str, device: torch.device) -> DistContext:
    """Join the process group ``torchrun`` set up (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``… in the environment)."""
    if parallel not in PARALLEL:
        raise ValueError(f"parallel must be one of {PARALLEL}, got {parallel!r}")
    if parallel == "none":
        return DistContext()
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise RuntimeError(f"parallel={parallel!r} needs the environment torchrun sets (RANK, WORLD_SIZE): "
                               f"torchrun --nproc_per_node=N -m companion train ... --parallel {parallel}")
        dist.init_process_group(backend_for(device))
    return DistContext(parallel, dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The Transformer blocks of a companion model (GPT, Llama, BERT: the entries of its ``blocks`` list)."""
    from companion.nn.block import TransformerBlock

    return [m for m in model.modules() if isinstance(m, TransformerBlock)]


class _Checkpointed:
    """A block's ``forward`` replaced by one that keeps no activations and recomputes them in ``backward``.

    Set as the instance attribute ``block.forward`` (``nn.Module.__call__`` looks it up there first), so the block
    keeps its place and its parameter names: checkpoints and optimizers do not see the difference."""

    def __init__(self, block: nn.Module) -> None:
        self.block, self.forward = block, type(block).forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return checkpoint(self.forward, self.block, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)


def checkpoint_activations(model: nn.Module) -> int:
    """Turn on activation checkpointing for every Transformer block of ``model``; returns how many blocks."""
    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError(f"activation checkpointing: {type(model).__name__} has no TransformerBlock to wrap")
    for block in blocks:
        if not isinstance(block.__dict__.get("forward"), _Checkpointed):
            block.forward = _Checkpointed(block)
    return len(blocks)


def wrap_model(model: nn.Module, ctx: DistContext) -> nn.Module:
    """The module the loop calls: ``model`` itself, ``DistributedDataParallel(model)``, or ``model`` after
    ``fully_shard`` of each block and the root (FSDP2 shards in place: the optimizer must be built afterwards)."""
    if ctx.parallel == "ddp":
        device = next(model.parameters()).device
        return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if ctx.parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        device = next(model.parameters()).device
        mesh = init_device_mesh(device.type, (ctx.world_size,), mesh_dim_names=("dp",))
        policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)  # gloo cannot reduce bf16; fp32 everywhere
        blocks = transformer_blocks(model)
        if not blocks:
            raise ValueError(f"fsdp: {type(model).__name__} has no TransformerBlock to shard")
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        if backend_for(device) == "gloo" and hasattr(model, "set_force_sum_reduction_for_comms"):
            for module in (*blocks, model):  # SUM, then FSDP divides by W: correct whether or not gloo has AVG
                module.set_force_sum_reduction_for_comms(True)
    return model


def no_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """DDP: skip the all-reduce on all but the last micro-batch of a step (gradients accumulate locally)."""
    if sync or not isinstance(getattr(model, "_orig_mod", model), nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return getattr(model, "_orig_mod", model).no_sync()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly sharded) DTensor; a collective for DTensors, so call it on every rank."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _unique_names(model: nn.Module) -> dict[str, str]:
    """alias -> first name, for parameters shared under several names (tied embeddings)."""
    first: dict[int, str] = {}
    return {name: first.setdefault(id(p), name) for name, p in model.named_parameters(remove_duplicate=False)}


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU weights, each shared tensor once under its first name; collective under FSDP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    names = _unique_names(model)
    return {k: v.detach().cpu().contiguous() for k, v in state.items() if names.get(k, k) == k}


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Full optimizer state keyed by parameter name (the same in every mode); collective under FSDP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_model_state(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Load full weights into a plain or sharded ``model`` (every rank passes the whole file)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    names = _unique_names(model)
    full = {alias: tensors[first] for alias, first in names.items() if first in tensors}
    full.update({k: v for k, v in tensors.items() if k not in full})  # buffers
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, strict=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
