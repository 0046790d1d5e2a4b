"""The Vision Transformer that vitserve exports, serves and fine-tunes.

Layout and parameter names follow lucidrains' vit-pytorch (the PreNorm era):
PreNorm wraps Attention and FeedForward, Attention has one fused bias-free
`to_qkv` Linear, so a state_dict of that layout loads here unchanged:

    to_patch_embedding.1.{weight,bias}
    transformer.layers.{i}.0.norm.*          PreNorm before attention
    transformer.layers.{i}.0.fn.to_qkv.weight (3 * heads * dim_head, dim): rows q | k | v
    transformer.layers.{i}.0.fn.to_out.0.*
    transformer.layers.{i}.1.norm.*          PreNorm before the feed-forward
    transformer.layers.{i}.1.fn.net.{0,3}.*
    mlp_head.{0,1}.*                          LayerNorm + Linear classifier

`ViTConfig` holds the hyper-parameters; `PRESETS` names the sizes vitserve knows.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from einops import rearrange, repeat
from einops.layers.torch import Rearrange
from torch import nn


@dataclass(frozen=True)
class ViTConfig:
    image_size: int = 8  # digits: scikit-learn's 8x8 images
    patch_size: int = 2  # 2x2 patches -> 16 tokens, enough spatial detail for 8x8 digits
    channels: int = 1  # grayscale
    num_classes: int = 10  # digits 0..9
    dim: int = 64  # token width; small so a 2-core CPU fine-tunes it in minutes
    depth: int = 4  # 4 blocks: deep enough to show gradient flow across blocks
    heads: int = 4  # per-head q/k/v gradients are part of what the service reports
    dim_head: int = 16  # heads * dim_head == dim, the usual ViT proportion
    mlp_dim: int = 128  # 2x dim: the feed-forward is the cheap part at this size
    pool: str = "cls"  # 'cls' token or 'mean' pooling, as in vit-pytorch
    dropout: float = 0.0  # off by default: fine-tuning on small data, exact parity checks
    emb_dropout: float = 0.0
    # Preprocessing the server applies to encoded images (PNG/JPEG) before the model.
    mean: tuple[float, ...] = field(default=(0.5,))
    std: tuple[float, ...] = field(default=(0.5,))

    def __post_init__(self):
        assert self.image_size % self.patch_size == 0, "image size must be divisible by the patch size"
        assert self.pool in {"cls", "mean"}, "pool must be 'cls' (cls token) or 'mean' (mean pooling)"
        assert len(self.mean) == len(self.std) == self.channels, "mean and std need one value per channel"

    def model_kwargs(self) -> dict:
        """Keyword arguments for `ViT(**kwargs)` (the preprocessing fields are not the network's)."""
        kwargs = asdict(self)
        kwargs.pop("mean"), kwargs.pop("std")
        return kwargs


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

PRESETS: dict[str, ViTConfig] = {
    "digits": ViTConfig(),
    # ViT-Ti/16 of "How to train your ViT" (DeiT-tiny sizes).
    "vit-tiny": ViTConfig(image_size=224, patch_size=16, channels=3, num_classes=1000, dim=192, depth=12,
                          heads=3, dim_head=64, mlp_dim=768, mean=IMAGENET_MEAN, std=IMAGENET_STD),
    # The benchmark size of docs/design.md: 64x64, patch 8, 6 blocks.
    "vit-small64": ViTConfig(image_size=64, patch_size=8, channels=3, num_classes=10, dim=192, depth=6,
                             heads=3, dim_head=64, mlp_dim=768, mean=IMAGENET_MEAN, std=IMAGENET_STD),
}
DEFAULT_PRESET = "digits"


class PreNorm(nn.Module):
    def __init__(self, dim, fn):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.norm(x))


class FeedForward(nn.Module):
    def __init__(self, dim, hidden_dim, dropout=0.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, dim),
            nn.Dropout(dropout),
        )

    def forward(self, x):
        return self.net(x)


class Attention(nn.Module):
    def __init__(self, dim, heads=8, dim_head=64, dropout=0.0):
        super().__init__()
        inner_dim = dim_head * heads
        project_out = not (heads == 1 and dim_head == dim)

        self.heads = heads
        self.scale = dim_head ** -0.5
        self.attend = nn.Softmax(dim=-1)
        self.dropout = nn.Dropout(dropout)
        self.to_qkv = nn.Linear(dim, inner_dim * 3, bias=False)  # one matmul for q, k and v
        self.to_out = nn.Sequential(nn.Linear(inner_dim, dim), nn.Dropout(dropout)) if project_out else nn.Identity()

    def forward(self, x):  # x: (b, n, dim)
        qkv = self.to_qkv(x).chunk(3, dim=-1)  # 3 x (b, n, heads * dim_head)
        q, k, v = map(lambda t: rearrange(t, "b n (h d) -> b h n d", h=self.heads), qkv)
        dots = torch.matmul(q, k.transpose(-1, -2)) * self.scale  # (b, h, n, n)
        attn = self.dropout(self.attend(dots))
        out = torch.matmul(attn, v)  # (b, h, n, d)
        out = rearrange(out, "b h n d -> b n (h d)")
        return self.to_out(out)


class Transformer(nn.Module):
    def __init__(self, dim, depth, heads, dim_head, mlp_dim, dropout=0.0):
        super().__init__()
        self.layers = nn.ModuleList([])
        for _ in range(depth):
            self.layers.append(nn.ModuleList([
                PreNorm(dim, Attention(dim, heads=heads, dim_head=dim_head, dropout=dropout)),
                PreNorm(dim, FeedForward(dim, mlp_dim, dropout=dropout)),
            ]))

    def forward(self, x):
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return x


class ViT(nn.Module):
    def __init__(self, *, image_size, patch_size, num_classes, dim, depth, heads, mlp_dim, pool="cls",
                 channels=3, dim_head=64, dropout=0.0, emb_dropout=0.0):
        super().__init__()
        assert image_size % patch_size == 0, "Image dimensions must be divisible by the patch size."
        assert pool in {"cls", "mean"}, "pool type must be either cls (cls token) or mean (mean pooling)"
        num_patches = (image_size // patch_size) ** 2
        patch_dim = channels * patch_size ** 2

        self.to_patch_embedding = nn.Sequential(
            Rearrange("b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch_size, p2=patch_size),
            nn.Linear(patch_dim, dim),
        )
        self.pos_embedding = nn.Parameter(torch.randn(1, num_patches + 1, dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.dropout = nn.Dropout(emb_dropout)
        self.transformer = Transformer(dim, depth, heads, dim_head, mlp_dim, dropout)
        self.pool = pool
        self.to_latent = nn.Identity()
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def forward(self, img):  # img: (b, c, H, W)
        x = self.to_patch_embedding(img)  # (b, n, dim)
        b, n, _ = x.shape
        cls_tokens = repeat(self.cls_token, "1 1 d -> b 1 d", b=b)
        x = torch.cat((cls_tokens, x), dim=1)  # (b, n + 1, dim)
        x = x + self.pos_embedding[:, : (n + 1)]
        x = self.dropout(x)
        x = self.transformer(x)
        x = x.mean(dim=1) if self.pool == "mean" else x[:, 0]  # (b, dim)
        return self.mlp_head(self.to_latent(x))  # (b, num_classes)


def build(config: ViTConfig) -> ViT:
    return ViT(**config.model_kwargs())
