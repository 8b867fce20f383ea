"""The attention of ResT (EMSA) and ResT V2 (EMSAv2): queries from the tokens, keys and
values from the spatially reduced tokens (docs/design.md). Parameter names follow the
authors' models.

EMSAv2 adds an up-sampling branch, ``Proj(O + LN(PixelShuffle_r(dwconv3x3(V)))[:H, :W])``:
for r = 1 or even the up-sampled map is ``r * ceil(H / r) >= H`` high and is cropped to
(H, W), which crops nothing where r divides H (the only sizes the authors' code runs on).
"""
from typing import Optional, Tuple

import torch
from mmcv.cnn import build_norm_layer
from torch import Tensor, nn

from .dispatch import ATTN_IMPLS, attend, tokens_to_map
from .emsa_ops import trace_friendly


def build_reduction(embed_dims: int, sr_ratio: int,
                    norm_cfg: dict) -> Tuple[nn.Conv2d, nn.Module]:
    """The depthwise reduction conv and the norm after it (``sr``, ``sr_norm``)."""
    conv = nn.Conv2d(embed_dims, embed_dims, kernel_size=sr_ratio + 1, stride=sr_ratio,
                     padding=sr_ratio // 2, groups=embed_dims)
    return conv, build_norm_layer(norm_cfg, embed_dims)[1]


class ReducedKVAttention(nn.Module):
    """What EMSA and EMSAv2 share: queries from the tokens, keys and values from the
    spatially reduced tokens. Subclasses build ``q``, ``kv`` and, for ``sr_ratio > 1``,
    ``sr`` and ``sr_norm``. ``attn_impl`` is one of :data:`ATTN_IMPLS` (or ``'fused'``,
    the former name of ``'lean'``)."""

    def __init__(self, embed_dims: int, num_heads: int, sr_ratio: int,
                 qk_scale: Optional[float], attn_impl: str) -> None:
        super().__init__()
        if embed_dims % num_heads != 0:
            raise ValueError(f'embed_dims ({embed_dims}) must be divisible by '
                             f'num_heads ({num_heads})')
        attn_impl = 'lean' if attn_impl == 'fused' else attn_impl
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f'attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}')
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.head_dims = embed_dims // num_heads
        self.scale = qk_scale or self.head_dims**-0.5
        self.sr_ratio = sr_ratio
        self.attn_impl = attn_impl

    def reduce_tokens(self, x: Tensor, hw_shape: Tuple[int, int]
                      ) -> Tuple[Tensor, Tuple[int, int]]:
        """``sr_norm(sr(x as a map))`` and its (h, w); ``x`` itself for ``sr_ratio`` 1."""
        if self.sr_ratio == 1:
            return x, hw_shape
        x_map = self.sr(tokens_to_map(x, hw_shape))
        return self.sr_norm(x_map.flatten(2).transpose(1, 2)), (x_map.shape[2], x_map.shape[3])

    def project(self, x: Tensor, hw_shape: Tuple[int, int]
                ) -> Tuple[Tensor, Tensor, Tensor, Tuple[int, int]]:
        """``q`` (B, heads, N, head_dim), ``k``, ``v`` (B, heads, M, head_dim) (views of
        the projections) and the (h, w) of the reduced map."""
        B, N, C = x.shape
        h, d = self.num_heads, self.head_dims
        q = self.q(x).reshape(B, N, h, d).transpose(1, 2)
        kv_in, kv_hw = self.reduce_tokens(x, hw_shape)
        kv = self.kv(kv_in)
        k, v = kv.reshape(B, -1, 2, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v, kv_hw


class EMSA(ReducedKVAttention):
    """Efficient multi-head self-attention: keys and values from the map reduced by a
    depthwise conv and a norm; with several heads a 1x1 conv mixes the heads of the scores
    before the softmax, and an instance norm follows.

    Args:
        embed_dims (int): Channels of the tokens.
        num_heads (int): Number of attention heads. Defaults to 1.
        sr_ratio (int): Spatial reduction ratio of keys and values. Defaults to 1.
        qkv_bias (bool): Bias in the q and kv projections. Defaults to True.
        qk_scale (float, optional): Override of ``head_dim ** -0.5``. Defaults to None.
        attn_drop (float): Dropout on the attention map. Defaults to 0.
        proj_drop (float): Dropout after the output projection. Defaults to 0.
        apply_transform (bool): Mix heads and instance-normalise the attention map
            (used only where ``num_heads > 1``). Defaults to True.
        norm_cfg (dict, optional): Config of the norm after the reduction conv.
            Defaults to ``dict(type='LN')``.
        attn_impl (str): One of :data:`ATTN_IMPLS`, the same function (see
            :func:`attend`). Defaults to 'lean'.
    """

    def __init__(self,
                 embed_dims: int,
                 num_heads: int = 1,
                 sr_ratio: int = 1,
                 qkv_bias: bool = True,
                 qk_scale: Optional[float] = None,
                 attn_drop: float = 0.,
                 proj_drop: float = 0.,
                 apply_transform: bool = True,
                 norm_cfg: Optional[dict] = None,
                 attn_impl: str = 'lean') -> None:
        super().__init__(embed_dims, num_heads, sr_ratio, qk_scale, attn_impl)
        norm_cfg = dict(type='LN') if norm_cfg is None else norm_cfg

        self.q = nn.Linear(embed_dims, embed_dims, bias=qkv_bias)
        self.kv = nn.Linear(embed_dims, embed_dims * 2, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(embed_dims, embed_dims)
        self.proj_drop = nn.Dropout(proj_drop)
        if sr_ratio > 1:
            self.sr, self.sr_norm = build_reduction(embed_dims, sr_ratio, norm_cfg)
        self.apply_transform = apply_transform and num_heads > 1
        if self.apply_transform:
            self.transform_conv = nn.Conv2d(num_heads, num_heads, kernel_size=1)

    def forward(self, x: Tensor, hw_shape: Tuple[int, int]) -> Tensor:
        """Tokens (B, N, C) of an (H, W) map -> tokens (B, N, C)."""
        B, N, C = x.shape
        q, k, v = self.project(x, hw_shape)[:3]
        out = attend(q, k, v, self.scale, self.attn_impl,
                     self.transform_conv if self.apply_transform else None,
                     self.attn_drop.p, self.training)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))


