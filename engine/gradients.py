"""Gradient summaries: per-parameter statistics and the q/k/v/head breakdown of fused projections.

Pure numpy; the training engine hands in the gradients and the weights before and after a step.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from engine.manifest import Parameter, QkvLayout


@dataclass(frozen=True)
class GradientSummary:
    """One trainable parameter's gradient in one step (proto: GradientSummary)."""
    name: str
    shape: tuple[int, ...]
    l2_norm: float
    mean: float
    std: float
    min: float
    max: float
    max_abs: float
    zero_fraction: float
    nonfinite_count: int
    param_norm: float
    update_ratio: float
    block: int = -1  # where the parameter sits (the manifest's placement)
    sublayer: str = "other"


@dataclass(frozen=True)
class QkvGradient:
    """One attention module's q, k and v gradients, whole and head by head, weights and biases (proto: QkvGradient)."""
    name: str  # fused: the projection weight; separate: the attention module
    block: int
    heads: int
    dim_head: int
    q_norm: float  # L2 norm of the q part of the weight gradient
    k_norm: float
    v_norm: float
    q_head_norms: tuple[float, ...]  # each head's rows of the q part
    k_head_norms: tuple[float, ...]
    v_head_norms: tuple[float, ...]
    module: str = ""
    weights: tuple[str, ...] = ()  # the q, k and v weight parameters (one name three times when fused)
    biases: tuple[str, ...] = ()  # the q, k and v bias parameters; () without biases (then the bias norms are 0)
    q_bias_norm: float = 0.0
    k_bias_norm: float = 0.0
    v_bias_norm: float = 0.0
    q_bias_head_norms: tuple[float, ...] = ()
    k_bias_head_norms: tuple[float, ...] = ()
    v_bias_head_norms: tuple[float, ...] = ()


def _l2(x: np.ndarray) -> float:
    flat = x.reshape(-1).astype(np.float64, copy=False)
    return float(np.sqrt(np.dot(flat, flat)))


def update_ratio(before: np.ndarray, after: np.ndarray) -> float:
    """||after - before|| / ||before||; a weight that moves away from all zeros has an infinite ratio."""
    delta = _l2(after.astype(np.float64) - before)
    norm = _l2(before)
    return delta / norm if norm > 0 else (float("inf") if delta > 0 else 0.0)


def summarize(name: str, grad: np.ndarray, before: np.ndarray, after: np.ndarray, block: int = -1,
              sublayer: str = "other") -> GradientSummary:
    g = grad.astype(np.float64, copy=False).reshape(-1)
    finite = np.isfinite(g)
    nonfinite = int(g.size - np.count_nonzero(finite))
    gf = g if nonfinite == 0 else g[finite]  # statistics of the finite part; the count says the rest
    param_norm = _l2(before)
    if gf.size:
        stats = dict(mean=float(gf.mean()), std=float(gf.std()), min=float(gf.min()), max=float(gf.max()),
                     max_abs=float(np.abs(gf).max()))
    else:
        stats = dict(mean=float("nan"), std=float("nan"), min=float("nan"), max=float("nan"), max_abs=float("nan"))
    return GradientSummary(
        name=name,
        shape=tuple(grad.shape),
        l2_norm=_l2(gf) if nonfinite == 0 else float("nan"),
        zero_fraction=float(np.count_nonzero(g == 0.0) / g.size) if g.size else 0.0,
        nonfinite_count=nonfinite,
        param_norm=param_norm,
        update_ratio=update_ratio(before, after),
        block=block,
        sublayer=sublayer,
        **stats,
    )


