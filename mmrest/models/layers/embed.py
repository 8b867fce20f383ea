"""Convolutional embeddings of ResT and ResT V2: pixel-attention position encoding, stems,
patch embeddings.

ResT: An Efficient Transformer for Visual Recognition (Zhang & Yang, NeurIPS 2021,
https://arxiv.org/abs/2105.13677); ResT V2: Simpler, Faster and Stronger (Zhang & Yang,
NeurIPS 2022, https://arxiv.org/abs/2204.07366); authors' code:
https://github.com/wofmanaf/ResT. Module names (``conv1``, ``norm1``, ``pos.pa_conv``,
``proj.0``, ...) follow the authors' models.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from mmcv.cnn import build_norm_layer
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .emsa_ops import autocast_dtype, cpu_tuned


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


def _ln_cfg(norm_cfg: Optional[dict]) -> dict:
    return dict(type='LN', eps=1e-6) if norm_cfg is None else norm_cfg


def stem_layout(x: Tensor) -> Tensor:
    """The layout a stem's convolutions run in: channels-last on the CPU (oneDNN's
    convs ran 25-45% faster here in that layout, and the output map flattens to
    (B, H * W, C) tokens without a copy), the input's own elsewhere."""
    if cpu_tuned(x):
        return x.contiguous(memory_format=torch.channels_last)
    return x


class PixelAttentionFunction(torch.autograd.Function):
    """``x * sigmoid(dwconv3x3(x) + bias)`` keeping x only: the backward pass recomputes
    the gate (one depthwise conv and a sigmoid) instead of keeping the gate map, which
    autograd keeps besides x (one map as large as x per PA; ResT-small's four PAs keep
    48 MB at 224x224 batch 32 that way)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        """Forward of a (B, C, H, W) map with the (C, 1, 3, 3) weight and (C,) bias."""
        gate = F.conv2d(x, weight, bias, padding=1, groups=x.shape[1]).sigmoid_()
        ctx.save_for_backward(x, weight, bias)
        return gate.mul_(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        """Backward: dx = g * s + conv^T(g * x * s * (1 - s)), s = sigmoid(conv(x))."""
        x, weight, bias = ctx.saved_tensors
        channels = x.shape[1]
        need = ctx.needs_input_grad
        gate = F.conv2d(x, weight, bias, padding=1, groups=channels).sigmoid_()
        grad_x = grad_out * gate if need[0] else None
        # g * x * s * (1 - s), in the gate's buffer
        grad_pre = gate.sub_(gate.square()).mul_(grad_out).mul_(x)
        conv_grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_pre, x, weight, [channels], [1, 1], [1, 1], [1, 1], False, [0, 0],
            channels, [need[0], need[1], need[2]])
        if need[0]:
            grad_x.add_(conv_grad_x)
        if grad_w is not None and grad_w.stride() != weight.stride():
            # the strides of the weight itself (a channels-last x gives other strides
            # of the size-1 dim, which DDP's gradient buckets would copy to match)
            grad_w = torch.empty_like(weight).copy_(grad_w)
        return grad_x, grad_w, grad_b


class PixelAttention(nn.Module):
    """Pixel-attention (PA) position encoding: ``x * sigmoid(dwconv3x3(x))``.

    With ``recompute_gate`` (the default; the backbones set it from their ``attn_impl``:
    True for ``'fused'``, False for ``'reference'``), CPU training outside autocast runs
    :class:`PixelAttentionFunction`, which keeps x only (where ``pa_conv`` is a plain
    ``nn.Conv2d`` with zero padding and no hooks, :func:`runs_as_written`), and CPU
    inference computes the gate and the product in place in the conv's output (unless
    ``pa_conv`` has hooks, which would see their output overwritten).

    Args:
        channels (int): Channels of the input map.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.pa_conv = nn.Conv2d(
            channels, channels, kernel_size=3, padding=1, groups=channels)
        self.recompute_gate = True

    def forward(self, x: Tensor) -> Tensor:
        conv = self.pa_conv
        if (self.recompute_gate and torch.is_grad_enabled() and cpu_tuned(x)
                and autocast_dtype(x.device.type) is None
                and runs_as_written(conv, nn.Conv2d) and conv.padding_mode == 'zeros'
                and conv.bias is not None
                and x.dtype == conv.weight.dtype == conv.bias.dtype
                and (x.requires_grad or conv.weight.requires_grad
                     or conv.bias.requires_grad)):
            return PixelAttentionFunction.apply(x, conv.weight, conv.bias)
        if (self.recompute_gate and cpu_inference(x) and x.dtype == conv.weight.dtype
                and not has_hooks(conv)):
            # CPU inference: the gate and the product in place in the conv's fresh
            # output (the same values; no two more maps to allocate)
            return conv(x).sigmoid_().mul_(x)
        return x * conv(x).sigmoid()


