"""engine/graph/explain.py against real exported training graphs: the loss, every gradient's node and path, q/k/v."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from onnx import numpy_helper

from model import export as exporter
from engine.errors import FailedPrecondition, NotFound
from engine.graph.explain import GradientExplainer
from engine.manifest import TRAINING_MODEL, Manifest
from tests.helpers import REPO

pytestmark = pytest.mark.slow

QKV0, QKV3 = "transformer.layers.0.0.fn.to_qkv.weight", "transformer.layers.3.0.fn.to_qkv.weight"


def explainer_for(folder: Path) -> tuple[GradientExplainer, Manifest]:
    manifest = Manifest.load(folder)
    return GradientExplainer(manifest.path(TRAINING_MODEL), manifest), manifest


@pytest.fixture(scope="module")
def explained(exported):
    explainer, manifest = explainer_for(exported[0])
    graph = onnx.load(str(manifest.path(TRAINING_MODEL))).graph
    return explainer, manifest, graph


def by_name(explanation):
    return {p.name: p for p in explanation.parameters}


def node_named(graph, name):
    return next(n for n in graph.node if n.name == name)


def test_loss_and_where_backpropagation_starts(explained):
    explainer, manifest, graph = explained
    explanation = explainer.explain()
    assert explanation.loss.op_type == "SoftmaxCrossEntropyLoss"
    assert explanation.loss.inputs == ("logits", "labels")
    assert explanation.loss.outputs[0] == graph.output[0].name == manifest.loss.output
    assert explanation.loss.name == manifest.loss.name
    # ORT's own op: the op type is domain-qualified, as vitserve.proto's GraphNode says.
    assert explanation.loss_gradient.op_type == "com.microsoft.SoftmaxCrossEntropyLossGrad"
    assert explanation.loss_gradient.inputs[0] == explanation.loss.outputs[0] + "_grad"
    assert explanation.loss_gradient.outputs == ("logits_grad",)
    assert explanation.forward_nodes + explanation.backward_nodes == len(graph.node)
    assert 0 < explanation.forward_nodes < explanation.backward_nodes


def test_every_trainable_parameter_has_a_connected_path_from_the_loss(explained):
    explainer, manifest, graph = explained
    explanation = explainer.explain()
    assert [p.name for p in explanation.parameters] == manifest.trainable
    assert len(explanation.parameters) == 52
    shapes = {p.name: p.shape for p in manifest.parameters}
    graph_outputs = {o.name for o in graph.output}
    for p in explanation.parameters:
        assert p.shape == shapes[p.name]
        assert p.gradient_tensor == p.name + "_grad"
        assert p.gradient_tensor + ".accumulation.out" in graph_outputs
        assert p.gradient_tensor in node_named(graph, p.gradient_node.name).output  # the real graph's node
        assert p.path[0] == explanation.loss_gradient and p.path[-1] == p.gradient_node
        assert p.ops_from_loss == len(p.path)
        for before, after in zip(p.path, p.path[1:]):
            assert set(before.outputs) & set(after.inputs), f"{p.name}: {before.name} does not feed {after.name}"


@pytest.mark.parametrize("name, block, sublayer", [
    ("cls_token", -1, "embedding"),
    ("pos_embedding", -1, "embedding"),
    ("to_patch_embedding.1.weight", -1, "embedding"),
    ("transformer.layers.0.0.norm.weight", 0, "attention.norm"),
    (QKV0, 0, "attention.qkv"),
    ("transformer.layers.2.0.fn.to_out.0.bias", 2, "attention.out"),
    ("transformer.layers.1.1.norm.bias", 1, "feedforward.norm"),
    ("transformer.layers.3.1.fn.net.3.weight", 3, "feedforward"),
    ("mlp_head.0.weight", -1, "head.norm"),
    ("mlp_head.1.bias", -1, "head"),
])
def test_block_and_sublayer(explained, name, block, sublayer):
    entry = explained[0].explain(name).parameters[0]
    assert (entry.block, entry.sublayer) == (block, sublayer)


def test_distance_from_the_loss(explained):
    entries = by_name(explained[0].explain())
    assert entries[QKV3].ops_from_loss < entries[QKV0].ops_from_loss
    closest = min(entries.values(), key=lambda p: p.ops_from_loss)
    assert closest.name == "mlp_head.1.weight"
    assert all(p.ops_from_loss > closest.ops_from_loss for p in entries.values() if p is not closest)


def test_qkv_parts_are_q_k_v_and_sum_into_the_projection_gradient(explained):
    explainer, manifest, graph = explained
    layout = next(a for a in manifest.qkv if a.name == QKV0)
    inner = layout.heads * layout.dim_head
    parts = explainer.explain(QKV0).parameters[0].qkv_parts
    assert [p.part for p in parts] == ["q", "k", "v"]
    assert len({p.gradient_node.name for p in parts}) == 3
    producer = {out: n for n in graph.node for out in n.output}
    consumers = lambda t: [n for n in graph.node if t in n.input]  # noqa: E731
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    (split,) = {producer[p.tensor].name: producer[p.tensor] for p in parts}.values()  # one Split (model/rewrite.py)
    assert split.op_type == "Split"
    projection_grad = split.input[0] + "_grad"  # the to_qkv MatMul output's gradient
    # Independent of the explainer's structural rule: q, k, v are the Split's pieces 0, 1, 2, each inner wide.
    assert [p.tensor for p in parts] == list(split.output)
    assert constants[split.input[1]].tolist() == [inner] * 3
    for p in parts:
        assert p.gradient_tensor == p.tensor + "_grad"
        assert p.gradient_tensor in node_named(graph, p.gradient_node.name).output
        (concat,) = consumers(p.gradient_tensor)  # the Split's gradient: the three pieces concatenated back
        assert concat.op_type == "Concat" and list(concat.input) == [q.gradient_tensor for q in parts]
        assert list(concat.output) == [projection_grad]
    entries = explainer.explain().parameters
    assert [p.name for p in entries if p.qkv_parts] == [a.name for a in manifest.qkv]


def test_unknown_parameter_is_not_found(explained):
    with pytest.raises(NotFound, match="'nope'.*52 trainable parameters"):
        explained[0].explain("nope")


def test_frozen_parameter_has_no_gradient(frozen_digits):
    explainer, manifest = explainer_for(frozen_digits)
    with pytest.raises(FailedPrecondition, match="'pos_embedding' is frozen"):
        explainer.explain("pos_embedding")
    names = [p.name for p in explainer.explain().parameters]
    assert "pos_embedding" not in names and names == manifest.trainable


def test_vit_pytorch_export_has_qkv_parts_in_both_blocks(tmp_path):
    kwargs = dict(image_size=16, patch_size=8, num_classes=3, dim=32, depth=2, heads=2, dim_head=8, mlp_dim=64)
    assert exporter.main(["--model", "vit_pytorch.vit:ViT", "--kwargs", json.dumps(kwargs), "--out", str(tmp_path)]) == 0
    explainer, manifest = explainer_for(tmp_path / "vit")
    entries = by_name(explainer.explain())
    assert [a.name for a in manifest.qkv] == [f"transformer.layers.{i}.0.fn.to_qkv.weight" for i in range(2)]
    for layout in manifest.qkv:
        entry = entries[layout.name]
        assert (entry.block, entry.sublayer) == (layout.block, "attention.qkv")
        assert [p.part for p in entry.qkv_parts] == ["q", "k", "v"]
        assert len({p.gradient_node.name for p in entry.qkv_parts}) == 3


def test_explain_module_does_not_import_torch():
    code = "import sys, engine.graph.explain; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0
