"""The PyTorch ViT: shapes, gradients, presets, and compatibility with vit-pytorch's state_dicts."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.export import load_class
from model.vit import DEFAULT_PRESET, PRESETS, ViTConfig, build


def test_default_preset_is_digits():
    assert DEFAULT_PRESET == "digits"
    c = PRESETS["digits"]
    assert (c.image_size, c.channels, c.num_classes) == (8, 1, 10)


def test_vit_tiny_is_vit_ti16():
    c = PRESETS["vit-tiny"]
    assert (c.image_size, c.patch_size, c.dim, c.depth, c.heads, c.dim_head, c.mlp_dim, c.num_classes) == \
        (224, 16, 192, 12, 3, 64, 768, 1000)
    model = build(c)
    assert sum(p.numel() for p in model.parameters()) == 5_710_504  # ~DeiT-tiny (5.72M; its head and norms differ)
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 1000)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_shapes_and_every_parameter_gets_a_gradient(pool):
    config = ViTConfig(pool=pool, dropout=0.1, emb_dropout=0.1)
    model = build(config)
    x = torch.randn(5, 1, 8, 8)
    logits = model(x)
    assert logits.shape == (5, 10)
    F.cross_entropy(logits, torch.arange(5)).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_parameter_names_are_the_lucidrains_prenorm_layout():
    names = set(build(PRESETS["digits"]).state_dict())
    for expected in ["to_patch_embedding.1.weight", "pos_embedding", "cls_token",
                     "transformer.layers.0.0.norm.weight", "transformer.layers.0.0.fn.to_qkv.weight",
                     "transformer.layers.3.0.fn.to_out.0.bias", "transformer.layers.3.1.fn.net.3.weight",
                     "mlp_head.0.weight", "mlp_head.1.bias"]:
        assert expected in names
    assert "transformer.layers.0.0.fn.to_qkv.bias" not in names  # to_qkv has no bias


def test_a_vit_pytorch_state_dict_loads_and_gives_the_same_logits():
    VitPytorch = load_class("vit_pytorch.vit:ViT")  # vit-pytorch 0.40.2, the PreNorm layout
    kwargs = dict(image_size=16, patch_size=4, num_classes=7, dim=32, depth=2, heads=2, dim_head=16, mlp_dim=64,
                  channels=3)
    theirs = VitPytorch(**kwargs).eval()
    ours = build(ViTConfig(**kwargs, mean=(0.5,) * 3, std=(0.5,) * 3)).eval()
    ours.load_state_dict(theirs.state_dict())  # strict: same names, same shapes
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))


def test_config_rules_have_messages():
    with pytest.raises(AssertionError, match="divisible by the patch size"):
        ViTConfig(image_size=10, patch_size=3)
    with pytest.raises(AssertionError, match="pool must be"):
        ViTConfig(pool="max")
