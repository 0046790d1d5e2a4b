"""Gradient summaries: per-parameter statistics and the q/k/v/head breakdown of fused projections.

Pure numpy; the training engine hands in the gradients and the weights before and after a step.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from proto.records.model import Parameter, QkvLayout
from proto.records.training import GradientSummary, QkvGradient


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


class FlatLayout:
    """Where each parameter lies in a flat float32 vector (the engine's gradients and weight snapshots, back to
    back in model order), with a float64 scratch as long as the longest parameter: every per-parameter sum is
    taken in float64 over a copy into that one buffer, so no pass allocates (and page-faults) a fresh copy."""

    def __init__(self, params: list[Parameter]):
        self.params = list(params)
        self.sizes = np.array([math.prod(p.shape) for p in self.params], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        self.spans = [(int(a), int(a + k)) for a, k in zip(self.starts, self.sizes)]
        self._scratch = np.empty(int(self.sizes.max(initial=0)), np.float64)

    def segment(self, x: np.ndarray, i: int) -> np.ndarray:
        """Parameter i's part of `x` as float64, in the scratch buffer (valid until the next call)."""
        a, b = self.spans[i]
        view = self._scratch[:b - a]
        np.copyto(view, x[a:b])
        return view

    def squares(self, x: np.ndarray) -> np.ndarray:
        """Each parameter's sum of squares of `x` in float64. A NaN or Inf makes its sum non-finite, and a finite
        float32 cannot overflow it, so the sums are all finite exactly when `x` is."""
        out = np.empty(len(self.spans))
        for i in range(len(self.spans)):
            v = self.segment(x, i)
            out[i] = v @ v
        return out

    def update_squares(self, before: np.ndarray, after: np.ndarray) -> np.ndarray:
        """Each parameter's sum of squares of `after - before`, the difference taken in float64 (exact)."""
        out = np.empty(len(self.spans))
        for i, (a, b) in enumerate(self.spans):
            v = self._scratch[:b - a]
            np.subtract(after[a:b], before[a:b], out=v, dtype=np.float64)
            out[i] = v @ v
        return out


def summarize_all(flat: FlatLayout, grads: np.ndarray, before: np.ndarray, after: np.ndarray,
                  grad_squares: np.ndarray | None = None) -> list[GradientSummary]:
    """`summarize` for every parameter at once, over flat float32 vectors laid out as `flat` says.

    A fixed number of numpy passes per parameter, each in float64 over the layout's scratch buffer, with no
    per-element Python: this keeps the summaries cheap next to the train step (docs/performance.md).
    `grad_squares`: flat.squares(grads), when the caller already has it (the engine's global norm).
    Parameters with NaN/Inf gradients (rare: the guard refuses to apply such a step) go through `summarize`.
    """
    params, sizes, starts = flat.params, flat.sizes, flat.starts
    sq = flat.squares(grads) if grad_squares is None else grad_squares
    if not np.isfinite(sq).all():
        return [summarize(p.name, grads[a:b].reshape(p.shape), before[a:b], after[a:b], p.block, p.sublayer)
                for p, (a, b) in zip(params, flat.spans)]
    mean, var = np.empty(len(params)), np.empty(len(params))
    for i, n in enumerate(sizes.tolist()):
        v = flat.segment(grads, i)
        mean[i] = v.sum() / n
        if mean[i] * mean[i] > 1e-3 * sq[i] / n:  # E[g^2] - mean^2 would cancel: two passes instead
            v -= mean[i]
            var[i] = (v @ v) / n
        else:
            var[i] = max(sq[i] / n - mean[i] * mean[i], 0.0)
    lo, hi = np.minimum.reduceat(grads, starts), np.maximum.reduceat(grads, starts)
    zeros = sizes - np.array([np.count_nonzero(grads[a:b]) for a, b in flat.spans])
    param_sq = flat.squares(before)
    delta_sq = flat.update_squares(before, after)
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

