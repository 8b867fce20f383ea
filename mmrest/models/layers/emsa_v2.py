"""The attention of ResT V2 (EMSAv2): multi-head attention on spatially reduced keys and
values, plus an up-sampling branch that restores what the reduction lost.

Parameter names follow the authors' models. With queries on an (H, W) map and keys/values on the reduced (h, w) map:

.. math::

    O = \\mathrm{concat}_g\\, \\mathrm{softmax}(Q_g K_g^T / \\sqrt{d})\\, V_g, \\qquad
    U = \\mathrm{LN}(\\mathrm{PixelShuffle}_r(\\mathrm{conv}_{3\\times 3, groups=C}(V)))
    [:H, :W], \\qquad \\mathrm{out} = \\mathrm{Proj}(O + U),

where V is the (C, h, w) map of the values (channel ``head * head_dim + j``) and r the
reduction ratio (``PixelShuffle_1`` is the identity).

The crop: for r = 1 or even, ``h = ceil(H / r)``, so ``r * h >= H``. Where r divides H
(the only sizes the authors' code runs on) nothing is cropped; elsewhere the rows and
columns beyond the query map are dropped. Odd r > 1 is refused.
"""
from typing import Optional, Tuple

import torch
from mmcv.cnn import build_norm_layer
from torch import Tensor, nn

from .dispatch import attend
from .emsa import ReducedKVAttention, build_reduction
from .emsa_ops import trace_friendly


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
