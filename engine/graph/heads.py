"""Head importance (Michel et al. 2019, "Are Sixteen Heads Really Better than One?") from the training graph.

The importance of head h is |dL/d xi_h| for a gate xi_h multiplying that head's output o_h (softmax(q k^T) v,
before the heads are merged), at xi = 1. Since o_h enters the rest of the network only through xi_h o_h,

    dL/d xi_h = sum over batch, tokens and head width of  o_h * dL/d o_h

and both factors are already tensors of ORT's training graph (`<o>` and `<o>_grad`). So no gate goes into
the model: a copy of the training graph that also outputs those two tensors per attention module gives
the importance, with the same loss and gradients, and nothing that an optimizer could update, a
checkpoint could store or Publish could export. The copy is built only when importance is asked for.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from proto.records.training import HeadScores

OUTPUT, GRADIENT = "vitserve_heads/{}/output", "vitserve_heads/{}/gradient"  # names of the added outputs


@dataclass(frozen=True)
class HeadOutput:
    """Where one attention module's per-head output lives in the training graph."""
    block: int
    module: str
    heads: int
    tensor: str  # (batch, heads, tokens, dim_head) or (batch * heads, tokens, dim_head)


def write_importance_graph(training_model: Path, outputs: list[HeadOutput], path: Path) -> None:
    """The training graph with each head output and its gradient as extra graph outputs, written to `path`.

    ORT's Module does not hand out graph outputs whose names end in "_grad", so each goes out through an
    Identity under a name of its own.
    """
    model = onnx.load(str(training_model))
    for i, o in enumerate(outputs):
        for source, name in ((o.tensor, OUTPUT.format(i)), (o.tensor + "_grad", GRADIENT.format(i))):
            model.graph.node.append(helper.make_node("Identity", [source], [name], name=f"{name}/Identity"))
            model.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    onnx.save(model, str(path))


def head_sums(output: HeadOutput, values: np.ndarray, gradient: np.ndarray, batch: int) -> np.ndarray:
    """sum of o_h * dL/d o_h per head (signed, float64), from the head output and its gradient as the graph laid
    them out. Sums of disjoint batches add up (weighted by their share of the loss's mean) before the |.|."""
    # (batch, heads, ...) or, as nn.MultiheadAttention lays it out, (batch * heads, ...): both reshape alike.
    if values.shape[:2] != (batch, output.heads) and values.shape[0] != batch * output.heads:
        raise ValueError(f"head output {output.tensor} has shape {values.shape}: no axis of {output.heads} heads")
    return (values.astype(np.float64) * gradient).reshape(batch, output.heads, -1).sum(axis=(0, 2))


def scores(output: HeadOutput, sums: np.ndarray) -> HeadScores:
    """The importance |dL/d xi_h| of each head from its signed sum (head_sums)."""
    return HeadScores(output.block, output.module, tuple(float(x) for x in np.abs(sums)))


def importance(output: HeadOutput, values: np.ndarray, gradient: np.ndarray, batch: int) -> HeadScores:
    """|sum of o_h * dL/d o_h| per head, from the head output and its gradient as the graph laid them out."""
    return scores(output, head_sums(output, values, gradient, batch))
