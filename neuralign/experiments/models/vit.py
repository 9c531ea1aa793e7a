r"""A small Vision Transformer for CIFAR-sized images (:class:`ViT`): patch embedding, class token, learned position
embedding, pre-norm blocks of multi-head self-attention and a GELU MLP, a final LayerNorm and a linear head
(Dosovitskiy et al. 2021, arXiv:2010.11929, at a small configuration: patch 4 on 32 x 32 images).

The attention is written as most codebases write it (timm's ``Attention``): one fused ``qkv`` projection,
``reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4)``, ``softmax(q @ k^T * d^-1/2) @ v``, ``transpose(1, 2).reshape(B,
N, D)`` and an output projection, so that :func:`~neuralign.alignment.trace_spec` finds its heads: per block one
group for the query/key units and one for the value units (both with a head structure sharing one head group), one
MLP group, and the residual stream shared by the patch embedding, the class token, the position embedding, every
LayerNorm and every block's output.
"""

from __future__ import annotations

import torch
from torch import nn

from neuralign._validate import check_int, check_real

__all__ = ["ViT", "Attention", "ViTBlock"]


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection: ``(B, N, D) -> (B, N, D)``, float32 or float64."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"`width` ({dim}) must be a multiple of `heads` ({heads})")
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class ViTBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + fc2(dropout(gelu(fc1(norm2(x)))))``."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(mlp_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.drop(self.act(self.fc1(self.norm2(x)))))


class ViT(nn.Module):
    r"""Vision Transformer: ``(B, C, S, S)`` images -> ``(B, num_classes)`` logits.

    Parameters
    ----------
    num_classes : int
    in_channels : int
    image_size : int
        Side ``S`` of the (square) input images; a multiple of ``patch_size``.
    patch_size : int
        Side of the square patches (4 for 32 x 32 images: 64 patches and a class token).
    width : int
        Model dimension ``D`` (the residual stream).
    depth : int
        Number of blocks.
    heads : int
        Attention heads per block (``D / heads`` units per head).
    mlp_dim : int
        Hidden units of each block's MLP.
    dropout : float
        Dropout in the MLP (0 by default).

    Raises
    ------
    ValueError
        Sizes that are not positive, an image size that is not a multiple of the patch size, a width that is not a
        multiple of the heads.

    Examples
    --------
    >>> ViT(10, width=32, depth=1, heads=2, mlp_dim=64)(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """

    def __init__(self, num_classes: int, in_channels: int = 3, image_size: int = 32, patch_size: int = 4,
                 width: int = 64, depth: int = 4, heads: int = 4, mlp_dim: int = 128,
                 dropout: float = 0.0) -> None:  # fmt: skip
        super().__init__()
        for name, v in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size),
                        ("patch_size", patch_size), ("width", width), ("depth", depth), ("heads", heads),
                        ("mlp_dim", mlp_dim)):  # fmt: skip
            check_int(v, name, minimum=1)
        check_real(dropout, "dropout", low=0.0, high=1.0, high_open=True)
        if image_size % patch_size:
            raise ValueError(f"`image_size` ({image_size}) must be a multiple of `patch_size` ({patch_size})")
        patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.randn(1, patches + 1, width) * 0.02)
        self.blocks = nn.Sequential(*(ViTBlock(width, heads, mlp_dim, dropout) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])
