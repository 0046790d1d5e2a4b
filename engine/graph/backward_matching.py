"""Which forward op each backward node of a gradient graph differentiates, and each forward tensor's gradient.

The backward graph is matched against the forward units (engine/graph/forward_units.py) in reverse forward order,
as autograd ran it, each unit's backward formula grown from the gradient of its output until its inputs'
gradients leave it (engine/graph/gradient_graph.py's docstring tells the method). Backward nodes the matching
leaves over go with their neighbours'.
"""
from __future__ import annotations

import heapq
from collections import defaultdict
from typing import TYPE_CHECKING

from engine.graph.explain import GRAD
from engine.graph.forward_units import Unit, forward_order

if TYPE_CHECKING:
    from engine.graph.gradient_graph import GradientGraph

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


class BackwardMatching:
    """The matching of one gradient graph, done once in __init__: its results are `owner`, `accumulates` and
    `gradient`."""

    def __init__(self, graph: GradientGraph):
        self.graph = graph
        self.owner: dict[int, int] = {}  # backward node -> forward unit it differentiates
        self.accumulates: set[int] = set()  # backward nodes that sum a tensor's gradient contributions
        self.gradient: dict[str, str] = {}  # forward tensor -> the tensor holding its (full) gradient
        self._contrib: dict[str, list[str]] = defaultdict(list)
        for u in reversed(forward_order(graph)):
            self._backward_of(graph.units[u])
        for p in graph.trainable:
            grad = p + GRAD
            if grad in graph.producer:
                self.gradient[p] = grad
        self._adopt()

    def _anchored(self, i: int, unit: Unit) -> bool:
        """Whether backward node i reads a tensor `unit` saved, or a float constant the unit's forward reads."""
        return bool(self.graph.saved(i) & unit.saved) or bool(self.graph.constants(i) & self.graph.unit_constants(unit))

    def _leads_to(self, i: int, unit: Unit, depth: int = 3) -> bool:
        """Whether a node at most `depth` steps downstream of backward node i is anchored to `unit`, or makes the
        gradient of one of its parameters: i continues the unit's backward."""
        params = {p + GRAD for p in unit.inputs if p in self.graph.parameters}
        frontier = [i]
        for _ in range(depth + 1):
            following = []
            for c in frontier:
                if any(o in params for o in self.graph.nodes[c].output) or (c != i and self._anchored(c, unit)):
                    return True
                for o in self.graph.nodes[c].output:
                    following += [u for u in self.graph.consumers.get(o, ())
                                  if u in self.graph.flow and u not in self.owner]
            frontier = following
        return False

    def _backward_of(self, unit: Unit) -> None:
        if unit.kind == "loss":
            self.owner[self.graph.seed] = unit.index
            self._grow(unit, set(), [self.graph.seed])
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

    def _resolve(self, unit: Unit, y: str) -> list[str]:
        """The gradient of forward tensor y: its consumers' contributions, summed by the Adds that accumulate them."""
        contributions = list(dict.fromkeys(self._contrib.get(y, ())))
        contributions = [self._through_copies(unit, c) for c in contributions]
        pending = list(dict.fromkeys(contributions))
        while len(pending) > 1:
            found = None
            for t in pending:
                for c in self.graph.consumers.get(t, ()):
                    node = self.graph.nodes[c]
                    if c in self.owner or c not in self.graph.flow or node.op_type not in ACCUMULATE:
                        continue
                    ins = self.graph.flow_inputs(c)
                    if len(set(ins) & set(pending)) >= 2 and set(ins) <= set(pending):
                        found = c if found is None else min(found, c)
            if found is None:
                break
            self.owner[found] = unit.index
            self.accumulates.add(found)
            ins = set(self.graph.flow_inputs(found))
            pending = [t for t in pending if t not in ins] + [self.graph.nodes[found].output[0]]
        return pending

    def _sole_free_user(self, tensor: str) -> int | None:
        """The one backward node that reads `tensor` and belongs to no unit yet; None when there is not exactly one."""
        users = [c for c in self.graph.consumers.get(tensor, ()) if c in self.graph.flow and c not in self.owner]
        return users[0] if len(users) == 1 else None

    def _through_copies(self, unit: Unit, tensor: str) -> str:
        """A gradient that one copy-like node passes on unchanged (the backward of a forward op the optimizer
        folded away, such as a full slice's slice_scatter) continues as that node's output; the node goes to
        the op whose backward made the gradient."""
        template = TEMPLATES.get(unit.op) if unit.kind == "structural" else None
        while True:
            c = self._sole_free_user(tensor)
            if c is None:
                return tensor
            node = self.graph.nodes[c]
            if node.op_type not in COPIES or self.graph.flow_inputs(c) != [tensor] or self.graph.saved(c) \
                    or self.graph.shape(node.output[0]) != self.graph.shape(tensor) or self.graph.shape(tensor) is None:
                return tensor
            if unit.kind == "compute" or unit.kind == "loss" or (template is not None and node.op_type in template) \
                    or (unit.kind == "structural" and template is None):
                return tensor  # the unit's own backward may start with it
            p = self.graph.producer.get(tensor)
            if p in self.owner:
                self.owner[c] = self.owner[p]
            tensor = node.output[0]

    def _pass_through(self, unit: Unit, dys: list[str]) -> None:
        node = self.graph.nodes[unit.nodes[0]]
        dy, y = dys[-1], unit.outputs[0]
        broadcast = []
        for slot, x in enumerate(node.input):
            if not x or x not in self.graph.requires_grad:
                continue
            if node.op_type in ("Add", "Sub") and (self.graph.shape(x) != self.graph.shape(y)
                                                   or (node.op_type == "Sub" and slot == 1)):
                broadcast.append(x)
            elif node.op_type not in ("Add", "Sub") and slot > 0:
                continue
            else:
                self._contrib[x].extend(dys)
        if broadcast:
            self._grow(unit, {dy}, [], BROADCAST, targets=broadcast, first=BROADCAST_FIRST)

    def _grow(self, unit: Unit, region: set, starts: list[int], template=None, targets=None, first=None) -> None:
        """Claim the unit's backward formula: the nodes reading only region tensors (the unit's output gradient and
        its formula's intermediates), from the unit's saved tensors, until gradients of its inputs leave it."""
        satisfied: set = set()  # inputs whose gradient has left the formula (each once; several dYs: several times)
        several = len(region) > 1
        initial = set(region)
        heap = list(starts)
        for t in region:
            heap += [c for c in self.graph.consumers.get(t, ()) if c in self.graph.flow]
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
                ins = self.graph.flow_inputs(c)
                if not ins or any(t not in region for t in ins):
                    continue
                if template is not None and self.graph.nodes[c].op_type not in template:
                    continue
                if first is not None and set(ins) <= initial and self.graph.nodes[c].op_type not in first:
                    continue
                if not self.graph.saved(c) <= unit.saved:
                    continue
                if unit.kind in ("compute", "loss") and len(set(ins)) == 1 and not self._anchored(c, unit) \
                        and not self._leads_to(c, unit):
                    # An op that neither reads what the unit saved nor leads to a node that does: the unit's backward
                    # ended at its input (e.g. a softmax's, when the Where that follows it made the whole gradient).
                    x = self._terminal(unit, ins[0], self.graph.producer[ins[0]], satisfied, targets, set())
                    if x is not None:
                        satisfied.add(x)
                        self._contrib[x].append(ins[0])
                        continue
            self.owner[c] = unit.index
            for t in self.graph.nodes[c].output:
                if not t:
                    continue
                if t in self.graph.grad_outputs:
                    self._contrib[self.graph.grad_outputs[t]].append(t)
                    continue
                x = self._terminal(unit, t, c, set() if several else satisfied, targets, region)
                if x is not None:
                    satisfied.add(x)
                    if unit.kind in ("compute", "loss"):
                        t = self._trailing_scale(unit, t)
                    self._contrib[x].append(t)
                    continue
                region.add(t)
                for user in self.graph.consumers.get(t, ()):
                    if user in self.graph.flow and user not in seen:
                        heapq.heappush(heap, user)

    def _terminal(self, unit: Unit, t: str, node: int, satisfied: set, targets, region: set) -> str | None:
        """The input X of `unit` whose gradient `t` is (this unit's contribution to it), or None while t is
        still inside the unit's formula: while a node combines it with the formula's intermediates, or a node
        downstream still reads what the unit saved."""
        shape = self.graph.shape(t)
        if shape is None:
            return None
        pool = targets if targets is not None else unit.inputs
        candidates = [x for x in pool
                      if x in self.graph.requires_grad and x not in satisfied and self.graph.shape(x) == shape]
        if not candidates and unit.kind == "structural" and targets is None:
            return self._fused_views(unit, shape)
        if not candidates:
            return None
        if unit.kind in ("compute", "loss"):
            for c in self.graph.consumers.get(t, ()):
                if c in self.graph.flow and any(u != t and u in region for u in self.graph.flow_inputs(c)):
                    return None
            if self._read_later(t, unit.own):
                return None
        candidates = self._matmul_operand(unit, node, candidates)
        if not candidates:
            return None
        read = self.graph.saved(node)
        unread = [x for x in candidates if x not in read]  # d(x) is made from the other operands, not from x
        return (unread or candidates)[0]

    def _operand_reads(self, tensor: str) -> set:
        p = self.graph.producer.get(tensor)
        if p is None or p in self.graph.forward:
            return {tensor}
        return set() if p in self.graph.flow else set(self.graph.saved(p))

    def _matmul_operand(self, unit: Unit, node: int, candidates: list[str]) -> list[str]:
        """For Y = A @ B, which of A and B a backward MatMul's result is the gradient of, from what its operands read:
        dY @ B^T is dA, A^T @ dY is dB, and dY^T @ A is dB^T (not yet dB: a Transpose follows), whatever the shapes
        (a square weight's dB and dB^T have the same one)."""
        forward, backward = self.graph.nodes[unit.nodes[0]], self.graph.nodes[node]
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

    def _trailing_scale(self, unit: Unit, tensor: str) -> str:
        """A formula's last scaling (a mean's 1/N: Mul, Div or Neg by a constant no forward op uses) after its
        result already has the input's shape belongs to the formula: the gradient leaves after it."""
        while True:
            c = self._sole_free_user(tensor)
            if c is None:
                return tensor
            node = self.graph.nodes[c]
            if node.op_type not in ("Mul", "Div", "Neg") or self.graph.flow_inputs(c) != [tensor] \
                    or self.graph.saved(c) or self.graph.constants(c) & self.graph.forward_constants \
                    or self.graph.shape(node.output[0]) != self.graph.shape(tensor):
                return tensor
            self.owner[c] = unit.index
            tensor = node.output[0]

    def _fused_views(self, unit: Unit, shape) -> str | None:
        """The input of an earlier op in an unbroken chain of reshapes and transposes leading to `unit` that has
        `shape`: the optimizer merged the chain's gradients into fewer nodes (view(view(x)) -> one Reshape)."""
        xs = [x for x in unit.inputs if x in self.graph.requires_grad]
        for _ in range(8):
            if len(xs) != 1 or xs[0] not in self.graph.producer or self.graph.producer[xs[0]] not in self.graph.unit_of:
                return None
            before = self.graph.units[self.graph.unit_of[self.graph.producer[xs[0]]]]
            if before.kind != "structural" or before.op not in VIEWS | {"Transpose"}:
                return None
            xs = [x for x in before.inputs if x in self.graph.requires_grad]
            if len(xs) == 1 and self.graph.shape(xs[0]) == shape:
                return xs[0]
        return None

    def _read_later(self, tensor: str, saved: set) -> bool:
        """Whether a backward node downstream of `tensor` still reads one of `saved` (the formula goes on)."""
        readers = set()
        for s in saved:
            for c in self.graph.consumers.get(s, ()):
                if c in self.graph.backward:
                    readers.add(c)
        flow_readers = set()
        stack = list(readers)
        seen = set(readers)
        while stack:  # a prep node that reads a saved tensor counts through the flow nodes that read it
            c = stack.pop()
            if c in self.graph.flow:
                flow_readers.add(c)
                continue
            for out in self.graph.nodes[c].output:
                for user in self.graph.consumers.get(out, ()):
                    if user not in seen and user in self.graph.backward:
                        seen.add(user)
                        stack.append(user)
        start = self.graph.producer.get(tensor, -1)
        flow_readers = {c for c in flow_readers if c > start and c not in self.owner}
        if not flow_readers:
            return False
        limit = max(flow_readers)
        queue, visited = [tensor], set()
        while queue:
            t = queue.pop()
            for c in self.graph.consumers.get(t, ()):
                if c in visited or c not in self.graph.flow or c > limit:
                    continue
                if c in flow_readers:
                    return True
                visited.add(c)
                queue.extend(o for o in self.graph.nodes[c].output if o)
        return False

    def _adopt(self) -> None:
        """Backward nodes the matching left over: a flow node goes with its input's producer, a node that reads
        only forward tensors with the node that uses it."""
        for i in sorted(self.graph.flow):
            if i in self.owner:
                continue
            for t in self.graph.flow_inputs(i):
                p = self.graph.producer[t]
                if p in self.owner:
                    self.owner[i] = self.owner[p]
                    break
        for i in sorted(self.graph.backward, reverse=True):
            if i in self.owner:
                continue
            for out in self.graph.nodes[i].output:
                users = sorted(c for c in self.graph.consumers.get(out, ()) if c in self.owner)
                if users:
                    self.owner[i] = self.owner[users[0]]
                    break
