"""Attribution maps (model/attribution.py, engine/graph/attribution.py) against PyTorch, layout by layout.

The oracle reads A_l in PyTorch eager with hooks on the module that produces the attention probabilities (the
softmax module, timm's attn_drop with its fused attention off, Hugging Face's eager attention weights,
nn.MultiheadAttention's weights with need_weights) and their gradients with retain_grad, on the same weights and
images, and computes rollout, Chefer's relevance and input x gradient with torch, loop by loop as the papers' code.
"""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from engine.errors import FailedPrecondition, InvalidArgument
from engine.graph import attribution as maps
from engine.graph.attribution import AttributionEngine
from engine.manifest import ATTRIBUTION_MODEL, WEIGHTS, LossNode, Manifest, Preprocessing, TensorSpec, sha256
from engine.train.graph_backend import write_initial_weights
from model.attribution import write_attribution_graph
from model.export import construct, load_class
from model.layout import place
from tests import layout_models as lm

pytestmark = pytest.mark.slow

TOL = 1e-5
CLS = dict(pooling="cls", readout=(0, 1), cls_token=0, patch_tokens=1, extra_tokens=(0,))


def hugging_face(attn_implementation: str) -> nn.Module:
    return construct(load_class("transformers:ViTForImageClassification"),
                     {**lm.HF_KWARGS, "attn_implementation": attn_implementation})


# name -> (builder, the record's expected readout fields)
MODELS = {
    "seed": (lm.seed, CLS),
    "vit-pytorch": (lm.vit_pytorch_vit, CLS),
    "vit-pytorch-simple": (lm.vit_pytorch_simple,
                           dict(pooling="mean", readout=(0, 16), cls_token=-1, patch_tokens=0, extra_tokens=())),
    "timm-fused": (lm.timm_vit, CLS),
    "hugging-face-eager": (lambda: hugging_face("eager"), CLS),
    "hugging-face-sdpa": (lambda: hugging_face("sdpa"), CLS),
    "torch-mha": (lm.EncoderViT, CLS),
    "torch-mha-post-norm": (lm.PostNormEncoderViT, CLS),
    "resnet": (lm.SmallResNet, dict(pooling="", readout=(0, 0), cls_token=-1, patch_tokens=0, extra_tokens=())),
}


def manifest_for(model: nn.Module, folder, name: str, channels: int = 3, size: int = lm.SIZE) -> Manifest:
    """attribution_model.onnx and weights.safetensors of `model` in `folder`, and a manifest naming them."""
    trainable = [n for n, _ in model.named_parameters()]
    # The attention layouts depend on the structure alone; an empty graph only leaves the parameters unplaced.
    placement = place(model, onnx.GraphProto(), set(trainable))
    record = write_attribution_graph(model, torch.randn(2, channels, size, size), trainable, folder,
                                     placement.attention)
    params = dict(model.named_parameters())
    write_initial_weights(folder / WEIGHTS, {n: params[n].detach().numpy() for n in trainable})
    return Manifest(
        name=name, source={}, input=TensorSpec("images", (-1, channels, size, size)),
        output=TensorSpec("logits", (-1, lm.CLASSES)),
        preprocessing=Preprocessing(size, size, channels, (0.5,) * channels, (0.5,) * channels),
        class_names=tuple(f"c{i}" for i in range(lm.CLASSES)), parameters=placement.parameters,
        attention=placement.attention, inference_fused_attention_blocks=0, loss=LossNode("", "", (), ""), opset=18,
        optimizer={}, versions={}, files={ATTRIBUTION_MODEL: sha256(folder / ATTRIBUTION_MODEL)},
        attribution=record, folder=folder)


class Case:
    def __init__(self, name: str, tmp_path_factory):
        builder, self.expected = MODELS[name]
        torch.manual_seed(0)
        self.name, self.model = name, builder()
        self.manifest = manifest_for(self.model, tmp_path_factory.mktemp(name), name)
        self.engine = AttributionEngine(self.manifest)


_CASES: dict[str, Case] = {}  # each model's graph is built once for the whole file


