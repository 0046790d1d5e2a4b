"""engine/graph/graph_explain.py against real gradient graphs (model/gradgraph.py): the loss, where backpropagation starts,
every gradient's node and path, q/k/v, and the readable node names, for the digits preset and three other layouts.

digits comes from the session's full export (conftest's `exported`); the layouts (tests/layout_models.py) are
exported once each, gradient graph only, and placed as the export places them (model/layout.py).
"""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from engine.errors import FailedPrecondition, NotFound
from engine.graph.graph_explain import BACKWARD_OF, NAMED, GradientGraphExplainer, name_backward_nodes
from engine.manifest import GRADIENT_MODEL, LossNode, Manifest, Preprocessing, TensorSpec
from model import gradgraph
from model.layout import place
from tests import layout_models as lm
from tests.helpers import REPO

LAYOUTS = {  # name -> (builder, frozen parameters); digits is the seed's layout (model/vit.py: fused to_qkv, no bias)
    "hugging-face": (lm.hugging_face_vit, ()),  # separate q_proj, k_proj, v_proj with biases
    "timm": (lm.timm_vit, ("pos_embed",)),  # fused qkv with a bias, cut by unbind; one parameter frozen
    "torch-mha": (lm.EncoderViT, ()),  # nn.TransformerEncoderLayer: in_proj_weight/in_proj_bias, cut by select
}
BATCH = 3


@dataclass
class Case:
    name: str
    manifest: Manifest
    raw: onnx.ModelProto  # as exported
    named: onnx.ModelProto  # after name_backward_nodes
    explainer: GradientGraphExplainer  # on the named graph
    feeds: dict


def layout_manifest(name: str, folder: Path, model: torch.nn.Module, graph: onnx.GraphProto, trainable: list[str]):
    """The manifest the export would write, as far as the explainer reads it: parameters and attention layouts."""
    placement = place(model, graph, set(trainable))
    return Manifest(
        name=name, source={}, input=TensorSpec("images", (-1, 3, lm.SIZE, lm.SIZE)),
        output=TensorSpec("logits", (-1, lm.CLASSES)),
        preprocessing=Preprocessing(lm.SIZE, lm.SIZE, 3, (0.5,) * 3, (0.5,) * 3),
        class_names=tuple(f"c{i}" for i in range(lm.CLASSES)), parameters=placement.parameters,
        attention=placement.attention, inference_fused_attention_blocks=0, loss=LossNode("", "", (), "loss"),
        opset=18, optimizer={}, versions={}, files={}, unplaced=placement.unplaced, folder=folder)


def random_feeds(model: onnx.ModelProto, classes: int) -> dict:
    rng = np.random.default_rng(0)
    feeds = {}
    for value in model.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else BATCH for d in value.type.tensor_type.shape.dim]
        if value.name == "labels":
            feeds[value.name] = rng.integers(0, classes, BATCH, dtype=np.int64)
        else:
            feeds[value.name] = (rng.standard_normal(dims) * (1.0 if value.name == "images" else 0.2)).astype(np.float32)
    return feeds


@pytest.fixture(scope="module", params=["digits", *LAYOUTS])
def case(request, tmp_path_factory) -> Case:
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "digits":
        manifest = Manifest.load(request.getfixturevalue("exported")[0], (GRADIENT_MODEL,))
        raw = onnx.load(str(manifest.path(GRADIENT_MODEL)))
    else:
        builder, frozen = LAYOUTS[request.param]
        torch.manual_seed(0)
        model = builder()
        trainable = [n for n, _ in model.named_parameters() if n not in frozen]
        gradgraph.export_gradient_graphs(model, torch.randn(2, 3, lm.SIZE, lm.SIZE), trainable, folder)
        raw = onnx.load(str(folder / GRADIENT_MODEL))
        manifest = layout_manifest(request.param, folder, model, raw.graph, trainable)
    named = name_backward_nodes(raw, manifest.parameters)
    onnx.save(named, str(folder / "named.onnx"))
    return Case(request.param, manifest, raw, named, GradientGraphExplainer(folder / "named.onnx", manifest),
                random_feeds(raw, manifest.num_classes))


