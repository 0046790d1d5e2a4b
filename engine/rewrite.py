"""Rewrites of a training-mode forward graph, made at export before ONNX Runtime builds the gradient graph.

Each one computes exactly the same function (the export's check compares logits, loss and every gradient with
PyTorch afterwards); what changes is which gradient kernels ORT 1.19.2 builds and runs on CPU. The effects were
measured step against step in one process (docs/performance.md, "The training step against PyTorch eager"):

- `keep_gelu_apart`: the exporter writes GELU as x * 0.5 * (1 + erf(x / sqrt 2)), which ORT's gradient builder
  fuses into Gelu, whose GeluGrad kernel is single-threaded Eigen (vit-small64 b32: 48 ms, 14% of the step).
  Writing `1 + erf` as `erf - (-1)` keeps the pattern from matching, so the gradient is built from Erf's and
  the elementwise ops' multithreaded kernels.
- `slices_to_split`: a fused qkv projection's output cut into q, k and v by three Slices becomes one Split. The
  gradient of three Slices is three SliceGrads, each a zero-filled full-size tensor, then their Sum; a Split's
  is one concatenation.

Together: vit-small64 b32 steps 1-7% shorter (six paired runs); digits b64 within noise.

- `split_transposes`: a Transpose that moves the innermost axis along with others (the patch cut
  `b c (h p1) (w p2) -> b h w (p1 p2 c)` is perm 0,2,4,3,5,1) runs in ORT's element-by-element fallback, ~10 ns
  an element here; it becomes a move of that one axis to the end and a Transpose that keeps the innermost block
  whole, with a Reshape between so that ORT's optimizer does not merge them back (vit-tiny's, batch 32: 43 ms
  -> 10 ms). The forward only: the images need no gradient. fusion.py applies it to the inference graph too.

Inference graphs made from the trained weights (Publish) come out of the rewritten eval graph, where a fused
GELU is the faster forward kernel: `gelu_together` turns `erf - (-1)` back into `1 + erf` for ORT's session-level
Gelu/BiasGelu fusion (engine/fusion.py applies it). onnx and numpy only, plus ONNX Runtime to measure bounds.
"""
from __future__ import annotations

import copy
from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper


def for_training(proto: onnx.ModelProto, input_name: str, example_shape: tuple[int, ...]) -> onnx.ModelProto:
    """The forward graph with every rewrite applied (a copy; `proto` is not changed)."""
    proto = copy.deepcopy(proto)
    keep_gelu_apart(proto.graph)
    slices_to_split(proto, input_name, example_shape)
    split_transposes(proto, input_name, example_shape)
    return proto


def constant_value(graph: onnx.GraphProto, name: str) -> np.ndarray | None:
    """The value of a tensor that is an initializer or a Constant node's output, else None."""
    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
    return None


def keep_gelu_apart(graph: onnx.GraphProto) -> int:
    """Turn each GELU's `Add(Erf(.), 1)` into `Sub(Erf(.), -1)`; returns how many were rewritten."""
    consumers = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    rewritten = 0
    for erf in [n for n in graph.node if n.op_type == "Erf"]:
        for add in consumers[erf.output[0]]:
            if add.op_type != "Add" or len(add.input) != 2:
                continue
            one = add.input[1] if add.input[0] == erf.output[0] else add.input[0]
            value = constant_value(graph, one)
            if value is None or value.size != 1 or float(value.reshape(-1)[0]) != 1.0:
                continue
            minus_one = f"{add.output[0]}_minus_one"
            graph.initializer.append(numpy_helper.from_array(np.array(-1.0, dtype=value.dtype), minus_one))
            add.op_type = "Sub"
            del add.input[:]
            add.input.extend([erf.output[0], minus_one])
            rewritten += 1
    return rewritten


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


