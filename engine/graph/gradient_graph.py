"""Where the loss and every gradient are computed in the `ort` trainer's gradient graph (ExplainGradients).

`gradient_model.onnx` (model/gradgraph.py) is PyTorch's own autograd traced into plain ONNX ops: inputs
`images`, `labels`, then every trainable parameter; outputs `loss`, `logits`, then `<param>_grad`. Its node
names come from the tracer (`node_addmm_13`), and its backward nodes carry no module names (make_fx records
no module stack for them). Everything here is read from the graph's structure, plus the module path that
torch.onnx writes on the forward nodes (`pkg.torch.onnx.name_scopes`); no grpc, no torch, no session:

- forward nodes are the ancestors of `loss` and `logits`; every other node is backward. The forward nodes
  that only the loss needs (log-softmax, the label gather, the mean) form one unit, "loss";
- the loss node produces `loss`; backpropagation starts at the backward node that reads the seed gradient
  (a constant 1: ones_like(loss)) and from which the most parameter gradients are reachable;
- every other forward unit is one traced op (the ONNX nodes that share one `pkg.torch.onnx.fx_node`). The
  backward graph is matched against them in reverse forward order, as autograd ran it: the full gradient
  dY of a unit's output (its consumers' contributions, summed by the accumulating Adds) enters the unit's
  backward formula, which is grown from dY through the nodes that read only dY, the formula's own
  intermediates and the unit's saved tensors, until a tensor of the shape of one of the unit's inputs X
  leaves it (for an op that saves tensors, once nothing downstream reads them any more): that tensor is
  the unit's contribution to dX. Pass-through ops (residual Adds) have no nodes: dY is their inputs'
  contribution. A parameter's gradient is the graph output `<param>_grad`;
- so each backward node is named after the forward op it differentiates (`name_backward_nodes`):
  forward `transformer.layers.0.0.fn.to_qkv/MatMul`, backward
  `backward/transformer.layers.0.0.fn.to_qkv/MatMul/Transpose_1`; the loss `loss/Div`, the start of
  backpropagation `backward/loss/Div`. Node names are free in ONNX: renaming changes nothing ORT runs;
- q, k and v: as in engine/graph/explain.py, from the forward graph (the fused projection's output cut in
  three, ordered by their roles in the attention), and their gradients from the matching above: for a
  fused projection, the three pieces that meet in the cut's gradient (the Split's Concat) feeding the
  fused weight's gradient; for separate projections, each projection output's gradient.

GradientGraph here is the analysis: the graph's indexes and walks, where backpropagation starts, what a backward
node reads, and the node names. forward_units.py makes the units, backward_matching.py matches the backward nodes
to them, and graph_explain.py writes the names into the file and answers ExplainGradients.
"""
from __future__ import annotations

from collections import defaultdict

import onnx
from onnx import numpy_helper

from engine.errors import ConfigError
from engine.graph.backward_matching import BackwardMatching
from engine.graph.explain import GRAD
from engine.graph.forward_units import Unit, forward_names, forward_units

LOSS, LOGITS = "loss", "logits"
BACKWARD = "backward"
FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}


