"""Figures for training runs: the gradient flow of one train step, a loss/accuracy curve, the head importance
of one batch (a blocks x heads heatmap) and the gradient history the server kept.

Every function draws on a bare `matplotlib.figure.Figure` rendered by the Agg backend, so they work without
a display and never touch pyplot's global state. Pictures are PNG or SVG (by the file's suffix); an SVG
keeps its text as text (svg.fonttype "none"), so its labels and numbers can be searched and read back.
"""
from __future__ import annotations

import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from client import GradientHistory, HeadImportanceResult, TrainStepResult

PICTURE_SUFFIXES = (".png", ".svg")
PART_COLOURS = {"q": "#1f77b4", "k": "#ff7f0e", "v": "#2ca02c"}

# Bar series of the gradient-flow figure: (key, legend label, colour).
SERIES = [
    ("q", "q projection", PART_COLOURS["q"]),
    ("k", "k projection", PART_COLOURS["k"]),
    ("v", "v projection", PART_COLOURS["v"]),
    ("qkv", "q/k/v projection (not split)", "#bcbd22"),
    ("out", "attention out", "#9467bd"),
    ("ff", "feed-forward", "#8c564b"),
    ("norm", "LayerNorms", "#7f7f7f"),
    ("embedding", "embedding (patch, pos, cls)", "#17becf"),
    ("head", "head (classifier)", "#d62728"),
]
# Attention sub-layers drawn from TrainStepResult.attention (split into q, k, v, weights and biases together);
# their own summaries are drawn only for a block that has no attention entry.
ATTENTION_SERIES = {"attention.q": "q", "attention.k": "k", "attention.v": "v", "attention.qkv": "qkv"}
# GradientSummary.sublayer -> its series.
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
    parameter of a sub-layer (weights and biases) together; q, k and v from the attention entries (fused or
    separate projections alike, each weight's part with its bias's part)."""
    parts: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    split = {a.block for a in result.attention}
    for a in result.attention:
        for key, weight, bias in (("q", a.q_norm, a.q_bias_norm), ("k", a.k_norm, a.k_bias_norm),
                                  ("v", a.v_norm, a.v_bias_norm)):
            parts[f"block {a.block}"][key] += [weight, bias]
    for g in result.gradients:
        key = SUBLAYER_SERIES.get(g.sublayer)
        if g.sublayer in ATTENTION_SERIES and g.block not in split:
            key = ATTENTION_SERIES[g.sublayer]
        group = f"block {g.block}" if g.block >= 0 else OUTSIDE_BLOCKS.get(g.sublayer)
        if key and group:
            parts[group][key].append(g.l2_norm)
    blocks = sorted((k for k in parts if k.startswith("block ")), key=lambda k: int(k.split()[1]))
    order = [k for k in ["embedding", *blocks, "head"] if k in parts]
    return {group: {key: _combined(v) for key, v in parts[group].items()} for group in order}


def picture_suffix(path: str | os.PathLike) -> str:
    """".png" or ".svg", the picture formats the figures are written in (ValueError for another suffix)."""
    suffix = Path(path).suffix.lower()
    if suffix not in PICTURE_SUFFIXES:
        raise ValueError(f"{path}: a picture is a .png or .svg file")
    return suffix


def save(fig: Figure, path: str | os.PathLike) -> Path:
    """Write `fig` as PNG or SVG by `path`'s suffix; an SVG keeps its text as <text> elements."""
    picture_suffix(path)
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        fig.savefig(path)
    return Path(path)


def gradient_flow(result: TrainStepResult, path: str | os.PathLike) -> Path:
    """Grouped bars of gradient L2 norms per transformer block (q, k, v, attention out,
    feed-forward, LayerNorms) plus the embedding and the head, on a log axis. Writes a PNG or SVG.

    Bars are placed by each gradient's block and sublayer (set at export), never by parameter name. A model
    whose parameters are all outside blocks and sub-layers (block -1, "other": a CNN) gets one bar per parameter."""
    return save(gradient_flow_figure(result), path)


def gradient_flow_figure(result: TrainStepResult) -> Figure:
    """The figure of gradient_flow."""
    groups = _gradient_groups(result)
    if not groups:
        if result.gradients:
            return _unplaced_gradients_figure(result)
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
    ax.set_title(_step_title(result))
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: [label for _, label, _ in SERIES].index(labels[i]))
    ax.legend([handles[i] for i in order], [labels[i] for i in order], loc="upper left",
              bbox_to_anchor=(1.01, 1.0), frameon=False, title="gradient of")
    return fig


