"""Figures for training runs: the gradient flow of one train step and a loss/accuracy curve.

Both functions draw on a bare `matplotlib.figure.Figure` rendered by the Agg
backend, so they work without a display and never touch pyplot's global state.
"""
from __future__ import annotations

import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from client.client import TrainStepResult

# Bar series of the gradient-flow figure: (key, legend label, colour).
SERIES = [
    ("q", "q (to_qkv rows)", "#1f77b4"),
    ("k", "k (to_qkv rows)", "#ff7f0e"),
    ("v", "v (to_qkv rows)", "#2ca02c"),
    ("out", "attention out (to_out)", "#9467bd"),
    ("ff", "feed-forward (fn.net)", "#8c564b"),
    ("norm", "LayerNorms", "#7f7f7f"),
    ("embedding", "embedding (patch, pos, cls)", "#17becf"),
    ("head", "head (classifier)", "#d62728"),
]
# GradientSummary.sublayer -> its series; attention.qkv is drawn as q, k and v (TrainStepResult.attention).
SUBLAYER_SERIES = {
    "attention.out": "out",
    "feedforward": "ff",
    "attention.norm": "norm",
    "feedforward.norm": "norm",
    "head.norm": "norm",
    "embedding": "embedding",
    "head": "head",
}
# The x-axis group of a parameter outside the transformer blocks (GradientSummary.block -1), by sublayer.
OUTSIDE_BLOCKS = {"embedding": "embedding", "head": "head", "head.norm": "head"}


def _combined(norms: list[float]) -> float:
    """L2 norm of several tensors together, from their own L2 norms."""
    return math.sqrt(sum(n * n for n in norms))


def _gradient_groups(result: TrainStepResult) -> dict[str, dict[str, float]]:
    """Gradient L2 norms by x-axis group ("embedding", "block 0", ..., "head") and series key: every
    parameter of a sub-layer (weights and biases) together, q, k and v from the split qkv gradients."""
    parts: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for a in result.attention:
        for key, norm in (("q", a.q_norm), ("k", a.k_norm), ("v", a.v_norm)):
            parts[f"block {a.block}"][key].append(norm)
    for g in result.gradients:
        key = SUBLAYER_SERIES.get(g.sublayer)
        group = f"block {g.block}" if g.block >= 0 else OUTSIDE_BLOCKS.get(g.sublayer)
        if key and group:
            parts[group][key].append(g.l2_norm)
    blocks = sorted((k for k in parts if k.startswith("block ")), key=lambda k: int(k.split()[1]))
    order = [k for k in ["embedding", *blocks, "head"] if k in parts]
    return {group: {key: _combined(v) for key, v in parts[group].items()} for group in order}


def gradient_flow(result: TrainStepResult, path: str | os.PathLike) -> Path:
    """Grouped bars of gradient L2 norms per transformer block (q, k, v, attention out,
    feed-forward, LayerNorms) plus the embedding and the head, on a log axis. Writes a PNG.

    Bars are placed by each gradient's block and sublayer (set at export), never by parameter name."""
    groups = _gradient_groups(result)
    if not groups:
        raise ValueError("the train step has no gradient summaries to plot (were they omitted?)")
    fig = Figure(figsize=(11, 5.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    keys = [key for key, _, _ in SERIES]
    width = 0.8 / max(max(len(series) for series in groups.values()), 1)
    drawn: set[str] = set()
    for x, (group, series) in enumerate(groups.items()):
        present = [k for k in keys if k in series]
        for i, key in enumerate(present):
            offset = (i - (len(present) - 1) / 2) * width
            _, label, colour = SERIES[keys.index(key)]
            value = series[key]
            ax.bar(x + offset, value if value > 0 else np.nan, width * 0.92, color=colour,
                   label=label if key not in drawn else None)
            drawn.add(key)
    ax.set_yscale("log")
    ax.set_xticks(range(len(groups)), list(groups))
    ax.set_xlabel("where in the network (input side left, loss side right)")
    ax.set_ylabel("gradient L2 norm (log scale)")
    ax.grid(axis="y", which="major", alpha=0.35)
    ax.grid(axis="y", which="minor", alpha=0.12)
    ax.set_axisbelow(True)
    status = "" if result.applied else f" ({result.status})"
    ax.set_title(f"Gradient flow at step {result.step}: loss {result.loss:.4f}, "
                 f"global grad norm {result.grad_norm:.3g}{status}")
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: [label for _, label, _ in SERIES].index(labels[i]))
    ax.legend([handles[i] for i in order], [labels[i] for i in order], loc="upper left",
              bbox_to_anchor=(1.01, 1.0), frameon=False, title="gradient of")
    fig.savefig(path)
    return Path(path)


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to `window` points (shorter at the start)."""
    cumsum = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    ends = np.arange(1, len(values) + 1)
    return (cumsum[ends] - cumsum[ends - counts]) / counts


def loss_curve(history: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Train loss per step (raw and smoothed, log axis) and test accuracy per evaluation (twin axis).

    `history` holds dicts with a "step" and either a "loss" (a train step) or a
    "test_accuracy" (an evaluation; an optional "test_loss" is drawn on the loss axis).
    """
    train = [h for h in history if "loss" in h]
    evals = [h for h in history if "test_accuracy" in h]
    if not train and not evals:
        raise ValueError("nothing to plot: the history has no train steps and no evaluations")
    fig = Figure(figsize=(10, 5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    lines = []
    if train:
        steps = np.array([h["step"] for h in train])
        losses = np.array([h["loss"] for h in train], dtype=float)
        ax.plot(steps, losses, color="#1f77b4", alpha=0.25, linewidth=0.8)
        window = max(len(losses) // 50, 5)
        lines += ax.plot(steps, _moving_average(losses, window), color="#1f77b4", linewidth=2,
                         label=f"train loss (mean of {window} steps)")
    if any("test_loss" in h for h in evals):
        tested = [h for h in evals if "test_loss" in h]
        lines += ax.plot([h["step"] for h in tested], [h["test_loss"] for h in tested], "s--",
                         color="#7f7f7f", markersize=4, label="test loss")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss (log scale)")
    ax.grid(alpha=0.3)
    if evals:
        acc_ax = ax.twinx()
        accuracy = np.array([h["test_accuracy"] for h in evals]) * 100
        lines += acc_ax.plot([h["step"] for h in evals], accuracy, "o-", color="#d62728",
                             linewidth=2, label="test accuracy")
        acc_ax.set_ylabel("test accuracy (%)", color="#d62728")
        acc_ax.tick_params(axis="y", colors="#d62728")
        acc_ax.set_ylim(max(min(accuracy.min() - 5, 80), 0), 102)
        acc_ax.annotate(f"final {accuracy[-1]:.1f}%", (evals[-1]["step"], accuracy[-1]),
                        textcoords="offset points", xytext=(-6, 8), ha="right", color="#d62728")
    fig.suptitle("Training loss and test accuracy")
    ax.legend(lines, [line.get_label() for line in lines], loc="lower center", bbox_to_anchor=(0.5, 1.0),
              ncol=len(lines), frameon=False)
    fig.savefig(path)
    return Path(path)