def built(name: str, tmp_path_factory) -> Case:
    if name not in _CASES:
        _CASES[name] = Case(name, tmp_path_factory)
    return _CASES[name]


@pytest.fixture(scope="module", params=list(MODELS))
def case(request, tmp_path_factory) -> Case:
    return built(request.param, tmp_path_factory)


def images(b: int = 3, seed: int = 0, shape=(3, lm.SIZE, lm.SIZE)) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((b, *shape), dtype=np.float32)


def rel_err(got, expected) -> float:
    expected = np.asarray(expected, np.float64)
    scale = float(np.abs(expected).max(initial=0.0))
    return float(np.abs(np.asarray(got, np.float64) - expected).max(initial=0.0)) / (scale if scale > 1e-12 else 1.0)


# ---------------------------------------------------------------- the oracle

def oracle_model(name: str, model: nn.Module) -> nn.Module:
    """A copy of `model` whose attention computes its probabilities as a tensor a hook can read."""
    if name == "hugging-face-sdpa":
        eager = hugging_face("eager")
        eager.load_state_dict(model.state_dict())
        return eager
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if hasattr(m, "fused_attn"):  # timm
            m.fused_attn = False
    return twin.eval()


def hook_probabilities(name: str, model: nn.Module, found: list) -> list:
    """Forward hooks appending each block's attention probabilities (retain_grad) to `found`, in block order."""
    hooks = []

    def keep(tensor):
        tensor.retain_grad()
        found.append(tensor)

    for m in model.modules():
        if name in ("seed", "vit-pytorch", "vit-pytorch-simple") and isinstance(m, nn.Softmax):
            hooks.append(m.register_forward_hook(lambda _m, _i, out: keep(out)))
        elif name == "timm-fused" and type(m).__name__ == "Attention":  # the softmax goes through attn_drop
            hooks.append(m.attn_drop.register_forward_hook(lambda _m, _i, out: keep(out)))
        elif name.startswith("hugging-face") and type(m).__name__ == "ViTAttention":
            hooks.append(m.register_forward_hook(lambda _m, _i, out: keep(out[1])))
        elif name.startswith("torch-mha") and isinstance(m, nn.MultiheadAttention):
            def weights_on(_m, args, kwargs):
                return args, {**kwargs, "need_weights": True, "average_attn_weights": False}

            def read(_m, _i, out):
                assert out[1]._base is not None  # the (batch * heads, n, n) softmax the module multiplies v with
                keep(out[1]._base)

            hooks.append(m.register_forward_pre_hook(weights_on, with_kwargs=True))
            hooks.append(m.register_forward_hook(read))
    return hooks


def torch_outputs(name: str, model: nn.Module, x: np.ndarray, target: np.ndarray):
    """(logits, [A_l], [dA_l], dx) from PyTorch eager."""
    twin = oracle_model(name, model)
    found: list = []
    hooks = hook_probabilities(name, twin, found)
    try:
        images_t = torch.from_numpy(x).requires_grad_(True)
        out = twin(images_t)
        logits = out if isinstance(out, torch.Tensor) else out.logits
        logits[torch.arange(len(target)), torch.from_numpy(target)].sum().backward()
    finally:
        for h in hooks:
            h.remove()
    shape = (len(x), lm.HEADS, found[0].shape[-1], found[0].shape[-1]) if found else ()
    return (logits.detach().numpy(), [a.detach().double().reshape(shape) for a in found],
            [a.grad.double().reshape(shape) for a in found], images_t.grad.double(), torch.from_numpy(x).double())


def read(matrix: torch.Tensor, record) -> np.ndarray:
    """(b, n, n) -> the readout rows' mean over the patch tokens, on the grid."""
    (s, e), p, (gh, gw) = record.readout, record.patch_tokens, record.grid
    return matrix[:, s:e].mean(dim=1)[:, p:p + gh * gw].reshape(-1, gh, gw).numpy()


