"""Graph rewrites the engine applies to inference graphs, and the ONNX graph helpers the rewrites share.

- `split_transposes`: a Transpose that moves the innermost axis along with others (the patch cut
  `b c (h p1) (w p2) -> b h w (p1 p2 c)` is perm 0,2,4,3,5,1) runs in ORT's element-by-element fallback, ~10 ns
  an element here; it becomes a move of that one axis to the end and a Transpose that keeps the innermost block
  whole, with a Reshape between so that ORT's optimizer does not merge them back (vit-tiny's, batch 32: 43 ms
  -> 10 ms). The export applies it to the training forward graph (model/rewrite.py), fusion.py to the
  inference graph.
- `gelu_together`: inference graphs made from the trained weights (Publish) come out of the rewritten eval graph,
  where the export wrote GELU's `1 + erf` as `erf - (-1)` (model/rewrite.py keep_gelu_apart); this turns it
  back for ORT's session-level Gelu/BiasGelu fusion (engine/graph/fusion.py applies it).

- `transposes_into_matmuls`: the `ort` trainer's gradient graph as its session runs it (the file keeps the traced
  structure that ExplainGradients reads): the swaps of a batched matmul's last two axes moved next to the MatMul,
  where ORT folds them into FusedMatMul, instead of merged into a Transpose it copies element by element;
  `heads_in_one_transpose`: the same graph's qkv cut into heads by one transpose and a Split of its leading axis.

onnx and numpy only, plus ONNX Runtime to measure shapes that are computed at run time.
"""
from __future__ import annotations

import copy
from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper


def constant_value(graph: onnx.GraphProto, name: str) -> np.ndarray | None:
    """The value of a tensor that is an initializer or a Constant node's output, else None."""
    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
    return None


def gelu_together(graph: onnx.GraphProto) -> int:
    """Undo `keep_gelu_apart` (for inference graphs): each `Sub(Erf(.), -1)` becomes `Add(Erf(.), 1)`."""
    rewritten = 0
    erfs = {n.output[0] for n in graph.node if n.op_type == "Erf"}
    for node in graph.node:
        if node.op_type != "Sub" or len(node.input) != 2 or node.input[0] not in erfs:
            continue
        value = constant_value(graph, node.input[1])
        if value is None or value.size != 1 or float(value.reshape(-1)[0]) != -1.0:
            continue
        one = f"{node.output[0]}_one"
        graph.initializer.append(numpy_helper.from_array(np.array(1.0, dtype=value.dtype), one))
        node.op_type = "Add"
        node.input[1] = one
        rewritten += 1
    return rewritten


def split_transposes(proto: onnx.ModelProto, input_name: str, example_shape: tuple[int, ...]) -> int:
    """Replace each Transpose that ORT runs element by element with two it runs in blocks; returns how many.

    Such a Transpose moves the innermost axis and is not the move of one axis (ORT's fast paths cover those and
    every perm that keeps the innermost axis). It becomes T1, the move of the axis that ends innermost to the
    end, then T2, the rest of the perm, which keeps that axis (and the trailing axes it leaves in place) in one
    block; the block is merged into one axis by a Reshape between them, without which ORT's optimizer folds the
    two Transposes back into one, and a last Reshape restores the output's shape. Needs the block's dims to be
    static (measured, or pinned in value_info); Transposes of initializers are left to constant folding.
    """
    graph = proto.graph
    initializers = {i.name for i in graph.initializer}
    slow = [n for n in graph.node if n.op_type == "Transpose" and n.input[0] not in initializers
            and not moves_one_axis(perm_of(n))]
    if not slow:
        return 0
    try:
        dims = static_dims(proto, input_name, example_shape, [n.input[0] for n in slow])
    except Exception:  # noqa: BLE001 - a graph ORT cannot probe keeps its Transposes: this is only a speed-up
        return 0
    written = 0
    for node in slow:
        perm, shape = perm_of(node), dims[node.input[0]]
        rank, last = len(perm), perm[-1]
        inner = [a for a in range(rank) if a != last] + [last]  # T1: `last` to the end, the rest in order
        rest = [inner.index(a) for a in perm]  # T2 on T1's output: keeps the innermost axis
        lead = rank - 1
        while lead > 0 and rest[lead - 1] == lead - 1:  # axes T2 leaves in place before it join the block
            lead -= 1
        if len(shape) != rank:
            continue
        block = [shape[a] for a in perm[lead:]]
        if any(d is None for d in block):
            continue
        base = node.output[0]
        merged = numpy_helper.from_array(np.array([0] * lead + [-1], np.int64), f"{base}_merged_shape")
        restored = numpy_helper.from_array(np.array([0] * lead + block, np.int64), f"{base}_shape")
        graph.initializer.extend([merged, restored])
        name = node.name or base
        new = [helper.make_node("Transpose", [node.input[0]], [f"{base}_inner"], name=f"{name}_inner", perm=inner),
               helper.make_node("Reshape", [f"{base}_inner", merged.name], [f"{base}_merged"], name=f"{name}_merge"),
               helper.make_node("Transpose", [f"{base}_merged"], [f"{base}_outer"], name=f"{name}_outer",
                                perm=rest[:lead] + [lead]),
               helper.make_node("Reshape", [f"{base}_outer", restored.name], [base], name=f"{name}_restore")]
        position = list(graph.node).index(node)
        graph.node.remove(node)
        for offset, replacement in enumerate(new):
            graph.node.insert(position + offset, replacement)
        written += 1
    return written


