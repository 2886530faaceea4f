"""Online softmax and tiled exact attention (FlashAttention's forward and backward passes), in plain PyTorch.

Milakov & Gimelshein (2018): a running maximum and a rescaled running sum give softmax's normaliser in one pass over
the scores. Dao et al. (2022, FlashAttention) and Dao (2023, FlashAttention-2) apply it to attention: blocks of
queries (outer loop) meet blocks of keys (inner loop); each query row keeps its running max m, running sum l and an
unnormalised output accumulator, rescaled whenever m grows, divided by l once at the end; key blocks that a causal
mask hides entirely are skipped. The result is exact attention (the math path up to rounding) and the memory it needs
beyond Q, K, V and the output grows like T, not T^2. On a GPU a block lives in on-chip SRAM; here every block is an
ordinary PyTorch op, so on a CPU this version is slower than the math path: it is meant to be read and tested.
The backward pass does what the kernels do: it keeps only Q, K, V, the output and the per-row log-sum-exp, and
recomputes each block's probabilities from them, so training memory grows like T as well. `peak_tensor_bytes`
measures the memory of the tensors a function creates, deterministically.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any

import torch
from einops import reduce, repeat
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from companion.nn.attention import check_qkv


def _check_block(name: str, size: int) -> None:
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"{name} must be a positive int, got {size!r}")


def _finite_or_zero(m: torch.Tensor) -> torch.Tensor:
    """The shift used inside exp(): the running max, or 0 where it is still -inf (no key seen yet), so that
    exp(-inf - shift) = 0 instead of exp(-inf + inf) = NaN."""
    return torch.where(torch.isneginf(m), torch.zeros_like(m), m)


def online_logsumexp(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """log(sum(exp(x))) over the last dim, reading ``x`` in blocks of ``block_size`` with a running max and sum.

    x: (..., S) -> (...,). Equal to ``torch.logsumexp(x, dim=-1)`` up to rounding; -inf for a row that is all -inf.
    After each block, ``m`` is the largest score seen so far and ``l = sum(exp(x_j - m))`` over the scores seen so
    far; when a block raises the maximum, the old sum is rescaled by exp(m_old - m_new).
    """
    _check_block("block_size", block_size)
    m = torch.full(x.shape[:-1], float("-inf"), dtype=x.dtype, device=x.device)  # (...,) running max
    l = torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)  # (...,) running sum of exp(x - m)
    for j in range(0, x.shape[-1], block_size):
        block = x[..., j : j + block_size]  # (..., b)
        m_new = torch.maximum(m, block.amax(dim=-1))
        shift = _finite_or_zero(m_new)
        l = l * torch.exp(m - shift) + torch.exp(block - shift[..., None]).sum(dim=-1)
        m = m_new
    return m + torch.log(l)  # (...,); m = -inf and l = 0 give -inf


def online_softmax(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """softmax over the last dim from the streamed log-sum-exp: exp(x - lse). Rows that are all -inf give 0."""
    lse = online_logsumexp(x, block_size)  # (...,)
    return torch.exp(x - _finite_or_zero(lse)[..., None])  # (..., S)


def _key_block_starts(i0: int, i1: int, s: int, offset: int, block_k: int, is_causal: bool) -> range:
    """Starts of the key blocks that query rows i0..i1-1 must visit. Under a causal mask (bottom-right aligned:
    query row i sits at absolute position offset + i) a key block is skipped when all its keys lie in the future
    of the last row, i.e. when it starts after offset + i1 - 1."""
    end = min(s, offset + i1) if is_causal else s
    return range(0, end, block_k)


def count_blocks(t: int, s: int, block_q: int, block_k: int, is_causal: bool = False) -> tuple[int, int]:
    """(blocks visited, blocks in the full grid) by `tiled_attention` for T queries and S keys."""
    _check_block("block_q", block_q)
    _check_block("block_k", block_k)
    offset = s - t
    visited = sum(len(_key_block_starts(i0, min(i0 + block_q, t), s, offset, block_k, is_causal))
                  for i0 in range(0, t, block_q))
    return visited, math.ceil(t / block_q) * math.ceil(s / block_k)


def _prepare(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
    scale: float | None, block_q: int, block_k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
    """Validate the arguments of `tiled_attention`; return k, v repeated to H heads, the mask expanded to
    (B, H, T, S) (a view) and the scale."""
    b, h, t, d, g, s = check_qkv(q, k, v)
    _check_block("block_q", block_q)
    _check_block("block_k", block_k)
    if is_causal and s < t:
        raise ValueError(f"a causal mask needs S >= T keys, got T={t} and S={s}")
    if mask is not None:
        try:
            mask = mask.expand(b, h, t, s)  # a view: nothing of size (T, S) is allocated by this
        except RuntimeError:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to (B, H, T, S) = "
                             f"{(b, h, t, s)}") from None
    if g != h:  # each key/value head serves H // G query heads
        k = repeat(k, "b g s d -> b (g r) s d", r=h // g)  # (B, H, S, D)
        v = repeat(v, "b g s d -> b (g r) s d", r=h // g)  # (B, H, S, Dv)
    return k, v, mask, 1.0 / math.sqrt(d) if scale is None else scale


def block_scores(
    qi: torch.Tensor, kj: torch.Tensor, i0: int, j0: int, offset: int, scale: float,
    mask: torch.Tensor | None, is_causal: bool,
) -> torch.Tensor:
    """One block of scores, scaled and masked: query rows i0..i0+bq-1 (qi: (B, H, bq, D)) against key columns
    j0..j0+bk-1 (kj: (B, H, bk, D)) -> (B, H, bq, bk). A causal mask is applied only to blocks that cross the diagonal
    (the others are entirely allowed, or skipped by the caller); ``mask`` is the (B, H, T, S) view from `_prepare`."""
    i1, j1 = i0 + qi.shape[2], j0 + kj.shape[2]
    scores = (qi @ kj.transpose(-2, -1)) * scale  # (B, H, bq, bk)
    if is_causal and j1 - 1 > offset + i0:  # the block crosses the diagonal: mask its future keys
        rows = torch.arange(i0, i1, device=qi.device)[:, None] + offset  # (bq, 1)
        cols = torch.arange(j0, j1, device=qi.device)[None, :]  # (1, bk)
        scores = scores.masked_fill(cols > rows, float("-inf"))
    if mask is not None:
        block_mask = mask[:, :, i0:i1, j0:j1]  # (B, H, bq, bk)
        if block_mask.dtype == torch.bool:
            scores = scores.masked_fill(~block_mask, float("-inf"))
        else:
            scores = scores + block_mask
    return scores


def tiled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    block_q: int = 64,
    block_k: int = 64,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax(Q K^T * scale + mask) V, computed block by block without forming the (T, S) score matrix.

    q: (B, H, T, D); k: (B, G, S, D); v: (B, G, S, Dv) with G dividing H (grouped-query attention as in
    `scaled_dot_product_attention`). ``mask`` broadcasts to (B, H, T, S): bool (True = attend) or float (added to the
    scores). ``is_causal`` is bottom-right aligned (see `causal_mask`) and may be combined with ``mask``. Block sizes
    need not divide T or S. Rows with no key to attend to give zero output and a log-sum-exp of -inf, as in the math
    path. No dropout. Returns (B, H, T, Dv), and with ``return_lse`` also the (B, H, T) log-sum-exp of the scaled,
    masked scores. When q, k or v require grad, the backward pass is `tiled_attention_backward`: it keeps only
    q, k, v, the output and the log-sum-exp, and recomputes the blocks.
    """
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        out, lse = _TiledAttention.apply(q, k, v, mask, is_causal, scale, block_q, block_k)
        return (out, lse) if return_lse else out
    k, v, mask, scale = _prepare(q, k, v, mask, is_causal, scale, block_q, block_k)  # k, v: (B, H, S, D)
    b, h, t, _ = q.shape
    s, dv = k.shape[2], v.shape[3]
    offset = s - t  # query row i sits at absolute position offset + i

    outs, lses = [], []
    for i0 in range(0, t, block_q):
        i1 = min(i0 + block_q, t)
        qi = q[:, :, i0:i1]  # (B, H, bq, D)
        m = q.new_full((b, h, i1 - i0), float("-inf"))  # (B, H, bq) running max of the scores
        l = q.new_zeros((b, h, i1 - i0))  # (B, H, bq) running sum of exp(score - m)
        acc = q.new_zeros((b, h, i1 - i0, dv))  # (B, H, bq, Dv) running sum of exp(score - m) * v
        for j0 in _key_block_starts(i0, i1, s, offset, block_k, is_causal):
            j1 = min(j0 + block_k, s)
            scores = block_scores(qi, k[:, :, j0:j1], i0, j0, offset, scale, mask, is_causal)  # (B, H, bq, bk)
            m_new = torch.maximum(m, scores.amax(dim=-1))  # (B, H, bq)
            shift = _finite_or_zero(m_new)
            p = torch.exp(scores - shift[..., None])  # (B, H, bq, bk) unnormalised weights
            alpha = torch.exp(m - shift)  # (B, H, bq) rescales what was summed under the old max
            l = l * alpha + p.sum(dim=-1)
            acc = acc * alpha[..., None] + p @ v[:, :, j0:j1]  # (B, H, bq, Dv)
            m = m_new
        seen = l > 0  # False only for rows whose keys are all masked
        l = torch.where(seen, l, torch.ones_like(l))
        outs.append(acc / l[..., None])  # (B, H, bq, Dv); 0 where no key was seen
        lses.append(torch.where(seen, m + torch.log(l), float("-inf")))  # (B, H, bq)
    out = torch.cat(outs, dim=2)  # (B, H, T, Dv)
    return (out, torch.cat(lses, dim=2)) if return_lse else out