def torch_rollout(attentions, record, replace: tuple[int, int] | None = None) -> np.ndarray:
    """jacobgil/vit-explain's rollout; `replace` (block, head): that block uses that head alone."""
    n = attentions[0].shape[-1]
    eye = torch.eye(n, dtype=torch.float64)
    result = eye.expand(attentions[0].shape[0], n, n)
    for layer, a in enumerate(attentions):
        fused = a[:, replace[1]] if replace and replace[0] == layer else a.mean(dim=1)
        a = 0.5 * fused + 0.5 * eye
        result = (a / a.sum(dim=-1, keepdim=True)) @ result
    return read(result, record)


def torch_chefer(attentions, grads, record) -> tuple[np.ndarray, list[np.ndarray]]:
    """Chefer et al.'s generate_relevance; and each block's per-head terms cam_h @ R_{l-1}, read."""
    n = attentions[0].shape[-1]
    relevance = torch.eye(n, dtype=torch.float64).expand(attentions[0].shape[0], n, n)
    terms = []
    for a, g in zip(attentions, grads):
        cam = (g * a).clamp(min=0)
        terms.append(np.stack([read(cam[:, h] @ relevance, record) for h in range(a.shape[1])], axis=1))
        relevance = relevance + cam.mean(dim=1) @ relevance
    return read(relevance, record), terms


def torch_gradxinput(x, dx, record) -> np.ndarray:
    (gh, gw), (ph, pw) = record.grid, record.patch
    return (x * dx).abs().sum(dim=1).reshape(-1, gh, ph, gw, pw).sum(dim=(2, 4)).numpy()


# ---------------------------------------------------------------- every layout

def test_record_says_how_the_maps_are_read(case):
    record = case.manifest.attribution
    assert {f: getattr(record, f) for f in case.expected} == case.expected
    if case.name == "resnet":
        assert (record.blocks, record.grid, record.patch) == (0, (8, 8), (2, 2))
        assert record.reason == "the model has no attention modules"
    else:
        assert (record.blocks, record.heads, record.grid, record.patch, record.reason) == \
            (lm.DEPTH, (lm.HEADS,) * lm.DEPTH, (4, 4), (4, 4), "")
        assert record.tokens == 16 + len(record.extra_tokens)


def test_graph_outputs_and_maps_equal_pytorch(case):
    """Logits, A_l, their gradients, the input gradient and the three maps equal PyTorch's at batches 1 and 3."""
    record = case.manifest.attribution
    for b in (1, 3):
        x = images(b, seed=b)
        target = np.arange(b, dtype=np.int64) % lm.CLASSES + 1
        logits, attentions, grads, dx, xt = torch_outputs(case.name, case.model, x, target)
        run = case.engine.run(x, target)
        assert rel_err(run.logits, logits) <= TOL
        assert len(run.attentions) == len(attentions) == record.blocks
        for got, want in zip(run.attentions + run.attention_grads, attentions + grads):
            assert rel_err(got, want) <= TOL
        assert rel_err(run.input_grad, dx) <= TOL
        expected = {"gradxinput": torch_gradxinput(xt, dx, record)}
        if record.blocks:
            expected["rollout"] = torch_rollout(attentions, record)
            expected["chefer"], terms = torch_chefer(attentions, grads, record)
        for method, want in expected.items():
            got = case.engine.attribute(x, target, method)
            assert [a.target for a in got] == list(target)
            assert rel_err(np.stack([a.map for a in got]), want) <= TOL, method
            assert got[0].map.shape == record.grid
        if record.blocks:
            heads = np.stack([a.heads for a in case.engine.attribute(x, target, "chefer", heads=True)])
            assert heads.shape == (b, record.blocks, lm.HEADS, *record.grid)
            assert rel_err(heads, np.stack(terms, axis=1)) <= TOL


def test_the_predicted_class_by_default(case):
    x = images(3, seed=7)
    predicted = case.engine.run(x, np.zeros(3, np.int64)).logits.argmax(axis=1)
    method = "chefer" if case.manifest.attribution.blocks else "gradxinput"
    default = case.engine.attribute(x, None, method)
    explicit = case.engine.attribute(x, predicted, method)
    assert [a.target for a in default] == list(predicted)
    assert all(np.array_equal(a.map, b.map) for a, b in zip(default, explicit))


# ---------------------------------------------------------------- properties of the maps