def slices_to_split(proto: onnx.ModelProto, input_name: str, example_shape: tuple[int, ...]) -> int:
    """Replace each group of Slices that cuts one tensor into consecutive pieces along one axis by one Split.

    Slice bounds in a traced graph are often computed from shapes at run time, so they are measured by running
    the graph at two batch sizes; only bounds that are equal in both runs, with step 1, are rewritten. Returns the
    number of Splits written.
    """
    graph = proto.graph
    groups = defaultdict(list)
    for node in graph.node:
        if node.op_type == "Slice" and len(node.input) >= 4 and node.input[3]:  # the axes given
            groups[node.input[0]].append(node)
    groups = {t: nodes for t, nodes in groups.items() if len(nodes) >= 2}
    if not groups:
        return 0
    names = sorted({name for nodes in groups.values() for n in nodes for name in n.input[1:] if name} | set(groups))
    try:
        bounds = measured(proto, input_name, example_shape, names)
    except Exception:  # noqa: BLE001 - a graph ORT cannot probe keeps its Slices: this is only a speed-up
        return 0
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 13)
    written = 0
    for tensor, nodes in groups.items():
        cut = partition(nodes, bounds, tensor)
        if cut is None:
            continue
        axis, pieces = cut
        sizes = np.array([end - start for start, end, _ in pieces], dtype=np.int64)
        outputs = [n.output[0] for _, _, n in pieces]
        if opset >= 13:  # split sizes are an input from opset 13 on, an attribute before
            sizes_name = f"{tensor}_split_sizes"
            graph.initializer.append(numpy_helper.from_array(sizes, sizes_name))
            split = helper.make_node("Split", [tensor, sizes_name], outputs, name=f"{tensor}_Split", axis=axis)
        else:
            split = helper.make_node("Split", [tensor], outputs, name=f"{tensor}_Split", axis=axis,
                                     split=sizes.tolist())
        position = min(list(graph.node).index(n) for n in nodes)
        for node in nodes:
            graph.node.remove(node)
        graph.node.insert(position, split)
        written += 1
    if written:
        prune(graph)
    return written


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
    import onnxruntime  # here, not on import: engine.fusion imports this module on every server's path

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


def partition(nodes: list[onnx.NodeProto], values: dict, tensor: str) -> tuple[int, list] | None:
    """(axis, [(start, end, node)] in order) when the Slices cut `tensor` into consecutive pieces, else None."""
    rank = values[tensor][0].ndim
    pieces, axes = [], set()
    for node in nodes:
        got = []
        for name in (i for i in node.input[1:5] if i):  # starts, ends, axes and steps (optional: 1)
            a, b = values[name]
            if a.shape != (1,) or not np.array_equal(a, b):  # one axis, the same bound at both batch sizes
                return None
            got.append(int(a[0]))
        start, end, axis = got[0], got[1], got[2] % rank
        if len(got) > 3 and got[3] != 1:
            return None
        size = values[tensor][0].shape[axis]
        if size != values[tensor][1].shape[axis]:  # the batch axis
            return None
        start, end = (min(max(v + size if v < 0 else v, 0), size) for v in (start, end))
        pieces.append((start, end, node))
        axes.add(axis)
    pieces.sort(key=lambda p: p[0])
    ends = [0] + [end for _, end, _ in pieces]
    if len(axes) != 1 or any(start != ends[i] or start >= end for i, (start, end, _) in enumerate(pieces)):
        return None
    if ends[-1] != values[tensor][0].shape[axes.copy().pop()]:
        return None
    return axes.pop(), pieces


def prune(graph: onnx.GraphProto) -> None:
    """Drop nodes nothing needs any more (the shape arithmetic that fed the replaced Slices' bounds)."""
    kept = live_nodes(list(graph.node), {o.name for o in graph.output})
    del graph.node[:]
    graph.node.extend(kept)


def live_nodes(nodes: list, outputs: set[str]) -> list:
    """The nodes something still needs for `outputs`, in their order (dead ones dropped, repeatedly)."""
    needed, keep = set(outputs), []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(node.input)
    return keep[::-1]