def perm_of(node: onnx.NodeProto) -> list[int]:
    """A Transpose node's perm."""
    return list(next(a.ints for a in node.attribute if a.name == "perm"))


def moves_one_axis(perm: list[int]) -> bool:
    """Whether the perm keeps the innermost axis or moves exactly one axis (ORT's fast Transpose paths)."""
    if not perm or perm[-1] == len(perm) - 1:
        return True
    for axis in range(len(perm)):
        others = [a for a in perm if a != axis]
        if others == sorted(others):
            return True
    return False


def static_dims(proto: onnx.ModelProto, input_name: str, example_shape: tuple[int, ...], names: list[str]
                ) -> dict[str, list[int | None]]:
    """Each tensor's dims, None for those that follow the batch: from value_info when all of them were pinned
    there (model/export.py pin_static_shapes), else measured at two batch sizes."""
    pinned = {vi.name: vi.type.tensor_type.shape for vi in proto.graph.value_info}
    if all(n in pinned and pinned[n].dim for n in names):
        return {n: [d.dim_value if d.HasField("dim_value") else None for d in pinned[n].dim] for n in names}
    values = measured(proto, input_name, example_shape, names)
    return {n: [x if x == y else None for x, y in zip(a.shape, b.shape)] for n, (a, b) in values.items()}


def measured(proto: onnx.ModelProto, input_name: str, example_shape: tuple[int, ...], names: list[str]
             ) -> dict[str, tuple[np.ndarray, ...]]:
    """Each named tensor's value at batch 2 and at batch 3: Slice bounds, or the shapes a dim's change tells
    batch-following from static by (static_dims here, model/export.py pin_static_shapes)."""
    import onnxruntime  # here, not on import: engine.graph.fusion imports this module on every server's path

    probe = copy.deepcopy(proto)
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    runs = [session.run(names, {input_name: rng.standard_normal((b, *example_shape[1:]), dtype=np.float32)})
            for b in (2, 3)]
    return {n: tuple(run[i] for run in runs) for i, n in enumerate(names)}


def live_nodes(nodes: list, outputs: set[str]) -> list:
    """The nodes something still needs for `outputs`, in their order (dead ones dropped, repeatedly)."""
    needed, keep = set(outputs), []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(node.input)
    return keep[::-1]


# --------------------------------------------------------------------------------------------------
# gradient graphs: the matrix transposes of batched matmuls, where ORT fuses them
# --------------------------------------------------------------------------------------------------

def _swap_last_two(rank: int) -> list[int]:
    return [*range(rank - 2), rank - 1, rank - 2]


def transposes_into_matmuls(proto: onnx.ModelProto) -> int:
    """Move each swap of the last two axes next to the batched MatMul that reads or makes it; returns how many moved.

    The traced attention multiplies 3-D views: q @ k^T is Transpose(k, swap) -> Reshape(to (b*h, d, n)) -> MatMul,
    and k's gradient comes back as MatMul -> Reshape(to (b, h, d, n)) -> Transpose(swap). With the Reshape between
    them, ORT cannot fold the swap into the MatMul (its FusedMatMul takes transA/transB); instead it merges the swap
    with the head split's Transpose into one that moves the innermost axis, which it copies element by element
    (digits b64: 0.8 ms where a block copy takes 0.15). A Reshape that keeps the last two axes commutes with their
    swap, so the swap moves across it (`Transpose -> Reshape` becomes `Reshape -> Transpose`, and the reverse), and
    a swap of a MatMul's result becomes the MatMul of the swapped operands ((A B)^T = B^T A^T), where a swapped
    swap cancels. Each node keeps its metadata. The trainer's session runs the result (engine/train/graph_backend.py),
    so the export's check, which trains through that session, compares its every gradient with PyTorch.
    """
    graph = proto.graph
    shapes = {}
    for value in [*graph.value_info, *graph.input, *graph.output]:
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]

    def is_swap(node) -> bool:
        if node.op_type != "Transpose":
            return False
        perm = perm_of(node)
        return len(perm) >= 2 and perm == _swap_last_two(len(perm))

    def keeps_last_two(reshape, before: list | None) -> list[int] | None:
        """The Reshape's target shape when it leaves the last two axes of a tensor of shape `before` as they are."""
        target = constant_value(graph, reshape.input[1]) if len(reshape.input) > 1 else None
        if target is None or before is None or len(before) < 2 or target.ndim != 1 or len(target) < 2:
            return None
        last = [int(v) for v in target[-2:]]
        if min(last) <= 0 or before[-2:] != last:
            return None
        return [int(v) for v in target]

    replaced = set()  # the shape initializers the Reshapes read before

    def swapped_shape(reshape, target: list[int]) -> None:
        replaced.add(reshape.input[1])
        name = f"{reshape.name or reshape.output[0]}_swapped_shape"
        graph.initializer.append(numpy_helper.from_array(
            np.array([*target[:-2], target[-1], target[-2]], dtype=np.int64), name))
        reshape.input[1] = name

    def exchange(first, second) -> None:
        """Put the nodes at each other's place in the graph (`second` now runs first)."""
        nodes = list(graph.node)
        i, j = nodes.index(first), nodes.index(second)
        a, b = onnx.NodeProto(), onnx.NodeProto()
        a.CopyFrom(first)
        b.CopyFrom(second)
        graph.node[i].CopyFrom(b)
        graph.node[j].CopyFrom(a)

    moved = 0
    changed = True
    while changed:
        changed = False
        consumers = defaultdict(list)
        for node in graph.node:
            for name in node.input:
                consumers[name].append(node)
        producer = {o: node for node in graph.node for o in node.output}
        outputs = {o.name for o in graph.output}
        for node in list(graph.node):
            if not is_swap(node) or node.output[0] in outputs:
                continue
            users = consumers[node.output[0]]
            # Transpose(X, swap) -> Reshape -> MatMul  ==>  Reshape(X) -> Transpose(swap) -> MatMul (the backward's
            # reads of the Reshape, a MatMul after its own swap, then cancel that swap)
            if len(users) == 1 and users[0].op_type == "Reshape" and users[0].input[0] == node.output[0] \
                    and consumers[users[0].output[0]] \
                    and all(c.op_type == "MatMul" or is_swap(c) for c in consumers[users[0].output[0]]):
                reshape = users[0]
                target = keeps_last_two(reshape, shapes.get(node.output[0]))
                if target is not None:
                    middle = f"{reshape.output[0]}_before_swap"
                    swapped_shape(reshape, target)
                    reshape.input[0], node.input[0] = node.input[0], middle
                    node.output[0], reshape.output[0] = reshape.output[0], middle
                    del node.attribute[:]
                    node.attribute.append(helper.make_attribute("perm", _swap_last_two(len(target))))
                    exchange(node, reshape)
                    moved += 1
                    changed = True
                    break
            source = producer.get(node.input[0])
            # MatMul -> Reshape -> Transpose(swap)  ==>  MatMul -> Transpose(swap) -> Reshape
            made_by = producer.get(source.input[0]) if source is not None else None
            if source is not None and source.op_type == "Reshape" and len(consumers[source.output[0]]) == 1 \
                    and source.output[0] not in outputs and made_by is not None and made_by.op_type == "MatMul" \
                    and len(consumers[source.input[0]]) == 1:
                before = shapes.get(source.input[0])
                target = keeps_last_two(source, before)
                if target is not None and len(target) == len(perm_of(node)):
                    middle = f"{source.output[0]}_after_swap"
                    swapped_shape(source, target)
                    node.input[0], source.input[0] = source.input[0], middle
                    source.output[0], node.output[0] = node.output[0], middle
                    del node.attribute[:]
                    node.attribute.append(helper.make_attribute("perm", _swap_last_two(len(before))))
                    exchange(source, node)
                    moved += 1
                    changed = True
                    break
            # MatMul(A, B) -> Transpose(swap)  ==>  MatMul(B^T, A^T), a swapped swap cancelled
            if source is not None and source.op_type == "MatMul" and len(consumers[source.output[0]]) == 1 \
                    and source.output[0] not in outputs:
                ranks = [len(shapes.get(t) or ()) for t in (*source.input, source.output[0])]
                if len(set(ranks)) != 1 or ranks[0] < 3:  # a batched MatMul (ORT folds a 2-D one's swap itself)
                    continue
                operands = []
                for k, t in enumerate(reversed(list(source.input))):
                    p = producer.get(t)
                    if p is not None and is_swap(p):
                        operands.append(p.input[0])
                        continue
                    name = f"{source.output[0]}_operand{k}_swapped"
                    swap = helper.make_node("Transpose", [t], [name], name=f"{source.name}/swap{k}",
                                            perm=_swap_last_two(ranks[0]))
                    swap.metadata_props.extend(source.metadata_props)
                    graph.node.insert(list(graph.node).index(source), swap)
                    operands.append(name)
                del source.input[:]
                source.input.extend(operands)
                source.output[0] = node.output[0]
                graph.node.remove(node)
                moved += 1
                changed = True
                break
    if moved:
        kept = live_nodes(list(graph.node), {o.name for o in graph.output})
        del graph.node[:]
        graph.node.extend(kept)
        _drop_unused_initializers(graph, replaced)
    return moved


