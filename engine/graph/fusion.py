"""Graph rewrite for inference: each attention block's ops become one ONNX Runtime MultiHeadAttention node.

The exported attention is, per block (lucidrains layout, q/k/v from one fused projection):

    q, k, v = Slice x3 (to_qkv(x)), or one Split         each (b, n, h*d)
    Q = Transpose[0,2,1,3](Reshape(q))                  (b, h, n, d)
    K = Transpose[0,2,3,1](Reshape(k))                  (b, h, d, n)
    V = Transpose[0,2,1,3](Reshape(v))                  (b, h, n, d)
    out = Reshape(Transpose[0,2,1,3](Dropout?(Softmax(MatMul(Q, K) * scale)) @ V))   (b, n, h*d)

ORT's transformer optimizer does not recognize this pattern (no bias, a chunked
projection), so it is matched here from each Softmax outwards and replaced by
com.microsoft.MultiHeadAttention(q, k, v, num_heads=h, scale=scale). Nodes left
without consumers are dropped. Callers check the fused graph's logits against the
unfused ones (or PyTorch's) before using it. No torch; onnx and numpy only.
"""
from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import helper

from engine.graph.rewrite import constant_value, gelu_together, live_nodes, perm_of, split_transposes

MS_DOMAIN = "com.microsoft"


class _Graph:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.producer = {o: n for n in model.graph.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in model.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def users(self, tensor: str) -> list:
        """Consumers of a tensor's values (Shape nodes only read its shape; they die with the pattern)."""
        return [n for n in self.consumers.get(tensor, []) if n.op_type != "Shape"]

    def op(self, tensor: str, op_type: str):
        node = self.producer.get(tensor)
        return node if node is not None and node.op_type == op_type else None

    def constant(self, tensor: str) -> np.ndarray | None:
        return constant_value(self.model.graph, tensor)


def _head_input(g: _Graph, tensor: str, perm: list[int]) -> str | None:
    """The (b, n, h*d) tensor behind Transpose[perm](Reshape(it))."""
    transpose = g.op(tensor, "Transpose")
    if transpose is None or perm_of(transpose) != perm:
        return None
    reshape = g.op(transpose.input[0], "Reshape")
    return reshape.input[0] if reshape is not None else None


def _is_identity(g: _Graph, dropout) -> bool:
    """Dropout without a training_mode input (or with a constant False one) passes its input through."""
    if len(dropout.input) < 3 or not dropout.input[2]:
        return True
    mode = g.constant(dropout.input[2])
    return mode is not None and not bool(mode)


def _match(g: _Graph, softmax) -> dict | None:
    scaled = g.producer.get(softmax.input[0])  # scores * scale
    if scaled is None or scaled.op_type not in ("Mul", "Div"):
        return None
    scores, factor = scaled.input
    value = g.constant(factor)
    scores_mm = g.op(scores, "MatMul")
    if value is None or value.size != 1 or scores_mm is None:
        return None
    scale = float(value.reshape(())) if scaled.op_type == "Mul" else 1.0 / float(value.reshape(()))
    q = _head_input(g, scores_mm.input[0], [0, 2, 1, 3])
    k = _head_input(g, scores_mm.input[1], [0, 2, 3, 1])
    users = g.users(softmax.output[0])
    if len(users) == 1 and users[0].op_type == "Dropout" and _is_identity(g, users[0]):
        users = g.users(users[0].output[0])  # attention dropout: the identity at inference
    if q is None or k is None or len(users) != 1 or users[0].op_type != "MatMul":
        return None
    context_mm = users[0]
    v = _head_input(g, context_mm.input[1], [0, 2, 1, 3])
    after = g.users(context_mm.output[0])
    if v is None or len(after) != 1 or after[0].op_type != "Transpose" or perm_of(after[0]) != [0, 2, 1, 3]:
        return None
    merge = g.users(after[0].output[0])
    if len(merge) != 1 or merge[0].op_type != "Reshape":
        return None
    return dict(q=q, k=k, v=v, scale=scale, output=merge[0].output[0], replaces=merge[0])


def fuse_attention(model: onnx.ModelProto, heads: list[int]) -> tuple[onnx.ModelProto, int]:
    """A copy of `model` with each matched attention (block order) fused; returns (model, blocks fused).

    `heads` gives each block's head count, in graph order. Nothing is fused unless every
    Softmax-attention in the graph matches and their number equals len(heads).
    """
    fused = onnx.ModelProto()
    fused.CopyFrom(model)
    g = _Graph(fused)
    matches = [_match(g, n) for n in fused.graph.node if n.op_type == "Softmax"]
    if not matches or any(m is None for m in matches) or len(matches) != len(heads):
        return model, 0
    replaced = {id(m["replaces"]): (m, h) for m, h in zip(matches, heads)}
    nodes = []
    for node in fused.graph.node:
        if id(node) in replaced:
            m, h = replaced[id(node)]
            nodes.append(helper.make_node("MultiHeadAttention", [m["q"], m["k"], m["v"]], [m["output"]],
                                          name=node.name + "/MultiHeadAttention", domain=MS_DOMAIN,
                                          num_heads=h, scale=m["scale"]))
        else:
            nodes.append(node)
    del fused.graph.node[:]
    fused.graph.node.extend(live_nodes(nodes, {o.name for o in fused.graph.output}))
    if not any(o.domain == MS_DOMAIN for o in fused.opset_import):
        fused.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return fused, len(matches)


def optimize_inference_model(path, heads: list[int], input_name: str, input_shape: tuple[int, ...]) -> int:
    """Fuse the attention of the model at `path` in place if the fused logits agree; returns blocks fused.

    GELUs the export kept apart for training (model/rewrite.py) are put back into the form ORT fuses, and
    Transposes ORT would run element by element are split into two it runs in blocks (rewrite.split_transposes).

    The check runs both graphs on the same random batch in ONNX Runtime: the fused graph must give
    the unfused graph's logits to 1e-4 of their scale, otherwise the file is left as it was.
    """
    import onnxruntime as ort

    model = onnx.load(str(path))
    fused, count = fuse_attention(model, heads)
    if fused is model:
        fused = copy.deepcopy(model)
    regrouped = gelu_together(fused.graph)
    regrouped += split_transposes(fused, input_name, input_shape)
    if not regrouped and not count:
        return 0
    batch = np.random.default_rng(0).standard_normal((2, *input_shape[1:]), dtype=np.float32)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = False  # two sessions per Publish, run once: an arena would only fragment the heap

    def logits(m: onnx.ModelProto) -> np.ndarray:
        session = ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return session.run(None, {input_name: batch})[0]

    expected, got = logits(model), logits(fused)
    if got.shape != expected.shape or np.abs(got - expected).max() > 1e-4 * (np.abs(expected).max() + 1e-12):
        return 0
    onnx.save(fused, str(path))
    return count
