"""What a training run records: a metrics history (JSON-serialisable), a text progress bar on stdout, and the
loss-curve figure (training loss per step, validation loss at each evaluation, perplexity on a second axis)."""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO


@dataclass
class History:
    """Rows appended during training: ``train`` one per optimizer step, ``eval`` one per evaluation."""

    train: list[dict] = field(default_factory=list)  # {"step", "loss", "lr", "grad_norm", "tokens"}
    eval: list[dict] = field(default_factory=list)  # {"step", "val_loss", "val_ppl"}

    def to_dict(self) -> dict:
        return {"train": self.train, "eval": self.eval}

    @classmethod
    def from_dict(cls, state: dict) -> History:
        return cls(train=list(state["train"]), eval=list(state["eval"]))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")

    def losses(self) -> list[float]:
        return [row["loss"] for row in self.train]

    @property
    def best_val_loss(self) -> float:
        return min((row["val_loss"] for row in self.eval if "val_loss" in row), default=math.inf)


class ProgressBar:
    """``step 120/500 [#####.........] loss 3.2101 lr 2.9e-04 | 4.1 step/s`` rewritten in place on ``stream``."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, stream: TextIO | None = None,
                 width: int = 24) -> None:
        self.total, self.n, self.enabled, self.width = total, initial, enabled, width
        self.stream = stream or sys.stdout
        self.start, self.start_n = time.perf_counter(), initial

    def update(self, n: int, **values: float) -> None:
        self.n = n
        if not self.enabled:
            return
        filled = int(self.width * n / max(self.total, 1))
        rate = (n - self.start_n) / max(time.perf_counter() - self.start, 1e-9)
        shown = " ".join(f"{k} {v:.4f}" if abs(v) >= 1e-2 else f"{k} {v:.1e}" for k, v in values.items())
        self.stream.write(f"\rstep {n}/{self.total} [{'#' * filled}{'.' * (self.width - filled)}] {shown} "
                          f"| {rate:.1f} step/s")
        self.stream.flush()

    def write(self, line: str) -> None:
        """Print a line above the bar (evaluation results)."""
        if self.enabled:
            self.stream.write("\r" + line + " " * 20 + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def plot_history(history: History, title: str = "训练曲线", ax=None):
    """Training loss (thin) and validation loss (markers) against the optimizer step; returns the Figure."""
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 3.6))
    else:
        fig = ax.figure
    if history.train:
        ax.plot([r["step"] for r in history.train], history.losses(), lw=1, alpha=0.8, label="训练损失")
    evals = [r for r in history.eval if "val_loss" in r]  # an eval_fn-only run reports other metrics
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", ms=4, label="验证损失")
    ax.set_xlabel("优化步数")
    ax.set_ylabel("交叉熵（nats/词元）")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig
