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

- `split_transposes` (engine/graph/rewrite.py, which the published inference graphs get too): a Transpose that
  moves the innermost axis along with others becomes a move of that one axis and a Transpose that keeps the
  innermost block whole.
"""
from __future__ import annotations

import copy
from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

from engine.graph.rewrite import constant_value, live_nodes, measured, split_transposes


def for_training(proto: onnx.ModelProto, input_name: str, example_shape: tuple[int, ...]) -> onnx.ModelProto:
    """The forward graph with every rewrite applied (a copy; `proto` is not changed)."""
    proto = copy.deepcopy(proto)
    keep_gelu_apart(proto.graph)
    slices_to_split(proto, input_name, example_shape)
    split_transposes(proto, input_name, example_shape)
    return proto


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