def summarize_all(params: list[Parameter], grads: np.ndarray, before: np.ndarray,
                  after: np.ndarray) -> list[GradientSummary]:
    """`summarize` for every parameter at once, over flat float32 vectors holding the parameters back to back.

    A fixed number of vectorized passes per parameter (numpy sums, float64 dot products), with no
    per-element Python: this is what keeps the summaries cheap next to the train step (vit-small64,
    2.7 M values: ~20 ms; np.*.reduceat with a float64 accumulator took 40). Parameters with NaN/Inf
    gradients (rare: the guard refuses to apply such a step) go through `summarize`.
    """
    sizes = np.array([math.prod(p.shape) for p in params], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    if not np.isfinite(grads).all():
        return [summarize(p.name, grads[a:a + k].reshape(p.shape), before[a:a + k], after[a:a + k], p.block,
                          p.sublayer) for p, a, k in zip(params, starts, sizes)]
    spans = [(int(a), int(a + k)) for a, k in zip(starts, sizes)]

    def segment_sum(x: np.ndarray) -> np.ndarray:  # float32 data, float64 (pairwise) sums
        return np.array([x[a:b].sum(dtype=np.float64) for a, b in spans])

    def segment_squares(x: np.ndarray) -> np.ndarray:  # sums of squares, in float64 throughout
        return np.array([np.dot(v, v) for v in (x[a:b].astype(np.float64) for a, b in spans)])

    mean = segment_sum(grads) / sizes
    sq = segment_squares(grads)
    var = np.maximum(sq / sizes - mean * mean, 0.0)
    # E[g^2] - mean^2 cancels where the mean dominates: recompute those segments in two passes.
    for i in np.flatnonzero(mean * mean > 1e-3 * sq / sizes):
        seg = grads[starts[i]:starts[i] + sizes[i]].astype(np.float64)
        var[i] = np.mean((seg - mean[i]) ** 2)
    lo, hi = np.minimum.reduceat(grads, starts), np.maximum.reduceat(grads, starts)
    zeros = np.array([np.count_nonzero(grads[a:b] == 0) for a, b in spans])
    param_sq = segment_squares(before)
    delta_sq = segment_squares(after - before)  # the difference is exact in float32 for nearby values
    norm, moved = np.sqrt(param_sq), np.sqrt(delta_sq)
    with np.errstate(divide="ignore", invalid="ignore"):  # a weight at all zeros: inf when it moved, else 0
        ratio = np.where(norm > 0, moved / norm, np.where(moved > 0, np.inf, 0.0))
    columns = zip(np.sqrt(sq).tolist(), mean.tolist(), np.sqrt(var).tolist(), lo.tolist(), hi.tolist(),
                  np.maximum(-lo, hi).tolist(), (zeros / sizes).tolist(), norm.tolist(), ratio.tolist())
    return [GradientSummary(name=p.name, shape=tuple(p.shape), block=p.block, sublayer=p.sublayer, l2_norm=l2, mean=m,
                            std=sd, min=a, max=b, max_abs=big, zero_fraction=zf, nonfinite_count=0, param_norm=pn,
                            update_ratio=r)
            for p, (l2, m, sd, a, b, big, zf, pn, r) in zip(params, columns)]


def _qkv_parts(layout: QkvLayout, grads: Mapping[str, np.ndarray], names: tuple[str, ...]) -> np.ndarray:
    """The q, k, v gradients as one float64 array (3, heads, dim_head, cols): row order (qkv, h, d).

    Fused: one tensor whose rows are (3, h, d), as `to_qkv(x).chunk(3)` then 'b n (h d) -> b h n d', timm's
    `qkv.reshape(B, N, 3, heads, head_dim)` and nn.MultiheadAttention's in_proj all cut it. Separate: three
    tensors whose rows are (h, d). Biases are the same with one column.
    """
    h, d = layout.heads, layout.dim_head
    if layout.fused:
        return grads[names[0]].astype(np.float64, copy=False).reshape(3, h, d, -1)
    return np.stack([grads[n].astype(np.float64, copy=False).reshape(h, d, -1) for n in names])


def _norms(parts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(per-part norms (3,), per-head norms (3, heads)) of a (3, heads, dim_head, cols) array."""
    head_norms = np.sqrt(np.einsum("phdi,phdi->ph", parts, parts))
    return np.sqrt((head_norms ** 2).sum(axis=1)), head_norms


def qkv_breakdown(layout: QkvLayout, grads: Mapping[str, np.ndarray]) -> QkvGradient:
    """Split an attention module's q/k/v weight (and bias) gradients into q, k, v and heads.

    `grads` maps parameter names to their gradients (at least the layout's weights and biases).
    """
    part, head = _norms(_qkv_parts(layout, grads, layout.weights))
    bias_part, bias_head = (_norms(_qkv_parts(layout, grads, layout.biases)) if layout.biases
                            else (np.zeros(3), np.zeros((3, 0))))
    return QkvGradient(
        name=layout.name, block=layout.block, heads=layout.heads, dim_head=layout.dim_head,
        q_norm=float(part[0]), k_norm=float(part[1]), v_norm=float(part[2]),
        q_head_norms=tuple(map(float, head[0])), k_head_norms=tuple(map(float, head[1])),
        v_head_norms=tuple(map(float, head[2])),
        module=layout.module, weights=layout.weights, biases=layout.biases,
        q_bias_norm=float(bias_part[0]), k_bias_norm=float(bias_part[1]), v_bias_norm=float(bias_part[2]),
        q_bias_head_norms=tuple(map(float, bias_head[0])), k_bias_head_norms=tuple(map(float, bias_head[1])),
        v_bias_head_norms=tuple(map(float, bias_head[2])),
    )


def global_norm(grads: np.ndarray) -> float:
    """L2 norm of all gradients together, given as one flat vector."""
    return _l2(grads)
