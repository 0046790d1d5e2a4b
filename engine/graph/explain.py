"""Where the loss and every gradient are computed in an ONNX Runtime training graph (ExplainGradients).

Pure graph analysis of `training_model.onnx` (onnx + the manifest; no grpc, no torch, no session):

- the loss is the node producing the graph's first output; backpropagation starts at the node
  that first consumes "<loss>_grad" (SoftmaxCrossEntropyLossGrad);
- ORT's gradient builder names the gradient of tensor T "T_grad", so trainable parameter W gets
  "W_grad" (the graph output "W_grad.accumulation.out" is its accumulator, one node later);
- backward nodes are those downstream of the loss's gradient node, plus the helpers the builder
  adds that only read forward tensors (e.g. the Shape feeding a SliceGrad), all named "<op>_Grad/...";
- a parameter's distance from the loss is a shortest producer -> consumer path through the
  backward graph, from the loss's gradient node to the node producing W_grad, both included;
- a fused qkv projection's output is cut into q, k and v by one Split (the export rewrites the
  traced graph's three Slices into one, model/rewrite.py) or by Slices or Gathers; each part's gradient
  "<part>_grad" comes out of the attention backward and goes back through the cut's gradient (a
  Concat for a Split; SliceGrads and their Sum for Slices) into the projection output's gradient.
"""
from __future__ import annotations

from collections import defaultdict, deque
from pathlib import Path

import onnx

from engine.errors import ConfigError, FailedPrecondition, NotFound
from engine.graph.heads import HeadOutput
from engine.graph.rewrite import constant_value
from engine.manifest import Manifest
from proto.records.explain import Explanation, GraphNode, ParameterGradientPath, QkvPartGradient
from proto.records.model import Parameter, QkvLayout

GRAD = "_grad"  # ORT's gradient tensor suffix
GRAD_NODE = "_Grad/"  # ORT's gradient node name infix
MATMULS = {"MatMul", "FusedMatMul", "Gemm"}
# Ops that move or scale a q/k/v part on its way to the attention matmuls without mixing it with another part.
PASS_THROUGH = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Cast", "Mul", "Div"}
# Ops between a fused projection's output and the cut into q, k and v (timm: Add(bias), Reshape, Transpose, Split).
RESHAPES = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Cast"}
CUTS = {"Slice", "Split", "Gather"}


def graph_node(node: onnx.NodeProto) -> GraphNode:
    """A node's record, its op type qualified by its domain when that is not the default one."""
    domain = node.domain if node.domain not in ("", "ai.onnx") else ""
    op_type = f"{domain}.{node.op_type}" if domain else node.op_type
    return GraphNode(node.name, op_type, tuple(node.input), tuple(node.output))


