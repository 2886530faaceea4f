"""A training loop to read in one sitting (in the spirit of nanoGPT's ``train.py`` and minGPT's ``Trainer``).

One optimizer step = ``grad_accum_steps`` micro-batches, each loss divided by that count before ``backward``
(so the gradient is that of one batch ``grad_accum_steps`` times larger), then gradient clipping, AdamW, and the
warmup + cosine (or WSD) learning rate of :mod:`.optim`. The data order is a pure function of ``(seed, epoch)``, and a
checkpoint stores the step, the optimizer, the RNG states and the history, so a resumed run continues with
exactly the batches, dropout masks and updates the uninterrupted run would have had.
Precision (device, autocast, GradScaler) comes from :func:`companion.runtime.choose_precision`. Under ``torchrun``
with ``parallel="ddp"``/``"fsdp"`` (:mod:`.distributed`) each rank takes its slice of every global micro-batch of
``batch_size * world_size`` rows; only rank 0 prints and writes. ``activation_checkpointing`` recomputes each
Transformer block in ``backward``; ``compile`` runs the model through ``torch.compile``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from companion.runtime import Precision, choose_precision
from companion.training import distributed
from companion.training.checkpoint import (CheckpointError, load_optimizer, load_weights, read_checkpoint,
                                           rng_state, save_checkpoint, set_rng_state)
from companion.training.metrics import History, ProgressBar, plot_history
from companion.training.optim import OptimizerConfig, build_optimizer, lr_at, set_lr

LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]  # (model, batch) -> scalar mean loss
EvalFn = Callable[[nn.Module], dict[str, float]]  # (model in eval mode) -> named metrics, e.g. {"f1": 0.83}


@dataclass(frozen=True)
class TrainConfig:
    """Everything about a run except the model and the data."""

    max_steps: int = 1000  # optimizer steps
    batch_size: int = 16  # examples per micro-batch
    grad_accum_steps: int = 1  # micro-batches per optimizer step (effective batch = batch_size * this)
    lr: float = 3e-4  # peak learning rate
    min_lr: float = 0.0  # learning rate at the end of the decay
    warmup_steps: int = 0  # linear warm-up steps
    schedule: str = "cosine"  # "cosine" or "wsd" (warmup-stable-decay; see companion.training.optim.lr_at)
    decay_fraction: float = 0.2  # WSD: share of max_steps spent in the final linear decay
    z_loss: float = 0.0  # coefficient of the z-loss added to a causal LM's loss (0: none; PaLM used 1e-4)
    weight_decay: float = 0.1  # AdamW decay on weight matrices (never on norms/biases; embeddings: see below)
    decay_embeddings: bool = False  # also decay embedding tables
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW moment decay rates
    eps: float = 1e-8  # AdamW epsilon
    max_grad_norm: float | None = 1.0  # clip the global gradient norm to this (None: no clipping)
    eval_every: int = 0  # evaluate every this many steps (0: only at the end)
    eval_batches: int | None = None  # at most this many validation batches per evaluation (None: all)
    patience: int | None = None  # early stopping: stop after this many evaluations without improvement
    min_delta: float = 0.0  # an improvement must beat the best value of `metric` by more than this
    metric: str = "val_loss"  # evaluation result watched by early stopping and restore_best (e.g. an eval_fn's "f1")
    mode: str = "min"  # "min": lower `metric` is better; "max": higher is better (accuracy, F1)
    restore_best: bool = False  # at the end, put back the weights of the evaluation with the best `metric`
    checkpoint_every: int = 0  # save every this many steps (0: only at the end, if out_dir is set)
    keep_checkpoints: int = 1  # newest checkpoints kept on disk
    out_dir: str | None = None  # run directory: checkpoints, metrics.json, loss_curve.png
    seed: int = 0  # data order (and evaluation masks)
    device: str | None = None  # "cpu", "cuda"… (None: the best available)
    precision: str | None = None  # "fp32", "bf16", "fp16" (None: chosen for the device)
    progress: bool = True  # draw a progress bar on stdout (rank 0 only)
    parallel: str = "none"  # "none", "ddp" (DistributedDataParallel) or "fsdp" (FSDP2 fully_shard); needs torchrun
    activation_checkpointing: bool = False  # recompute each Transformer block in backward instead of storing it
    compile: bool = False  # torch.compile the model

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum_steps", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        for name in ("eval_every", "checkpoint_every", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {self.max_grad_norm!r}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be a positive int or None, got {self.patience!r}")
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {self.mode!r}")
        if not (self.min_delta >= 0 and math.isfinite(self.min_delta)):
            raise ValueError(f"min_delta must be a finite number >= 0, got {self.min_delta!r}")
        if not (self.z_loss >= 0 and math.isfinite(self.z_loss)):
            raise ValueError(f"z_loss must be a finite number >= 0, got {self.z_loss!r}")
        if self.parallel not in distributed.PARALLEL:
            raise ValueError(f"parallel must be one of {distributed.PARALLEL}, got {self.parallel!r}")
        self.optimizer()  # validates lr, min_lr, warmup, betas

    def optimizer(self) -> OptimizerConfig:
        return OptimizerConfig(lr=self.lr, min_lr=self.min_lr, warmup_steps=self.warmup_steps,
                               decay_steps=self.max_steps, weight_decay=self.weight_decay, betas=tuple(self.betas),
                               eps=self.eps, decay_embeddings=self.decay_embeddings, schedule=self.schedule,
                               decay_fraction=self.decay_fraction)


# fields whose change would break an exact resume (they decide which examples form each step)
_RESUME_KEYS = ("grad_accum_steps", "seed")  # and the global batch, batch_size * world_size


class Trainer:
    """``Trainer(model, config, train_data, collate_fn, loss_fn, eval_data).fit()`` -> :class:`History`.

    ``train_data``/``eval_data``: anything with ``len`` and integer indexing returning one example (a list, a
    ``datasets.Dataset``); ``collate_fn`` turns a list of examples into a dict of tensors; ``loss_fn(model,
    batch)`` returns the mean loss of the batch. ``precision`` overrides :func:`companion.runtime.choose_precision`
    (e.g. fp16 with a GradScaler on the CPU, to test overflow handling); ``scaler_init``: the GradScaler's first scale.

    ``module`` is the model itself (its weights are what checkpoints hold); ``model`` is what the loop calls: the same
    object, its DDP wrapper, or the ``torch.compile`` of either.

    ``eval_fn(model) -> dict`` adds metrics of its own to each evaluation (validation accuracy, macro-F1…; called
    with the model in eval mode, under ``no_grad`` and the evaluation's forked RNG). Early stopping watches
    ``config.metric`` (``"val_loss"`` by default) in direction ``config.mode``; ``best_step`` is the step of the best
    evaluation, and with ``config.restore_best`` the weights of that step are put back when ``fit`` ends.
    """

    def __init__(self, model: nn.Module, config: TrainConfig, train_data: Sequence, collate_fn: Callable,
                 loss_fn: LossFn, eval_data: Sequence | None = None, precision: Precision | None = None,
                 scaler_init: float = 2.0**16, eval_fn: EvalFn | None = None) -> None:
        self.config, self.train_data, self.eval_data, self.eval_fn = config, train_data, eval_data, eval_fn
        self.collate_fn, self.loss_fn = collate_fn, loss_fn
        precision = precision or choose_precision(config.device, config.precision)
        self.dist = distributed.init_distributed(config.parallel, precision.device)
        self.precision = self.dist.place(precision)
        if len(train_data) < config.batch_size * self.dist.world_size:
            raise ValueError(f"train_data has {len(train_data)} examples, fewer than batch_size={config.batch_size}"
                             f" x world_size={self.dist.world_size}")
        self.module = model.to(self.precision.device)
        if config.activation_checkpointing:
            distributed.checkpoint_activations(self.module)
        self.model = distributed.wrap_model(self.module, self.dist)  # FSDP shards self.module in place
        if config.compile:
            self.model = torch.compile(self.model)
        self.optimizer = build_optimizer(self.module, config.optimizer())
        self.scaler = self._grad_scaler(scaler_init)
        if self.dist.world_size > 1:  # same initial weights everywhere, different dropout masks on each rank
            torch.manual_seed(config.seed * 100_003 + 7919 * self.dist.rank + 1)
        self.step = 0  # optimizer steps taken
        self.tokens = 0  # input tokens seen
        self.history = History()
        self.best_metric, self.bad_evals = (math.inf if config.mode == "min" else -math.inf), 0  # early stopping
        self.best_step: int | None = None  # step of the best evaluation so far
        self.best_weights: dict[str, torch.Tensor] | None = None  # its weights (CPU copies), with restore_best

    def _grad_scaler(self, init_scale: float) -> torch.amp.GradScaler:
        enabled = self.precision.grad_scaler
        if enabled and self.dist.parallel == "fsdp":  # each rank sees only its shard: found-inf is all-reduced
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            return ShardedGradScaler(self.precision.device.type, init_scale=init_scale)
        return torch.amp.GradScaler(self.precision.device.type, init_scale=init_scale, enabled=enabled)

    # ------------------------------------------------------------------ data
    def micro_batches(self, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's micro-batches from number ``start`` on: epoch ``e`` visits the data in ``randperm`` order
        seeded by ``(seed, e)``, cut into global micro-batches of ``batch_size * world_size`` rows, of which rank ``r``
        takes rows ``[r * batch_size, (r + 1) * batch_size)``; the last incomplete global batch of an epoch is
        dropped, so no example is seen twice in an epoch and the ranks together see what one process would."""
        B, W, r = self.config.batch_size, self.dist.world_size, self.dist.rank
        per_epoch = len(self.train_data) // (B * W)
        epoch, i = divmod(start, per_epoch)
        while True:
            g = torch.Generator().manual_seed(self.config.seed * 100_003 + epoch)
            order = torch.randperm(len(self.train_data), generator=g).tolist()
            for j in range(i, per_epoch):
                rows = order[j * B * W + r * B:j * B * W + (r + 1) * B]
                yield self._to_device(self.collate_fn([self.train_data[k] for k in rows]))
            epoch, i = epoch + 1, 0

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.precision.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    # ------------------------------------------------------------------ one step
    def train_step(self, batches: Sequence[dict[str, torch.Tensor]]) -> dict[str, float]:
        """One optimizer step over ``batches`` (the accumulated micro-batches); returns the step's record."""
        self.model.train()
        lr = lr_at(self.step, self.config.optimizer())
        set_lr(self.optimizer, lr)
        total, tokens = self.backward(batches)
        self.scaler.unscale_(self.optimizer)  # true gradients before clipping (no-op without a scaler)
        max_norm = self.config.max_grad_norm or math.inf
        # the global norm: DDP gradients are already averaged; FSDP2 DTensor gradients reduce their shards' norms
        grad_norm = distributed.full_tensor(torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm))
        self.scaler.step(self.optimizer)  # skips the update if fp16 gradients overflowed
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += tokens
        return {"step": self.step, "loss": total, "lr": lr, "grad_norm": float(grad_norm), "tokens": self.tokens}

    def backward(self, batches: Sequence[dict[str, torch.Tensor]]) -> tuple[float, int]:
        """Accumulate the (scaled) gradient of the step's mean loss into ``.grad``; return the loss averaged over
        micro-batches and ranks, and the input tokens all ranks saw. DDP all-reduces on the last micro-batch only."""
        total, tokens = 0.0, 0
        for i, batch in enumerate(batches):
            with distributed.no_sync(self.model, sync=i == len(batches) - 1):
                with self.precision.autocast():
                    loss = self.loss_fn(self.model, batch)
                self.scaler.scale(loss / len(batches)).backward()  # gradients add up over micro-batches
            total += loss.item()
            tokens += int(batch["input_ids"].numel()) if "input_ids" in batch else 0
        total, tokens = self.dist.sum([total, float(tokens)], self.precision.device)
        return total / (len(batches) * self.dist.world_size), int(tokens)

    @property
    def best_val_loss(self) -> float:
        """The best value of ``config.metric`` so far (the validation loss unless another metric is chosen)."""
        return self.best_metric

    @property
    def evaluates(self) -> bool:
        return bool(self.eval_data) or self.eval_fn is not None

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean validation loss (weighted by batch size) and its perplexity ``exp(loss)``, and whatever ``eval_fn``
        returns (without eval_data, only the latter).

        Runs under a forked RNG seeded by ``config.seed``: random masks in an MLM collator are the same at every
        evaluation, and the training RNG stream is untouched (so evaluating does not change training).
        """
        if not self.evaluates:
            raise ValueError("evaluate() needs eval_data or an eval_fn")
        result: dict[str, float] = {"step": self.step}
        if self.eval_data:
            result.update(self._validation_loss())
        if self.eval_fn is not None:
            self.model.eval()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.config.seed)
                extra = self.eval_fn(self.module)
            self.model.train()
            clash = sorted(set(extra) & set(result))
            if clash:
                raise ValueError(f"eval_fn returned keys the trainer already reports: {clash}")
            result.update({k: float(v) for k, v in extra.items()})
        return result

    def _validation_loss(self) -> dict[str, float]:
        self.model.eval()
        B = self.config.batch_size * self.dist.world_size  # every rank evaluates the global batches, all of them
        n_batches = math.ceil(len(self.eval_data) / B)
        if self.config.eval_batches is not None:
            n_batches = min(n_batches, self.config.eval_batches)
        total, count = 0.0, 0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            for j in range(n_batches):
                rows = [self.eval_data[k] for k in range(j * B, min((j + 1) * B, len(self.eval_data)))]
                with self.precision.autocast():
                    loss = self.loss_fn(self.model, self._to_device(self.collate_fn(rows)))
                total, count = total + loss.item() * len(rows), count + len(rows)
        self.model.train()
        val_loss = total / count
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}

    # ------------------------------------------------------------------ the loop
    def fit(self, resume_from: str | Path | None = None, until: int | None = None) -> History:
        """Train to ``config.max_steps`` (or stop early; ``until`` stops at that step, as if interrupted)."""
        cfg = self.config
        if resume_from is not None:
            self.load(resume_from)
        stop_at = cfg.max_steps if until is None else min(until, cfg.max_steps)
        batches = self.micro_batches(start=self.step * cfg.grad_accum_steps)
        bar = ProgressBar(cfg.max_steps, self.step, enabled=cfg.progress and self.dist.is_main)
        stopped_early = False
        while self.step < stop_at and not stopped_early:
            record = self.train_step([next(batches) for _ in range(cfg.grad_accum_steps)])
            self.history.train.append(record)
            bar.update(self.step, loss=record["loss"], lr=record["lr"])
            last = self.step == cfg.max_steps
            if self.evaluates and ((cfg.eval_every and self.step % cfg.eval_every == 0) or last):
                result = self.evaluate()  # every rank evaluates all of eval_data (FSDP needs all ranks in forward)
                self.history.eval.append(result)
                bar.write(self._eval_line(result))
                stopped_early = self._early_stop(result)
            if cfg.out_dir and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save()
        bar.close()
        if cfg.restore_best and self.best_weights is not None and self.best_step != self.step:
            self._load_weights(self.best_weights)
        if cfg.out_dir:
            self.save()
            if self.dist.is_main:
                self.history.save(Path(cfg.out_dir) / "metrics.json")
                self.save_loss_curve(Path(cfg.out_dir) / "loss_curve.png")
        return self.history

    def save_loss_curve(self, path: Path) -> None:
        import matplotlib.pyplot as plt

        from companion.plotting import use_book_style

        try:
            use_book_style()  # Chinese labels need a CJK font
        except RuntimeError:
            pass  # none installed: the figure is still written, with boxes for the Chinese labels
        fig = plot_history(self.history)
        fig.savefig(path)
        plt.close(fig)

    def _eval_line(self, result: dict[str, float]) -> str:
        parts = [f"val_loss {result['val_loss']:.4f}, ppl {result['val_ppl']:.2f}"] if "val_loss" in result else []
        parts += [f"{k} {v:.4f}" for k, v in result.items() if k not in ("step", "val_loss", "val_ppl")]
        return f"step {self.step}: " + ", ".join(parts)

    def _early_stop(self, result: dict[str, float]) -> bool:
        """Track the best ``config.metric``; True once ``patience`` evaluations in a row did not improve it."""
        cfg = self.config
        if cfg.metric not in result and cfg.patience is None and not cfg.restore_best:
            return False  # nothing depends on it (e.g. an eval_fn-only run with the default metric "val_loss")
        if cfg.metric not in result:
            raise ValueError(f"metric {cfg.metric!r} is not among the evaluation results "
                             f"{sorted(k for k in result if k != 'step')}")
        value = result[cfg.metric]
        sign = 1.0 if cfg.mode == "min" else -1.0  # compare sign * value: lower is better
        if sign * value < sign * self.best_metric - cfg.min_delta:
            self.best_metric, self.best_step, self.bad_evals = value, self.step, 0
            if cfg.restore_best:
                self.best_weights = self._weights_that_train()
        else:
            self.bad_evals += 1
        return cfg.patience is not None and self.bad_evals >= cfg.patience

    def _weights_that_train(self) -> dict[str, torch.Tensor]:
        """CPU copies of the weights training can change: the parameters that require grad, and the buffers (all
        weights under FSDP). Frozen parameters (a LoRA base model) are left out: they are the same at every step."""
        if self.dist.parallel == "fsdp":
            return {k: v.detach().to("cpu", copy=True) for k, v in distributed.model_state(self.module).items()}
        frozen = {n for n, p in self.module.named_parameters(remove_duplicate=False) if not p.requires_grad}
        return {k: v.detach().to("cpu", copy=True) for k, v in self.module.state_dict().items() if k not in frozen}

    def _load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.dist.parallel == "fsdp":
            distributed.load_model_state(self.module, tensors)
            return
        result = self.module.load_state_dict(tensors, strict=False)
        if result.unexpected_keys:
            raise CheckpointError(f"best weights hold tensors the model lacks: {result.unexpected_keys[:8]}")

    # ------------------------------------------------------------------ checkpoints
    def save(self, run_dir: str | Path | None = None) -> Path:
        """Checkpoint into ``run_dir`` (default ``config.out_dir``); see :mod:`.checkpoint`. Call it on every rank:
        the full weights and optimizer state are gathered (FSDP), every rank's RNG state too; rank 0 writes."""
        run_dir = run_dir or self.config.out_dir
        if run_dir is None:
            raise ValueError("save() needs a run directory: pass one or set TrainConfig.out_dir")
        weights = distributed.model_state(self.module)
        optimizer = distributed.optimizer_state(self.module, self.optimizer)
        rngs = self.dist.gather(rng_state())
        final = Path(run_dir) / f"step-{self.step:08d}"
        if self.dist.is_main:
            extra = {"config": asdict(self.config), "history": self.history.to_dict(), "tokens": self.tokens,
                     "scaler": self.scaler.state_dict(),
                     "early_stopping": (self.best_metric, self.bad_evals, self.best_step),
                     "best_weights": self.best_weights,
                     "world_size": self.dist.world_size, "rank_rng": rngs}
            final = save_checkpoint(run_dir, weights, optimizer, self.step, extra, keep=self.config.keep_checkpoints)
        if self.dist.world_size > 1:
            torch.distributed.barrier()  # nobody reads the checkpoint before it is complete
        return final

    def load(self, path: str | Path) -> None:
        """Restore model, optimizer, scaler, RNG, step, history from a checkpoint (directory or run directory),
        whatever number of ranks wrote it, as long as the global batch is the same."""
        tensors, state = read_checkpoint(path, map_location="cpu")
        saved, world = state["config"], self.dist.world_size
        changed = [f"{k}: {saved[k]!r} in the checkpoint, {getattr(self.config, k)!r} now"
                   for k in _RESUME_KEYS if saved.get(k) != getattr(self.config, k)]
        before = saved["batch_size"] * state.get("world_size", 1)
        if before != self.config.batch_size * world:
            changed.insert(0, f"batch_size: {saved['batch_size']!r} in the checkpoint, {self.config.batch_size!r} now"
                           f" (global batch {before} vs {self.config.batch_size * world})")
        if changed:
            raise CheckpointError(f"cannot resume exactly from {path}: " + "; ".join(changed))
        if self.dist.parallel == "fsdp":
            distributed.load_model_state(self.module, tensors)
        else:
            load_weights(self.module, tensors, source=state["path"])
        load_optimizer(self.module, self.optimizer, state["optimizer"])
        rngs = state.get("rank_rng")
        set_rng_state(rngs[self.dist.rank] if rngs and len(rngs) == world else state["rng"])
        self.step, self.tokens = state["step"], state["tokens"]
        self.history = History.from_dict(state["history"])
        early = state["early_stopping"]
        self.best_metric, self.bad_evals = early[0], early[1]
        self.best_step = early[2] if len(early) > 2 else None
        self.best_weights = state.get("best_weights")
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
