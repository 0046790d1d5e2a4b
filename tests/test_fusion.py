"""The inference graph's attention fusion (engine/graph/fusion.py): same logits as the unfused graph, fewer nodes."""
from __future__ import annotations

import hashlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from model.export import export_onnx, load_class
from model.layout import place
from model.vit import ViTConfig, build
from proto import vitserve_pb2 as pb
from engine.graph.fusion import fuse_attention, optimize_inference_model


def logits(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]


def ops(model: onnx.ModelProto, op_type: str) -> int:
    return sum(n.op_type == op_type for n in model.graph.node)


@pytest.mark.parametrize("make, channels, size", [
    (lambda: build(ViTConfig(depth=3, heads=4, dim_head=16)), 1, 8),
    (lambda: build(ViTConfig(image_size=16, patch_size=4, channels=3, dim=48, depth=2, heads=3, dim_head=16,
                             pool="mean", mean=(0.5,) * 3, std=(0.5,) * 3)), 3, 16),
    (lambda: load_class("vit_pytorch.vit:ViT")(image_size=16, patch_size=4, num_classes=5, dim=32, depth=2, heads=2,
                                                mlp_dim=64, dim_head=8), 3, 16),
], ids=["digits-3-blocks", "mean-pool-3-heads", "vit-pytorch"])
def test_fused_logits_equal_unfused(make, channels, size):
    torch.manual_seed(0)
    model = make().eval()
    example = torch.randn(2, channels, size, size)
    unfused = export_onnx(model, example, 16, training=False)
    layouts = place(model, export_onnx(model, example, 16, training=True).graph, set()).attention
    fused, count = fuse_attention(unfused, [a.heads for a in layouts])
    assert count == len(layouts) == ops(fused, "MultiHeadAttention")
    assert ops(fused, "Softmax") == 0 and len(fused.graph.node) < len(unfused.graph.node)
    x = np.random.default_rng(1).standard_normal((5, channels, size, size), dtype=np.float32)
    np.testing.assert_allclose(logits(fused, x), logits(unfused, x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        np.testing.assert_allclose(logits(fused, x), model(torch.from_numpy(x)).numpy(), rtol=1e-4, atol=1e-5)


def test_nothing_is_fused_when_the_block_count_does_not_match():
    model = build(ViTConfig(depth=2)).eval()
    unfused = export_onnx(model, torch.randn(2, 1, 8, 8), 16, training=False)
    same, count = fuse_attention(unfused, [4])  # two attention blocks in the graph, one head count given
    assert count == 0 and same is unfused


def test_a_fusion_that_changes_the_logits_is_refused(tmp_path):
    model = build(ViTConfig(depth=2, heads=4, dim_head=16)).eval()
    path = tmp_path / "inference.onnx"
    onnx.save(export_onnx(model, torch.randn(2, 1, 8, 8), 16, training=False), path)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    assert optimize_inference_model(path, [2, 2], "images", (-1, 1, 8, 8)) == 0  # wrong head count: other math
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert optimize_inference_model(path, [4, 4], "images", (-1, 1, 8, 8)) == 2
    assert ops(onnx.load(path), "MultiHeadAttention") == 2


def test_exported_and_published_models_are_fused(running, exported):
    assert ops(onnx.load(exported[0] / "inference.onnx"), "MultiHeadAttention") == 4
    version = running.stub.Publish(pb.PublishRequest()).version
    assert ops(onnx.load(running.trainer.versions.model_path(version)), "MultiHeadAttention") == 4