@pytest.fixture
def seed_case(tmp_path_factory) -> Case:
    return built("seed", tmp_path_factory)


@pytest.fixture
def simple_case(tmp_path_factory) -> Case:
    return built("vit-pytorch-simple", tmp_path_factory)


def test_rollout_rows_sum_to_one(simple_case):
    """Mean pooling over every token, all of them patches: each rollout row sums to 1, so does their mean."""
    maps_ = simple_case.engine.attribute(images(3), None, "rollout")
    assert np.allclose([m.map.sum() for m in maps_], 1.0, atol=1e-6)  # float32 maps


def test_rollout_per_head_replaces_one_blocks_mean_by_the_head(seed_case):
    x, target = images(2), np.array([1, 3])
    _, attentions, *_ = torch_outputs("seed", seed_case.model, x, target)
    heads = np.stack([a.heads for a in seed_case.engine.attribute(x, target, "rollout", heads=True)])
    record = seed_case.manifest.attribution
    for layer in range(lm.DEPTH):
        for h in range(lm.HEADS):
            assert rel_err(heads[:, layer, h], torch_rollout(attentions, record, (layer, h))) <= TOL


def test_chefer_without_attention_gradient_is_the_identity_row(seed_case, simple_case):
    for case, expected in ((seed_case, 0.0), (simple_case, 1 / 16)):
        run = case.engine.run(images(2), np.array([0, 1]))
        zero = [np.zeros_like(g) for g in run.attention_grads]
        got, _ = maps.chefer(run.attentions, zero, case.manifest.attribution)
        assert np.array_equal(got, np.full_like(got, expected))


def test_deleting_a_patch_changes_the_maps(seed_case):
    x = images(1)
    before = {m: seed_case.engine.attribute(x, [2], m)[0].map for m in maps.METHODS}
    deleted = x.copy()
    deleted[..., :lm.PATCH, :lm.PATCH] = x.mean()  # the top-left patch set to the image's mean
    for method, map_before in before.items():
        after = seed_case.engine.attribute(deleted, [2], method)[0].map
        assert not np.allclose(after, map_before), method


def test_training_weights_are_inputs(seed_case):
    """Other weights (a trainer's) passed by name give PyTorch's maps at those weights."""
    changed = copy.deepcopy(seed_case.model)
    with torch.no_grad():
        for p in changed.parameters():
            p.add_(0.05 * torch.randn_like(p))
    weights = {n: p.detach().numpy() for n, p in changed.named_parameters()}
    x, target = images(2), np.array([4, 0])
    _, attentions, grads, *_ = torch_outputs("seed", changed, x, target)
    want, _ = torch_chefer(attentions, grads, seed_case.manifest.attribution)
    got = np.stack([a.map for a in seed_case.engine.attribute(x, target, "chefer", weights=weights)])
    assert rel_err(got, want) <= TOL
    exported = np.stack([a.map for a in seed_case.engine.attribute(x, target, "chefer")])
    assert not np.allclose(got, exported)


def test_published_weights_are_read_by_name(seed_case, tmp_path):
    params = dict(seed_case.model.named_parameters())
    initializers = [onnx.numpy_helper.from_array(params[n].detach().numpy() * 2, n) for n in params]
    published = onnx.helper.make_model(onnx.helper.make_graph([], "published", [], [], initializers))
    onnx.save(published, tmp_path / "model.onnx")
    weights = maps.published_weights(seed_case.manifest, tmp_path / "model.onnx")
    assert all(np.array_equal(weights[n], params[n].detach().numpy() * 2) for n in params)
    del published.graph.initializer[0]
    onnx.save(published, tmp_path / "model.onnx")
    with pytest.raises(FailedPrecondition, match="holds no initializer"):
        maps.published_weights(seed_case.manifest, tmp_path / "model.onnx")


# ---------------------------------------------------------------- errors

