"""Training: AdamW with parameter groups and the warmup + cosine schedule (:mod:`.optim`), atomic and exactly
resumable checkpoints (:mod:`.checkpoint`), memory accounting (:mod:`.memory`), DDP/FSDP2 and activation checkpointing (:mod:`.distributed`), throughput and MFU (:mod:`.throughput`), metrics and the loss curve (:mod:`.metrics`), and the loop
(:mod:`.trainer`)."""

from companion.training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)
from companion.training.distributed import (
    DistContext,
    checkpoint_activations,
    init_distributed,
    wrap_model,
)
from companion.training.memory import (
    MemoryEstimate,
    activation_bytes,
    estimate_memory,
    format_gib,
    memory_table,
    published_configs,
)
from companion.training.metrics import History, ProgressBar, plot_history
from companion.training.optim import (
    OptimizerConfig,
    adamw_step,
    build_optimizer,
    lr_at,
    param_groups,
    set_lr,
    split_decay,
)
from companion.training.throughput import (
    GPU_PEAK_FLOPS,
    gpu_model,
    gpu_peak_flops,
    measure_matmul_peak,
    measure_throughput,
    mfu,
)
from companion.training.trainer import Trainer, TrainConfig

__all__ = [
    "CheckpointError",
    "DistContext",
    "GPU_PEAK_FLOPS",
    "History",
    "MemoryEstimate",
    "OptimizerConfig",
    "ProgressBar",
    "TrainConfig",
    "Trainer",
    "activation_bytes",
    "adamw_step",
    "build_optimizer",
    "checkpoint_activations",
    "estimate_memory",
    "format_gib",
    "gpu_model",
    "gpu_peak_flops",
    "init_distributed",
    "load_checkpoint",
    "load_weights",
    "lr_at",
    "measure_matmul_peak",
    "measure_throughput",
    "memory_table",
    "mfu",
    "param_groups",
    "plot_history",
    "published_configs",
    "save_checkpoint",
    "set_lr",
    "split_decay",
    "wrap_model",
]