def run(model: onnx.ModelProto, feeds: dict, extra: list[str] = ()) -> dict:
    """Every graph output (and the tensors `extra`) of one onnxruntime run."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    model.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in extra)
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def perturbable(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """`model` whose forward pass reads `t + delta/<t>` wherever it read each tensor t of `tensors` (the backward
    nodes still read t), with the inputs delta/<t>: the loss as a function of those forward tensors."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output}
    forward, stack = set(), [producer["loss"], producer["logits"]]
    while stack:
        i = stack.pop()
        if i not in forward:
            forward.add(i)
            stack += [producer[t] for t in graph.node[i].input if t in producer]
    nodes = []
    for i, node in enumerate(graph.node):
        if i in forward:
            for k, t in enumerate(node.input):
                if t in tensors:
                    node.input[k] = f"{t}/perturbed"
        nodes.append(node)
        for t in node.output:
            if t in tensors:
                nodes.append(onnx.helper.make_node("Add", [t, f"delta/{t}"], [f"{t}/perturbed"]))
                graph.input.append(onnx.helper.make_tensor_value_info(f"delta/{t}", onnx.TensorProto.FLOAT, None))
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def nodes_of(graph: onnx.GraphProto) -> dict:
    return {n.name: n for n in graph.node}


def descendants(graph: onnx.GraphProto, start: str) -> set[str]:
    """Node names reachable from node `start` over producer -> consumer edges."""
    consumers = {}
    for n in graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    by_name, seen, stack = nodes_of(graph), set(), [start]
    while stack:
        for t in by_name[stack.pop()].output:
            for c in consumers.get(t, ()):
                if c.name not in seen:
                    seen.add(c.name)
                    stack.append(c.name)
    return seen


# ---------------------------------------------------------------------------------------------------------------------

def test_loss_node_and_where_backpropagation_starts(case):
    explanation = case.explainer.explain()
    graph = case.named.graph
    # The loss: mean cross-entropy, the sum of the picked log-probabilities over the number of counted labels.
    assert explanation.loss.outputs == ("loss",) and explanation.loss.op_type == "Div"
    assert explanation.loss.name == "loss/Div"
    assert nodes_of(graph)["loss/Div"].output[0] == graph.output[0].name == "loss"
    # Backpropagation starts where d(loss) = 1 enters: the backward of that Div, reading the constant 1.
    start = nodes_of(graph)[explanation.loss_gradient.name]
    assert explanation.loss_gradient.name == "backward/loss/Div" and start.op_type == "Div"
    ones = {i.name for i in graph.initializer if onnx.numpy_helper.to_array(i).size == 1
            and float(onnx.numpy_helper.to_array(i).reshape(-1)[0]) == 1.0}
    assert ones & set(start.input)
    reached = descendants(graph, start.name)
    producers = {o: n.name for n in graph.node for o in n.output}
    assert all(producers[p + "_grad"] in reached for p in case.manifest.trainable)
    assert explanation.forward_nodes + explanation.backward_nodes == len(graph.node)
    assert 0 < explanation.forward_nodes < explanation.backward_nodes
    assert sum(n.name.startswith("backward/") for n in graph.node) == explanation.backward_nodes


def test_every_trainable_parameter_has_its_gradient_node_and_a_path_from_the_loss(case):
    explanation = case.explainer.explain()
    graph_nodes = nodes_of(case.named.graph)
    assert [p.name for p in explanation.parameters] == case.manifest.trainable
    shapes = {p.name: p.shape for p in case.manifest.parameters}
    for p in explanation.parameters:
        assert p.shape == shapes[p.name]
        assert p.gradient_tensor == p.name + "_grad"
        assert list(graph_nodes[p.gradient_node.name].output) == [p.gradient_tensor]  # the real graph's producer
        assert p.path[0] == explanation.loss_gradient and p.path[-1] == p.gradient_node
        assert p.ops_from_loss == len(p.path) > 1
        for before, after in zip(p.path, p.path[1:]):
            assert set(before.outputs) & set(after.inputs), f"{p.name}: {before.name} does not feed {after.name}"
            assert after.name.startswith("backward/")
    entries = {p.name: p for p in explanation.parameters}
    first, last = case.manifest.qkv[0], case.manifest.qkv[-1]
    assert entries[first.weights[0]].ops_from_loss > entries[last.weights[0]].ops_from_loss  # block 0 is deeper


