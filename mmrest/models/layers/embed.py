"""Convolutional embeddings of ResT: pixel-attention position encoding, stem, patch embedding.

ResT: An Efficient Transformer for Visual Recognition (Zhang & Yang, NeurIPS 2021,
https://arxiv.org/abs/2105.13677); authors' code: https://github.com/wofmanaf/ResT.
Module names (``conv1``, ``norm1``, ``pos.pa_conv``, ...) follow the authors' models.
"""
from typing import Optional, Tuple

import torch
from mmcv.cnn import build_norm_layer
from torch import Tensor, nn

from .emsa_ops import cpu_tuned


def map_to_tokens(x: Tensor) -> Tensor:
    """(B, C, H, W) map -> contiguous (B, H * W, C) tokens.

    Free for a channels-last map (the CPU layout of the stem and patch embeddings); a
    copy otherwise.
    """
    return x.flatten(2).transpose(1, 2).contiguous()


def tokens_to_map(tokens: Tensor, hw_shape: Tuple[int, int]) -> Tensor:
    """(B, H * W, C) tokens -> (B, C, H, W) map for the next convolution.

    On the CPU a free channels-last view (oneDNN's convs are fastest in that layout);
    elsewhere a contiguous NCHW copy.
    """
    B, _, C = tokens.shape
    if cpu_tuned(tokens):
        return tokens.reshape(B, *hw_shape, C).permute(0, 3, 1, 2)
    return tokens.transpose(1, 2).reshape(B, C, *hw_shape).contiguous()


def _bn_cfg(norm_cfg: Optional[dict]) -> dict:
    return dict(type='BN') if norm_cfg is None else norm_cfg


class PixelAttention(nn.Module):
    """Pixel-attention (PA) position encoding: ``x * sigmoid(dwconv3x3(x))``.

    Args:
        channels (int): Channels of the input map.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.pa_conv = nn.Conv2d(
            channels, channels, kernel_size=3, padding=1, groups=channels)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.pa_conv(x).sigmoid()


class ConvStem(nn.Module):
    """The stem: conv3x3/2 + BN + ReLU, conv3x3 + BN + ReLU, conv3x3/2, then PA.

    Args:
        in_channels (int): Input channels. Defaults to 3.
        out_channels (int): Output channels. Defaults to 64.
        norm_cfg (dict, optional): Config of the two norms. Defaults to
            ``dict(type='BN')``.
    """

    def __init__(self,
                 in_channels: int = 3,
                 out_channels: int = 64,
                 norm_cfg: Optional[dict] = None) -> None:
        super().__init__()
        hidden = out_channels // 2
        norm_cfg = _bn_cfg(norm_cfg)
        self.conv1 = nn.Conv2d(
            in_channels, hidden, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm1 = build_norm_layer(norm_cfg, hidden)[1]
        self.conv2 = nn.Conv2d(
            hidden, hidden, kernel_size=3, stride=1, padding=1, bias=False)
        self.norm2 = build_norm_layer(norm_cfg, hidden)[1]
        self.conv3 = nn.Conv2d(
            hidden, out_channels, kernel_size=3, stride=2, padding=1, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.pos = PixelAttention(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        if cpu_tuned(x):
            # Channels-last on the CPU: oneDNN's convs ran 25-45% faster here in that
            # layout, and the output map flattens to (B, H * W, C) tokens without a copy.
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.act(self.norm1(self.conv1(x)))
        x = self.act(self.norm2(self.conv2(x)))
        return self.pos(self.conv3(x))


class PatchEmbed(nn.Module):
    """Overlapping patch embedding: conv3x3 stride 2 (padding 1), BN, PA.

    The output map is ``ceil(H / 2) x ceil(W / 2)`` for any H, W (the authors' code
    assumed ``H // 2`` and failed on odd maps).

    Args:
        in_channels (int): Input channels.
        out_channels (int): Output channels.
        norm_cfg (dict, optional): Config of the norm. Defaults to ``dict(type='BN')``.
    """

    def __init__(self,
                 in_channels: int,
                 out_channels: int,
                 norm_cfg: Optional[dict] = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size=3, stride=2, padding=1)
        self.norm = build_norm_layer(_bn_cfg(norm_cfg), out_channels)[1]
        self.pos = PixelAttention(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.pos(self.norm(self.conv(x)))
