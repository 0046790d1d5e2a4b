"""model/gradgraph.py: loss, logits and every gradient from the exported ONNX graphs equal PyTorch autograd's.

Each model is exported once (module-scoped fixture) and run in onnxruntime's plain InferenceSession at batch
sizes 1 and 3; the oracle is PyTorch autograd on the same weights and batch (model/verify.py's train_mode).
"""
from __future__ import annotations

import copy
import time

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from model import decompositions, gradgraph
from model.errors import ExportError
from model.export import construct, load_class
from model.verify import train_mode
from model.vit import PRESETS, ViTConfig, build
from tests import layout_models as lm

pytestmark = pytest.mark.slow

TOL = 1e-5
BATCHES = (1, 3)


# ---------------------------------------------------------------- models

def hugging_face(attn_implementation: str) -> nn.Module:
    return construct(load_class("transformers:ViTForImageClassification"),
                     {**lm.HF_KWARGS, "attn_implementation": attn_implementation})


class ConvMix(nn.Module):
    """Strided, padded, dilated, grouped and transposed convolutions with biases, a frozen BatchNorm and an
    in-place ReLU (the graph is traced functionalized)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, stride=2, padding=2, dilation=2)  # 16 -> 7
        self.b = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.norm = nn.BatchNorm2d(8)
        self.up = nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1, groups=2)  # 7 -> 14
        self.line = nn.Conv1d(4, 6, 5, stride=3, padding=1, bias=False)
        self.head = nn.Linear(6, lm.CLASSES)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        x = torch.relu(self.norm(self.b(self.act(self.a(x)))))
        x = torch.relu(self.up(x)).flatten(2)  # (b, 4, 196)
        return self.head(self.line(x).mean(dim=2))


def randomize_batch_norms(model: nn.Module) -> nn.Module:
    """Running statistics and affine parameters away from their 0/1 defaults (a frozen BatchNorm must use them)."""
    generator = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
    return model


DIGITS = PRESETS["digits"]
SMALL = dict(image_size=lm.SIZE, patch_size=lm.PATCH, channels=3, num_classes=lm.CLASSES, dim=lm.DIM, depth=lm.DEPTH,
             heads=lm.HEADS, dim_head=lm.DIM_HEAD, mlp_dim=2 * lm.DIM, mean=(0.5,) * 3, std=(0.5,) * 3)

# name -> (builder, (channels, size), frozen parameter prefixes)
MODELS = {
    "digits": (lambda: build(DIGITS), (1, 8), ()),  # the seed layout (model/vit.py) at the default preset
    "vit-pytorch": (lm.vit_pytorch_vit, (3, lm.SIZE), ()),
    "vit-pytorch-simple": (lm.vit_pytorch_simple, (3, lm.SIZE), ()),
    "timm-frozen-patch-embedding": (lm.timm_vit, (3, lm.SIZE), ("patch_embed.",)),  # a frozen Conv2d
    "hugging-face-eager": (lambda: hugging_face("eager"), (3, lm.SIZE), ()),
    "hugging-face-sdpa": (lambda: hugging_face("sdpa"), (3, lm.SIZE), ()),
    "torch-mha": (lm.EncoderViT, (3, lm.SIZE), ()),
    "torch-mha-post-norm": (lm.PostNormEncoderViT, (3, lm.SIZE), ()),
    "resnet-batchnorm": (lambda: randomize_batch_norms(lm.SmallResNet()), (3, lm.SIZE), ()),
    "conv-mix": (lambda: randomize_batch_norms(ConvMix()), (3, lm.SIZE), ()),
}


class Exported:
    def __init__(self, name: str, tmp_path_factory):
        builder, (channels, size), frozen = MODELS[name]
        torch.manual_seed(0)
        self.model = builder()
        self.shape = (channels, size, size)
        self.trainable = [n for n, _ in self.model.named_parameters() if not n.startswith(frozen)]
        self.frozen = [n for n, _ in self.model.named_parameters() if n.startswith(frozen)]
        self.buffers = {n for n, _ in self.model.named_buffers() if not n.endswith("num_batches_tracked")}
        self.state = copy.deepcopy(self.model.state_dict())
        self.folder = tmp_path_factory.mktemp(name)
        started = time.perf_counter()
        gradgraph.export_gradient_graphs(self.model, torch.randn(2, *self.shape), self.trainable, self.folder)
        self.seconds = time.perf_counter() - started
        self.gradient = onnx.load(self.folder / gradgraph.GRADIENT_MODEL)
        self.forward = onnx.load(self.folder / gradgraph.FORWARD_MODEL)

    def session(self, file: str) -> onnxruntime.InferenceSession:
        return onnxruntime.InferenceSession(str(self.folder / file), providers=["CPUExecutionProvider"])

    def weights(self) -> dict[str, np.ndarray]:
        params = dict(self.model.named_parameters())
        return {n: params[n].detach().numpy() for n in self.trainable}


@pytest.fixture(scope="module", params=list(MODELS))
def exported(request, tmp_path_factory) -> Exported:
    return Exported(request.param, tmp_path_factory)


def batch(shape, b: int, seed: int = 0):
    rng = np.random.default_rng(seed + b)
    return rng.standard_normal((b, *shape), dtype=np.float32), rng.integers(0, lm.CLASSES, size=b, dtype=np.int64)


def torch_step(model: nn.Module, images: np.ndarray, labels: np.ndarray, trainable: list[str]):
    model.zero_grad(set_to_none=True)
    train_mode(model)
    logits = model(torch.from_numpy(images))
    logits = logits if isinstance(logits, torch.Tensor) else logits.logits
    loss = F.cross_entropy(logits, torch.from_numpy(labels))
    loss.backward()
    params = dict(model.named_parameters())
    grads = {n: params[n].grad.numpy().copy() if params[n].grad is not None else np.zeros(params[n].shape, np.float32)
             for n in trainable}
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), logits.detach().numpy(), grads


ZERO = 1e-8  # a gradient below this everywhere is zero up to float32 rounding, e.g. attention's key bias


def rel_err(got: np.ndarray, expected: np.ndarray) -> float:
    """max |got - expected| / max |expected|; absolute for a gradient that is zero (exactly or up to rounding)."""
    assert got.shape == expected.shape, (got.shape, expected.shape)
    scale = float(np.abs(expected).max(initial=0.0))
    diff = float(np.abs(got - expected).max(initial=0.0))
    return diff / scale if scale > ZERO else diff


# ---------------------------------------------------------------- the graphs' interface

def test_interface(exported):
    """Inputs images, labels, the trainable parameters by name; outputs loss, logits, <name>_grad; IR <= 10."""
    g, f = exported.gradient, exported.forward
    assert [i.name for i in g.graph.input] == ["images", "labels", *exported.trainable]
    assert [o.name for o in g.graph.output] == ["loss", "logits", *[n + "_grad" for n in exported.trainable]]
    assert [i.name for i in f.graph.input] == ["images", *exported.trainable]
    assert [o.name for o in f.graph.output] == ["logits"]
    for model in (g, f):
        assert model.ir_version <= 10
        assert all(o.domain in ("", "ai.onnx", "com.microsoft") for o in model.opset_import)
        assert all(o.version <= 21 for o in model.opset_import if o.domain in ("", "ai.onnx"))
        images = model.graph.input[0].type.tensor_type
        assert images.elem_type == onnx.TensorProto.FLOAT
        assert [d.dim_param or d.dim_value for d in images.shape.dim] == ["batch", *exported.shape]
        initializers = {i.name for i in model.graph.initializer}
        assert not initializers & set(exported.trainable)
        assert set(exported.frozen) <= initializers  # frozen parameters and buffers: constants, by name
        assert exported.buffers <= initializers
        assert all(n.metadata_props for n in model.graph.node[:5])  # torch.onnx's node metadata kept
    assert g.graph.input[1].type.tensor_type.elem_type == onnx.TensorProto.INT64
    params = dict(exported.model.named_parameters())
    for name, output in zip(exported.trainable, g.graph.output[2:]):
        assert [d.dim_value for d in output.type.tensor_type.shape.dim] == list(params[name].shape)
    assert not {o.name for o in g.graph.output} & {n + "_grad" for n in exported.frozen}


def test_gradients_equal_torch(exported):
    """loss, logits and EVERY gradient equal PyTorch autograd's at batches 1 and 3; forward logits equal eval's."""
    gradient = exported.session(gradgraph.GRADIENT_MODEL)
    forward = exported.session(gradgraph.FORWARD_MODEL)
    model = exported.model
    weights = exported.weights()
    worst = 0.0
    for b in BATCHES:
        images, labels = batch(exported.shape, b)
        loss, logits, grads = torch_step(model, images, labels, exported.trainable)
        got = gradient.run(None, {"images": images, "labels": labels, **weights})
        assert abs(float(got[0]) - loss) <= TOL * abs(loss), (b, float(got[0]), loss)
        assert rel_err(got[1], logits) <= TOL, b
        for name, g in zip(exported.trainable, got[2:]):
            err = rel_err(g, grads[name])
            worst = max(worst, err)
            assert err <= TOL, f"batch {b}: gradient of {name}: max rel err {err:.3g}"
        model.eval()
        with torch.no_grad():
            expected = model(torch.from_numpy(images))
        expected = (expected if isinstance(expected, torch.Tensor) else expected.logits).numpy()
        assert rel_err(forward.run(None, {"images": images, **weights})[0], expected) <= TOL, b
    print(f"\n{exported.folder.name}: export {exported.seconds:.1f}s, gradient graph "
          f"{len(exported.gradient.graph.node)} nodes, forward graph {len(exported.forward.graph.node)} nodes, "
          f"max grad rel err {worst:.2g}")


def test_export_leaves_the_weights_alone(exported):
    state = exported.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in exported.state.items())


# ---------------------------------------------------------------- dropout

def test_dropout_graph_loads_and_runs(tmp_path):
    """Dropout in training mode becomes random ops that load and run (the parity tests above are dropout-free)."""
    torch.manual_seed(0)
    config = ViTConfig(**{**SMALL, "depth": 1, "dim": 16, "heads": 2, "mlp_dim": 16, "dropout": 0.3,
                          "emb_dropout": 0.3})
    model = build(config)
    assert any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())
    trainable = [n for n, _ in model.named_parameters()]
    gradgraph.export_gradient_graphs(model, torch.randn(2, 3, lm.SIZE, lm.SIZE), trainable, tmp_path / "dropout")
    random_ops = {"Dropout", "RandomUniform", "RandomUniformLike", "RandomNormal", "RandomNormalLike", "Bernoulli"}
    ops = {f: {n.op_type for n in onnx.load(tmp_path / "dropout" / f).graph.node}
           for f in (gradgraph.GRADIENT_MODEL, gradgraph.FORWARD_MODEL)}
    assert ops[gradgraph.GRADIENT_MODEL] & random_ops
    assert not ops[gradgraph.FORWARD_MODEL] & random_ops
    session = onnxruntime.InferenceSession(str(tmp_path / "dropout" / gradgraph.GRADIENT_MODEL),
                                           providers=["CPUExecutionProvider"])
    params = dict(model.named_parameters())
    weights = {n: params[n].detach().numpy() for n in trainable}
    images, labels = batch((3, lm.SIZE, lm.SIZE), 3)
    first, second = (session.run(None, {"images": images, "labels": labels, **weights}) for _ in range(2))
    assert all(np.isfinite(o).all() for o in first)
    assert not np.array_equal(first[1], second[1])  # dropout draws new masks per run
    forward = onnxruntime.InferenceSession(str(tmp_path / "dropout" / gradgraph.FORWARD_MODEL),
                                           providers=["CPUExecutionProvider"])
    model.eval()
    with torch.no_grad():
        expected = model(torch.from_numpy(images)).numpy()
    assert rel_err(forward.run(None, {"images": images, **weights})[0], expected) <= TOL  # eval: dropout off


# ---------------------------------------------------------------- outputs that are not plain computed values

class SharedGradients(nn.Module):
    """b1 and b2 get the same gradient (one value for two outputs), `unused` none (a constant zero output)."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(3 * 4 * 4, lm.CLASSES)
        self.b1 = nn.Parameter(torch.randn(lm.CLASSES))
        self.b2 = nn.Parameter(torch.randn(lm.CLASSES))
        self.unused = nn.Parameter(torch.randn(2, 2))

    def forward(self, x):
        return self.head(x.flatten(1)) + (self.b1 + self.b2)  # AddBackward hands one tensor to both