class GradientExplainer:
    """Loads a training graph once; `explain` answers from what __init__ precomputed."""

    def __init__(self, training_model_path: Path | str, manifest: Manifest):
        graph = onnx.load(str(training_model_path)).graph
        self._nodes = list(graph.node)
        self._graph = graph  # for constant values
        self._producer = {out: i for i, n in enumerate(self._nodes) for out in n.output if out}
        self._consumers: dict[str, list[int]] = defaultdict(list)
        for i, node in enumerate(self._nodes):
            for name in dict.fromkeys(node.input):
                self._consumers[name].append(i)
        loss_output = graph.output[0].name
        self._loss = self._producer[loss_output]
        if not self._consumers[loss_output + GRAD]:
            raise ConfigError(f"training graph has no consumer of the loss gradient {loss_output + GRAD!r}")
        self._loss_grad = self._consumers[loss_output + GRAD][0]
        downstream = self._downstream(self._loss_grad)
        self._backward = set(downstream) | {i for i, n in enumerate(self._nodes) if GRAD_NODE in n.name}
        self._parent = downstream  # BFS tree: node -> its predecessor on a shortest path from the loss gradient
        self._frozen = {p.name for p in manifest.parameters if not p.trainable}
        self._parts: dict[str, tuple[QkvPartGradient, ...]] = {}  # q/k/v weight or bias -> where its parts' gradients are
        for layout in manifest.qkv:
            self._parts.update(self._layout_parts(layout))
        self._paths = {p.name: self._parameter_path(p) for p in manifest.parameters if p.trainable}

    def explain(self, parameter: str = "") -> Explanation:
        if parameter and parameter not in self._paths:
            if parameter in self._frozen:
                raise FailedPrecondition(f"parameter {parameter!r} is frozen in this model: it has no gradient")
            example = next(iter(self._paths))
            raise NotFound(f"parameter {parameter!r} is not in this model; ExplainGradients knows "
                           f"{len(self._paths)} trainable parameters, e.g. {example}")
        chosen = (self._paths[parameter],) if parameter else tuple(self._paths.values())
        return Explanation(loss=self._info(self._loss), loss_gradient=self._info(self._loss_grad), parameters=chosen,
                           forward_nodes=len(self._nodes) - len(self._backward), backward_nodes=len(self._backward))

    # -- graph walking ---------------------------------------------------------------------------

    def _info(self, index: int) -> GraphNode:
        return graph_node(self._nodes[index])

    def _downstream(self, start: int) -> dict[int, int | None]:
        """Breadth-first over producer -> consumer edges (consumers in graph order): node -> parent."""
        parent: dict[int, int | None] = {start: None}
        queue = deque([start])
        while queue:
            node = queue.popleft()
            for out in self._nodes[node].output:
                for consumer in self._consumers.get(out, ()):
                    if consumer not in parent:
                        parent[consumer] = node
                        queue.append(consumer)
        return parent

    def _path_to(self, node: int) -> list[int]:
        path = [node]
        while self._parent[path[-1]] is not None:
            path.append(self._parent[path[-1]])
        return path[::-1]

    def _gradient_producer(self, tensor: str) -> int | None:
        node = self._producer.get(tensor + GRAD)
        return node if node in self._parent else None

    def _parameter_path(self, parameter: Parameter) -> ParameterGradientPath:
        name = parameter.name
        node = self._gradient_producer(name)
        if node is None:
            raise ConfigError(f"training graph has no gradient {name + GRAD!r} reached from the loss: re-run the export")
        path = tuple(self._info(i) for i in self._path_to(node))
        return ParameterGradientPath(name=name, shape=parameter.shape, block=parameter.block,
                                     sublayer=parameter.sublayer, gradient_tensor=name + GRAD,
                             gradient_node=self._info(node), ops_from_loss=len(path), path=path,
                             qkv_parts=self._parts.get(name, ()))

    # -- q, k and v ------------------------------------------------------------------------------

    def _forward_consumers(self, tensor: str) -> list[int]:
        return [i for i in self._consumers.get(tensor, ()) if i not in self._backward]

    def _first_matmul(self, tensor: str, through: set[str]) -> tuple[int, int] | None:
        """(node, input slot) of the first forward matmul that `tensor` reaches through `through` ops."""
        queue, seen = deque([tensor]), {tensor}
        while queue:
            current = queue.popleft()
            for i in self._forward_consumers(current):
                node = self._nodes[i]
                if node.op_type in MATMULS:
                    return i, list(node.input).index(current)
                if node.op_type in through and node.output[0] not in seen:
                    seen.add(node.output[0])
                    queue.append(node.output[0])
        return None

    def _layout_parts(self, layout: QkvLayout) -> dict[str, tuple[QkvPartGradient, ...]]:
        """Every q/k/v weight and bias of one attention module -> the q, k, v part gradients it feeds."""
        if layout.fused:
            parts = self._fused_parts(layout.weights[0])
            return {n: parts for n in {*layout.weights, *layout.biases}} if parts else {}
        found = {}
        for i, (role, weight) in enumerate(zip("qkv", layout.weights)):
            tensor = self._projection_output(weight)
            part = self._part(role, tensor) if tensor else None
            if part is None:
                continue
            found[weight] = (part,)
            if layout.biases:
                found[layout.biases[i]] = (part,)
        return found

    def _part(self, role: str, tensor: str) -> QkvPartGradient | None:
        """Where the gradient of q, k or v (the forward `tensor`) is computed; None when it is not found. ORT's
        gradient builder names that gradient `<tensor>_grad`."""
        node = self._gradient_producer(tensor)
        return None if node is None else QkvPartGradient(role, tensor, tensor + GRAD, self._info(node))

    def head_outputs(self, manifest: Manifest) -> list[HeadOutput]:
        """Each attention module's per-head output softmax(q k^T) v: the matmul that takes v as its right operand."""
        outputs = []
        for layout in manifest.qkv:
            parts = self._parts.get(layout.weights[2], ())
            v = next((p.tensor for p in parts if p.part == "v"), None)
            found = self._first_matmul(v, PASS_THROUGH) if v else None
            if found is None or found[1] != 1:
                raise ConfigError(f"attention module {layout.module or layout.name}: its head outputs were not found "
                                  "in the training graph, so head importance cannot be computed")
            outputs.append(HeadOutput(layout.block, layout.module or layout.name, layout.heads,
                                      self._nodes[found[0]].output[0]))
        return outputs

    def _projection_output(self, weight: str) -> str | None:
        """x @ W^T, plus the bias when an Add follows: the tensor a projection weight makes."""
        found = self._first_matmul(weight, {"Transpose", "Identity", "Cast"})  # W -> (W^T) -> x @ W^T
        if found is None:
            return None
        product = self._nodes[found[0]].output[0]
        adds = [i for i in self._forward_consumers(product) if self._nodes[i].op_type == "Add"]
        return self._nodes[adds[0]].output[0] if len(adds) == 1 else product

    def _fused_parts(self, weight: str) -> tuple[QkvPartGradient, ...]:
        """q, k and v of one fused projection: the three pieces its output is cut into (by Slice, Split or Gather),
        after the bias add, reshapes and transposes, ordered by their roles in the attention."""
        product = self._projection_output(weight)
        if product is None:
            return ()
        cuts, parts = self._cut(product)
        if len(parts) != 3:
            return ()
        ordered = self._order_by_attention(parts) or self._order_by_offset(cuts, parts)
        result = []
        for role, tensor in zip("qkv", ordered or ()):
            part = self._part(role, tensor)
            if part is None:
                return ()
            result.append(part)
        return tuple(result)

    def _cut(self, tensor: str) -> tuple[list[int], list[str]]:
        """(cutting nodes, their output tensors) of the first tensor downstream of `tensor`, through ops that only
        reshape or move it, that is cut into pieces: by three Slices or Gathers, or by one Split."""
        queue, seen = deque([tensor]), {tensor}
        while queue:
            current = queue.popleft()
            consumers = [i for i in self._forward_consumers(current) if self._nodes[i].op_type != "Shape"]
            cuts = [i for i in consumers if self._nodes[i].op_type in CUTS]
            if cuts:
                return cuts, [out for i in cuts for out in self._nodes[i].output]
            for i in consumers:
                node = self._nodes[i]
                if node.op_type in RESHAPES and node.output[0] not in seen:
                    seen.add(node.output[0])
                    queue.append(node.output[0])
        return [], []

    def _order_by_attention(self, parts: list[str]) -> list[str] | None:
        """q, k, v from their roles: q and k meet in one matmul (q @ k^T: q left, k right, k through a
        Transpose), v is the right operand of another one (softmax(q k^T) @ v). Checked on the digits and
        vit-pytorch graphs: q, k, v are Slice, Slice_1, Slice_2 there, starting at 0, inner and 2 * inner."""
        reached = {p: self._first_matmul(p, PASS_THROUGH) for p in parts}
        if None in reached.values():
            return None
        by_node: dict[int, dict[int, str]] = defaultdict(dict)
        for part, (node, slot) in reached.items():
            by_node[node][slot] = part
        scores = [slots for slots in by_node.values() if set(slots) == {0, 1}]
        values = [slots for slots in by_node.values() if set(slots) == {1}]
        if len(scores) != 1 or len(values) != 1:
            return None
        return [scores[0][0], scores[0][1], values[0][1]]

    def _order_by_offset(self, cuts: list[int], parts: list[str]) -> list[str] | None:
        """Fallback: q, k, v by the constant starts of three Slices, the indices of three Gathers, or a Split's order."""
        if len(cuts) == 1:
            return parts
        starts = []
        for i in cuts:  # Slice's starts, Gather's index: an initializer or a Constant node
            value = constant_value(self._graph, self._nodes[i].input[1])
            if value is None:
                return None
            starts.append(int(value.reshape(-1)[0]))
        return [part for _, part in sorted(zip(starts, parts))]
