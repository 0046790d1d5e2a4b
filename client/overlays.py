"""The picture of Attribute: each image with its attribution map laid over it, one panel per image."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from client import AttributeResult
from client.plots import save

PANELS_PER_ROW = 4


def attribution_overlay(result: AttributeResult, pixels: np.ndarray, names: list[str],
                        path: str | os.PathLike) -> Path:
    """Writes a PNG or SVG: per image, its pixels (float (b, c, h, w) in [0, 1], as the model saw them) in grey or
    colour, its map spread over the grid's cells as a translucent heatmap, and a title naming the image, the
    class explained and the method."""
    return save(attribution_overlay_figure(result, pixels, names), path)


def attribution_overlay_figure(result: AttributeResult, pixels: np.ndarray, names: list[str]) -> Figure:
    count = len(result.attributions)
    columns = min(count, PANELS_PER_ROW)
    rows = math.ceil(count / columns)
    fig = Figure(figsize=(3.0 * columns + 0.8, 3.2 * rows + 0.4), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    weights = f"step {result.step}" if result.step else f"version {result.model_version}"
    fig.suptitle(f"{result.method} ({weights})")
    patch_rows, patch_columns = result.patch
    for i, (attribution, name) in enumerate(zip(result.attributions, names)):
        ax = fig.add_subplot(rows, columns, i + 1)
        image = np.clip(pixels[i], 0.0, 1.0)
        height, width = image.shape[1:]
        heat = np.kron(attribution.map, np.ones((patch_rows, patch_columns)))[:height, :width]  # cells -> pixels
        if image.shape[0] == 1:
            ax.imshow(image[0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        else:
            ax.imshow(image.transpose(1, 2, 0), interpolation="nearest")
        overlay = ax.imshow(heat, cmap="inferno", alpha=0.55, interpolation="nearest",
                            extent=(-0.5, heat.shape[1] - 0.5, heat.shape[0] - 0.5, -0.5))
        ax.set_title(f"{name}\nclass {attribution.target} ({attribution.label})", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(overlay, ax=ax, shrink=0.8)
    return fig
