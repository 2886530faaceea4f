"""Training checkpoints: weights as safetensors, everything else needed for an exact resume (optimizer
moments, grad-scaler, step, RNG states, metrics history) in a small torch file, written atomically.

Layout of a run directory::

    run/step-00000200/model.safetensors   weights (tied tensors stored once; safetensors.torch.save_model)
    run/step-00000200/state.pt            step, optimizer, scaler, RNG states, history, sha256 of the weights
    run/LATEST                            the name of the newest complete checkpoint

A checkpoint is written into a temporary directory and renamed into place (``os.replace``), then ``LATEST``
is replaced the same way: a crash at any moment leaves the previous checkpoint intact and pointed to.
A model or optimizer may also be given as a full state dict (what rank 0 gathers from DDP/FSDP ranks, see
:mod:`.distributed`), so a checkpoint written by ``W`` ranks loads in one process.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file, save_model
from torch import nn

from companion.data import atomic_write_bytes, sha256sum
from companion.errors import CheckpointError

FORMAT_VERSION = 1
WEIGHTS, STATE, LATEST = "model.safetensors", "state.pt", "LATEST"


def rng_state() -> dict[str, Any]:
    """The state of every random generator a training step may draw from."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: str | Path, model: nn.Module | Mapping[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer | Mapping[str, Any] | None, step: int,
                    extra: dict[str, Any] | None = None, keep: int = 1) -> Path:
    """Write ``run_dir/step-<step>/`` atomically, point ``LATEST`` at it, keep the newest ``keep`` checkpoints.

    ``model``/``optimizer``: the objects, or their state dicts (a weights dict must hold each shared tensor once).
    ``extra`` (config, history, scaler state…) is stored in ``state.pt`` next to the optimizer and RNG states.
    Returns the checkpoint directory.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep!r}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        if isinstance(model, nn.Module):
            save_model(model, str(tmp / WEIGHTS))
            tensors = model.state_dict()
        else:
            tensors = dict(model)
            save_file(tensors, str(tmp / WEIGHTS))
        if isinstance(optimizer, torch.optim.Optimizer):
            optimizer = optimizer.state_dict()
        state = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "weights_sha256": sha256sum(tmp / WEIGHTS),
            "shapes": {k: tuple(v.shape) for k, v in tensors.items()},
            "optimizer": None if optimizer is None else optimizer,
            "rng": rng_state(),
            **(extra or {}),
        }
        torch.save(state, tmp / STATE)
        trash = None
        if final.exists():  # re-saving the same step: move the old one aside, delete it only once replaced
            trash = final.with_name(f".{final.name}.old")
            os.replace(final, trash)
        os.replace(tmp, final)
        if trash is not None:
            shutil.rmtree(trash)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    atomic_write_bytes(run_dir / LATEST, (final.name + "\n").encode())
    for old in sorted(run_dir.glob("step-*"))[:-keep]:
        shutil.rmtree(old)
    return final


def resolve(path: str | Path) -> Path:
    """A checkpoint directory from either itself or a run directory holding ``LATEST``."""
    path = Path(path)
    if (path / LATEST).is_file():
        name = (path / LATEST).read_text(encoding="utf-8").strip()
        path = path / name
    if not (path / WEIGHTS).is_file() or not (path / STATE).is_file():
        raise CheckpointError(f"no checkpoint at {path}: expected {WEIGHTS} and {STATE} there "
                              f"(or a run directory with a {LATEST} file)")
    return path


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu"
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(weights, state)`` of a checkpoint (directory or run directory), checked: format version and the sha256
    of the weights. Raises :class:`CheckpointError` naming the file when it is corrupt."""
    path = resolve(path)
    weights_file, state_file = path / WEIGHTS, path / STATE
    try:
        state = torch.load(state_file, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated or overwritten file: pickle/zip errors of many kinds
        raise CheckpointError(f"cannot read training state {state_file}: {type(e).__name__}: {e}") from e
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        found = state.get("format_version") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{state_file} has format version {found!r}; this code reads {FORMAT_VERSION}")
    actual = sha256sum(weights_file)
    if actual != state["weights_sha256"]:
        raise CheckpointError(f"{weights_file} is corrupt: sha256 {actual} differs from {state['weights_sha256']} "
                              f"recorded in {state_file}")
    try:
        tensors = load_file(str(weights_file), device=str(map_location))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read weights {weights_file}: {e}") from e
    state["path"] = path
    return tensors, state


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    restore_rng: bool = True, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load weights into ``model`` (and state into ``optimizer``; RNG states if ``restore_rng``); return the
    state dict (``step``, ``history``, whatever ``extra`` held). Raises :class:`CheckpointError` naming the file
    and the mismatch when the checkpoint is corrupt or does not fit."""
    tensors, state = read_checkpoint(path, map_location)
    state_file = state["path"] / STATE
    load_weights(model, tensors, source=state["path"] / WEIGHTS)
    if optimizer is not None:
        if state["optimizer"] is None:
            raise CheckpointError(f"{state_file} holds no optimizer state")
        try:
            load_optimizer(model, optimizer, state["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"optimizer state in {state_file} does not fit this optimizer: {e}") from e
    if restore_rng:
        set_rng_state(state["rng"])
    return state


def load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """``optimizer.load_state_dict``, also for a state keyed by parameter name (as :mod:`.distributed` saves it)."""
    if any(isinstance(k, str) for k in state["state"]) or any(
            isinstance(p, str) for g in state["param_groups"] for p in g["params"]):
        from companion.training.distributed import load_optimizer_state

        load_optimizer_state(model, optimizer, state)
    else:
        optimizer.load_state_dict(state)


def load_weights(model: nn.Module, tensors: dict[str, torch.Tensor], source: str | Path = "<tensors>") -> None:
    """Copy ``tensors`` into ``model``; every parameter must be present with the same shape.

    Tied parameters may be stored under one of their names only (safetensors stores a shared tensor once).
    """
    expected = model.state_dict()
    # names that alias the same storage as another expected name (tied weights) may be absent from the file
    by_ptr: dict[int, list[str]] = {}
    for name, t in expected.items():
        by_ptr.setdefault(t.data_ptr(), []).append(name)
    missing = [n for n in expected if n not in tensors
               and not any(alias in tensors for alias in by_ptr[expected[n].data_ptr()])]
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [f"{n}: file {tuple(tensors[n].shape)} vs model {tuple(expected[n].shape)}"
             for n in expected if n in tensors and tensors[n].shape != expected[n].shape]
    if missing or unexpected or wrong:
        parts = [f"missing {missing[:8]}" if missing else "", f"unexpected {unexpected[:8]}" if unexpected else "",
                 f"shape mismatch {wrong[:8]}" if wrong else ""]
        raise CheckpointError(f"weights in {source} do not fit {type(model).__name__}: "
                              + "; ".join(p for p in parts if p))
    with torch.no_grad():
        for name, t in expected.items():
            if name in tensors:
                t.copy_(tensors[name])