def test_backward_nodes_are_named_after_the_op_they_differentiate(case):
    graph = case.named.graph
    names = [n.name for n in graph.node]
    assert len(set(names)) == len(names)
    assert any(p.key == NAMED for p in case.named.metadata_props)
    forward = {n for n in names if not n.startswith("backward/")}
    for node in graph.node:
        if node.name.startswith("backward/"):
            of = next(p.value for p in node.metadata_props if p.key == BACKWARD_OF)
            assert node.name.startswith(f"backward/{of}/")
            assert of == "loss" or of in forward or any(f.startswith(f"{of}/") for f in forward)
    producers = {o: n.name for n in graph.node for o in n.output}
    for p in case.manifest.trainable:
        module = p.rpartition(".")[0]
        differentiated = producers[p + "_grad"].split("/")[1]  # backward/<module>/<op>/...
        if module:  # the forward op that reads the parameter runs in its module (or, nn.MultiheadAttention, a parent)
            assert module == differentiated or module.startswith(differentiated + "."), (p, producers[p + "_grad"])


def test_renamed_graph_computes_exactly_what_the_exported_one_does(case):
    before, after = run(case.raw, case.feeds), run(case.named, case.feeds)
    assert list(before) == list(after) == ["loss", "logits", *(p + "_grad" for p in case.manifest.trainable)]
    for name in before:
        np.testing.assert_array_equal(before[name], after[name], err_msg=name)


def test_qkv_parts_are_found_and_ordered_for_every_attention_module(case):
    entries = {p.name: p for p in case.explainer.explain().parameters}
    graph = case.named.graph
    producers = {o: n for n in graph.node for o in n.output}
    extra = [part.gradient_tensor for a in case.manifest.qkv for w in dict.fromkeys(a.weights)
             for part in entries[w].qkv_parts]
    values = run(case.named, case.feeds, extra)
    for layout in case.manifest.qkv:
        inner = layout.inner
        if layout.fused:
            parts = entries[layout.name].qkv_parts
            assert [p.part for p in parts] == ["q", "k", "v"]
            assert all(entries[b].qkv_parts == parts for b in layout.biases)
            assert len({p.gradient_node.name for p in parts}) == 3
            weight_grad = entries[layout.name].gradient_node.name
            meets = set.intersection(*(descendants(graph, p.gradient_node.name) for p in parts))
            assert weight_grad in meets  # all three feed the fused weight's gradient
            meet = min(meets, key=[n.name for n in graph.node].index)  # where they come together: the cut's gradient
            assert nodes_of(graph)[meet].op_type in ("Concat", "Add")
            if layout.biases:  # oracle: each part's gradient sums to the sum of its rows of the bias gradient
                bias = values[layout.biases[0] + "_grad"]
                for i, p in enumerate(parts):
                    np.testing.assert_allclose(values[p.gradient_tensor].sum(), bias[i * inner:(i + 1) * inner].sum(),
                                               rtol=1e-4, atol=1e-6, err_msg=f"{layout.name} {p.part}")
            else:  # oracle: the projection's output is cut by one Split into q, k, v, in that order
                (split,) = {producers[p.tensor].name: producers[p.tensor] for p in parts}.values()
                assert split.op_type == "Split" and [p.tensor for p in parts] == list(split.output)
                concat = nodes_of(graph)[meet]
                assert concat.op_type == "Concat" and list(concat.input) == [p.gradient_tensor for p in parts]
        else:
            for i, (role, weight) in enumerate(zip("qkv", layout.weights)):
                (part,) = entries[weight].qkv_parts
                assert part.part == role and entries[layout.biases[i]].qkv_parts == (part,)
                assert entries[weight].gradient_node.name in descendants(graph, part.gradient_node.name)
                np.testing.assert_allclose(values[part.gradient_tensor].sum(axis=0), values[layout.biases[i] + "_grad"],
                                           rtol=1e-4, atol=1e-6, err_msg=f"{weight}")
    assert [p.name for p in entries.values() if p.qkv_parts] == [
        n for n in case.manifest.trainable if any(n in (*a.weights, *a.biases) for a in case.manifest.qkv)]