class GradientGraph:
    """The analysis of one gradient graph: forward units, backward nodes, which forward op each backward node
    differentiates, and every forward tensor's gradient."""

    def __init__(self, model: onnx.ModelProto, parameters=()):
        graph = model.graph
        self.graph = graph
        self.nodes = list(graph.node)
        n = len(self.nodes)
        self.producer = {out: i for i, node in enumerate(self.nodes) for out in node.output if out}
        self.consumers: dict[str, list[int]] = defaultdict(list)
        for i, node in enumerate(self.nodes):
            for name in dict.fromkeys(node.input):
                if name:
                    self.consumers[name].append(i)
        self._types, self._shapes = {}, {}
        for value in list(graph.input) + list(graph.output) + list(graph.value_info):
            t = value.type.tensor_type
            self._types[value.name] = t.elem_type
            if t.HasField("shape"):
                self._shapes[value.name] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                                 for d in t.shape.dim)
        self._initializers = {i.name: i for i in graph.initializer}
        for name, init in self._initializers.items():
            self._types.setdefault(name, init.data_type)
            self._shapes.setdefault(name, tuple(init.dims))
        names = [p if isinstance(p, str) else p.name for p in parameters]
        outputs = [o.name for o in graph.output]
        inputs = [i.name for i in graph.input]
        self.trainable = [i for i in inputs if i + GRAD in set(outputs)]
        self.parameters = set(names) | set(self.trainable)
        self.grad_outputs = {p + GRAD: p for p in self.trainable if p + GRAD in self.producer}
        loss_name = LOSS if LOSS in outputs else outputs[0]
        logits_name = LOGITS if LOGITS in outputs else outputs[1]
        if loss_name not in self.producer:
            raise ConfigError(f"gradient graph: no node produces the loss {loss_name!r}")
        self.loss = self.producer[loss_name]
        self.logits_ancestors = self._ancestors([self.producer[logits_name]] if logits_name in self.producer else [])
        self.forward = self._ancestors([self.loss]) | self.logits_ancestors
        self.backward = set(range(n)) - self.forward
        self.units, self.unit_of = forward_units(self)
        self.loss_unit = self.unit_of.get(self.loss)
        self.names, self._taken = forward_names(self.units, self.nodes)
        self._requires_grad()
        self.seed = self._seed()
        self.flow = self._downstream(self.seed)
        self._saved_cache: dict[int, frozenset] = {}
        self._constants_cache: dict[int, frozenset] = {}
        self.forward_constants = {self._constant_key(t) for i in self.forward for t in self.nodes[i].input
                                  if t in self._initializers and self.is_float(t)}
        matching = BackwardMatching(self)
        self.owner = matching.owner  # backward node -> forward unit it differentiates
        self.accumulates = matching.accumulates  # backward nodes that sum a tensor's gradient contributions
        self.gradient = matching.gradient  # forward tensor -> the tensor holding its (full) gradient

    # -- basic walks ------------------------------------------------------------------------------

    def _ancestors(self, starts) -> set[int]:
        seen, stack = set(starts), list(starts)
        while stack:
            for name in self.nodes[stack.pop()].input:
                p = self.producer.get(name)
                if p is not None and p not in seen:
                    seen.add(p)
                    stack.append(p)
        return seen

    def _downstream(self, start: int) -> set[int]:
        seen, stack = {start}, [start]
        while stack:
            for out in self.nodes[stack.pop()].output:
                for c in self.consumers.get(out, ()):
                    if c not in seen:
                        seen.add(c)
                        stack.append(c)
        return seen

    def shape(self, tensor: str):
        return self._shapes.get(tensor)

    def is_float(self, tensor: str) -> bool:
        return self._types.get(tensor) in FLOATS

    def is_forward_tensor(self, tensor: str) -> bool:
        """A value of the forward pass a backward node may save: a forward node's output, a graph input, or a
        parameter held as an initializer (a frozen one); not a constant."""
        if tensor in self.producer:
            return self.producer[tensor] in self.forward
        return tensor in self.parameters or (tensor not in self._initializers and tensor != "")

    def _constant(self, tensor: str):
        if tensor in self._initializers:
            return numpy_helper.to_array(self._initializers[tensor])
        p = self.producer.get(tensor)
        if p is not None and self.nodes[p].op_type == "Constant":
            for attr in self.nodes[p].attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
        return None

    def _requires_grad(self) -> None:
        self.requires_grad = set(self.trainable)
        for i in sorted(self.forward):
            node = self.nodes[i]
            if any(t in self.requires_grad for t in node.input):
                self.requires_grad.update(o for o in node.output if o and self.is_float(o))

    # -- where backpropagation starts --------------------------------------------------------------

    def _is_one(self, tensor: str) -> bool:
        value = self._constant(tensor)
        return value is not None and value.size == 1 and float(value.reshape(-1)[0]) == 1.0

    def _seed(self) -> int:
        """The backward node where the loss's gradient enters: it reads the constant 1 (ones_like(loss)) and
        reaches the most parameter gradients (first in graph order on a tie)."""
        targets = {self.producer[g] for g in self.grad_outputs}
        candidates = [i for i in sorted(self.backward) if any(self._is_one(t) for t in self.nodes[i].input)]
        if not candidates:
            candidates = [i for i in sorted(self.backward)
                          if not any(self.producer.get(t) in self.backward for t in self.nodes[i].input)]
        if not candidates:
            raise ConfigError("gradient graph has no backward nodes")
        best = max(candidates, key=lambda i: (len(self._downstream(i) & targets), -i))
        if targets and not self._downstream(best) & targets:
            raise ConfigError("gradient graph: no parameter gradient is reached from the loss")
        return best

    # -- what a backward node reads ----------------------------------------------------------------

    def saved(self, i: int) -> frozenset:
        """The forward float tensors backward node i reads, directly or through backward nodes that read only
        forward tensors (e.g. a weight's transpose, LayerNorm's (x - mean) * rstd)."""
        if i in self._saved_cache:
            return self._saved_cache[i]
        found = set()
        for t in () if self.nodes[i].op_type in ("Shape", "Size") else self.nodes[i].input:  # a shape reads no value
            if not t:
                continue
            p = self.producer.get(t)
            if p is not None and p in self.backward:
                if p not in self.flow:
                    found |= self.saved(p)
            elif self.is_float(t) and self.is_forward_tensor(t):
                found.add(t)
        self._saved_cache[i] = frozenset(found)
        return self._saved_cache[i]

    def constants(self, i: int) -> frozenset:
        """The float constants (not parameters) backward node i reads, directly or through backward nodes that
        read only forward tensors and constants (a scale, an epsilon)."""
        if i in self._constants_cache:
            return self._constants_cache[i]
        found = set()
        for t in self.nodes[i].input:
            p = self.producer.get(t)
            if p is not None and p in self.backward and p not in self.flow:
                found |= self.constants(p)
            elif t in self._initializers and t not in self.parameters and self.is_float(t):
                found.add(self._constant_key(t))
        self._constants_cache[i] = frozenset(found)
        return self._constants_cache[i]

    def _constant_key(self, tensor: str):
        """A float scalar constant by its value (the exporter keeps equal scalars under several names), else by name."""
        init = self._initializers[tensor]
        if init.data_type in FLOATS and len(init.dims) <= 1 and (not init.dims or init.dims[0] == 1):
            return ("value", float(numpy_helper.to_array(init).reshape(-1)[0]))
        return ("name", tensor)

    def unit_constants(self, unit: Unit) -> set:
        return {self._constant_key(t) for t in unit.inputs
                if t in self._initializers and t not in self.parameters and self.is_float(t)}

    def flow_inputs(self, i: int) -> list[str]:
        return [t for t in self.nodes[i].input if t and self.producer.get(t) in self.flow]

    # -- names ------------------------------------------------------------------------------------

    def node_names(self) -> dict[int, str]:
        """Every node's readable name: forward nodes after their module and op, backward nodes after the forward
        op they differentiate (`backward/<forward op>/<own op>`, `.../accumulate/Add` where gradients are summed)."""
        names = dict(self.names)
        taken = dict(self._taken)

        def unique(base: str) -> str:
            k = taken.get(base, 0)
            taken[base] = k + 1
            return base if k == 0 else f"{base}_{k}"

        for i in sorted(self.backward):
            node = self.nodes[i]
            u = self.owner.get(i)
            if u is None:
                names[i] = unique(f"{BACKWARD}/{node.name or node.op_type}")
                continue
            unit = self.units[u]
            middle = "/accumulate" if i in self.accumulates else ""
            names[i] = unique(f"{BACKWARD}/{unit.name}{middle}/{node.op_type}")
        return names

    def differentiates(self, i: int) -> str:
        """The forward op backward node i differentiates (its forward name), "" if unknown."""
        u = self.owner.get(i)
        return self.units[u].name if u is not None else ""

    def unit_output(self, tensor: str) -> str:
        """`tensor` if another unit reads it; else the output of its own unit it reaches (timm's unbind: Slice then
        Squeeze in one op)."""
        p = self.producer.get(tensor)
        if p is None or p not in self.unit_of:
            return tensor
        unit = self.units[self.unit_of[p]]
        current = tensor
        for _ in range(len(unit.nodes)):
            if current in unit.outputs:
                return current
            inside = [c for c in self.consumers.get(current, ()) if self.unit_of.get(c) == unit.index]
            if len(inside) != 1:
                return tensor
            current = next((o for o in self.nodes[inside[0]].output if o), current)
        return current if current in unit.outputs else tensor