def test_shared_and_unused_gradients_get_their_own_outputs(tmp_path):
    torch.manual_seed(0)
    model = SharedGradients()
    trainable = ["b1", "unused", "b2", "head.weight"]
    gradgraph.export_gradient_graphs(model, torch.randn(2, 3, 4, 4), trainable, tmp_path)
    graph = onnx.load(tmp_path / gradgraph.GRADIENT_MODEL)
    assert [o.name for o in graph.graph.output] == ["loss", "logits", *[n + "_grad" for n in trainable]]
    session = onnxruntime.InferenceSession(str(tmp_path / gradgraph.GRADIENT_MODEL), providers=["CPUExecutionProvider"])
    params = dict(model.named_parameters())
    images, labels = batch((3, 4, 4), 3)
    got = session.run(None, {"images": images, "labels": labels, **{n: params[n].detach().numpy() for n in trainable}})
    _, _, grads = torch_step(model, images, labels, trainable)
    for name, g in zip(trainable, got[2:]):
        assert rel_err(g, grads[name]) <= TOL, name
    assert not got[3].any()  # `unused`


class FixedBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(3 * 4 * 4, lm.CLASSES)

    def forward(self, x):
        return self.head(x.reshape(2, -1))  # only works for a batch of 2


def test_a_forward_that_fixes_the_batch_size_is_an_export_error(tmp_path):
    with pytest.raises(ExportError, match="fixes the batch size to 2"):
        gradgraph.export_gradient_graphs(FixedBatch(), torch.randn(2, 3, 4, 4), ["head.weight", "head.bias"], tmp_path)


