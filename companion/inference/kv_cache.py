"""A preallocated key/value cache: one (B, G, L, D) buffer pair per attention layer, written in place.

The cache of Pope et al. (2022), "Efficiently Scaling Transformer Inference", in the static layout of transformers'
``StaticCache`` and nanochat's ``KVCache``: memory for the longest sequence is taken once, each decoding step writes
its keys and values into the next slots and attention reads a view of the filled part, so no step copies the past
(`companion.nn.attention.KVCache` concatenates, which copies the whole cache every step). It stores G key/value heads
(grouped-query attention stores fewer than H), works for left-padded batches (padding slots are masked by the
model's ``attention_mask``), and supports what generation needs beyond appending: ``crop`` rolls back rejected
tokens (speculative decoding) and ``reorder`` follows the surviving beams (beam search).
"""

from __future__ import annotations

import torch
from torch import nn


class PreallocatedKVCache:
    """The keys and values of one attention layer, for ``batch_size`` rows of up to ``max_len`` positions.

    Satisfies `companion.nn.attention.KVCacheLike`: ``seq_len`` positions are filled, ``update(k, v)`` writes
    (B, G, T, D) at positions seq_len .. seq_len + T - 1 and returns views (B, G, seq_len + T, D) of the buffers.
    """

    def __init__(self, batch_size: int, kv_heads: int, max_len: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        for name, value in (("batch_size", batch_size), ("kv_heads", kv_heads), ("max_len", max_len),
                            ("head_dim", head_dim)):
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value!r}")
        shape = (batch_size, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # (B, G, L, D)
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # (B, G, L, D)
        self.max_len = max_len
        self._len = 0

    @property
    def seq_len(self) -> int:
        return self._len

    @property
    def nbytes(self) -> int:
        """Bytes held by the two buffers (all ``max_len`` positions, filled or not)."""
        return self.k.nbytes + self.v.nbytes

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, g, _, d = self.k.shape
        if k.shape != v.shape or k.dim() != 4 or (k.shape[0], k.shape[1], k.shape[3]) != (b, g, d):
            raise ValueError(f"k and v must have shape (B, G, T, D) = ({b}, {g}, T, {d}), "
                             f"got {tuple(k.shape)} and {tuple(v.shape)}")
        end = self._len + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"cache full: {self._len} cached + {k.shape[2]} new positions exceed max_len={self.max_len}")
        self.k[:, :, self._len:end] = k
        self.v[:, :, self._len:end] = v
        self._len = end
        return self.k[:, :, :end], self.v[:, :, :end]  # (B, G, S, D) views, S = seq_len

    def crop(self, length: int) -> None:
        """Forget every position from ``length`` on (the buffers keep their memory; later updates overwrite)."""
        if not 0 <= length <= self._len:
            raise ValueError(f"can only crop to 0 .. seq_len={self._len} positions, got {length!r}")
        self._len = length

    def reorder(self, index: torch.Tensor) -> None:
        """Row i becomes old row ``index[i]`` (beam search: each surviving beam continues from its parent)."""
        if index.dim() != 1 or index.shape[0] != self.k.shape[0]:
            raise ValueError(f"index must have shape ({self.k.shape[0]},), got {tuple(index.shape)}")
        self.k = self.k.index_select(0, index)
        self.v = self.v.index_select(0, index)


def allocate_kv_caches(model: nn.Module, batch_size: int, max_len: int, *, dtype: torch.dtype | None = None,
                       device: torch.device | str | None = None) -> list[PreallocatedKVCache]:
    """One `PreallocatedKVCache` per block of a `companion.GPT` / `companion.Llama` (its G, D, dtype and device)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise TypeError(f"allocate_kv_caches needs a model with .blocks of TransformerBlock, got {type(model).__name__}")
    if max_len > model.config.n_ctx:
        raise ValueError(f"max_len={max_len} exceeds the model's context length n_ctx={model.config.n_ctx}")
    weight = next(model.parameters())
    dtype = weight.dtype if dtype is None else dtype
    device = weight.device if device is None else device
    caches = []
    for block in blocks:
        cfg = block.self_attn.config  # AttentionConfig
        caches.append(PreallocatedKVCache(batch_size, cfg.kv_heads, max_len, cfg.head_dim, dtype=dtype, device=device))
    return caches