def set_cpu_fusions(module: nn.Module, enabled: bool) -> nn.Module:
    """Set ``recompute_gate`` of every :class:`PixelAttention` and ``fold_norm`` of every
    module that has one (the stems and patch embeddings, :func:`conv_norm`) in ``module``.

    Args:
        module (nn.Module): A backbone, stem or patch embedding.
        enabled (bool): Whether CPU training recomputes the PA gate and CPU inference
            folds the BatchNorms into the convolutions before them.

    Returns:
        nn.Module: ``module``.
    """
    for m in module.modules():
        if isinstance(m, PixelAttention):
            m.recompute_gate = enabled
        if hasattr(m, 'fold_norm'):  # the stems and patch embeddings with BatchNorms
            m.fold_norm = enabled
    return module


def has_hooks(*modules: nn.Module) -> bool:
    """Whether calling these modules would run hooks, their own or global ones: forward,
    forward-pre, backward and backward-pre hooks. A shortcut that bypasses the modules
    must not skip them. Hooks with an ``observes_only`` attribute set to True (they
    change no input, output or weight and keep no output, e.g. the profiler ranges of
    ``tools/analysis/profile_step.py``) do not count."""
    from torch.nn.modules import module as module_globals
    tables = [module_globals._global_forward_hooks, module_globals._global_forward_pre_hooks,
              module_globals._global_backward_hooks,
              module_globals._global_backward_pre_hooks]
    for m in modules:
        tables += (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks,
                   m._backward_pre_hooks)
    return any(not getattr(hook, 'observes_only', False)
               for table in tables if table for hook in table.values())


def runs_as_written(module: nn.Module, cls: type) -> bool:
    """Whether a shortcut may use ``module``'s parameters in place of calling it: it is a
    plain ``cls`` (not a subclass, e.g. a quantization-aware or pruned variant) and
    calling it would run no hook (:func:`has_hooks`)."""
    return type(module) is cls and not has_hooks(module)


def cpu_inference(x: Tensor) -> bool:
    """Whether ``x`` runs in CPU inference in eager mode outside autocast, where the
    inference shortcuts of this module (folded norms, the in-place PA) may apply."""
    return (not torch.is_grad_enabled() and cpu_tuned(x)
            and autocast_dtype(x.device.type) is None)


def conv_norm(conv: nn.Conv2d, norm: nn.Module, x: Tensor, fold: bool = True) -> Tensor:
    """``norm(conv(x))``; in CPU inference with an eval-mode BatchNorm, one convolution
    with the norm folded into its weight and bias.

    Folding saves the norm's pass over the map (2.5% of ResT-small's inference at
    224x224 batch 16 here, A/B in one process). The folded weight
    ``w * gamma / sqrt(var + eps)`` is made at each call (a few thousand values): the
    same function to rounding (about 1e-7 relative), whatever was loaded into the norm.
    Only for a plain ``nn.Conv2d`` and an eval-mode ``nn.BatchNorm2d`` / ``SyncBatchNorm``
    with running statistics and affine parameters of the input's dtype, and only where
    neither module has forward hooks (pre-hooks such as ``weight_norm``'s included).

    Args:
        conv (nn.Conv2d): The convolution.
        norm (nn.Module): The norm after it.
        x (Tensor): Input map (B, C, H, W).
        fold (bool): Whether folding may apply. Defaults to True.

    Returns:
        Tensor: ``norm(conv(x))``.
    """
    if (fold and cpu_inference(x) and isinstance(norm, (nn.BatchNorm2d, nn.SyncBatchNorm))
            and type(norm).forward in (nn.BatchNorm2d.forward, nn.SyncBatchNorm.forward)
            and not norm.training and norm.affine and norm.track_running_stats
            and norm.running_var is not None and x.dim() == 4
            and type(conv) is nn.Conv2d and conv.padding_mode == 'zeros'
            and not has_hooks(conv, norm)
            and all(t.dtype == x.dtype for t in (conv.weight, norm.weight, norm.bias,
                                                 norm.running_mean, norm.running_var))
            and (conv.bias is None or conv.bias.dtype == x.dtype)):
        scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)
        bias = norm.bias - norm.running_mean * scale
        if conv.bias is not None:
            bias = bias + conv.bias * scale
        return F.conv2d(x, conv.weight * scale.reshape(-1, 1, 1, 1), bias, conv.stride,
                        conv.padding, conv.dilation, conv.groups)
    return norm(conv(x))


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
        self.fold_norm = True  # see conv_norm

    def forward(self, x: Tensor) -> Tensor:
        x = stem_layout(x)
        x = self.act(conv_norm(self.conv1, self.norm1, x, self.fold_norm))
        x = self.act(conv_norm(self.conv2, self.norm2, x, self.fold_norm))
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
        self.fold_norm = True  # see conv_norm

    def forward(self, x: Tensor) -> Tensor:
        return self.pos(conv_norm(self.conv, self.norm, x, self.fold_norm))


