"""Small, randomly initialised image classifiers of every layout the gradient window covers, from their real packages.

Each builder returns (model, channels, image size). Nothing is downloaded: the models are built from
their constructors (Hugging Face's from a ViTConfig). timm imports through tests/torchvision_shim.py.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from model import export as exporter
from model.export import load_class
from model.vit import ViTConfig, build
from tests.torchvision_shim import import_timm

SIZE, PATCH, DIM, DEPTH, HEADS, DIM_HEAD, CLASSES = 16, 4, 32, 2, 4, 8, 5


def seed() -> nn.Module:
    """model/vit.py: vit-pytorch's PreNorm layout, one fused to_qkv without bias."""
    return build(ViTConfig(image_size=SIZE, patch_size=PATCH, channels=3, num_classes=CLASSES, dim=DIM, depth=DEPTH,
                           heads=HEADS, dim_head=DIM_HEAD, mlp_dim=2 * DIM, mean=(0.5,) * 3, std=(0.5,) * 3))


def vit_pytorch_vit() -> nn.Module:
    return load_class("vit_pytorch.vit:ViT")(image_size=SIZE, patch_size=PATCH, num_classes=CLASSES, dim=DIM,
                                             depth=DEPTH, heads=HEADS, mlp_dim=2 * DIM, dim_head=DIM_HEAD)


def vit_pytorch_simple() -> nn.Module:
    return load_class("vit_pytorch.simple_vit:SimpleViT")(image_size=SIZE, patch_size=PATCH, num_classes=CLASSES,
                                                          dim=DIM, depth=DEPTH, heads=HEADS, mlp_dim=2 * DIM,
                                                          dim_head=DIM_HEAD)


def timm_vit() -> nn.Module:
    """timm's VisionTransformer: one fused qkv Linear with a bias, num_heads."""
    import_timm()
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=SIZE, patch_size=PATCH, in_chans=3, num_classes=CLASSES, embed_dim=DIM,
                             depth=DEPTH, num_heads=HEADS, mlp_ratio=2.0)


HF_KWARGS = dict(image_size=SIZE, patch_size=PATCH, num_channels=3, hidden_size=DIM, num_hidden_layers=DEPTH,
                 num_attention_heads=HEADS, intermediate_size=2 * DIM, num_labels=CLASSES)


def hugging_face_vit() -> nn.Module:
    """transformers' ViTForImageClassification: separate q/k/v projections with biases (built as the export does)."""
    from model.export import construct

    return construct(load_class("transformers:ViTForImageClassification"), HF_KWARGS)


class EncoderViT(nn.Module):
    """A ViT made of torch.nn.TransformerEncoderLayer: PyTorch's own nn.MultiheadAttention (fused in_proj + bias)."""

    def __init__(self, norm_first: bool = True):
        super().__init__()
        self.patch = nn.Conv2d(3, DIM, PATCH, PATCH)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, DIM))
        self.pos_embedding = nn.Parameter(torch.randn(1, (SIZE // PATCH) ** 2 + 1, DIM) * 0.02)
        layer = nn.TransformerEncoderLayer(DIM, HEADS, 2 * DIM, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, DEPTH, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)  # (b, n, dim)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding
        return self.head(self.norm(self.encoder(x)[:, 0]))


class PostNormEncoderViT(EncoderViT):
    def __init__(self):
        super().__init__(norm_first=False)


class SmallResNet(nn.Module):
    """A ResNet-style CNN with BatchNorm2d: no attention, trained on frozen running statistics."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                   nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        return self.head(x.mean(dim=(2, 3)))


class Unexportable(nn.Module):
    """A classifier whose forward the ONNX exporter cannot trace (an FFT)."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(3 * SIZE * SIZE, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.fft.fft2(x).abs().flatten(1))


LAYOUTS = {  # name -> (builder, fused, biases)
    "seed": (seed, True, False),
    "vit-pytorch": (vit_pytorch_vit, True, False),
    "vit-pytorch-simple": (vit_pytorch_simple, True, False),
    "timm": (timm_vit, True, True),
    "hugging-face": (hugging_face_vit, False, True),
    "torch-mha": (EncoderViT, True, True),
    "torch-mha-post-norm": (PostNormEncoderViT, True, True),
}


def export(model: nn.Module, name: str, out: Path) -> Path:
    """The artifact folder of `model` exported as every layout here is: SIZE x SIZE RGB, CLASSES classes, AdamW."""
    return exporter.export(model=model, name=name, out=out, image_size=SIZE, channels=3, mean=[0.5] * 3,
                           std=[0.5] * 3, class_names=[f"c{i}" for i in range(CLASSES)], source={}, freeze=[],
                           optimizer="adamw", opset=16)
