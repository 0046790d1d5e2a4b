"""The forward-graph rewrites made before ORT builds the gradient graph (model/rewrite.py): same function,
other kernels.

The export's own check (logits, loss and every gradient against PyTorch) runs on the rewritten graphs in
test_export and test_layouts; here: what is rewritten, what is left alone, and that outputs do not change.
"""
from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.training import artifacts as ort_artifacts

from engine.graph import rewrite as graph_rewrite
from model import rewrite
from model import export as ex
from model.vit import PRESETS, build


def run(proto: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def ops(proto: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in proto.graph.node)


def slow_transposes(proto: onnx.ModelProto) -> list[list[int]]:
    """The perms of the Transposes ORT runs element by element (graph_rewrite.split_transposes' targets)."""
    return [graph_rewrite.perm_of(n) for n in proto.graph.node
            if n.op_type == "Transpose" and not graph_rewrite.moves_one_axis(graph_rewrite.perm_of(n))]


@pytest.fixture(scope="module")
def digits_forward():
    torch.manual_seed(0)
    config = PRESETS["digits"]
    example = torch.randn(2, config.channels, config.image_size, config.image_size)
    proto = ex.pin_static_shapes(ex.export_onnx(build(config), example, ex.DEFAULT_OPSET, training=True),
                                 tuple(example.shape))
    return proto, tuple(example.shape)


def test_the_seeds_gelus_and_qkv_cuts_are_rewritten_and_the_logits_do_not_change(digits_forward):
    proto, shape = digits_forward
    rewritten = rewrite.for_training(proto, ex.INPUT_NAME, shape)
    before, after = ops(proto), ops(rewritten)
    depth = PRESETS["digits"].depth
    assert (before["Slice"], after["Slice"]) == (3 * depth + 1, 1)  # q, k, v per block; pos_embedding's stays
    assert (before["Split"], after["Split"]) == (0, depth)
    assert after["Erf"] == before["Erf"] == depth and after["Sub"] == before["Sub"] + depth
    assert slow_transposes(proto) == [[0, 2, 4, 3, 5, 1]] and slow_transposes(rewritten) == []  # the patch cut
    assert after["Transpose"] == before["Transpose"] + 1
    assert len(rewritten.graph.node) < len(proto.graph.node)  # the bounds' shape arithmetic is pruned
    assert ops(proto) == before  # the input graph is not changed

    images = np.random.default_rng(1).standard_normal((5, *shape[1:]), dtype=np.float32)
    (want,), (got,) = run(proto, {ex.INPUT_NAME: images}), run(rewritten, {ex.INPUT_NAME: images})
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_ort_builds_no_fused_gelu_gradient_and_no_slice_gradients_for_qkv(digits_forward, tmp_path):
    proto, shape = digits_forward
    names = [i.name for i in proto.graph.initializer if i.name.startswith(("transformer.", "mlp_head."))]
    counts = {}
    for label, graph in (("exported", proto), ("rewritten", rewrite.for_training(proto, ex.INPUT_NAME, shape))):
        folder = tmp_path / label
        folder.mkdir()
        ort_artifacts.generate_artifacts(graph, requires_grad=names, loss=ort_artifacts.LossType.CrossEntropyLoss,
                                         optimizer=ort_artifacts.OptimType.SGD, artifact_directory=folder,
                                         additional_output_names=[ex.OUTPUT_NAME])
        counts[label] = ops(onnx.load(folder / "training_model.onnx"))
    depth = PRESETS["digits"].depth
    assert (counts["exported"]["GeluGrad"], counts["rewritten"]["GeluGrad"]) == (depth, 0)
    assert (counts["exported"]["SliceGrad"], counts["rewritten"]["SliceGrad"]) == (3 * depth, 0)


def sliced(bounds: list[tuple[int, int]], step: int | None = 1, width: int = 6) -> onnx.ModelProto:
    """x (batch, width) -> one output per Slice [start, end) along axis 1, bounds as initializers (the steps
    input named "" when `step` is None)."""
    inits, nodes, outputs = [], [], []
    for i, (start, end) in enumerate(bounds):
        for part, value in (("s", start), ("e", end), ("a", 1), ("p", step)):
            if value is not None:
                inits.append(numpy_helper.from_array(np.array([value], np.int64), f"{part}{i}"))
        steps = [f"p{i}"] if step is not None else [""]  # an optional input left out by name
        nodes.append(helper.make_node("Slice", ["x", f"s{i}", f"e{i}", f"a{i}", *steps], [f"y{i}"]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)])


@pytest.mark.parametrize(("bounds", "step"), [([(2, 4), (0, 2), (4, 6)], 1), ([(0, 1), (1, 6)], 1),
                                              ([(0, 3), (3, 2**62)], 1), ([(0, 3), (3, 6)], None)],
                         ids=["out-of-order", "unequal", "open-end", "no-steps"])
