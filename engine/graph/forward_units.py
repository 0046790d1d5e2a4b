"""The forward side of a gradient graph (engine/graph/gradient_graph.py), in units: its forward nodes grouped
into one unit per traced op (the ONNX nodes that share one `pkg.torch.onnx.fx_node`; the loss's ops into one),
each unit's module (torch.onnx's `pkg.torch.onnx.name_scopes`), label, kind and forward name, and the units'
forward order, in which autograd ran their backward formulas in reverse.
"""
from __future__ import annotations

import ast
import heapq
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import onnx

if TYPE_CHECKING:
    from engine.graph.gradient_graph import GradientGraph

LOSS_UNIT = "loss"  # the module name of the forward ops between the logits and the loss
PASS_THROUGH_OPS = {"Add", "Sub", "Identity", "Cast"}  # dY is the input's gradient (a broadcast one summed)
STRUCTURAL_OPS = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Concat", "Split", "Slice", "Gather",
                  "Expand", "Tile", "Pad", "Identity"}
SHAPE_OPS = {"Shape", "Size", "Constant", "ConstantOfShape", "Range"}


@dataclass
class Unit:
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


def forward_units(graph: GradientGraph) -> tuple[list[Unit], dict[int, int]]:
    """Group the forward nodes into units (one per traced op; the loss's ops into one) and describe them:
    (the units, forward node -> its unit)."""
    groups: dict[str, list[int]] = {}
    loss_nodes = []
    for i in sorted(graph.forward):
        if i not in graph.logits_ancestors:
            loss_nodes.append(i)
            continue
        key = _fx_key(graph.nodes[i]) or f"#{i}"
        groups.setdefault(key, []).append(i)
    _safe_softmax(graph, groups)
    units = [_unit(graph, index, nodes) for index, nodes in enumerate(groups.values())]
    if loss_nodes:
        unit = _unit(graph, len(units), loss_nodes)
        unit.kind, unit.module = "loss", LOSS_UNIT
        units.append(unit)
    unit_of = {i: unit.index for unit in units for i in unit.nodes}
    _modules(graph, units, unit_of)
    for unit in units:
        _describe(graph, unit)
    return units, unit_of


def _safe_softmax(graph: GradientGraph, groups: dict[str, list[int]]) -> None:
    """aten._safe_softmax (F.scaled_dot_product_attention's) is traced as Softmax then Where(all -inf, 0, softmax),
    but differentiated as one op (its backward reads the Where's output): one unit."""
    key_of = {i: k for k, nodes in groups.items() for i in nodes}
    for i in list(key_of):
        node = graph.nodes[i]
        if node.op_type != "Softmax" or i not in key_of:
            continue
        users = [c for c in graph.consumers.get(node.output[0], ()) if c in graph.forward]
        wheres = [c for c in users if graph.nodes[c].op_type == "Where" and node.output[0] in graph.nodes[c].input[1:]]
        if len(wheres) != 1 or any(graph.nodes[c].op_type != "Shape" for c in users if c not in wheres):
            continue
        where_key, softmax_key = key_of[wheres[0]], key_of[i]
        if where_key != softmax_key and where_key in groups:
            for j in groups.pop(where_key):
                key_of[j] = softmax_key
                groups[softmax_key].append(j)
            groups[softmax_key].sort()


def _unit(graph: GradientGraph, index: int, nodes: list[int]) -> Unit:
    unit = Unit(index, nodes)
    members = set(nodes)
    for i in nodes:
        for t in graph.nodes[i].output:
            if t:
                unit.produced.add(t)
    for i in nodes:
        for t in graph.nodes[i].input:
            if t and t not in unit.produced and t not in unit.inputs:
                unit.inputs.append(t)
    graph_outputs = {o.name for o in graph.graph.output}
    for t in sorted(unit.produced, key=lambda t: graph.producer[t]):
        if t in graph_outputs or any(c in graph.forward and c not in members for c in graph.consumers.get(t, ())):
            unit.outputs.append(t)
    unit.saved = {t for t in unit.inputs if graph.is_forward_tensor(t) and graph.is_float(t)} | unit.produced
    unit.own = unit.produced | {t for t in unit.inputs if t in graph.parameters}
    return unit


