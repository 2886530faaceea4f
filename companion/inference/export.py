"""Export a language model out of Python: ``torch.export`` graphs and ONNX files run by onnxruntime.

``torch.export.export`` traces ``forward(input_ids)`` into an ExportedProgram with symbolic batch and sequence
sizes; ``torch.onnx.export(..., dynamo=True)`` translates that program to ONNX (through onnxscript), and
onnxruntime's CPU session runs it. The KV cache is not part of the exported graph: it is a full-sequence
(prefill / scoring) export, whose logits the tests compare with PyTorch's.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn


def _dims(model: nn.Module, max_batch: int) -> tuple[dict[int, torch.export.Dim], ...]:
    n_ctx = model.config.n_ctx
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    time = torch.export.Dim("time", min=1, max=n_ctx)
    return ({0: batch, 1: time},)


def _example(model: nn.Module) -> torch.Tensor:
    return torch.zeros(2, min(8, model.config.n_ctx), dtype=torch.long)  # (B, T): sizes > 1 stay symbolic


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence two known, harmless messages of torch 2.13's exporter: a logged warning per torchvision operator
    it cannot register (torchvision is not installed), and a FutureWarning about ``LeafSpec`` raised inside
    torch's own pytree code."""
    log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*", category=FutureWarning)
            yield
    finally:
        log.setLevel(level)


def export_program(model: nn.Module, max_batch: int = 64) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model.forward(input_ids (B, T)) -> logits (B, T, V)`` with dynamic B and T."""
    with _quiet_exporter():
        return torch.export.export(model.eval(), (_example(model),), dynamic_shapes=_dims(model, max_batch))


def export_onnx(model: nn.Module, path: str | Path, max_batch: int = 64) -> Path:
    """Write ``model`` as an ONNX file: input ``input_ids`` int64 (batch, time), output ``logits`` float32
    (batch, time, V); batch up to ``max_batch`` and time up to ``model.config.n_ctx`` are dynamic."""
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"path must end in .onnx, got {str(path)!r}")
    with _quiet_exporter():
        program = torch.onnx.export(model.eval(), (_example(model),), dynamo=True,
                                    dynamic_shapes=_dims(model, max_batch), input_names=["input_ids"],
                                    output_names=["logits"], verbose=False)
        program.save(str(path))
    return path


class OnnxLM:
    """An onnxruntime CPU session of an exported model: ``OnnxLM(path)(input_ids (B, T)) -> logits (B, T, V)``."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (B, T), got {tuple(input_ids.shape)}")
        (logits,) = self.session.run(["logits"], {"input_ids": input_ids.to(torch.long).numpy()})
        return torch.from_numpy(logits)  # (B, T, V)
