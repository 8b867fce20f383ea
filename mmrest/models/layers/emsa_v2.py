"""The attention of ResT V2 (EMSAv2): multi-head attention on spatially reduced keys and
values, plus an up-sampling branch that restores what the reduction lost.

ResT V2: Simpler, Faster and Stronger (Qing-Long Zhang and Yu-Bin Yang, NeurIPS 2022,
https://arxiv.org/abs/2204.07366); authors' code: https://github.com/wofmanaf/ResT
(``models/rest_v2.py``). Parameter names (``q``, ``kv``, ``sr``, ``sr_norm``, ``up.0``,
``up_norm``, ``proj``) follow the authors' models so that their checkpoints load as they
are.

With queries on an (H, W) map and keys/values on the reduced (h, w) map:

.. math::

    O = \\mathrm{concat}_g\\, \\mathrm{softmax}(Q_g K_g^T / \\sqrt{d})\\, V_g, \\qquad
    U = \\mathrm{LN}(\\mathrm{PixelShuffle}_r(\\mathrm{conv}_{3\\times 3, groups=C}(V)))
    [:H, :W], \\qquad \\mathrm{out} = \\mathrm{Proj}(O + U),

where V is the (C, h, w) map of the values (channel ``head * head_dim + j``) and r the
reduction ratio (``PixelShuffle_1`` is the identity).

**The crop.** The reduction conv (kernel r + 1, stride r, padding r // 2) gives
``h = ceil(H / r)`` for even r (and r = 1), so the up-sampled map is ``r * h >= H`` high.
The authors' code reshapes the values with ``H // r`` and fails unless r divides H; where
it runs, ``r * h == H`` and nothing is cropped. Everywhere else the up-sampled map is
cropped to its top-left (H, W): the rows and columns beyond the query map are dropped,
those it keeps are exactly the authors' function of the values there
(``tests/test_restv2_backbone.py`` checks both). Odd reduction ratios other than 1 can give
``r * h < H`` and are refused by :class:`EMSAv2`.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from mmcv.cnn import build_norm_layer
from torch import Tensor, nn

from .block import add_residual
from .embed import runs_as_written
from .emsa import ReducedKVAttention, build_reduction, emsa_reference
from .emsa_ops import emsa_fused, trace_friendly


class EMSAv2(ReducedKVAttention):
    """Efficient multi-head self-attention of ResT V2 (no head mixing, no instance norm),
    with the up-sampling branch.

    Args:
        embed_dims (int): Channels of the tokens.
        num_heads (int): Number of attention heads. Defaults to 1.
        sr_ratio (int): Spatial reduction ratio of keys and values: 1 or even.
            Defaults to 1.
        norm_cfg (dict, optional): Config of the norms after the reduction and the
            up-sampling. Defaults to ``dict(type='LN', eps=1e-6)``.
        attn_impl (str): ``'fused'`` (default: the attention through PyTorch's
            ``scaled_dot_product_attention``, see
            :func:`mmrest.models.layers.emsa_ops.emsa_fused`; the pixel shuffle, crop and
            change to tokens in one copy; in place where that is safe on the CPU) or
            ``'reference'`` (the equations as the authors wrote them: materialised
            scores, ``nn.PixelShuffle``). Both compute the same function.
            Defaults to 'fused'.
    """

    def __init__(self,
                 embed_dims: int,
                 num_heads: int = 1,
                 sr_ratio: int = 1,
                 norm_cfg: Optional[dict] = None,
                 attn_impl: str = 'fused') -> None:
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
            nn.Conv2d(
                embed_dims,
                sr_ratio * sr_ratio * embed_dims,
                kernel_size=3,
                padding=1,
                groups=embed_dims), nn.PixelShuffle(sr_ratio))
        self.up_norm = build_norm_layer(norm_cfg, embed_dims)[1]
        self.proj = nn.Linear(embed_dims, embed_dims)

    def forward(self, x: Tensor, hw_shape: Tuple[int, int]) -> Tensor:
        """Tokens (B, N, C) of an (H, W) map -> tokens (B, N, C), as
        :meth:`mmrest.models.layers.EMSA.forward`."""
        B, N, C = x.shape
        q, k, v, kv, kv_hw = self.project(x, hw_shape)
        if self.attn_impl == 'reference':
            out = emsa_reference(q, k, v, self.scale).transpose(1, 2).reshape(B, N, C)
            return self.proj(out + self._upsample_reference(v, kv_hw, hw_shape))
        # (B, heads, N, head_dim) -> (B, N, C): free where SDPA returns, as its CPU
        # kernels do, a transposed view of a (B, N, heads, head_dim) tensor
        out = emsa_fused(q, k, v, self.scale).transpose(1, 2).reshape(B, N, C)
        del q  # not needed any more: its memory serves the up-sampling
        if not (runs_as_written(self.up, nn.Sequential)
                and runs_as_written(self.up[0], nn.Conv2d)
                and self.up[0].padding_mode == 'zeros'
                and runs_as_written(self.up[1], nn.PixelShuffle)):
            # hooks or other modules there: called as they are
            up = self._upsample_reference(v, kv_hw, hw_shape)
            return self.proj(out + up)
        # on the CPU without autograd ``out`` is added into the fresh ``up``
        return self.proj(
            add_residual(out, self._upsample(kv[..., C:], kv_hw, hw_shape), (self.up_norm, )))

    def _upsample_reference(self, v: Tensor, kv_hw: Tuple[int, int],
                            hw_shape: Tuple[int, int]) -> Tensor:
        """U as the authors compute it, from the values (B, heads, M, head_dim)."""
        B, _, M, _ = v.shape
        v_map = v.transpose(-1, -2).reshape(B, self.embed_dims, *kv_hw)
        up = self.up(v_map)[:, :, :hw_shape[0], :hw_shape[1]]
        return self.up_norm(up.flatten(2).transpose(1, 2))

    def _upsample(self, v: Tensor, kv_hw: Tuple[int, int],
                  hw_shape: Tuple[int, int]) -> Tensor:
        """U from the value tokens (B, M, C) (any strides); returns (B, N, C) tokens.

        The pixel shuffle and the change to tokens are one permuted copy of the conv
        output, (B, C, r, r, h, w) -> (B, h, r, w, r, C); the crop is a view of it.
        """
        B, M, C = v.shape
        r = self.sr_ratio
        h, w = kv_hw
        H, W = hw_shape
        # NCHW on every device: a channels-last view of the tokens was no faster on the
        # CPU here (ResTV2-tiny stage 1 at 800x1344, 2 threads: 99-148 vs 111-121 ms)
        v_map = v.transpose(1, 2).reshape(B, C, h, w)
        conv = self.up[0]
        y = F.conv2d(v_map, conv.weight, conv.bias, padding=1, groups=C)
        if r == 1:  # no shuffle, nothing to crop
            return self.up_norm(y.flatten(2).transpose(1, 2))
        y = y.reshape(B, C, r, r, h, w).permute(0, 4, 2, 5, 3, 1).reshape(B, h * r, w * r, C)
        if trace_friendly():
            # torch.export cannot prove r * h >= H for symbolic sizes (a slice would need
            # it): take the rows and columns by index instead
            y = y.index_select(1, torch.arange(H, device=y.device))
            y = y.index_select(2, torch.arange(W, device=y.device))
        else:
            y = y[:, :H, :W]
        return self.up_norm(y).reshape(B, H * W, C)