def _modules(graph: GradientGraph, units: list[Unit], unit_of: dict[int, int]) -> None:
    """Each unit's module: torch.onnx's name scopes; else the module of the parameter it reads; else the
    common prefix of its neighbours' modules (e.g. the Split the optimizer makes of three Slices)."""
    known = False
    for unit in units:
        if unit.kind == "loss":
            continue
        scopes = next((s for s in (_scopes(graph.nodes[i]) for i in unit.nodes) if s), None)
        if scopes and scopes[0] == "" and len(scopes) >= 2:
            unit.module = scopes[-2]
            known = known or bool(unit.module)
    if not known:  # no module paths (an older exporter): start from the parameters each unit reads
        for unit in units:
            if unit.kind != "loss":
                unit.module = None
                params = [t for t in unit.inputs if t in graph.parameters]
                if params:
                    unit.module = params[0].rpartition(".")[0]
    for _ in range(3):
        for unit in units:
            if unit.module is not None:
                continue
            near = [units[unit_of[graph.producer[t]]].module for t in unit.inputs
                    if t in graph.producer and graph.producer[t] in unit_of]
            near += [units[unit_of[c]].module for t in unit.outputs for c in graph.consumers.get(t, ())
                     if c in unit_of]
            near = [m for m in near if m is not None and m != LOSS_UNIT]
            if near:
                unit.module = _common_prefix(near)
    for unit in units:
        if unit.module is None:
            unit.module = ""


def _describe(graph: GradientGraph, unit: Unit) -> None:
    ops = [graph.nodes[i].op_type for i in unit.nodes]
    main = [graph.nodes[i].op_type for i in unit.nodes if graph.nodes[i].op_type not in SHAPE_OPS
            and any(graph.is_float(o) for o in graph.nodes[i].output)] or ops
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
        unit.label = _fx_target(graph.nodes[unit.nodes[-1]]) or main[-1]
    if unit.op in PASS_THROUGH_OPS and len(main) == 1:
        unit.kind = "pass"
    elif all(op in STRUCTURAL_OPS for op in main):
        unit.kind = "structural"


def forward_names(units: list[Unit], nodes: list[onnx.NodeProto]) -> tuple[dict[int, str], dict[str, int]]:
    """Name each unit (`<module>/<label>`, the loss `loss`) and each forward node (the unit's name, or
    `<unit>/<op>` in a unit of several nodes): (node -> its name, how many times each base name was given)."""
    taken: dict[str, int] = {}

    def unique(base: str) -> str:
        k = taken.get(base, 0)
        taken[base] = k + 1
        return base if k == 0 else f"{base}_{k}"

    names: dict[int, str] = {}
    for unit in sorted(units, key=lambda u: u.nodes[0]):
        prefix = f"{unit.module}/" if unit.module else ""
        if unit.kind == "loss":
            unit.name = LOSS_UNIT
            for i in unit.nodes:
                names[i] = unique(f"{LOSS_UNIT}/{nodes[i].op_type}")
            continue
        unit.name = unique(prefix + unit.label)
        if len(unit.nodes) == 1:
            names[unit.nodes[0]] = unit.name
        else:
            for i in unit.nodes:
                names[i] = unique(f"{unit.name}/{nodes[i].op_type}")
    return names, taken


def forward_order(graph: GradientGraph) -> list[int]:
    """Units in forward order (a topological order of the unit graph; graph order breaks ties)."""
    deps: dict[int, set] = {u.index: set() for u in graph.units}
    for unit in graph.units:
        for t in unit.inputs:
            p = graph.producer.get(t)
            if t in graph.requires_grad and p in graph.unit_of and graph.unit_of[p] != unit.index:
                deps[unit.index].add(graph.unit_of[p])
    users: dict[int, set] = defaultdict(set)
    for u, ds in deps.items():
        for d in ds:
            users[d].add(u)
    first = {u.index: u.nodes[0] for u in graph.units}
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