def _step_title(result: TrainStepResult) -> str:
    status = "" if result.applied else f" ({result.status})"
    return (f"Gradient flow at step {result.step}: loss {result.loss:.4f}, "
            f"global grad norm {result.grad_norm:.3g}{status}")


def _unplaced_gradients_figure(result: TrainStepResult) -> Figure:
    """One bar per parameter in model order, for a model without transformer blocks (nothing placed)."""
    names = [g.name for g in result.gradients]
    fig = Figure(figsize=(max(8.0, 0.35 * len(names) + 2), 6), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    norms = [g.l2_norm if g.l2_norm > 0 else np.nan for g in result.gradients]
    ax.bar(range(len(names)), norms, 0.8, color="#7f7f7f")
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_xlabel("parameter, in model order (input side left); the export placed none in a block or sub-layer")
    ax.set_ylabel("gradient L2 norm (log scale)")
    ax.grid(axis="y", which="major", alpha=0.35)
    ax.set_axisbelow(True)
    ax.set_title(_step_title(result))
    return fig


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
    return save(fig, path)


# ---------------------------------------------------------------- head importance

def head_value(value: float) -> str:
    """How a head-importance value is written in the heatmap's cells."""
    return f"{value:.3g}"


def head_heatmap(result: HeadImportanceResult, path: str | os.PathLike) -> Path:
    """Head importance as a blocks x heads heatmap, each cell annotated with its value. Writes a PNG or SVG."""
    return save(head_heatmap_figure(result), path)


def head_heatmap_figure(result: HeadImportanceResult) -> Figure:
    """The figure of head_heatmap: one image (rows: attention modules in block order, columns: heads) whose
    array is result.matrix(), and one text per cell."""
    matrix = result.matrix()
    if not matrix.size:
        raise ValueError("no head importance to plot: the model has no attention modules")
    rows, heads = matrix.shape
    fig = Figure(figsize=(max(5.0, 1.0 * heads + 3), max(3.0, 0.6 * rows + 1.8)), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="viridis", aspect="auto")
    finite = matrix[np.isfinite(matrix)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for r in range(rows):
        for h in range(heads):
            value = matrix[r, h]
            if np.isfinite(value):
                ax.text(h, r, head_value(value), ha="center", va="center", fontsize=9,
                        color="black" if value > middle else "white")
    ax.set_xticks(range(heads), [f"head {h}" for h in range(heads)])
    ax.set_yticks(range(rows), [f"block {s.block}" for s in result.heads])
    ax.set_xlabel("head")
    ax.set_ylabel("transformer block (input side at the top)")
    fig.colorbar(image, ax=ax, label="|dL/d\u03be_h|")
    ax.set_title(f"Head importance at step {result.step} (loss {result.loss:.4f})")
    return fig


# ---------------------------------------------------------------- gradient history

def gradient_history(history: GradientHistory, path: str | os.PathLike, pattern: str = "") -> Path:
    """The kept steps' loss and the matched parameters' gradient L2 norms over the steps, and each block's
    q, k and v gradient norms when the history holds attention entries. Writes a PNG or SVG."""
    return save(gradient_history_figure(history, pattern), path)


def gradient_history_figure(history: GradientHistory, pattern: str = "") -> Figure:
    """The figure of gradient_history: 2 panels (loss; parameters' gradient norms), 3 with attention entries."""
    steps = history.steps
    if not steps:
        raise ValueError("no kept steps to plot")
    attention = any(s.attention for s in steps)
    fig = Figure(figsize=(11, 9.5 if attention else 7), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(3 if attention else 2, 1, sharex=True)
    marker = "o" if len(steps) <= 40 else None
    numbers = [s.step for s in steps]

    loss_ax = axes[0]
    loss_ax.plot(numbers, [s.loss for s in steps], marker=marker, color="#1f77b4", label="loss")
    loss_ax.set_ylabel("cross-entropy loss")
    norm_ax = loss_ax.twinx()
    norm_ax.plot(numbers, [s.grad_norm for s in steps], marker=marker, linestyle="--", color="#7f7f7f",
                 label="global grad norm")
    norm_ax.set_ylabel("global gradient L2 norm", color="#7f7f7f")
    lines = loss_ax.get_lines() + norm_ax.get_lines()
    loss_ax.legend(lines, [line.get_label() for line in lines], loc="upper right", frameon=False)
    loss_ax.grid(alpha=0.3)

    param_ax = axes[1]
    names = history.parameters()
    colours = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    for i, name in enumerate(names):
        points = [(s.step, g.l2_norm) for s in steps for g in s.gradients if g.name == name and g.l2_norm > 0]
        if points:
            x, y = zip(*points)
            param_ax.plot(x, y, marker=marker, markersize=3, linewidth=1, label=name, color=colours(i % colours.N),
                          linestyle=["-", "--", ":"][i // colours.N % 3])
    param_ax.set_yscale("log")
    param_ax.set_ylabel("gradient L2 norm (log)")
    param_ax.grid(alpha=0.3)
    matched = f"parameters matching {pattern!r}" if pattern else "every parameter"
    param_ax.set_title(f"{matched}: {len(names)}", fontsize=10)
    if names:
        param_ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
                        fontsize=7 if len(names) <= 16 else 5, ncol=1 + len(names) // 24)

    if attention:
        qkv_ax = axes[2]
        blocks = sorted({a.block for s in steps for a in s.attention})
        styles = ["-", "--", ":", "-."]
        for i, block in enumerate(blocks):
            for part in "qkv":
                points = [(s.step, getattr(a, f"{part}_norm")) for s in steps for a in s.attention
                          if a.block == block]
                x, y = zip(*points)
                qkv_ax.plot(x, [v if v > 0 else np.nan for v in y], marker=marker, markersize=3,
                            linestyle=styles[i % len(styles)], color=PART_COLOURS[part],
                            alpha=1.0 - 0.6 * i / max(len(blocks), 1), label=f"block {block} {part}")
        qkv_ax.set_yscale("log")
        qkv_ax.set_ylabel("q/k/v weight gradient L2 norm (log)")
        qkv_ax.grid(alpha=0.3)
        qkv_ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=7,
                      ncol=1 + len(blocks) // 8)
    axes[-1].set_xlabel("optimizer step")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    first, last = numbers[0], numbers[-1]
    fig.suptitle(f"Gradient history: steps {first} to {last} ({len(steps)} kept of at most {history.capacity})")
    return fig


# ---------------------------------------------------------------- fit and evaluate

def fit_curve(epochs: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """A fit's epochs: train and validation loss (left) and validation accuracy (right), best epoch marked."""
    if not epochs:
        raise ValueError("nothing to plot: no finished epoch")
    fig = Figure(figsize=(11, 4.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, acc_ax = fig.subplots(1, 2)
    x = [e["epoch"] for e in epochs]
    loss_ax.plot(x, [e["train_loss"] for e in epochs], "o-", color="#1f77b4", label="train loss")
    loss_ax.plot(x, [e["val_loss"] for e in epochs], "s--", color="#7f7f7f", label="validation loss")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("cross-entropy loss")
    loss_ax.legend(frameon=False)
    accuracy = [e["val_accuracy"] * 100 for e in epochs]
    acc_ax.plot(x, accuracy, "o-", color="#d62728", label="validation accuracy")
    best = [e for e in epochs if e.get("best")]
    if best:
        acc_ax.plot([best[-1]["epoch"]], [best[-1]["val_accuracy"] * 100], "*", color="black", markersize=14,
                    label=f"best: epoch {best[-1]['epoch']}, {best[-1]['val_accuracy']:.1%}")
    acc_ax.set_xlabel("epoch")
    acc_ax.set_ylabel("validation accuracy (%)")
    acc_ax.legend(frameon=False, loc="lower right")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"fit: {len(epochs)} epochs, {epochs[-1]['images_per_s']:.0f} images/s in the last")
    return save(fig, path)


def confusion_matrix(matrix: np.ndarray, labels: list[str], path: str | os.PathLike, title: str = "") -> Path:
    """A confusion matrix (rows: true class, columns: predicted), counts in the cells (scikit-learn's display)."""
    from sklearn.metrics import ConfusionMatrixDisplay

    size = max(5.0, 0.45 * len(labels) + 3)
    fig = Figure(figsize=(size, size * 0.9), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ConfusionMatrixDisplay(matrix, display_labels=labels).plot(ax=ax, cmap="Blues", colorbar=True,
                                                               xticks_rotation="vertical" if len(labels) > 8 else
                                                               "horizontal")
    ax.set_title(title or "confusion matrix")
    return save(fig, path)
