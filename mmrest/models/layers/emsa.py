"""Efficient Multi-head Self-Attention (EMSA) of ResT.

ResT: An Efficient Transformer for Visual Recognition (Zhang & Yang, NeurIPS 2021,
https://arxiv.org/abs/2105.13677); authors' code: https://github.com/wofmanaf/ResT.

Parameter names (``q``, ``kv``, ``sr``, ``sr_norm``, ``transform_conv``, ``proj``) follow the
authors' models so that their checkpoints load without renaming.
"""
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from mmcv.cnn import build_norm_layer
from torch import Tensor, nn

from .embed import runs_as_written
# INSTANCE_NORM_EPS: ``eps`` of the InstanceNorm2d applied to the attention map (1e-5,
# PyTorch's default).
from .emsa_ops import INSTANCE_NORM_EPS, cpu_tuned, emsa_fused

ATTN_IMPLS = ('fused', 'reference')


def build_reduction(embed_dims: int, sr_ratio: int,
                    norm_cfg: dict) -> Tuple[nn.Conv2d, nn.Module]:
    """The reduction conv (depthwise, kernel ``sr_ratio + 1``, stride ``sr_ratio``,
    padding ``sr_ratio // 2``, with bias) and the norm after it (``sr``, ``sr_norm``)."""
    conv = nn.Conv2d(
        embed_dims,
        embed_dims,
        kernel_size=sr_ratio + 1,
        stride=sr_ratio,
        padding=sr_ratio // 2,
        groups=embed_dims)
    return conv, build_norm_layer(norm_cfg, embed_dims)[1]