# ---------------------------------------------------------------- convolution_backward as convolutions

@st.composite
def conv_configs(draw):
    spatial = draw(st.sampled_from([1, 2, 3]))
    transposed = draw(st.booleans())
    groups = draw(st.sampled_from([1, 2, 3]))
    stride = draw(st.lists(st.integers(1, 3), min_size=spatial, max_size=spatial))
    dilation = draw(st.lists(st.integers(1, 2), min_size=spatial, max_size=spatial))
    kernel = draw(st.lists(st.integers(1, 3), min_size=spatial, max_size=spatial))
    padding = [draw(st.integers(0, (d * (k - 1)) // 2 + (0 if transposed else 1))) for k, d in zip(kernel, dilation)]
    output_padding = [draw(st.integers(0, max(s, d) - 1)) if transposed else 0 for s, d in zip(stride, dilation)]
    size = [draw(st.integers(d * (k - 1) + 1, 7)) for k, d in zip(kernel, dilation)]
    c_in, c_out = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    return dict(spatial=spatial, transposed=transposed, groups=groups, stride=stride, dilation=dilation,
                kernel=kernel, padding=padding, output_padding=output_padding, size=size, c_in=c_in, c_out=c_out,
                batch=draw(st.integers(1, 3)), bias=draw(st.booleans()))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_configs())
def test_convolution_backward_decomposition_equals_torch(c):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(c["batch"], c["c_in"], *c["size"], generator=generator, dtype=torch.float64)
    if c["transposed"]:
        weight_shape = (c["c_in"], c["c_out"] // c["groups"])
    else:
        weight_shape = (c["c_out"], c["c_in"] // c["groups"])
    w = torch.randn(*weight_shape, *c["kernel"], generator=generator, dtype=torch.float64)
    args = (c["stride"], c["padding"], c["dilation"], c["transposed"], c["output_padding"], c["groups"])
    y = torch.ops.aten.convolution(x, w, None, *args)
    grad_y = torch.randn(y.shape, generator=generator, dtype=torch.float64)
    mask = [True, True, c["bias"]]
    bias_sizes = [c["c_out"]] if c["bias"] else None
    expected = torch.ops.aten.convolution_backward(grad_y, x, w, bias_sizes, *args, mask)
    got = decompositions.convolution_backward(grad_y, x, w, bias_sizes, *args, mask)
    for e, g in zip(expected, got):
        if e is None:
            assert g is None
        else:
            assert g.shape == e.shape
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- the safe softmax of F.scaled_dot_product_attention

@pytest.mark.parametrize("dim", [-1, 1])
def test_safe_softmax_decomposition_equals_torch_on_masked_and_nan_rows(dim):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 7, generator=generator)
    x[0, 1, :] = float("-inf")  # a fully masked row (dim -1): zeros, not NaN
    x[0, :, 2] = float("-inf")  # a fully masked column (dim 1)
    x[1, 2, :3] = float("-inf")  # partly masked
    x[1, 3, 4] = float("nan")  # NaN rows stay NaN
    x[1, 4, :] = float("-inf")
    x[1, 4, 5] = float("nan")  # -inf and a NaN: not masked, NaN
    expected = torch.ops.aten._safe_softmax(x, dim)
    got = decompositions.safe_softmax(x, dim)
    assert torch.isnan(expected).any() and (expected == 0).any()
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(torch.isnan(got), torch.isnan(expected))


def test_sdpa_models_attention_softmax_costs_no_full_size_where(tmp_path):
    """F.scaled_dot_product_attention (Hugging Face's sdpa here) traces to aten._safe_softmax: its masked-row check
    is one reduction per row and two broadcast elementwise ops, no full-size Equal, Where or zeros."""
    torch.manual_seed(0)
    model = hugging_face("sdpa")
    shape = (3, lm.SIZE, lm.SIZE)
    trainable = [n for n, _ in model.named_parameters()]
    gradgraph.export_gradient_graphs(model, torch.randn(2, *shape), trainable, tmp_path)
    proto = onnx.shape_inference.infer_shapes(onnx.load(tmp_path / gradgraph.GRADIENT_MODEL))
    dims = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
            for v in (*proto.graph.value_info, *proto.graph.input)}

    def full_size(name: str) -> bool:  # (batch, heads, tokens, tokens), not one value per row (..., 1)
        return len(dims.get(name, [])) == 4 and dims[name][-1] != 1
    softmaxes = [n for n in proto.graph.node if n.op_type == "Softmax"]
    assert len(softmaxes) == lm.DEPTH
    row_checks = [n for n in proto.graph.node if n.op_type == "ReduceMax"]
    assert len(row_checks) == lm.DEPTH
    for node in proto.graph.node:  # nothing of the attention probabilities' size is compared, selected or made
        if node.op_type in ("Where", "Equal", "ReduceMin", "Expand", "ConstantOfShape"):
            assert not any(full_size(t) for t in (*node.input, *node.output)), node
    units = {dict((p.key, p.value) for p in n.metadata_props).get("vitserve.unit") for n in softmaxes}
    assert len(units) == lm.DEPTH and None not in units  # ExplainGradients sees one softmax op per block
    session = onnxruntime.InferenceSession(str(tmp_path / gradgraph.GRADIENT_MODEL), providers=["CPUExecutionProvider"])
    images, labels = batch(shape, 3)
    feeds = {"images": images, "labels": labels,
             **{n: p.detach().numpy() for n, p in model.named_parameters()}}
    loss = session.run(["loss"], feeds)[0]
    expected, _, _ = torch_step(model, images, labels, trainable)
    assert abs(float(loss) - expected) <= TOL * abs(expected)


# ---------------------------------------------------------------- errors

class ReplicationPadded(nn.Module):
    """nn.ReplicationPad2d: its forward translates to ONNX, its backward (aten.replication_pad2d_backward) does not."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.pad = nn.ReplicationPad2d(1)
        self.head = nn.Linear(4 * lm.SIZE * lm.SIZE, lm.CLASSES)

    def forward(self, x):
        return self.head(self.pad(self.conv(x)).flatten(1))


def test_untranslatable_backward_is_one_line_export_error(tmp_path):
    with pytest.raises(ExportError) as raised:
        gradgraph.export_gradient_graphs(ReplicationPadded(), torch.randn(2, 3, lm.SIZE, lm.SIZE),
                                         ["conv.weight", "conv.bias", "head.weight", "head.bias"], tmp_path)
    message = str(raised.value)
    assert "\n" not in message
    assert message == ("torch.onnx cannot translate aten.replication_pad2d_backward.default "
                       "(needed by the backward of pad (ReplicationPad2d))"), message
    assert raised.value.__cause__ is None
    assert not (tmp_path / gradgraph.GRADIENT_MODEL).exists()


def test_bad_trainable_names_are_export_errors(tmp_path):
    with pytest.raises(ExportError, match="not parameters"):
        gradgraph.export_gradient_graphs(build(DIGITS), torch.randn(2, 1, 8, 8), ["nope"], tmp_path)
