r"""Memory-lean training of the block's second half: ``fc2(GELU(fc1(LN(x))))``.

Autograd keeps four tensors of that chain for the backward pass: the LayerNorm's input
:math:`x` (C channels per token), its output :math:`b` (C), the hidden pre-activation
:math:`h` (4C) and the activation :math:`g = \mathrm{GELU}(h)` (4C), i.e. 10C per token,
more than half of what a ResT block keeps. :class:`NormMlpFunction` computes the same
function and keeps only :math:`x`, the LayerNorm's per-token mean and inverse std, and
:math:`h` (5C per token). In the backward pass it recomputes :math:`b` from them (one
element-wise pass) and :math:`g` from :math:`h`, then applies the chain rule with the
same ATen backward kernels autograd would use::

    dW2 = dm^T g,            db2 = sum(dm),
    dh  = GELU'(h) * (dm W2),
    dW1 = dh^T b,            db1 = sum(dh),
    dx, dgamma, dbeta = LayerNorm backward of (dh W1).

The forward values are exactly those of the modules; gradients agree to rounding
(``tests/test_norm_mlp.py``). Fewer kept tensors also mean fewer fresh pages to fault
in at every step (see README "Speed and memory").
"""
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable


class NormMlpFunction(torch.autograd.Function):
    """``fc2(GELU(fc1(LayerNorm(x))))`` keeping x, the LayerNorm statistics and the
    hidden pre-activation only (exact GELU, no dropout)."""

    @staticmethod
    def forward(ctx, x: Tensor, ln_weight: Tensor, ln_bias: Tensor, eps: float,
                w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
        """Forward.

        Args:
            x (Tensor): Tokens (..., C).
            ln_weight (Tensor): LayerNorm weight (C,).
            ln_bias (Tensor): LayerNorm bias (C,).
            eps (float): LayerNorm ``eps``.
            w1 (Tensor): fc1 weight (hidden, C).
            b1 (Tensor): fc1 bias (hidden,).
            w2 (Tensor): fc2 weight (C, hidden).
            b2 (Tensor): fc2 bias (C,).

        Returns:
            Tensor: (..., C).
        """
        normed, mean, rstd = torch.native_layer_norm(x, x.shape[-1:], ln_weight, ln_bias,
                                                     eps)
        hidden = F.linear(normed, w1, b1)
        del normed
        out = F.linear(F.gelu(hidden), w2, b2)
        ctx.save_for_backward(x, mean, rstd, hidden, ln_weight, ln_bias, w1, w2)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        """Backward (recomputes the LayerNorm output and the activation)."""
        x, mean, rstd, hidden, ln_weight, ln_bias, w1, w2 = ctx.saved_tensors
        C = x.shape[-1]
        dm = grad_out.reshape(-1, C)
        h2 = hidden.reshape(-1, hidden.shape[-1])
        need = ctx.needs_input_grad
        grad_w2 = dm.t().mm(F.gelu(h2)) if need[6] else None
        grad_b2 = dm.sum(0) if need[7] else None
        dh = torch.ops.aten.gelu_backward(dm.mm(w2), h2)
        del h2
        normed = torch.addcmul(ln_bias, (x - mean) * rstd, ln_weight).reshape(-1, C)
        grad_w1 = dh.t().mm(normed) if need[4] else None
        grad_b1 = dh.sum(0) if need[5] else None
        del normed
        d_normed = dh.mm(w1).reshape(x.shape)
        del dh
        grad_x, grad_lnw, grad_lnb = torch.ops.aten.native_layer_norm_backward(
            d_normed, x, [C], mean, rstd, ln_weight, ln_bias,
            [need[0], need[1], need[2]])
        return grad_x, grad_lnw, grad_lnb, None, grad_w1, grad_b1, grad_w2, grad_b2


def norm_mlp_applies(x: Tensor, norm: nn.Module, mlp: nn.Module) -> bool:
    """Whether :func:`norm_mlp` computes ``mlp(norm(x))`` for this call.

    Only where it is the same function and measured to help: a gradient is needed, the
    tokens are float32/float64 CPU tensors outside autocast, the norm is an affine
    ``nn.LayerNorm`` over the last dim, the MLP is ``fc1``, exact ``nn.GELU``, ``fc2``
    with biases, and no dropout is active.
    """
    from .emsa_ops import autocast_dtype, cpu_tuned
    return (torch.is_grad_enabled() and cpu_tuned(x)
            and x.dtype in (torch.float32, torch.float64)
            and autocast_dtype(x.device.type) is None
            and type(norm) is nn.LayerNorm and norm.elementwise_affine
            and norm.bias is not None and len(norm.normalized_shape) == 1
            and isinstance(getattr(mlp, 'act', None), nn.GELU)
            and mlp.act.approximate == 'none'
            and mlp.fc1.bias is not None and mlp.fc2.bias is not None
            and (not mlp.training or mlp.drop.p == 0))


def norm_mlp(x: Tensor, norm: nn.LayerNorm, mlp: nn.Module) -> Tensor:
    """``mlp(norm(x))`` through :class:`NormMlpFunction` (see :func:`norm_mlp_applies`).

    Args:
        x (Tensor): Tokens (..., C).
        norm (nn.LayerNorm): The LayerNorm.
        mlp (nn.Module): An MLP with ``fc1``, ``act`` (GELU) and ``fc2``.

    Returns:
        Tensor: (..., C).
    """
    return NormMlpFunction.apply(x, norm.weight, norm.bias, norm.eps, mlp.fc1.weight,
                                 mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)


__all__: Tuple[str, ...] = ('NormMlpFunction', 'norm_mlp', 'norm_mlp_applies')