def test_slices_that_cut_a_tensor_into_consecutive_pieces_become_one_split(bounds, step):
    proto = sliced(bounds, step)
    x = np.arange(18, dtype=np.float32).reshape(3, 6)
    want = run(proto, {"x": x})
    assert rewrite.slices_to_split(proto, "x", (2, 6)) == 1
    assert ops(proto) == {"Split": 1}
    for got, expected in zip(run(proto, {"x": x}), want):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(("bounds", "step"), [([(0, 2), (3, 6)], 1), ([(0, 3), (2, 6)], 1), ([(0, 2), (2, 4)], 1),
                                              ([(0, 3), (3, 6)], 2), ([(0, 6)], 1)],
                         ids=["gap", "overlap", "short", "step-2", "one-slice"])
def test_slices_that_do_not_partition_the_tensor_are_left_alone(bounds, step):
    proto = sliced(bounds, step)
    assert rewrite.slices_to_split(proto, "x", (2, 6)) == 0
    assert ops(proto) == {"Slice": len(bounds)}


def test_a_graph_onnx_runtime_cannot_run_keeps_its_slices():
    proto = sliced([(0, 3), (3, 6)])
    proto.graph.node.insert(0, helper.make_node("Unknown", ["x"], ["x2"], domain="example.unknown"))
    proto.graph.node[1].input[0] = proto.graph.node[2].input[0] = "x2"
    proto.opset_import.append(helper.make_opsetid("example.unknown", 1))
    assert rewrite.slices_to_split(proto, "x", (2, 6)) == 0
    assert ops(proto) == {"Unknown": 1, "Slice": 2}


def test_only_an_add_of_one_to_an_erf_is_rewritten():
    nodes = [helper.make_node("Erf", ["x"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["gelu_part"]),
             helper.make_node("Add", ["e", "two"], ["other"])]
    inits = [numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array(2.0, np.float32), "two")]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4]) for n in ("gelu_part", "other")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])], outputs, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)])
    x = np.array([-2.0, -0.5, 0.5, 3.0], np.float32)
    want = run(proto, {"x": x})
    assert rewrite.keep_gelu_apart(proto.graph) == 1
    assert [n.op_type for n in proto.graph.node] == ["Erf", "Sub", "Add"]
    for got, expected in zip(run(proto, {"x": x}), want):
        np.testing.assert_array_equal(got, expected)


def transposed(perm: list[int], dims: list[int]) -> onnx.ModelProto:
    """x (batch, *dims) -> Transpose[perm] -> y."""
    graph = helper.make_graph([helper.make_node("Transpose", ["x"], ["y"], perm=perm)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *dims])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)])


@given(data=st.data())
@settings(max_examples=40, deadline=None)
def test_a_transpose_split_in_two_moves_every_element_where_one_would(data):
    rank = data.draw(st.integers(2, 6), label="rank")
    dims = data.draw(st.lists(st.integers(1, 4), min_size=rank - 1, max_size=rank - 1), label="dims")
    perm = [0, *data.draw(st.permutations(range(1, rank)), label="perm")]  # the batch stays outermost, as in models
    proto = transposed(perm, dims)
    written = graph_rewrite.split_transposes(proto, "x", (2, *dims))
    assert written == (0 if graph_rewrite.moves_one_axis(perm) else 1)
    assert slow_transposes(proto) == []
    for batch in (1, 3):  # the batch axis stays dynamic
        x = np.arange(batch * int(np.prod(dims)), dtype=np.float32).reshape(batch, *dims)
        np.testing.assert_array_equal(run(proto, {"x": x})[0], x.transpose(perm))


def test_onnx_runtime_does_not_fold_the_split_transposes_back_into_one(tmp_path):
    proto = transposed([0, 2, 4, 3, 5, 1], [3, 4, 2, 4, 2])  # the patch cut of a 3-channel 8x8 image, 2x2 patches
    assert graph_rewrite.split_transposes(proto, "x", (2, 3, 4, 2, 4, 2)) == 1
    onnx.save(proto, tmp_path / "split.onnx")
    assert slow_transposes(optimized(tmp_path / "split.onnx", tmp_path)) == []


def test_a_transpose_whose_block_dims_are_unknown_or_dynamic_is_left_alone():
    proto = transposed([0, 2, 4, 3, 5, 1], [3, 4, 2, 4, 2])
    assert graph_rewrite.split_transposes(proto, "x", (2, 3, 4, 2, 4, 1)) == 0  # the probe fails: wrong example shape
    assert slow_transposes(proto) == [[0, 2, 4, 3, 5, 1]]
    proto = transposed([2, 1, 0], [3, 4])  # the batch axis (dynamic) would be the innermost block
    assert graph_rewrite.split_transposes(proto, "x", (2, 3, 4)) == 0


def optimized(path, tmp_path) -> onnx.ModelProto:
    """The graph ONNX Runtime runs for the model at `path` (after its session-level fusions)."""
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return onnx.load(options.optimized_model_filepath)


def optimized_ops(path, tmp_path) -> collections.Counter:
    """The op types of the graph ONNX Runtime runs for the model at `path` (after its session-level fusions)."""
    return ops(optimized(path, tmp_path))


