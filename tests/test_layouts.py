"""The gradient window for every ViT family: placement, q/k/v gradients of weights and biases, and their graph nodes.

Each model comes from its real package (tests/layout_models.py), randomly initialised, and is exported and
served for real. The oracle is PyTorch autograd on the same weights and batch, sliced by hand into q, k, v
and heads.
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.manifest import Manifest
from model import verify
from proto import vitserve_pb2 as pb
from tests.helpers import TRAINERS, images_msg, tensor
from tests.layout_models import CLASSES, DEPTH, DIM_HEAD, HEADS, HF_KWARGS, LAYOUTS, SIZE, SmallResNet, export

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SUBLAYERS = {"attention.qkv", "attention.q", "attention.k", "attention.v", "attention.out", "attention.norm",
             "feedforward", "feedforward.norm", "embedding", "head", "head.norm"}
RTOL = 1e-4


@dataclass
class Exported:
    name: str
    folder: Path
    model: torch.nn.Module  # holds the exported weights
    fused: bool
    biases: bool


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout(request, layout_exports) -> Exported:
    builder, fused, biases = LAYOUTS[request.param]
    folder, state = layout_exports(request.param)
    model = builder()
    model.load_state_dict(state)
    return Exported(request.param, folder, model, fused, biases)


def labelled_batch(n: int = 6, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 3, SIZE, SIZE), dtype=np.float32), rng.integers(0, CLASSES, n, dtype=np.int64)


def hand_sliced(entry: pb.QkvGradient, grads: dict[str, np.ndarray], names) -> tuple[list, list]:
    """(q, k, v norms, their per-head norms) of PyTorch's gradients, cut by hand."""
    inner = entry.heads * entry.dim_head
    if len(set(names)) == 1:
        whole = grads[names[0]]
        parts = [whole[i * inner:(i + 1) * inner] for i in range(3)]
    else:
        parts = [grads[n] for n in names]
    norms = [float(np.linalg.norm(p)) for p in parts]
    heads = [[float(np.linalg.norm(p[h * entry.dim_head:(h + 1) * entry.dim_head])) for h in range(entry.heads)]
             for p in parts]
    return norms, heads


def test_every_parameter_is_placed_from_the_structure(layout):
    manifest = Manifest.load(layout.folder)
    assert manifest.unplaced == ()
    assert [(a.block, a.heads, a.dim_head, a.fused) for a in manifest.attention] == \
        [(b, HEADS, DIM_HEAD, layout.fused) for b in range(DEPTH)]
    names = {p.name for p in manifest.parameters}
    for a in manifest.attention:
        assert set(a.weights) <= names and set(a.biases) <= names and bool(a.biases) == layout.biases
    places = {p.name: (p.block, p.sublayer) for p in manifest.parameters}
    assert {s for _, s in places.values()} <= SUBLAYERS
    for a in manifest.attention:
        for role, weight in zip("qkv", a.weights):
            assert places[weight] == (a.block, "attention.qkv" if layout.fused else f"attention.{role}")
    for block in range(DEPTH):  # each block has its norms, output projection and feed-forward
        in_block = {s for b, s in places.values() if b == block}
        assert {"attention.norm", "attention.out", "feedforward", "feedforward.norm"} <= in_block, (block, in_block)
    outside = {s for b, s in places.values() if b == -1}
    assert "embedding" in outside and "head" in outside and outside <= {"embedding", "head", "head.norm"}


def test_train_step_qkv_norms_of_weights_and_biases_equal_pytorch(layout, serve):
    server = serve(artifacts=layout.folder)
    images, labels = labelled_batch()
    response = server.stub.TrainStep(pb.TrainStepRequest(images=images_msg(images), labels=tensor(labels)))
    trainable = [n for n, _ in layout.model.named_parameters()]
    loss, grads = verify.torch_gradients(layout.model, images, labels, trainable)
    assert response.loss == pytest.approx(loss, rel=RTOL)
    assert len(response.attention) == DEPTH
    for entry in response.attention:
        assert entry.block in range(DEPTH) and (entry.heads, entry.dim_head) == (HEADS, DIM_HEAD)
        norms, heads = hand_sliced(entry, grads, list(entry.weights))
        np.testing.assert_allclose([entry.q_norm, entry.k_norm, entry.v_norm], norms, rtol=RTOL)
        np.testing.assert_allclose([entry.q_head_norms, entry.k_head_norms, entry.v_head_norms], heads, rtol=RTOL)
        if layout.biases:  # the k bias gets a zero gradient in exact arithmetic (softmax ignores a shift): ~1e-11 here
            norms, heads = hand_sliced(entry, grads, list(entry.biases))
            atol = 1e-6 * max(norms)
            np.testing.assert_allclose([entry.q_bias_norm, entry.k_bias_norm, entry.v_bias_norm], norms, rtol=RTOL,
                                       atol=atol)
            np.testing.assert_allclose([entry.q_bias_head_norms, entry.k_bias_head_norms, entry.v_bias_head_norms],
                                       heads, rtol=RTOL, atol=atol)
        else:
            assert list(entry.biases) == [] and entry.q_bias_norm == entry.k_bias_norm == entry.v_bias_norm == 0.0
    manifest = {p.name: (p.block, p.sublayer) for p in Manifest.load(layout.folder).parameters}
    assert {g.name: (g.block, g.sublayer) for g in response.gradients} == manifest


@pytest.mark.parametrize("trainer", TRAINERS)  # each explains the graph it trains on
def test_explain_finds_the_q_k_v_gradient_nodes_of_every_weight_and_bias(layout, serve, trainer):
    server = serve(artifacts=layout.folder)
    explained = server.stub.ExplainGradients(pb.ExplainGradientsRequest())
    manifest = Manifest.load(layout.folder)
    # ort-training: ORT's loss op; ort: the decomposed cross-entropy's last op, named after the loss
    assert (explained.loss.op_type, explained.loss.name) == (
        ("SoftmaxCrossEntropyLoss", manifest.loss.name) if trainer == "ort-training" else ("Div", "loss/Div"))
    paths = {p.name: p for p in explained.parameters}
    assert {n: (p.block, p.sublayer) for n, p in paths.items()} == \
        {p.name: (p.block, p.sublayer) for p in manifest.parameters}
    for a in manifest.attention:
        for role, name in zip("qkv", a.weights + a.biases if a.biases else a.weights + ("",) * 3):
            if not name:
                continue
            parts = paths[name].qkv_parts
            assert [p.part for p in parts] == (["q", "k", "v"] if layout.fused else [role]), name
            for part in parts:  # ORT's gradient builder names a gradient <tensor>_grad; the tracer does not
                assert part.gradient_node.name and part.gradient_tensor in part.gradient_node.outputs
                assert trainer == "ort" or part.gradient_tensor == part.tensor + "_grad"
                assert trainer == "ort-training" or part.gradient_node.name.startswith("backward/")
            assert paths[name].path[0].name == explained.loss_gradient.name  # the path starts at the loss gradient
    info = server.stub.GetModelInfo(pb.GetModelInfoRequest())
    assert [(m.module, m.block, list(m.weights)) for m in info.attention] == \
        [(a.module, a.block, list(a.weights)) for a in manifest.attention]
    assert list(info.unplaced) == []


def test_a_batchnorm_cnn_trains_on_frozen_statistics_and_matches_pytorch(tmp_path, serve):
    torch.manual_seed(0)
    model = SmallResNet()
    with torch.no_grad():  # running statistics that are not the initial 0 / 1
        model.train()
        model(torch.randn(32, 3, SIZE, SIZE) * 2 + 1)
    state = copy.deepcopy(model.state_dict())
    folder = export(model, "resnet", tmp_path)
    model.load_state_dict(state)
    manifest = Manifest.load(folder)
    assert manifest.frozen_batchnorm == ("stem.1", "block.1", "block.4")
    assert manifest.attention == () and {u.reason for u in manifest.unplaced} == \
        {"no attention blocks were found in the model"}
    assert manifest.export_check["grad_max_rel_err"] < verify.GRAD_TOL

    server = serve(artifacts=folder)
    images, labels = labelled_batch()
    response = server.stub.TrainStep(pb.TrainStepRequest(images=images_msg(images), labels=tensor(labels)))
    loss, grads = verify.torch_gradients(model, images, labels, [n for n, _ in model.named_parameters()])
    assert response.loss == pytest.approx(loss, rel=RTOL)
    for g in response.gradients:
        assert g.l2_norm == pytest.approx(float(np.linalg.norm(grads[g.name])), rel=1e-3)
    info = server.stub.GetModelInfo(pb.GetModelInfoRequest())
    assert len(info.unplaced) == len(manifest.parameters)
    with torch.no_grad():  # the running statistics did not move in training, as in PyTorch's eval-mode norms
        assert torch.equal(model.stem[1].running_mean, state["stem.1.running_mean"])


