"""What the service asks of a gradient graph's analysis (engine/graph/gradient_graph.py): the export writes its
readable node names into `gradient_model.onnx` (`name_backward_nodes`), and the `ort` trainer answers
ExplainGradients from it (`GradientGraphExplainer`: the loss, where backpropagation starts, each parameter's
gradient path and its q/k/v parts).
"""
from __future__ import annotations

from pathlib import Path

import onnx

from engine.graph.explain import GRAD, GradientExplainer, QkvPartGradient
from engine.graph.gradient_graph import GradientGraph
from engine.manifest import Manifest

NAMED = "vitserve.node_names"  # model metadata: set once name_backward_nodes has named the graph
BACKWARD_OF = "vitserve.backward_of"  # node metadata: the forward op a backward node differentiates


def name_backward_nodes(model: onnx.ModelProto, manifest_parameters=()) -> onnx.ModelProto:
    """`model` (a gradient graph from model/gradgraph.py) with readable node names, as a copy.

    Forward nodes are named `<module>/<op>` (e.g. `transformer.layers.0.0.fn.to_qkv/MatMul`; the loss's ops
    `loss/<op>`), backward nodes `backward/<forward op>/<op>` after the forward op they differentiate (e.g.
    `backward/transformer.layers.0.0.fn.to_qkv/MatMul/Transpose_1`), and each backward node gets the metadata
    `vitserve.backward_of` (that forward op). Only node names and metadata change: the inputs, outputs, tensors
    and every computation stay as they are. `manifest_parameters`: the model's parameters (names or
    engine.manifest.Parameter), so that frozen ones held as initializers count as parameters."""
    named = onnx.ModelProto()
    named.CopyFrom(model)
    analysis = GradientGraph(named, manifest_parameters)
    names = analysis.node_names()
    for i, node in enumerate(named.graph.node):
        node.name = names[i]
        if i in analysis.backward:
            of = analysis.differentiates(i)
            for prop in list(node.metadata_props):
                if prop.key == BACKWARD_OF:
                    node.metadata_props.remove(prop)
            if of:
                node.metadata_props.add(key=BACKWARD_OF, value=of)
    for prop in list(named.metadata_props):
        if prop.key == NAMED:
            named.metadata_props.remove(prop)
    named.metadata_props.add(key=NAMED, value="module/op; backward/<forward op>/op")
    return named


# --------------------------------------------------------------------------------------------------
# ExplainGradients
# --------------------------------------------------------------------------------------------------

class GradientGraphExplainer(GradientExplainer):
    """GradientExplainer's answer (the same records, errors and `explain` contract) for a gradient graph.

    Node names are the file's own: readable once the export has run `name_backward_nodes` over it."""

    def __init__(self, gradient_model_path: Path | str, manifest: Manifest):
        model = onnx.load(str(gradient_model_path))
        self._analysis = a = GradientGraph(model, manifest.parameters)
        self._graph = model.graph
        self._nodes = a.nodes
        self._producer = a.producer
        self._consumers = a.consumers
        self._loss = a.loss
        self._loss_grad = a.seed
        self._backward = a.backward
        self._parent = self._downstream(a.seed)  # BFS tree from where backpropagation starts
        self._frozen = {p.name for p in manifest.parameters if not p.trainable}
        self._parts: dict[str, tuple[QkvPartGradient, ...]] = {}
        for layout in manifest.qkv:
            self._parts.update(self._layout_parts(layout))
        self._paths = {p.name: self._parameter_path(p) for p in manifest.parameters if p.trainable}

    def differentiates(self, node_name: str) -> str:
        """The forward op a backward node differentiates, by the node's name ("" for a forward node)."""
        index = next((i for i, n in enumerate(self._nodes) if n.name == node_name), None)
        return self._analysis.differentiates(index) if index is not None else ""

    def _projection_output(self, weight: str) -> str | None:
        """x @ W^T, plus the bias when an Add follows it: the traced graph multiplies 2-D rows (view, mm, view), so the
        bias Add (nn.MultiheadAttention's in_proj_bias) may come after the view back to (batch, tokens, features)."""
        found = self._first_matmul(weight, {"Transpose", "Identity", "Cast"})
        if found is None:
            return None
        product = current = self._nodes[found[0]].output[0]
        for _ in range(4):
            users = [i for i in self._forward_consumers(current) if self._nodes[i].op_type != "Shape"]
            adds = [i for i in users if self._nodes[i].op_type == "Add"]
            if len(adds) == 1:
                return self._nodes[adds[0]].output[0]
            if len(users) != 1 or self._nodes[users[0]].op_type not in ("Reshape", "Identity", "Cast"):
                break
            current = self._nodes[users[0]].output[0]
        return product

    def _gradient_tensor(self, tensor: str) -> str | None:
        if tensor + GRAD in self._analysis.grad_outputs:
            return tensor + GRAD
        return self._analysis.gradient.get(tensor)

    def _gradient_producer(self, tensor: str) -> int | None:
        grad = self._gradient_tensor(tensor)
        node = self._producer.get(grad) if grad else None
        return node if node in self._parent else None

    def _part(self, role: str, tensor: str) -> QkvPartGradient | None:
        tensor = self._analysis.unit_output(tensor)
        node = self._gradient_producer(tensor)
        if node is None:
            return None
        return QkvPartGradient(role, tensor, self._gradient_tensor(tensor), self._info(node))