def test_a_published_inference_graph_gets_its_gelus_back_together_and_its_attention_fused(exported, tmp_path):
    """Publish exports the trained weights from the rewritten eval graph; the inference graph ORT runs still has
    fused GELUs (ORT's forward Gelu kernel beats Erf and four elementwise ops) and MultiHeadAttention per block."""
    from engine.graph.fusion import optimize_inference_model
    from engine.manifest import Manifest
    from engine.runtime import session_options
    from engine.train.step import TrainingEngine

    manifest = Manifest.load(exported[0])
    engine = TrainingEngine(manifest, "cpu", session_options(1, training=True), 1e-3)
    path = tmp_path / "published.onnx"
    engine.export_inference_model(path, manifest.output_name)
    exported_graph = onnx.load(path)
    depth = PRESETS["digits"].depth
    assert ops(exported_graph)["Erf"] == depth and ops(exported_graph)["Split"] == depth  # as trained

    assert optimize_inference_model(path, [q.heads for q in manifest.qkv], manifest.input_name,
                                    manifest.input_shape) == depth
    assert slow_transposes(exported_graph) == []  # the patch cut was split for training, and stays split
    published = optimized_ops(path, tmp_path)
    assert published["MultiHeadAttention"] == depth and "Erf" not in published
    assert published["BiasGelu"] + published["Gelu"] == depth

    images = np.random.default_rng(2).standard_normal((4, *manifest.input_shape[1:]), dtype=np.float32)
    feed = {manifest.input_name: images}
    (want,), (got,) = run(exported_graph, feed), run(onnx.load(path), feed)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def innermost_moves(proto: onnx.ModelProto) -> list[list[int]]:
    """The perms of the Transposes that move the innermost axis (ORT copies those element by element)."""
    return [graph_rewrite.perm_of(n) for n in proto.graph.node
            if n.op_type == "Transpose" and graph_rewrite.perm_of(n)[-1] != len(graph_rewrite.perm_of(n)) - 1]


def test_the_gradient_graph_runs_with_its_attention_transposes_folded_into_matmuls(exported, tmp_path):
    """The seed's attention computes q @ k^T on 3-D views: in the file, k's swap and its gradient's swap sit across a
    Reshape from their MatMuls, and ORT merges each with the head split into a Transpose that moves the innermost
    axis. The trainer's session runs the graph with those swaps moved onto the MatMuls, the qkv cut into heads by
    one transpose and the patch cut split: every Transpose ORT runs then keeps the innermost axis but the patch cut's
    first half, the outputs (loss, logits, every gradient) are the same, and the file is unchanged."""
    from engine.manifest import GRADIENT_MODEL, Manifest
    from engine.train.graph_backend import runnable_gradient_graph

    manifest = Manifest.load(exported[0])
    path = manifest.path(GRADIENT_MODEL)
    traced = onnx.load(path)
    rewritten = onnx.load(path)
    depth = PRESETS["digits"].depth
    # per block: k's swap forward across its Reshape; its gradient's swap back across one, then into the MatMul
    assert graph_rewrite.transposes_into_matmuls(rewritten) == 3 * depth
    assert graph_rewrite.transposes_into_matmuls(rewritten) == 0  # nothing left to move
    before = optimized_ops(path, tmp_path)
    assert graph_rewrite.heads_in_one_transpose(rewritten) == 2 * depth  # per block the cut and its gradient's join
    assert graph_rewrite.split_transposes(rewritten, manifest.input_name, tuple(manifest.input_shape)) == 1
    patch_cut = [0, 2, 4, 3, 5, 1]  # b c (h p1) (w p2) -> b h w (p1 p2 c), as traced
    assert innermost_moves(optimized(path, tmp_path)) == [patch_cut] + [[0, 2, 3, 1]] * depth + [[0, 3, 1, 2]] * depth
    onnx.save(rewritten, tmp_path / "rewritten.onnx")
    # left: the split patch cut's first half, which moves the one channel axis to the end
    assert innermost_moves(optimized(tmp_path / "rewritten.onnx", tmp_path)) == [[0, 2, 3, 4, 5, 1]]
    after = optimized_ops(tmp_path / "rewritten.onnx", tmp_path)
    # per block, 3 head transposes each way became 1; the patch cut's one became 2
    assert after["Transpose"] == before["Transpose"] - 4 * depth + 1
    assert (after["Split"], after["Concat"]) == (before["Split"], before["Concat"])  # now along the leading axis
    assert runnable_gradient_graph(manifest) == rewritten  # what the trainer's session runs

    rng = np.random.default_rng(3)
    feed = {manifest.input_name: rng.standard_normal((5, *manifest.input_shape[1:]), dtype=np.float32),
            "labels": rng.integers(0, 10, 5)}
    weights = {p.name: rng.standard_normal(p.shape).astype(np.float32) * 0.1 for p in manifest.parameters if p.trainable}
    feed.update(weights)
    for want, got in zip(run(traced, feed), run(rewritten, feed)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert onnx.load(path) == traced  # the session's copy was rewritten, not the file
