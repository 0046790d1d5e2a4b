"""ExplainGradients' records (where the loss and each trainable parameter's gradient are computed) and Attribute's
(which image patches a prediction comes from)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from proto.records import Record


@dataclass(frozen=True)
class GraphNode(Record):
    """A node of the training graph: name, op type (domain-qualified when not the default domain, e.g.
    "com.microsoft.SoftmaxCrossEntropyLossGrad"), input and output tensor names."""
    name: str
    op_type: str
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.name} ({self.op_type})"


@dataclass(frozen=True)
class QkvPartGradient(Record):
    """Where the q, k or v part of a fused qkv projection gets its gradient."""
    part: str  # "q", "k" or "v"
    tensor: str  # the forward Slice/Split output
    gradient_tensor: str
    gradient_node: GraphNode | None  # None: not reported


@dataclass(frozen=True)
class ParameterGradientPath(Record):
    """How one trainable parameter's gradient is computed."""
    name: str
    shape: tuple[int, ...]
    block: int
    sublayer: str
    gradient_tensor: str
    gradient_node: GraphNode | None
    ops_from_loss: int
    path: list[GraphNode] = field(default_factory=list)  # loss gradient first
    qkv_parts: list[QkvPartGradient] = field(default_factory=list)  # q, k, v (empty unless a fused qkv projection)


@dataclass(frozen=True)
class Explanation(Record):
    """ExplainGradients' answer: the loss node, the node that starts backpropagation, and each parameter's gradient
    path in manifest order."""
    loss: GraphNode | None
    loss_gradient: GraphNode | None
    parameters: list[ParameterGradientPath]
    forward_nodes: int
    backward_nodes: int

    def parameter(self, name: str) -> ParameterGradientPath:
        """The entry for parameter `name` (KeyError when absent)."""
        for p in self.parameters:
            if p.name == name:
                return p
        raise KeyError(name)


@dataclass(frozen=True)
class ImageAttribution(Record):
    """One image's attribution map on the patch grid (engine/graph/attribution.py): how much each patch contributes
    to the explained class, and with heads=True each block's and head's map."""
    map: np.ndarray  # float32 (rows, columns) of the grid
    target: int  # the class explained
    label: str  # its name
    heads: np.ndarray | None = None  # float32 (blocks, heads, rows, columns) when asked for


@dataclass(frozen=True)
class AttributeResult(Record):
    """Attribute's answer: one map per image, how they were made, and which weights they explain."""
    attributions: list[ImageAttribution]
    method: str  # rollout, chefer or gradxinput
    model_version: int = 0  # the served version explained (0: the export)
    step: int = 0  # with the training weights: their step
    grid: tuple[int, ...] = ()  # (rows, columns) of cells
    patch: tuple[int, ...] = ()  # pixels of one cell, (rows, columns)