def emsa_reference(q: Tensor, k: Tensor, v: Tensor, scale: float,
                   transform_weight: Optional[Tensor] = None,
                   transform_bias: Optional[Tensor] = None,
                   attn_drop: float = 0.,
                   training: bool = False,
                   eps: float = INSTANCE_NORM_EPS,
                   transform: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """The straightforward EMSA attention core, as the equations are written.

    Args:
        q (Tensor): Queries of shape (B, heads, N, head_dim).
        k (Tensor): Keys of shape (B, heads, M, head_dim).
        v (Tensor): Values of shape (B, heads, M, head_dim).
        scale (float): Multiplier of the scores ``q @ k^T``.
        transform_weight (Tensor, optional): Weight (heads, heads, 1, 1) of the 1x1 conv
            that mixes the heads of the score tensor. ``None`` means plain softmax
            attention. Defaults to None.
        transform_bias (Tensor, optional): Bias (heads,) of that conv. Defaults to None.
        attn_drop (float): Dropout probability on the attention map. Defaults to 0.
        training (bool): Whether dropout is active. Defaults to False.
        eps (float): ``eps`` of the instance norm. Defaults to 1e-5.
        transform (Callable, optional): The head-mixing conv itself (a module, whose
            hooks then run), called on the scores in place of ``transform_weight`` and
            ``transform_bias``. Defaults to None.

    Returns:
        Tensor: Output of shape (B, heads, N, head_dim).

    Note:
        Where a head's score map has a single element (one query and one key), the
        instance norm of it is 0/sqrt(0 + eps) = 0, the limit of the formula; PyTorch's
        ``InstanceNorm2d`` refuses such a map, so the normalisation is written out here.
    """
    attn = (q @ k.transpose(-2, -1)) * scale
    if transform is not None or transform_weight is not None:
        attn = (transform(attn) if transform is not None
                else F.conv2d(attn, transform_weight, transform_bias))
        attn = attn.softmax(dim=-1)
        mean = attn.mean(dim=(-2, -1), keepdim=True)
        var = attn.var(dim=(-2, -1), keepdim=True, unbiased=False)
        attn = (attn - mean) / torch.sqrt(var + eps)
    else:
        attn = attn.softmax(dim=-1)
    attn = F.dropout(attn, attn_drop, training)
    return attn @ v


class ReducedKVAttention(nn.Module):
    """What the attentions of ResT (:class:`EMSA`) and ResT V2
    (:class:`~mmrest.models.layers.EMSAv2`) share: the head settings, queries from the
    tokens, keys and values from the spatially reduced tokens.

    Subclasses build ``q``, ``kv`` and, for ``sr_ratio > 1``, ``sr`` and ``sr_norm``
    (:func:`build_reduction`), in the order of their authors' models.

    Args:
        embed_dims (int): Channels of the tokens.
        num_heads (int): Number of attention heads.
        sr_ratio (int): Spatial reduction ratio of keys and values.
        qk_scale (float, optional): Override of ``head_dim ** -0.5``.
        attn_impl (str): One of :data:`ATTN_IMPLS`.
    """

    def __init__(self, embed_dims: int, num_heads: int, sr_ratio: int,
                 qk_scale: Optional[float], attn_impl: str) -> None:
        super().__init__()
        if embed_dims % num_heads != 0:
            raise ValueError(f'embed_dims ({embed_dims}) must be divisible by '
                             f'num_heads ({num_heads})')
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
        """The tokens keys and values are computed from: ``sr_norm(sr(x as a map))``.

        Args:
            x (Tensor): Tokens (B, N, C) of an (H, W) map, N = H * W.
            hw_shape (tuple[int, int]): (H, W).

        Returns:
            tuple[Tensor, tuple[int, int]]: Tokens (B, M, C) and their map's (h, w); ``x``
            and (H, W) themselves where ``sr_ratio`` is 1.
        """
        if self.sr_ratio == 1:
            return x, hw_shape
        B, N, C = x.shape
        if cpu_tuned(x):
            # A channels-last view of the token map (no copy). Built this way its
            # strides are unambiguous even for B = 1, so the depthwise conv takes
            # oneDNN's channels-last kernel (an order of magnitude faster here than the
            # NCHW fallback that ``x.transpose(1, 2).reshape(B, C, H, W)`` triggers for
            # B = 1), and its channels-last output flattens back to tokens without a
            # copy.
            x_map = x.reshape(B, *hw_shape, C).permute(0, 3, 1, 2)
        else:
            x_map = x.transpose(1, 2).reshape(B, C, *hw_shape).contiguous()
        x_map = self.sr(x_map)
        return self.sr_norm(x_map.flatten(2).transpose(1, 2)), (x_map.shape[2], x_map.shape[3])

    def project(self, x: Tensor, hw_shape: Tuple[int, int]
                ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tuple[int, int]]:
        """Queries, keys and values of tokens (B, N, C) of an (H, W) map.

        Returns:
            tuple: ``q`` (B, heads, N, head_dim), ``k`` and ``v`` (B, heads, M, head_dim)
            (views of the projections, no copies), the ``kv`` projection (B, M, 2 C)
            (``k`` is its first C channels, ``v`` its last C, channel ``head * head_dim +
            j`` in each) and the (h, w) of the reduced map (M = h * w).
        """
        B, N, C = x.shape
        h, d = self.num_heads, self.head_dims
        q = self.q(x).reshape(B, N, h, d).transpose(1, 2)
        kv_in, kv_hw = self.reduce_tokens(x, hw_shape)
        kv = self.kv(kv_in)
        k, v = kv.reshape(B, -1, 2, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v, kv, kv_hw


class EMSA(ReducedKVAttention):
    """Efficient multi-head self-attention.

    Keys and values come from the input map shrunk by a depthwise conv (kernel
    ``sr_ratio + 1``, stride ``sr_ratio``, padding ``sr_ratio // 2``) and a LayerNorm; with
    more than one head, a 1x1 conv mixes the heads of the score tensor ("transform") before
    the softmax, and an instance norm follows it.

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
        attn_impl (str): ``'fused'`` (default, query-blocked and memory-lean, see
            :func:`mmrest.models.layers.emsa_ops.emsa_fused`) or ``'reference'`` (the
            equations as written; kept for tests and benchmarks). Both compute the same
            function; ``'fused'`` falls back to the reference while training with
            attention dropout. Defaults to 'fused'.
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
                 attn_impl: str = 'fused') -> None:
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
        """Forward.

        Args:
            x (Tensor): Tokens of shape (B, N, C), N = H * W.
            hw_shape (tuple[int, int]): (H, W) of the token map.

        Returns:
            Tensor: Tokens of shape (B, N, C).
        """
        B, N, C = x.shape
        q, k, v = self.project(x, hw_shape)[:3]
        transform = self.transform_conv if self.apply_transform else None
        if (self.attn_impl == 'reference' or (self.training and self.attn_drop.p > 0)
                or not (transform is None or runs_as_written(transform, nn.Conv2d))):
            # the conv called as a module: hooks on it run, another module type is used
            out = emsa_reference(q, k, v, self.scale, attn_drop=self.attn_drop.p,
                                 training=self.training, transform=transform)
        else:
            # a transposed view of a (B, N, heads, head_dim) tensor: the reshape below
            # is free
            out = emsa_fused(q, k, v, self.scale,
                             None if transform is None else transform.weight,
                             None if transform is None else transform.bias,
                             INSTANCE_NORM_EPS)
        out = out.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(out))