def test_bad_requests_are_refused(seed_case, tmp_path_factory):
    engine, x = seed_case.engine, images(2)
    with pytest.raises(InvalidArgument, match="unknown attribution method 'saliency'; the methods are rollout, "
                                              "chefer, gradxinput"):
        engine.attribute(x, None, "saliency")
    with pytest.raises(InvalidArgument, match=r"target: must be in \[0, 5\), got 5"):
        engine.attribute(x, [0, 5], "rollout")
    with pytest.raises(InvalidArgument, match="target: shape must be"):
        engine.attribute(x, [0], "rollout")
    with pytest.raises(InvalidArgument, match="per-head maps need an attention method"):
        engine.attribute(x, None, "gradxinput", heads=True)
    with pytest.raises(InvalidArgument, match="images: shape must be"):
        engine.attribute(x[:, :1], None, "rollout")
    torch.manual_seed(0)
    cnn = AttributionEngine(manifest_for(lm.SmallResNet(), tmp_path_factory.mktemp("cnn"), "cnn"))
    for method in ("rollout", "chefer"):
        with pytest.raises(FailedPrecondition, match="the model has no attention modules; only gradxinput works"):
            cnn.attribute(x, None, method)


def test_an_export_without_the_record_is_refused(seed_case):
    old = dataclasses.replace(seed_case.manifest, attribution=None)
    with pytest.raises(FailedPrecondition, match="without an attribution graph: re-run the export"):
        AttributionEngine(old)


# ---------------------------------------------------------------- the export

def test_the_export_writes_the_graph_and_its_record(exported, torch_model):
    """make export's digits (8 x 8 images, 2 x 2 patches): the file, its sha256, the record, PyTorch's maps."""
    folder, _ = exported
    manifest = Manifest.load(folder)
    assert manifest.files[ATTRIBUTION_MODEL] == sha256(folder / ATTRIBUTION_MODEL)
    record = manifest.attribution
    assert (record.blocks, record.heads, record.tokens, record.grid, record.patch) == (4, (4,) * 4, 17, (4, 4), (2, 2))
    assert (record.pooling, record.readout, record.patch_tokens, record.reason) == ("cls", (0, 1), 1, "")
    engine = AttributionEngine(manifest)
    x, target = images(2, shape=(1, 8, 8)), np.array([3, 9])
    _, attentions, grads, *_ = torch_outputs("seed", torch_model.eval(), x, target)
    got = np.stack([a.map for a in engine.attribute(x, target, "chefer")])
    assert rel_err(got, torch_chefer(attentions, grads, record)[0]) <= TOL


def test_register_tokens_and_mean_pooling_are_measured():
    """timm with two register tokens and global_pool="avg" reads the patch tokens' mean; the seed with pool="mean"
    every token's, its class token's too (the record alone: no graph needed)."""
    from model.attribution import token_layout
    from model.vit import ViTConfig, build
    from tests.torchvision_shim import import_timm

    import_timm()
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    timm_avg = VisionTransformer(img_size=lm.SIZE, patch_size=lm.PATCH, in_chans=3, num_classes=lm.CLASSES,
                                 embed_dim=lm.DIM, depth=lm.DEPTH, num_heads=lm.HEADS, global_pool="avg", reg_tokens=2)
    seed_mean = build(ViTConfig(image_size=lm.SIZE, patch_size=lm.PATCH, channels=3, num_classes=lm.CLASSES,
                                dim=lm.DIM, depth=lm.DEPTH, heads=lm.HEADS, dim_head=lm.DIM_HEAD, mlp_dim=2 * lm.DIM,
                                pool="mean", mean=(0.5,) * 3, std=(0.5,) * 3))
    expected = {
        "timm-avg-registers": (timm_avg, dict(pooling="mean", readout=(3, 19), patch_tokens=3, extra_tokens=(0, 1, 2))),
        "seed-mean": (seed_mean, dict(pooling="mean", readout=(0, 17), patch_tokens=1, extra_tokens=(0,))),
    }
    for name, (model, fields) in expected.items():
        record = token_layout(model.eval(), torch.randn(2, 3, lm.SIZE, lm.SIZE),
                              place(model, onnx.GraphProto(), set()).attention)
        assert {f: getattr(record, f) for f in fields} == fields, name
        assert (record.grid, record.cls_token, record.reason) == ((4, 4), -1, ""), name