def heads_in_one_transpose(proto: onnx.ModelProto) -> int:
    """Cut a fused qkv projection into heads with one Transpose instead of a Split and one Transpose per part, and
    join its gradient the same way; returns how many cuts and joins were rewritten.

    The seed's layout (and vit-pytorch's) chunks the projection (b, n, 3*h*d) along its last axis, then each part
    (b, n, h, d) -> (b, h, n, d); the backward transposes each part's gradient back and concatenates the three along
    the last axis. Both the last-axis Split and Concat and the three transposes copy in blocks of one head's d
    values. As one transpose of (b, n, 3, h, d) -> (3, b, h, n, d) and a Split (or Concat) of the leading axis,
    which moves whole contiguous parts, the copies are one block copy and three memcpys each way.
    """
    graph = proto.graph
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 13)
    if opset < 13:
        return 0
    consumers = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    producer = {o: node for node in graph.node for o in node.output}
    outputs = {o.name for o in graph.output}
    head_perm = [0, 2, 1, 3]

    def const(name: str) -> np.ndarray | None:
        return constant_value(graph, name) if name else None

    def initializer(name: str, values) -> str:
        graph.initializer.append(numpy_helper.from_array(np.array(values, dtype=np.int64), name))
        return name

    def sole(tensor: str, op_type: str):
        users = consumers.get(tensor, [])
        if len(users) == 1 and users[0].op_type == op_type and tensor not in outputs:
            return users[0]
        return None

    def heads_shape(reshape) -> tuple[int, int, int] | None:
        """(n, h, d) of a Reshape to (-1, n, h, d)."""
        shape = const(reshape.input[1])
        if shape is None or shape.shape != (4,) or min(int(v) for v in shape[1:]) <= 0:
            return None
        return int(shape[1]), int(shape[2]), int(shape[3])

    rewritten = 0
    removed, added = [], []  # nodes to drop; (position anchor, nodes to insert before it)
    for split in [n for n in graph.node if n.op_type == "Split"]:
        k = len(split.output)
        axis = next((a.i for a in split.attribute if a.name == "axis"), 0)
        if k < 2 or axis not in (2, -1) or (len(split.input) > 1 and split.input[1]
                                            and len(set(const(split.input[1]).tolist())) != 1):
            continue
        chain = []
        for out in split.output:
            reshape = sole(out, "Reshape")
            transpose = sole(reshape.output[0], "Transpose") if reshape is not None else None
            if transpose is None or perm_of(transpose) != head_perm or heads_shape(reshape) is None:
                break
            chain.append((reshape, transpose))
        if len(chain) != k or len({heads_shape(r) for r, _ in chain}) != 1:
            continue
        n, h, d = heads_shape(chain[0][0])
        base = split.name or split.output[0]
        cut = helper.make_node("Reshape", [split.input[0], initializer(f"{base}_parts_shape", [-1, n, k, h, d])],
                               [f"{base}_parts"], name=f"{base}/parts")
        move = helper.make_node("Transpose", [f"{base}_parts"], [f"{base}_heads"], name=f"{base}/heads",
                                perm=[2, 0, 3, 1, 4])
        # (k, everything): a Reshape between the Transpose and the Split, without which ORT's optimizer pushes the
        # Transpose through the Split as k transposes again
        rows = helper.make_node("Reshape", [f"{base}_heads", initializer(f"{base}_rows_shape", [k, -1])],
                                [f"{base}_rows"], name=f"{base}/rows")
        pieces = helper.make_node("Split", [f"{base}_rows", initializer(f"{base}_ones", [1] * k)],
                                  [f"{base}_piece{i}" for i in range(k)], name=f"{base}/pieces", axis=0)
        heads = [helper.make_node("Reshape", [f"{base}_piece{i}", initializer(f"{base}_head_shape{i}", [-1, h, n, d])],
                                  [t.output[0]], name=f"{t.name}/head") for i, (_, t) in enumerate(chain)]
        added.append((split, [cut, move, rows, pieces, *heads]))
        removed += [split, *(node for pair in chain for node in pair)]
        rewritten += 1
    for concat in [n for n in graph.node if n.op_type == "Concat"]:
        axis = next((a.i for a in concat.attribute if a.name == "axis"), 0)
        k = len(concat.input)
        if k < 2 or axis not in (2, -1):
            continue
        chain = []
        for tensor in concat.input:
            reshape = producer.get(tensor)
            if reshape is None or reshape.op_type != "Reshape" or sole(tensor, "Concat") is not concat:
                break
            transpose = producer.get(reshape.input[0])
            if transpose is None or transpose.op_type != "Transpose" or perm_of(transpose) != head_perm \
                    or sole(transpose.output[0], "Reshape") is not reshape:
                break
            target = const(reshape.input[1])
            if target is None or target.shape != (3,) or min(int(v) for v in target[1:]) <= 0:
                break
            chain.append((transpose, reshape, int(target[1]), int(target[2])))
        if len(chain) != k or len({(n, inner) for _, _, n, inner in chain}) != 1:
            continue
        dims = [[*shape[1:]] for shape in ((_shape(graph, t.input[0]) or [None]) for t, _, _, _ in chain)]
        if len({tuple(x) for x in dims}) != 1 or len(dims[0]) != 3 or None in dims[0]:
            continue
        h, n, d = dims[0]
        if n != chain[0][2] or h * d != chain[0][3]:
            continue
        base = concat.name or concat.output[0]
        stacked = [helper.make_node("Reshape", [t.input[0], initializer(f"{base}_stack_shape{i}", [1, -1, h, n, d])],
                                    [f"{base}_stacked{i}"], name=f"{base}/stack{i}") for i, (t, _, _, _) in enumerate(chain)]
        join = helper.make_node("Concat", [f"{base}_stacked{i}" for i in range(k)], [f"{base}_joined"],
                                name=f"{base}/join", axis=0)
        back = helper.make_node("Transpose", [f"{base}_joined"], [f"{base}_tokens"], name=f"{base}/tokens",
                                perm=[1, 3, 0, 2, 4])
        flat = helper.make_node("Reshape", [f"{base}_tokens", initializer(f"{base}_flat_shape", [-1, n, k * h * d])],
                                [concat.output[0]], name=f"{base}/flat")
        added.append((concat, [*stacked, join, back, flat]))
        removed += [concat, *(node for t, r, _, _ in chain for node in (t, r))]
        rewritten += 1
    if rewritten:
        for anchor, nodes in added:
            position = list(graph.node).index(anchor)
            for offset, node in enumerate(nodes):
                node.metadata_props.extend(anchor.metadata_props)
                graph.node.insert(position + offset, node)
        for node in removed:
            graph.node.remove(node)
        _drop_unused_initializers(graph, {name for node in removed for name in node.input})
    return rewritten


def _drop_unused_initializers(graph: onnx.GraphProto, candidates: set[str]) -> None:
    """Drop the initializers among `candidates` that no node reads any more (replaced Reshapes' shapes)."""
    used = {name for node in graph.node for name in node.input}
    kept = [i for i in graph.initializer if i.name in used or i.name not in candidates]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _shape(graph: onnx.GraphProto, name: str) -> list | None:
    """A tensor's dims from the graph's value_info (None for a dynamic one), or None when it is not recorded."""
    for value in [*graph.value_info, *graph.input, *graph.output]:
        if value.name == name:
            return [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
    return None