class ConvStemV2(nn.Module):
    """The ResT V2 stem (stride 4): conv3x3/2 + BN + ReLU, conv3x3/2 + BN + ReLU, conv1x1,
    PA, then a LayerNorm of the tokens.

    Args:
        in_channels (int): Input channels. Defaults to 3.
        out_channels (int): Output channels. Defaults to 96.
        norm_cfg (dict, optional): Config of the two BatchNorms. Defaults to
            ``dict(type='BN')``.
        token_norm_cfg (dict, optional): Config of the token norm. Defaults to
            ``dict(type='LN', eps=1e-6)``.
    """

    def __init__(self,
                 in_channels: int = 3,
                 out_channels: int = 96,
                 norm_cfg: Optional[dict] = None,
                 token_norm_cfg: Optional[dict] = None) -> None:
        super().__init__()
        hidden = out_channels // 2
        norm_cfg = _bn_cfg(norm_cfg)
        # indices 0-6 as in the authors' ``stem.proj`` (2 and 5 are the ReLUs)
        self.proj = nn.Sequential(
            nn.Conv2d(in_channels, hidden, kernel_size=3, stride=2, padding=1, bias=False),
            build_norm_layer(norm_cfg, hidden)[1], nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, kernel_size=3, stride=2, padding=1, bias=False),
            build_norm_layer(norm_cfg, out_channels)[1], nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=1))
        self.pos = PixelAttention(out_channels)
        self.norm = build_norm_layer(_ln_cfg(token_norm_cfg), out_channels)[1]
        self.fold_norm = True  # see conv_norm

    def forward(self, x: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        """Images (B, C_in, H, W) -> tokens (B, h * w, C) of the (h, w) map."""
        x, proj = stem_layout(x), self.proj
        if self.fold_norm and cpu_inference(x) and not has_hooks(proj):
            x = proj[2](conv_norm(proj[0], proj[1], x))
            x = proj[6](proj[5](conv_norm(proj[3], proj[4], x)))
        else:
            x = proj(x)
        x = self.pos(x)
        return self.norm(map_to_tokens(x)), (x.shape[2], x.shape[3])


class PatchEmbedV2(nn.Module):
    """The ResT V2 patch embedding: conv3x3 stride 2 (padding 1, with bias), PA, then a
    LayerNorm of the tokens. The output map is ``ceil(H / 2) x ceil(W / 2)``.

    Args:
        in_channels (int): Input channels.
        out_channels (int): Output channels.
        norm_cfg (dict, optional): Config of the token norm. Defaults to
            ``dict(type='LN', eps=1e-6)``.
    """

    def __init__(self,
                 in_channels: int,
                 out_channels: int,
                 norm_cfg: Optional[dict] = None) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1)
        self.pos = PixelAttention(out_channels)
        self.norm = build_norm_layer(_ln_cfg(norm_cfg), out_channels)[1]

    def forward(self, x: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        """Map (B, C_in, H, W) -> tokens (B, h * w, C) of the (h, w) map."""
        x = self.pos(self.proj(x))
        return self.norm(map_to_tokens(x)), (x.shape[2], x.shape[3])