def tiled_attention_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    block_q: int = 64,
    block_k: int = 64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of `tiled_attention` from what its forward keeps: q, k, v, out and lse (B, H, T).

    The probabilities of each block are recomputed as P = exp(S - lse) instead of being stored; with
    delta_i = dO_i . O_i (= sum_j P_ij dP_ij): dV = P^T dO, dP = dO V^T, dS = P * (dP - delta), dQ = dS K * scale,
    dK = dS^T Q * scale (Dao et al., 2022, appendix B). dk, dv are summed back over the query heads of each group.
    """
    g = k.shape[1]
    k, v, mask, scale = _prepare(q, k, v, mask, is_causal, scale, block_q, block_k)  # k, v: (B, H, S, D)
    t, s = q.shape[2], k.shape[2]
    offset = s - t
    lse = _finite_or_zero(lse)  # rows with no key: their scores are all -inf, so P = exp(-inf - 0) = 0
    delta = (grad_out * out).sum(dim=-1)  # (B, H, T)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for i0 in range(0, t, block_q):
        i1 = min(i0 + block_q, t)
        qi, doi = q[:, :, i0:i1], grad_out[:, :, i0:i1]  # (B, H, bq, D), (B, H, bq, Dv)
        for j0 in _key_block_starts(i0, i1, s, offset, block_k, is_causal):
            j1 = min(j0 + block_k, s)
            kj, vj = k[:, :, j0:j1], v[:, :, j0:j1]  # (B, H, bk, D), (B, H, bk, Dv)
            scores = block_scores(qi, kj, i0, j0, offset, scale, mask, is_causal)  # (B, H, bq, bk)
            p = torch.exp(scores - lse[:, :, i0:i1, None])  # (B, H, bq, bk) the forward's probabilities
            dv[:, :, j0:j1] += p.transpose(-2, -1) @ doi  # (B, H, bk, Dv)
            dp = doi @ vj.transpose(-2, -1)  # (B, H, bq, bk)
            ds = p * (dp - delta[:, :, i0:i1, None])  # (B, H, bq, bk)
            dq[:, :, i0:i1] += (ds @ kj) * scale  # (B, H, bq, D)
            dk[:, :, j0:j1] += (ds.transpose(-2, -1) @ qi) * scale  # (B, H, bk, D)
    if g != q.shape[1]:  # sum over the query heads that share a key/value head
        dk = reduce(dk, "b (g r) s d -> b g s d", "sum", g=g)  # (B, G, S, D)
        dv = reduce(dv, "b (g r) s d -> b g s d", "sum", g=g)  # (B, G, S, Dv)
    return dq, dk, dv


class _TiledAttention(torch.autograd.Function):
    """Autograd for `tiled_attention`: saves q, k, v, out, lse (O(T) memory) and recomputes the blocks."""

    @staticmethod
    def forward(ctx, q, k, v, mask, is_causal, scale, block_q, block_k):  # noqa: ANN001 (autograd's signature)
        out, lse = tiled_attention(q, k, v, mask, is_causal=is_causal, scale=scale, block_q=block_q,
                                   block_k=block_k, return_lse=True)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask, ctx.options = mask, dict(is_causal=is_causal, scale=scale, block_q=block_q, block_k=block_k)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):  # noqa: ANN001 (autograd's signature)
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = tiled_attention_backward(q, k, v, out, lse, grad_out, ctx.mask, **ctx.options)
        return dq, dk, dv, None, None, None, None, None


class _LiveTensorBytes(TorchDispatchMode):
    """Counts the storage bytes of every tensor an operation creates while they are alive; keeps the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.owners: dict[int, int] = {}  # storage address -> live tensors that view it

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (torch's signature)
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._track(leaf)
        return out

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        address, nbytes = storage.data_ptr(), storage.nbytes()
        if address == 0:  # empty tensor
            return
        if address not in self.owners:
            self.owners[address] = 0
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        self.owners[address] += 1
        weakref.finalize(tensor, self._release, address, nbytes)

    def _release(self, address: int, nbytes: int) -> None:
        self.owners[address] -= 1
        if self.owners[address] == 0:
            del self.owners[address]
            self.live -= nbytes


def peak_tensor_bytes(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, int]:
    """Run ``fn(*args, **kwargs)`` and return (its result, the peak bytes of the tensors it created alive at once).

    Counts every tensor that a PyTorch operation returns inside ``fn`` (views share their storage's count), from
    creation until Python frees it; the inputs are not counted, the result is (it is alive at the end). The count
    is the same on every CPU, unlike an allocator's statistics, but it does not see scratch buffers a fused
    kernel allocates internally (for a FlashAttention kernel: per-thread blocks, independent of T).
    """
    with _LiveTensorBytes() as meter:
        result = fn(*args, **kwargs)
    return result, meter.peak