def test_qkv_part_gradients_are_the_gradients_of_q_k_and_v(case):
    """Oracle: the loss moves by <g, d> when q (k, v) moves by a small d, g the tensor the explanation names as its
    gradient (central differences, d along g)."""
    parts = {p.tensor: p.gradient_tensor for e in case.explainer.explain().parameters for p in e.qkv_parts}
    assert len(parts) == 3 * len(case.manifest.qkv)
    model = perturbable(case.named, list(parts))
    model.graph.output.extend(onnx.helper.make_tensor_value_info(g, onnx.TensorProto.FLOAT, None) for g in parts.values())
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    zeros = {f"delta/{t}": np.zeros(1, np.float32) for t in parts}
    gradients = dict(zip(parts.values(), session.run(list(parts.values()), {**case.feeds, **zeros})))
    for tensor, grad in parts.items():
        g = gradients[grad].astype(np.float64)
        d = (g * min(1e-4 / (g * g).sum(), 1e-2 / np.abs(g).max())).astype(np.float32)  # loss moves ~1e-4
        up, down = (session.run(["loss"], {**case.feeds, **zeros, f"delta/{tensor}": s * d})[0] for s in (1, -1))
        np.testing.assert_allclose((up - down) / 2, (g * d).sum(), rtol=0.05, err_msg=f"{tensor} -> {grad}")


@pytest.mark.parametrize("case", ["digits"], indirect=True)
def test_digits_fused_qkv_explanation_reads_in_the_model_s_terms(case):
    entry = case.explainer.explain("transformer.layers.0.0.fn.to_qkv.weight").parameters[0]
    assert entry.gradient_node.name.startswith("backward/transformer.layers.0.0.fn.to_qkv/")
    assert [p.gradient_node.name.rsplit("/", 1)[0] for p in entry.qkv_parts] == [
        "backward/transformer.layers.0.0.fn/Reshape", "backward/transformer.layers.0.0.fn/Reshape_1",
        "backward/transformer.layers.0.0.fn/Reshape_2"]  # the gradients of the three views of the Split's pieces
    names = [n.name for n in entry.path]
    assert "backward/transformer.layers.0.0.fn/Split/Concat" in names  # the Split's gradient: q, k, v meet
    assert names.index("backward/transformer.layers.0.0.fn/Split/Concat") == len(names) - 6
    assert any(n.startswith("backward/transformer.layers.0.0.fn.attend/Softmax/") for n in
               (n.name for n in case.named.graph.node))


def test_unknown_parameter_is_not_found(case):
    with pytest.raises(NotFound, match=f"'nope'.*{len(case.manifest.trainable)} trainable parameters"):
        case.explainer.explain("nope")


@pytest.mark.parametrize("case", ["timm"], indirect=True)
def test_frozen_parameter_has_no_gradient(case):
    with pytest.raises(FailedPrecondition, match="'pos_embed' is frozen"):
        case.explainer.explain("pos_embed")
    assert "pos_embed_grad" not in {o.name for o in case.named.graph.output}
    assert [p.name for p in case.explainer.explain().parameters] == case.manifest.trainable


def test_graph_explain_module_does_not_import_torch():
    code = "import sys, engine.graph.graph_explain; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0
