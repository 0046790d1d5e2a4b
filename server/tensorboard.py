"""Gradient history as TensorBoard event files (--tensorboard-dir), written with tensorboardX: no torch, no TensorFlow.

Every applied train step adds scalars: the loss, the learning rate, the global gradient norm, each
parameter's gradient norm and update ratio, each attention block's q, k and v gradient norms (weights and
biases) and per-head norms, and head importance when the step computed it. Every N steps
(--tensorboard-histogram-every) each parameter's gradient goes in as a histogram.
`tensorboard --logdir DIR` shows the run.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

from proto.records.training import StepResult


def _summary_writer():
    """tensorboardX's SummaryWriter, imported with torch hidden: tensorboardX does `try: import torch` to accept
    torch tensors, and the serving process must not load torch (2 s, hundreds of MB) even where it is installed."""
    hidden = "torch" not in sys.modules
    if hidden:
        sys.modules["torch"] = None  # `import torch` raises ImportError, as where torch is not installed
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hidden:
            del sys.modules["torch"]
    return SummaryWriter


class GradientBoard:
    def __init__(self, folder: Path, histogram_every: int):
        self._writer = _summary_writer()(logdir=str(folder), flush_secs=5)
        self._every = histogram_every

    def histograms(self, step: int, grads: dict[str, np.ndarray]) -> None:
        """The engine's on_gradients hook: every parameter's gradient as a histogram every N steps."""
        if step % self._every == 0:
            for name, grad in grads.items():
                self._writer.add_histogram(f"gradient/{name}", grad.reshape(-1), step)

    def record(self, r: StepResult) -> None:
        """The scalars of one applied step."""
        scalar = self._writer.add_scalar
        scalar("loss", r.loss, r.step)
        scalar("learning_rate", r.learning_rate, r.step)
        scalar("grad_norm", r.grad_norm, r.step)
        for g in r.gradients:
            scalar(f"gradient_norm/{g.name}", g.l2_norm, r.step)
            if math.isfinite(g.update_ratio):
                scalar(f"update_ratio/{g.name}", g.update_ratio, r.step)
        for a in r.attention:
            for part in "qkv":
                scalar(f"attention/block{a.block}/{part}", getattr(a, f"{part}_norm"), r.step)
                for h, norm in enumerate(getattr(a, f"{part}_head_norms")):
                    scalar(f"attention/block{a.block}/{part}_head{h}", norm, r.step)
                if a.biases:
                    scalar(f"attention/block{a.block}/{part}_bias", getattr(a, f"{part}_bias_norm"), r.step)
        for scores in r.head_importance:
            for h, value in enumerate(scores.importance):
                scalar(f"head_importance/block{scores.block}/head{h}", value, r.step)

    def close(self) -> None:
        self._writer.close()