def run_export(*args: str, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "model.export", *args, "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_a_model_the_exporter_cannot_trace_is_one_export_failed_line(tmp_path):
    result = run_export("--model", "tests.layout_models:Unexportable", "--image-size", str(SIZE), out=tmp_path)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("EXPORT FAILED: torch.onnx.export cannot export Unexportable: ")
    assert "Traceback" not in result.stderr and not list(tmp_path.glob("unexportable"))


def test_hugging_face_vit_exports_from_the_command_line(tmp_path):
    result = run_export("--model", "transformers:ViTForImageClassification", "--kwargs", json.dumps(HF_KWARGS),
                        out=tmp_path)
    assert result.returncode == 0, result.stderr
    manifest = Manifest.load(tmp_path / "vitforimageclassification")
    assert manifest.input_shape == (-1, 3, SIZE, SIZE) and manifest.num_classes == CLASSES
    assert [a.weights for a in manifest.attention] == [
        tuple(f"vit.layers.{b}.attention.{p}_proj.weight" for p in "qkv") for b in range(DEPTH)]
    assert manifest.unplaced == ()


# ---------------------------------------------------------------- head importance

OUT_PROJECTIONS = {"seed": "to_out", "vit-pytorch": "to_out", "vit-pytorch-simple": "to_out", "timm": "proj",
                   "hugging-face": "o_proj"}  # the module that merges the heads; nn.MultiheadAttention: GatedMHA


class GatedMHA(torch.nn.Module):
    """nn.MultiheadAttention's math written out, with a gate on each head's output (the oracle for torch-mha)."""

    def __init__(self, mha: torch.nn.MultiheadAttention, gate: torch.Tensor):
        super().__init__()
        self.mha, self.gate = mha, gate
        self.batch_first = mha.batch_first  # read by nn.TransformerEncoderLayer

    def forward(self, query, key, value, **kwargs):
        m, (b, n, e) = self.mha, query.shape
        q, k, v = torch.nn.functional.linear(query, m.in_proj_weight, m.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, n, m.num_heads, m.head_dim).transpose(1, 2) for t in (q, k, v))  # (b, h, n, d)
        heads = torch.softmax(q @ k.transpose(-1, -2) / m.head_dim ** 0.5, dim=-1) @ v
        heads = heads * self.gate.view(1, -1, 1, 1)
        return m.out_proj(heads.transpose(1, 2).reshape(b, n, e)), None


def gated_importance(layout: Exported, images: np.ndarray, labels: np.ndarray) -> list[np.ndarray]:
    """|dL/d xi| for gates xi = 1 multiplying each head's output, put in by hooks (or GatedMHA), in PyTorch."""
    model = copy.deepcopy(layout.model)
    manifest = Manifest.load(layout.folder)
    gates, handles = [], []
    for a in manifest.attention:
        gate = torch.ones(a.heads, requires_grad=True)
        gates.append(gate)
        module = model.get_submodule(a.module)
        if isinstance(module, torch.nn.MultiheadAttention):
            parent, _, child = a.module.rpartition(".")
            setattr(model.get_submodule(parent), child, GatedMHA(module, gate))
            continue

        def gate_heads(_, inputs, gate=gate, heads=a.heads):  # (b, n, h * d) -> each head's slice times its gate
            x = inputs[0]
            return (x.unflatten(-1, (heads, -1)) * gate.view(heads, 1)).flatten(-2),

        handles.append(model.get_submodule(f"{a.module}.{OUT_PROJECTIONS[layout.name]}")
                       .register_forward_pre_hook(gate_heads))
    verify.train_mode(model)
    loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(images)), torch.from_numpy(labels))
    loss.backward()
    return [g.grad.abs().numpy() for g in gates]


@pytest.mark.parametrize("trainer", TRAINERS)  # ort-training: its head outputs; ort: the output projection's gradient
def test_head_importance_equals_pytorch_with_gates_on_the_heads(layout, serve, trainer):
    server = serve(artifacts=layout.folder)
    images, labels = labelled_batch()
    response = server.stub.HeadImportance(pb.HeadImportanceRequest(images=images_msg(images), labels=tensor(labels)))
    expected = gated_importance(layout, images, labels)
    assert [h.block for h in response.heads] == list(range(DEPTH)) and response.step == 0
    for got, want in zip(response.heads, expected):
        np.testing.assert_allclose(got.importance, want, rtol=1e-5, atol=1e-5 * float(want.max()))
    assert server.engine.step == 0  # nothing changed


def test_head_importance_in_a_train_step_changes_nothing_else(layout, serve):
    """The same step with and without head importance: same loss, gradients and weights after; no gate anywhere."""
    images, labels = labelled_batch()
    plain, gated = serve(artifacts=layout.folder), serve(artifacts=layout.folder)
    request = pb.TrainStepRequest(images=images_msg(images), labels=tensor(labels))
    a = plain.stub.TrainStep(request)
    request.head_importance = True
    b = gated.stub.TrainStep(request)
    assert a.head_importance == [] and len(b.head_importance) == DEPTH
    assert b.loss == a.loss and [g.l2_norm for g in b.gradients] == [g.l2_norm for g in a.gradients]
    after_a, after_b = plain.engine.parameters(), gated.engine.parameters()
    assert set(after_b) == {p.name for p in Manifest.load(layout.folder).parameters}  # no gate among the weights
    assert all(np.array_equal(after_a[n], after_b[n]) for n in after_a)
    expected = gated_importance(layout, images, labels)  # the step's importance is that of the weights before it
    for got, want in zip(b.head_importance, expected):
        np.testing.assert_allclose(got.importance, want, rtol=1e-5, atol=1e-5 * float(want.max()))
