"""Convolutional embeddings of ResT and ResT V2: pixel-attention position encoding, stems,
patch embeddings. Module names follow the authors' models."""
from typing import Optional, Tuple

from mmcv.cnn import build_norm_layer
from torch import Tensor, nn

from .dispatch import map_to_tokens, stem_layout


class PixelAttention(nn.Module):
    """Pixel-attention (PA) position encoding: ``x * sigmoid(dwconv3x3(x))``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.pa_conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1, groups=channels)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.pa_conv(x).sigmoid()


class ConvStem(nn.Module):
    """The stem: conv3x3/2 + BN + ReLU, conv3x3 + BN + ReLU, conv3x3/2, then PA
    (``norm_cfg`` defaults to ``dict(type='BN')``)."""

    def __init__(self,
                 in_channels: int = 3,
                 out_channels: int = 64,
                 norm_cfg: Optional[dict] = None) -> None:
        super().__init__()
        hidden = out_channels // 2
        norm_cfg = dict(type='BN') if norm_cfg is None else norm_cfg
        self.conv1 = nn.Conv2d(in_channels, hidden, 3, stride=2, padding=1, bias=False)
        self.norm1 = build_norm_layer(norm_cfg, hidden)[1]
        self.conv2 = nn.Conv2d(hidden, hidden, 3, stride=1, padding=1, bias=False)
        self.norm2 = build_norm_layer(norm_cfg, hidden)[1]
        self.conv3 = nn.Conv2d(hidden, out_channels, 3, stride=2, padding=1, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.pos = PixelAttention(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.norm1(self.conv1(stem_layout(x))))
        x = self.act(self.norm2(self.conv2(x)))
        return self.pos(self.conv3(x))


class PatchEmbed(nn.Module):
    """Overlapping patch embedding: conv3x3 stride 2, BN, PA; the output map is
    ``ceil(H / 2) x ceil(W / 2)`` (``norm_cfg`` defaults to ``dict(type='BN')``)."""

    def __init__(self,
                 in_channels: int,
                 out_channels: int,
                 norm_cfg: Optional[dict] = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1)
        norm_cfg = dict(type='BN') if norm_cfg is None else norm_cfg
        self.norm = build_norm_layer(norm_cfg, out_channels)[1]
        self.pos = PixelAttention(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.pos(self.norm(self.conv(x)))


class ConvStemV2(nn.Module):
    """The ResT V2 stem (stride 4): conv3x3/2 + BN + ReLU, conv3x3/2 + BN + ReLU, conv1x1,
    PA, then a LayerNorm of the tokens (``norm_cfg`` defaults to ``dict(type='BN')``,
    ``token_norm_cfg`` to ``dict(type='LN', eps=1e-6)``)."""

    def __init__(self,
                 in_channels: int = 3,
                 out_channels: int = 96,
                 norm_cfg: Optional[dict] = None,
                 token_norm_cfg: Optional[dict] = None) -> None:
        super().__init__()
        hidden = out_channels // 2
        norm_cfg = dict(type='BN') if norm_cfg is None else norm_cfg
        if token_norm_cfg is None:
            token_norm_cfg = dict(type='LN', eps=1e-6)
        # indices 0-6 as in the authors' ``stem.proj`` (2 and 5 are the ReLUs)
        self.proj = nn.Sequential(
            nn.Conv2d(in_channels, hidden, kernel_size=3, stride=2, padding=1, bias=False),
            build_norm_layer(norm_cfg, hidden)[1], nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, kernel_size=3, stride=2, padding=1, bias=False),
            build_norm_layer(norm_cfg, out_channels)[1], nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=1))
        self.pos = PixelAttention(out_channels)
        self.norm = build_norm_layer(token_norm_cfg, out_channels)[1]

    def forward(self, x: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        """Images (B, C_in, H, W) -> tokens (B, h * w, C) of the (h, w) map."""
        x = self.pos(self.proj(stem_layout(x)))
        return self.norm(map_to_tokens(x)), (x.shape[2], x.shape[3])


class PatchEmbedV2(nn.Module):
    """The ResT V2 patch embedding: conv3x3 stride 2, PA, then a LayerNorm of the tokens
    (``norm_cfg`` defaults to ``dict(type='LN', eps=1e-6)``)."""

    def __init__(self,
                 in_channels: int,
                 out_channels: int,
                 norm_cfg: Optional[dict] = None) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1)
        self.pos = PixelAttention(out_channels)
        norm_cfg = dict(type='LN', eps=1e-6) if norm_cfg is None else norm_cfg
        self.norm = build_norm_layer(norm_cfg, out_channels)[1]

    def forward(self, x: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        """Map (B, C_in, H, W) -> tokens (B, h * w, C) of the (h, w) map."""
        x = self.pos(self.proj(x))
        return self.norm(map_to_tokens(x)), (x.shape[2], x.shape[3])