class EMSAv2(ReducedKVAttention):
    """Efficient multi-head self-attention of ResT V2 (no head mixing), with the
    up-sampling branch.

    Args:
        embed_dims (int): Channels of the tokens.
        num_heads (int): Number of attention heads. Defaults to 1.
        sr_ratio (int): Spatial reduction ratio: 1 or even. Defaults to 1.
        norm_cfg (dict, optional): Config of the norms. Defaults to
            ``dict(type='LN', eps=1e-6)``.
        attn_impl (str): One of :data:`~mmrest.models.layers.ATTN_IMPLS`.
            Defaults to 'lean'.
    """

    def __init__(self,
                 embed_dims: int,
                 num_heads: int = 1,
                 sr_ratio: int = 1,
                 norm_cfg: Optional[dict] = None,
                 attn_impl: str = 'lean') -> None:
        if sr_ratio < 1 or (sr_ratio > 1 and sr_ratio % 2):
            raise ValueError(f'sr_ratio must be 1 or even, got {sr_ratio} (with an odd '
                             'ratio the up-sampled values may not cover the query map)')
        super().__init__(embed_dims, num_heads, sr_ratio, None, attn_impl)
        norm_cfg = dict(type='LN', eps=1e-6) if norm_cfg is None else norm_cfg

        self.q = nn.Linear(embed_dims, embed_dims)
        self.kv = nn.Linear(embed_dims, embed_dims * 2)
        if sr_ratio > 1:
            self.sr, self.sr_norm = build_reduction(embed_dims, sr_ratio, norm_cfg)
        self.up = nn.Sequential(
            nn.Conv2d(embed_dims, sr_ratio * sr_ratio * embed_dims, kernel_size=3,
                      padding=1, groups=embed_dims), nn.PixelShuffle(sr_ratio))
        self.up_norm = build_norm_layer(norm_cfg, embed_dims)[1]
        self.proj = nn.Linear(embed_dims, embed_dims)

    def forward(self, x: Tensor, hw_shape: Tuple[int, int]) -> Tensor:
        """Tokens (B, N, C) of an (H, W) map -> tokens (B, N, C)."""
        B, N, C = x.shape
        q, k, v, kv_hw = self.project(x, hw_shape)
        out = attend(q, k, v, self.scale, self.attn_impl).transpose(1, 2).reshape(B, N, C)
        return self.proj(out + self._upsample(v, kv_hw, hw_shape))

    def _upsample(self, v: Tensor, kv_hw: Tuple[int, int],
                  hw_shape: Tuple[int, int]) -> Tensor:
        """U, tokens (B, N, C), from the values (B, heads, M, head_dim)."""
        B, (H, W) = v.shape[0], hw_shape
        up = self.up(v.transpose(-1, -2).reshape(B, self.embed_dims, *kv_hw))
        if trace_friendly():
            # torch.export cannot prove r * h >= H for symbolic sizes (a slice would need
            # it): take the rows and columns by index instead
            up = up.index_select(2, torch.arange(H, device=up.device))
            up = up.index_select(3, torch.arange(W, device=up.device))
        else:
            up = up[:, :, :H, :W]
        return self.up_norm(up.flatten(2).transpose(1, 2))
