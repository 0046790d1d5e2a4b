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
"""
from __future__ import annotations

import ast
import heapq
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import numpy_helper

from engine.errors import ConfigError
from engine.graph.explain import GRAD, GradientExplainer, QkvPartGradient
from engine.manifest import Manifest

LOSS, LOGITS = "loss", "logits"
LOSS_UNIT = "loss"  # the module name of the forward ops between the logits and the loss
BACKWARD = "backward"
NAMED = "vitserve.node_names"  # model metadata: set once name_backward_nodes has named the graph
BACKWARD_OF = "vitserve.backward_of"  # node metadata: the forward op a backward node differentiates
FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}

PASS_THROUGH_OPS = {"Add", "Sub", "Identity", "Cast"}  # dY is the input's gradient (a broadcast one summed)
STRUCTURAL_OPS = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Concat", "Split", "Slice", "Gather",
                  "Expand", "Tile", "Pad", "Identity"}
SHAPE_OPS = {"Shape", "Size", "Constant", "ConstantOfShape", "Range"}
VIEWS = {"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Expand"}
# The ops each structural op's gradient is made of (a unit grows its backward only through these).
TEMPLATES = {
    "Reshape": VIEWS, "Squeeze": VIEWS, "Unsqueeze": VIEWS, "Flatten": VIEWS, "Identity": VIEWS,
    "Transpose": {"Transpose", "Reshape"},
    "Split": {"Concat", "Reshape", "Identity", "Expand", "ConstantOfShape"},
    "Concat": {"Slice", "Split", "Gather", "Reshape", "Squeeze", "Identity"},
    "Expand": {"ReduceSum", "Reshape", "Squeeze", "Unsqueeze", "Identity"},
    "Tile": {"ReduceSum", "Reshape", "Squeeze", "Unsqueeze", "Identity"},
}
BROADCAST = {"ReduceSum", "Reshape", "Squeeze", "Unsqueeze", "Neg", "Identity"}  # a broadcast input's gradient,
BROADCAST_FIRST = {"ReduceSum", "Neg"}  # which starts by summing (or negating) dY
ACCUMULATE = {"Add", "Sum"}
# Ops that only copy a gradient on (the backward of a forward op the optimizer removed, e.g. a full slice).
COPIES = {"Identity", "ScatterND", "ScatterElements", "Where", "Pad", "Cast", "Reshape", "Expand", "Squeeze", "Unsqueeze"}


# --------------------------------------------------------------------------------------------------
# The analysis
# --------------------------------------------------------------------------------------------------

@dataclass
class _Unit:
    """One forward op (the ONNX nodes of one traced op), or the loss."""
    index: int
    nodes: list  # node indices, graph order
    module: str | None = None  # "" the model itself, None unknown
    label: str = ""
    name: str = ""  # the forward name, e.g. "transformer.layers.0.0.fn.to_qkv/MatMul"
    kind: str = "compute"  # compute | structural | pass | loss
    op: str = ""
    inputs: list = field(default_factory=list)  # tensors read from outside the unit, in order
    outputs: list = field(default_factory=list)  # tensors other forward units (or graph outputs) read
    produced: set = field(default_factory=set)
    saved: set = field(default_factory=set)  # tensors its backward may read: inputs and everything it produces
    own: set = field(default_factory=set)  # those that only its backward reads: what it produces, its parameters


def _scopes(node: onnx.NodeProto) -> list | None:
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                value = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            return value if isinstance(value, list) else None
    return None


def _meta(node: onnx.NodeProto, key: str) -> str:
    return next((p.value for p in node.metadata_props if p.key == key), "")


def _fx_key(node: onnx.NodeProto) -> str:
    """The traced op a node comes from: `vitserve.unit` where the export wrote one op as several traced nodes."""
    unit = _meta(node, "vitserve.unit")
    if unit:
        return unit
    text = _meta(node, "pkg.torch.onnx.fx_node")
    if text.startswith("%"):
        return text[1:].split(" ", 1)[0]
    return _meta(node, "vitserve.fx_node")


def _fx_target(node: onnx.NodeProto) -> str:
    """'gelu' from '... target=torch.ops.aten.gelu.default ...' (or from `vitserve.op`, see _fx_key)."""
    op = _meta(node, "vitserve.op")
    if op:
        return op
    text = _meta(node, "pkg.torch.onnx.fx_node")
    start = text.find("target=")
    if start < 0:
        return ""
    target = text[start + 7:].split("]", 1)[0].split("(", 1)[0]
    parts = target.split(".")
    if len(parts) >= 2 and parts[-1] in ("default", "Tensor", "int", "Scalar", "dim", "self", "dim_IntList"):
        return parts[-2]
    return parts[-1]


def _common_prefix(modules: list[str]) -> str:
    split = [m.split(".") if m else [] for m in modules]
    prefix = []
    for parts in zip(*split):
        if len(set(parts)) != 1:
            break
        prefix.append(parts[0])
    return ".".join(prefix)


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
        self._logits_ancestors = self._ancestors([self.producer[logits_name]] if logits_name in self.producer else [])
        self.forward = self._ancestors([self.loss]) | self._logits_ancestors
        self.backward = set(range(n)) - self.forward
        self._units()
        self._requires_grad()
        self.seed = self._seed()
        self.flow = self._downstream(self.seed)
        self._saved_cache: dict[int, frozenset] = {}
        self._constants_cache: dict[int, frozenset] = {}
        self._forward_constants = {self._constant_key(t) for i in self.forward for t in self.nodes[i].input
                                   if t in self._initializers and self.is_float(t)}
        self.owner: dict[int, int] = {}  # backward node -> forward unit it differentiates
        self.accumulates: set[int] = set()  # backward nodes that sum a tensor's gradient contributions
        self.gradient: dict[str, str] = {}  # forward tensor -> the tensor holding its (full) gradient
        self._contrib: dict[str, list[str]] = defaultdict(list)
        self._match()

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

    def _is_forward_tensor(self, tensor: str) -> bool:
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

    # -- forward units ----------------------------------------------------------------------------

    def _units(self) -> None:
        """Group the forward nodes into units (one per traced op; the loss's ops into one) and name them."""
        groups: dict[str, list[int]] = {}
        loss_nodes = []
        for i in sorted(self.forward):
            if i not in self._logits_ancestors:
                loss_nodes.append(i)
                continue
            key = _fx_key(self.nodes[i]) or f"#{i}"
            groups.setdefault(key, []).append(i)
        self._safe_softmax(groups)
        self.units: list[_Unit] = []
        self.unit_of: dict[int, int] = {}
        for nodes in groups.values():
            self._add_unit(nodes)
        if loss_nodes:
            unit = self._add_unit(loss_nodes)
            unit.kind, unit.module = "loss", LOSS_UNIT
        self.loss_unit = self.unit_of.get(self.loss)
        self._modules()
        for unit in self.units:
            self._describe(unit)
        self._forward_names()

    def _safe_softmax(self, groups: dict[str, list[int]]) -> None:
        """aten._safe_softmax (F.scaled_dot_product_attention's) is traced as Softmax then Where(all -inf, 0, softmax),
        but differentiated as one op (its backward reads the Where's output): one unit."""
        key_of = {i: k for k, nodes in groups.items() for i in nodes}
        for i in list(key_of):
            node = self.nodes[i]
            if node.op_type != "Softmax" or i not in key_of:
                continue
            users = [c for c in self.consumers.get(node.output[0], ()) if c in self.forward]
            wheres = [c for c in users if self.nodes[c].op_type == "Where" and node.output[0] in self.nodes[c].input[1:]]
            if len(wheres) != 1 or any(self.nodes[c].op_type != "Shape" for c in users if c not in wheres):
                continue
            where_key, softmax_key = key_of[wheres[0]], key_of[i]
            if where_key != softmax_key and where_key in groups:
                for j in groups.pop(where_key):
                    key_of[j] = softmax_key
                    groups[softmax_key].append(j)
                groups[softmax_key].sort()

    def _add_unit(self, nodes: list[int]) -> _Unit:
        unit = _Unit(len(self.units), nodes)
        self.units.append(unit)
        for i in nodes:
            self.unit_of[i] = unit.index
        members = set(nodes)
        for i in nodes:
            for t in self.nodes[i].output:
                if t:
                    unit.produced.add(t)
        for i in nodes:
            for t in self.nodes[i].input:
                if t and t not in unit.produced and t not in unit.inputs:
                    unit.inputs.append(t)
        graph_outputs = {o.name for o in self.graph.output}
        for t in sorted(unit.produced, key=lambda t: self.producer[t]):
            if t in graph_outputs or any(c in self.forward and c not in members for c in self.consumers.get(t, ())):
                unit.outputs.append(t)
        unit.saved = {t for t in unit.inputs if self._is_forward_tensor(t) and self.is_float(t)} | unit.produced
        unit.own = unit.produced | {t for t in unit.inputs if t in self.parameters}
        return unit

    def _modules(self) -> None:
        """Each unit's module: torch.onnx's name scopes; else the module of the parameter it reads; else the
        common prefix of its neighbours' modules (e.g. the Split the optimizer makes of three Slices)."""
        known = False
        for unit in self.units:
            if unit.kind == "loss":
                continue
            scopes = next((s for s in (_scopes(self.nodes[i]) for i in unit.nodes) if s), None)
            if scopes and scopes[0] == "" and len(scopes) >= 2:
                unit.module = scopes[-2]
                known = known or bool(unit.module)
        if not known:  # no module paths (an older exporter): start from the parameters each unit reads
            for unit in self.units:
                if unit.kind != "loss":
                    unit.module = None
                    params = [t for t in unit.inputs if t in self.parameters]
                    if params:
                        unit.module = params[0].rpartition(".")[0]
        for _ in range(3):
            for unit in self.units:
                if unit.module is not None:
                    continue
                near = [self.units[self.unit_of[self.producer[t]]].module for t in unit.inputs
                        if t in self.producer and self.producer[t] in self.unit_of]
                near += [self.units[self.unit_of[c]].module for t in unit.outputs for c in self.consumers.get(t, ())
                         if c in self.unit_of]
                near = [m for m in near if m is not None and m != LOSS_UNIT]
                if near:
                    unit.module = _common_prefix(near)
        for unit in self.units:
            if unit.module is None:
                unit.module = ""

    def _describe(self, unit: _Unit) -> None:
        ops = [self.nodes[i].op_type for i in unit.nodes]
        main = [self.nodes[i].op_type for i in unit.nodes if self.nodes[i].op_type not in SHAPE_OPS
                and any(self.is_float(o) for o in self.nodes[i].output)] or ops
        if len(set(main)) == 1:
            unit.op = main[0]
        else:
            unit.op = "composite"
        if unit.kind == "loss":
            unit.label = "loss"
            return
        if len(unit.nodes) == 1 or len(set(main)) == 1:
            unit.label = main[-1]
        elif "Softmax" in main:  # a safe softmax (Softmax, Where)
            unit.label = unit.op = "Softmax"
        else:
            unit.label = _fx_target(self.nodes[unit.nodes[-1]]) or main[-1]
        if unit.op in PASS_THROUGH_OPS and len(main) == 1:
            unit.kind = "pass"
        elif all(op in STRUCTURAL_OPS for op in main):
            unit.kind = "structural"

    def _forward_names(self) -> None:
        taken: dict[str, int] = {}

        def unique(base: str) -> str:
            k = taken.get(base, 0)
            taken[base] = k + 1
            return base if k == 0 else f"{base}_{k}"

        self.names: dict[int, str] = {}
        for unit in sorted(self.units, key=lambda u: u.nodes[0]):
            prefix = f"{unit.module}/" if unit.module else ""
            if unit.kind == "loss":
                unit.name = LOSS_UNIT
                for i in unit.nodes:
                    self.names[i] = unique(f"{LOSS_UNIT}/{self.nodes[i].op_type}")
                continue
            unit.name = unique(prefix + unit.label)
            if len(unit.nodes) == 1:
                self.names[unit.nodes[0]] = unit.name
            else:
                for i in unit.nodes:
                    self.names[i] = unique(f"{unit.name}/{self.nodes[i].op_type}")
        self._taken = taken

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

    # -- matching the backward nodes to the forward ops -----------------------------------------------

    def _saved(self, i: int) -> frozenset:
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
                    found |= self._saved(p)
            elif self.is_float(t) and self._is_forward_tensor(t):
                found.add(t)
        self._saved_cache[i] = frozenset(found)
        return self._saved_cache[i]

    def _constants(self, i: int) -> frozenset:
        """The float constants (not parameters) backward node i reads, directly or through backward nodes that
        read only forward tensors and constants (a scale, an epsilon)."""
        if i in self._constants_cache:
            return self._constants_cache[i]
        found = set()
        for t in self.nodes[i].input:
            p = self.producer.get(t)
            if p is not None and p in self.backward and p not in self.flow:
                found |= self._constants(p)
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

    def _unit_constants(self, unit: _Unit) -> set:
        return {self._constant_key(t) for t in unit.inputs
                if t in self._initializers and t not in self.parameters and self.is_float(t)}

    def _anchored(self, i: int, unit: _Unit) -> bool:
        """Whether backward node i reads a tensor `unit` saved, or a float constant the unit's forward reads."""
        return bool(self._saved(i) & unit.saved) or bool(self._constants(i) & self._unit_constants(unit))

    def _leads_to(self, i: int, unit: _Unit, depth: int = 3) -> bool:
        """Whether a node at most `depth` steps downstream of backward node i is anchored to `unit`, or makes the
        gradient of one of its parameters: i continues the unit's backward."""
        params = {p + GRAD for p in unit.inputs if p in self.parameters}
        frontier = [i]
        for _ in range(depth + 1):
            following = []
            for c in frontier:
                if any(o in params for o in self.nodes[c].output) or (c != i and self._anchored(c, unit)):
                    return True
                for o in self.nodes[c].output:
                    following += [u for u in self.consumers.get(o, ()) if u in self.flow and u not in self.owner]
            frontier = following
        return False

    def _flow_inputs(self, i: int) -> list[str]:
        return [t for t in self.nodes[i].input if t and self.producer.get(t) in self.flow]

    def _order(self) -> list[int]:
        """Units in forward order (a topological order of the unit graph; graph order breaks ties)."""
        deps: dict[int, set] = {u.index: set() for u in self.units}
        for unit in self.units:
            for t in unit.inputs:
                p = self.producer.get(t)
                if t in self.requires_grad and p in self.unit_of and self.unit_of[p] != unit.index:
                    deps[unit.index].add(self.unit_of[p])
        users: dict[int, set] = defaultdict(set)
        for u, ds in deps.items():
            for d in ds:
                users[d].add(u)
        first = {u.index: u.nodes[0] for u in self.units}
        ready = [(first[u], u) for u, ds in deps.items() if not ds]
        heapq.heapify(ready)
        order, left = [], {u: set(ds) for u, ds in deps.items()}
        while ready:
            _, u = heapq.heappop(ready)
            order.append(u)
            for v in users[u]:
                left[v].discard(u)
                if not left[v]:
                    heapq.heappush(ready, (first[v], v))
        done = set(order)
        order += sorted((u for u in deps if u not in done), key=lambda u: first[u])  # cycles: graph order
        return order

    def _match(self) -> None:
        for u in reversed(self._order()):
            self._backward_of(self.units[u])
        for p in self.trainable:
            grad = p + GRAD
            if grad in self.producer:
                self.gradient[p] = grad
        self._adopt()

    def _backward_of(self, unit: _Unit) -> None:
        if unit.kind == "loss":
            self.owner[self.seed] = unit.index
            self._grow(unit, set(), [self.seed])
            return
        dys = []
        for y in unit.outputs:
            dy = self._resolve(unit, y)
            if dy:
                if len(dy) == 1:  # several: contributions the graph only sums after reshaping them (a shared view)
                    self.gradient[y] = dy[0]
                dys += dy
        if not dys:
            return
        if unit.kind == "pass":
            self._pass_through(unit, dys)
        else:
            self._grow(unit, set(dys), [], TEMPLATES.get(unit.op) if unit.kind == "structural" else None)

    def _resolve(self, unit: _Unit, y: str) -> list[str]:
        """The gradient of forward tensor y: its consumers' contributions, summed by the Adds that accumulate them."""
        contributions = list(dict.fromkeys(self._contrib.get(y, ())))
        contributions = [self._through_copies(unit, c) for c in contributions]
        pending = list(dict.fromkeys(contributions))
        while len(pending) > 1:
            found = None
            for t in pending:
                for c in self.consumers.get(t, ()):
                    node = self.nodes[c]
                    if c in self.owner or c not in self.flow or node.op_type not in ACCUMULATE:
                        continue
                    ins = self._flow_inputs(c)
                    if len(set(ins) & set(pending)) >= 2 and set(ins) <= set(pending):
                        found = c if found is None else min(found, c)
            if found is None:
                break
            self.owner[found] = unit.index
            self.accumulates.add(found)
            ins = set(self._flow_inputs(found))
            pending = [t for t in pending if t not in ins] + [self.nodes[found].output[0]]
        return pending

    def _sole_free_user(self, tensor: str) -> int | None:
        """The one backward node that reads `tensor` and belongs to no unit yet; None when there is not exactly one."""
        users = [c for c in self.consumers.get(tensor, ()) if c in self.flow and c not in self.owner]
        return users[0] if len(users) == 1 else None

    def _through_copies(self, unit: _Unit, tensor: str) -> str:
        """A gradient that one copy-like node passes on unchanged (the backward of a forward op the optimizer
        folded away, such as a full slice's slice_scatter) continues as that node's output; the node goes to
        the op whose backward made the gradient."""
        template = TEMPLATES.get(unit.op) if unit.kind == "structural" else None
        while True:
            c = self._sole_free_user(tensor)
            if c is None:
                return tensor
            node = self.nodes[c]
            if node.op_type not in COPIES or self._flow_inputs(c) != [tensor] or self._saved(c) \
                    or self.shape(node.output[0]) != self.shape(tensor) or self.shape(tensor) is None:
                return tensor
            if unit.kind == "compute" or unit.kind == "loss" or (template is not None and node.op_type in template) \
                    or (unit.kind == "structural" and template is None):
                return tensor  # the unit's own backward may start with it
            p = self.producer.get(tensor)
            if p in self.owner:
                self.owner[c] = self.owner[p]
            tensor = node.output[0]

    def _pass_through(self, unit: _Unit, dys: list[str]) -> None:
        node = self.nodes[unit.nodes[0]]
        dy, y = dys[-1], unit.outputs[0]
        broadcast = []
        for slot, x in enumerate(node.input):
            if not x or x not in self.requires_grad:
                continue
            if node.op_type in ("Add", "Sub") and (self.shape(x) != self.shape(y) or (node.op_type == "Sub" and slot == 1)):
                broadcast.append(x)
            elif node.op_type not in ("Add", "Sub") and slot > 0:
                continue
            else:
                self._contrib[x].extend(dys)
        if broadcast:
            self._grow(unit, {dy}, [], BROADCAST, targets=broadcast, first=BROADCAST_FIRST)

    def _grow(self, unit: _Unit, region: set, starts: list[int], template=None, targets=None, first=None) -> None:
        """Claim the unit's backward formula: the nodes reading only region tensors (the unit's output gradient and
        its formula's intermediates), from the unit's saved tensors, until gradients of its inputs leave it."""
        satisfied: set = set()  # inputs whose gradient has left the formula (each once; several dYs: several times)
        several = len(region) > 1
        initial = set(region)
        heap = list(starts)
        for t in region:
            heap += [c for c in self.consumers.get(t, ()) if c in self.flow]
        heapq.heapify(heap)
        seen = set()
        while heap:
            c = heapq.heappop(heap)
            if c in seen:
                continue
            seen.add(c)
            if c not in starts:
                if c in self.owner:
                    continue
                ins = self._flow_inputs(c)
                if not ins or any(t not in region for t in ins):
                    continue
                if template is not None and self.nodes[c].op_type not in template:
                    continue
                if first is not None and set(ins) <= initial and self.nodes[c].op_type not in first:
                    continue
                if not self._saved(c) <= unit.saved:
                    continue
                if unit.kind in ("compute", "loss") and len(set(ins)) == 1 and not self._anchored(c, unit) \
                        and not self._leads_to(c, unit):
                    # An op that neither reads what the unit saved nor leads to a node that does: the unit's backward
                    # ended at its input (e.g. a softmax's, when the Where that follows it made the whole gradient).
                    x = self._terminal(unit, ins[0], self.producer[ins[0]], satisfied, targets, set())
                    if x is not None:
                        satisfied.add(x)
                        self._contrib[x].append(ins[0])
                        continue
            self.owner[c] = unit.index
            for t in self.nodes[c].output:
                if not t:
                    continue
                if t in self.grad_outputs:
                    self._contrib[self.grad_outputs[t]].append(t)
                    continue
                x = self._terminal(unit, t, c, set() if several else satisfied, targets, region)
                if x is not None:
                    satisfied.add(x)
                    if unit.kind in ("compute", "loss"):
                        t = self._trailing_scale(unit, t)
                    self._contrib[x].append(t)
                    continue
                region.add(t)
                for user in self.consumers.get(t, ()):
                    if user in self.flow and user not in seen:
                        heapq.heappush(heap, user)

    def _terminal(self, unit: _Unit, t: str, node: int, satisfied: set, targets, region: set) -> str | None:
        """The input X of `unit` whose gradient `t` is (this unit's contribution to it), or None while t is
        still inside the unit's formula: while a node combines it with the formula's intermediates, or a node
        downstream still reads what the unit saved."""
        shape = self.shape(t)
        if shape is None:
            return None
        pool = targets if targets is not None else unit.inputs
        candidates = [x for x in pool if x in self.requires_grad and x not in satisfied and self.shape(x) == shape]
        if not candidates and unit.kind == "structural" and targets is None:
            return self._fused_views(unit, shape)
        if not candidates:
            return None
        if unit.kind in ("compute", "loss"):
            for c in self.consumers.get(t, ()):
                if c in self.flow and any(u != t and u in region for u in self._flow_inputs(c)):
                    return None
            if self._read_later(t, unit.own):
                return None
        candidates = self._matmul_operand(unit, node, candidates)
        if not candidates:
            return None
        read = self._saved(node)
        unread = [x for x in candidates if x not in read]  # d(x) is made from the other operands, not from x
        return (unread or candidates)[0]

    def _operand_reads(self, tensor: str) -> set:
        p = self.producer.get(tensor)
        if p is None or p in self.forward:
            return {tensor}
        return set() if p in self.flow else set(self._saved(p))

    def _matmul_operand(self, unit: _Unit, node: int, candidates: list[str]) -> list[str]:
        """For Y = A @ B, which of A and B a backward MatMul's result is the gradient of, from what its operands read:
        dY @ B^T is dA, A^T @ dY is dB, and dY^T @ A is dB^T (not yet dB: a Transpose follows), whatever the shapes
        (a square weight's dB and dB^T have the same one)."""
        forward, backward = self.nodes[unit.nodes[0]], self.nodes[node]
        if len(unit.nodes) != 1 or forward.op_type not in ("MatMul", "Gemm") or backward.op_type != "MatMul" \
                or any(a.name in ("transA", "transB") and a.i for a in forward.attribute):
            return candidates
        a, b = forward.input[0], forward.input[1]
        first, second = self._operand_reads(backward.input[0]), self._operand_reads(backward.input[1])
        if a in second:
            return []
        if b in second:
            return [x for x in candidates if x == a]
        if a in first:
            return [x for x in candidates if x == b]
        return candidates

    def _trailing_scale(self, unit: _Unit, tensor: str) -> str:
        """A formula's last scaling (a mean's 1/N: Mul, Div or Neg by a constant no forward op uses) after its
        result already has the input's shape belongs to the formula: the gradient leaves after it."""
        while True:
            c = self._sole_free_user(tensor)
            if c is None:
                return tensor
            node = self.nodes[c]
            if node.op_type not in ("Mul", "Div", "Neg") or self._flow_inputs(c) != [tensor] or self._saved(c) \
                    or self._constants(c) & self._forward_constants or self.shape(node.output[0]) != self.shape(tensor):
                return tensor
            self.owner[c] = unit.index
            tensor = node.output[0]

    def _fused_views(self, unit: _Unit, shape) -> str | None:
        """The input of an earlier op in an unbroken chain of reshapes and transposes leading to `unit` that has
        `shape`: the optimizer merged the chain's gradients into fewer nodes (view(view(x)) -> one Reshape)."""
        xs = [x for x in unit.inputs if x in self.requires_grad]
        for _ in range(8):
            if len(xs) != 1 or xs[0] not in self.producer or self.producer[xs[0]] not in self.unit_of:
                return None
            before = self.units[self.unit_of[self.producer[xs[0]]]]
            if before.kind != "structural" or before.op not in VIEWS | {"Transpose"}:
                return None
            xs = [x for x in before.inputs if x in self.requires_grad]
            if len(xs) == 1 and self.shape(xs[0]) == shape:
                return xs[0]
        return None

    def _read_later(self, tensor: str, saved: set) -> bool:
        """Whether a backward node downstream of `tensor` still reads one of `saved` (the formula goes on)."""
        readers = set()
        for s in saved:
            for c in self.consumers.get(s, ()):
                if c in self.backward:
                    readers.add(c)
        flow_readers = set()
        stack = list(readers)
        seen = set(readers)
        while stack:  # a prep node that reads a saved tensor counts through the flow nodes that read it
            c = stack.pop()
            if c in self.flow:
                flow_readers.add(c)
                continue
            for out in self.nodes[c].output:
                for user in self.consumers.get(out, ()):
                    if user not in seen and user in self.backward:
                        seen.add(user)
                        stack.append(user)
        start = self.producer.get(tensor, -1)
        flow_readers = {c for c in flow_readers if c > start and c not in self.owner}
        if not flow_readers:
            return False
        limit = max(flow_readers)
        queue, visited = [tensor], set()
        while queue:
            t = queue.pop()
            for c in self.consumers.get(t, ()):
                if c in visited or c not in self.flow or c > limit:
                    continue
                if c in flow_readers:
                    return True
                visited.add(c)
                queue.extend(o for o in self.nodes[c].output if o)
        return False

    def _adopt(self) -> None:
        """Backward nodes the matching left over: a flow node goes with its input's producer, a node that reads
        only forward tensors with the node that uses it."""
        for i in sorted(self.flow):
            if i in self.owner:
                continue
            for t in self._flow_inputs(i):
                p = self.producer[t]
                if p in self.owner:
                    self.owner[i] = self.owner[p]
                    break
        for i in sorted(self.backward, reverse=True):
            if i in self.owner:
                continue
            for out in self.nodes[i].output:
                users = sorted(c for c in self.consumers.get(out, ()) if c in self.owner)
                if users:
                    self.owner[i] = self.owner[users[0]]
                    break

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

