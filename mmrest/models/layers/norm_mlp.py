r"""The block's second half, ``fc2(GELU(fc1(LN(x))))``, over blocks of tokens on the CPU:
memory-lean training and inference without hidden-sized tensors.

Autograd keeps four tensors of that chain for the backward pass: the LayerNorm's input
:math:`x` (C channels per token), its output :math:`b` (C), the hidden pre-activation
:math:`h` (4C) and the activation :math:`g = \mathrm{GELU}(h)` (4C), i.e. 10C per token,
more than half of what a ResT block keeps. :class:`NormMlpFunction` computes the same
function and keeps only :math:`x`, the LayerNorm's per-token mean and inverse std, and
:math:`h` (5C per token). In the backward pass it recomputes :math:`b` from them (one
element-wise pass) and :math:`g` from :math:`h`, then applies the chain rule with the
same ATen kernels autograd would use::

    dW2 = dm^T g,            db2 = sum(dm),
    dh  = GELU'(h) * (dm W2),
    dW1 = dh^T b,            db1 = sum(dh),
    dx, dgamma, dbeta = LayerNorm backward of (dh W1).

Both passes run over blocks of :data:`BLOCK_ROWS` tokens: the normalised tokens, the
activation and the hidden-sized gradients of a block live in small buffers that are
reused from block to block and stay in the CPU's caches, and the weight gradients are
accumulated block by block; the LayerNorm backward runs block by block into the rows
of dx. The whole-size tensors are only x, h, the output and dx; inference
(:func:`norm_mlp` without autograd) has no h either. Without blocks every step
allocated and faulted in four fresh hidden-sized tensors per block (4C floats per token
each) and streamed them through memory; with them the LayerNorm + MLP of ResTV2-tiny's
stage 1 at 800x1344, batch 2, took 0.52 s instead of 0.79-0.88 s forward and backward
here (2 threads; stages 2 and 3 0.39 vs 0.52 s and 0.33 vs 0.39 s), and ResT-small's
inference ran 8% faster at 224x224 batch 16 and at 800x1344 (README "Speed and
memory").

Values: every op is the module's own op over a block of rows; forward values agree with
the modules' to rounding (bitwise within one block), gradients to rounding (the weight
gradients are summed block by block; ``tests/test_norm_mlp.py``).
"""
from typing import Optional, Tuple

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

#: Tokens per block of :class:`NormMlpFunction`. Measured here (2 threads, AVX2, 1 MB L2
#: per core) on the LayerNorm + MLP of ResTV2-tiny's stages at 800x1344, batch 2, forward
#: and backward: 682 to 2730 rows ran within 3% of the best at every width (C = 96 to
#: 768); 170 rows or fewer (many small matmuls) ran up to 2x slower, whole-size tensors
#: (one block) 15-40% slower.
BLOCK_ROWS = 1024


def _forward_blocks(x: Tensor, ln_weight: Tensor, ln_bias: Tensor, eps: float,
                    w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, out: Tensor,
                    block_rows: int, keep_hidden: bool) -> Tuple[Tensor, ...]:
    """``fc2(GELU(fc1(LayerNorm(x))))`` over blocks of rows of the (rows, C) tokens,
    written into the (rows, C) ``out``.

    Returns, with ``keep_hidden``, the LayerNorm's (rows, 1) mean and inverse std and the
    (rows, hidden) pre-activation; without it (inference) nothing, the pre-activation of
    a block living in a reused block buffer too.
    """
    C, hidden_dims = x.shape[-1], w1.shape[0]
    rows = x.shape[0]
    block_rows = max(1, min(block_rows, rows))
    act_buf = x.new_empty(block_rows * hidden_dims)
    if keep_hidden:
        hidden = x.new_empty(rows, hidden_dims)
        mean = x.new_empty(rows, 1)
        rstd = x.new_empty(rows, 1)
    for start in range(0, rows, block_rows):
        stop = min(start + block_rows, rows)
        act = act_buf[:(stop - start) * hidden_dims].view(stop - start, hidden_dims)
        normed, block_mean, block_rstd = torch.native_layer_norm(
            x[start:stop], [C], ln_weight, ln_bias, eps)
        if keep_hidden:
            mean[start:stop], rstd[start:stop] = block_mean, block_rstd
        # the pre-activation into the kept h, or (inference) into the activation's buffer
        h = torch.addmm(b1, normed, w1.t(), out=hidden[start:stop] if keep_hidden else act)
        torch.addmm(b2, torch.ops.aten.gelu.out(h, out=act), w2.t(), out=out[start:stop])
    return (mean, rstd, hidden) if keep_hidden else ()


class NormMlpFunction(torch.autograd.Function):
    """``fc2(GELU(fc1(LayerNorm(x))))`` keeping x, the LayerNorm statistics and the
    hidden pre-activation only (exact GELU, no dropout), run over blocks of rows."""

    @staticmethod
    def forward(ctx,
                x: Tensor,
                ln_weight: Tensor,
                ln_bias: Tensor,
                eps: float,
                w1: Tensor,
                b1: Tensor,
                w2: Tensor,
                b2: Tensor,
                block_rows: Optional[int] = None) -> Tensor:
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
            block_rows (int, optional): Tokens per block; None means
                :data:`BLOCK_ROWS`. Defaults to None.

        Returns:
            Tensor: (..., C).
        """
        block_rows = BLOCK_ROWS if block_rows is None else block_rows
        C = x.shape[-1]
        out = x.new_empty(x.shape)  # a fresh tensor, not a view, for autograd
        mean, rstd, hidden = _forward_blocks(x.reshape(-1, C), ln_weight, ln_bias, eps,
                                             w1, b1, w2, b2, out.view(-1, C), block_rows,
                                             keep_hidden=True)
        ctx.save_for_backward(x, mean, rstd, hidden, ln_weight, ln_bias, w1, w2)
        ctx.block_rows = max(1, min(block_rows, hidden.shape[0]))
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        """Backward (recomputes the LayerNorm output and the activation block by
        block)."""
        x, mean, rstd, hidden, ln_weight, ln_bias, w1, w2 = ctx.saved_tensors
        C, hidden_dims = x.shape[-1], w1.shape[0]
        tokens = x.reshape(-1, C)
        rows, block_rows = tokens.shape[0], ctx.block_rows
        dm = grad_out.reshape(-1, C)
        need = ctx.needs_input_grad
        grad_w2 = w2.new_zeros(w2.shape) if need[6] else None
        grad_b2 = dm.sum(0) if need[7] else None
        grad_w1 = w1.new_zeros(w1.shape) if need[4] else None
        grad_b1 = w1.new_zeros(hidden_dims) if need[5] else None
        grad_x = x.new_empty(rows, C) if need[0] else None
        grad_lnw = ln_weight.new_zeros(C) if need[1] else None
        grad_lnb = ln_bias.new_zeros(C) if need[2] else None
        act_buf = x.new_empty(block_rows * hidden_dims)
        dh_buf = x.new_empty(block_rows * hidden_dims)
        normed_buf = x.new_empty(block_rows * C)
        # the LayerNorm backward's outputs of a block: its rows of grad_x, and scratch
        # for the (C,) parameter gradients (and for grad_x if unneeded).
        # All three are computed (the out= overload needs every output defined).
        ln_scratch = [x.new_empty(block_rows * C), x.new_empty(C), x.new_empty(C)]
        for start in range(0, rows, block_rows):
            stop = min(start + block_rows, rows)
            n = stop - start
            h, dm_block = hidden[start:stop], dm[start:stop]
            if grad_w2 is not None:
                act = torch.ops.aten.gelu.out(h, out=act_buf[:n * hidden_dims].view(n, -1))
                grad_w2.addmm_(dm_block.t(), act)
            dh = torch.mm(dm_block, w2, out=dh_buf[:n * hidden_dims].view(n, -1))
            torch.ops.aten.gelu_backward.grad_input(dh, h, grad_input=dh)
            normed = normed_buf[:n * C].view(n, C)
            if grad_w1 is not None:
                torch.sub(tokens[start:stop], mean[start:stop], out=normed)
                torch.addcmul(ln_bias, normed.mul_(rstd[start:stop]), ln_weight,
                              out=normed)
                grad_w1.addmm_(dh.t(), normed)
            if grad_b1 is not None:
                grad_b1.add_(dh.sum(0))
            if need[0] or need[1] or need[2]:
                d_normed = torch.mm(dh, w1, out=normed)
                grad_x_block = (grad_x[start:stop] if need[0] else
                                ln_scratch[0][:n * C].view(n, C))
                torch.ops.aten.native_layer_norm_backward.out(
                    d_normed, tokens[start:stop], [C], mean[start:stop], rstd[start:stop],
                    ln_weight, ln_bias, [True, True, True], out0=grad_x_block,
                    out1=ln_scratch[1], out2=ln_scratch[2])
                if need[1]:
                    grad_lnw.add_(ln_scratch[1])
                if need[2]:
                    grad_lnb.add_(ln_scratch[2])
        grad_x = grad_x.view(x.shape) if need[0] else None
        return (grad_x, grad_lnw, grad_lnb, None, grad_w1, grad_b1, grad_w2, grad_b2,
                None)


def norm_mlp_applies(x: Tensor, norm: nn.Module, mlp: nn.Module) -> bool:
    """Whether :func:`norm_mlp` computes ``mlp(norm(x))`` for this call.

    Only where it is the same function and measured to help: the tokens are
    float32/float64 CPU tensors outside autocast (and outside graph recording), the norm
    is an affine ``nn.LayerNorm`` over the last dim, the MLP is ``fc1``, exact ``nn.GELU``, ``fc2``
    with biases, and no dropout is active.
    """
    from .emsa_ops import autocast_dtype, cpu_tuned
    return (cpu_tuned(x) and x.dtype in (torch.float32, torch.float64)
            and autocast_dtype(x.device.type) is None
            and type(norm) is nn.LayerNorm and norm.elementwise_affine
            and norm.bias is not None and len(norm.normalized_shape) == 1
            and isinstance(getattr(mlp, 'act', None), nn.GELU)
            and mlp.act.approximate == 'none'
            and mlp.fc1.bias is not None and mlp.fc2.bias is not None
            and (not mlp.training or mlp.drop.p == 0))


def norm_mlp(x: Tensor, norm: nn.LayerNorm, mlp: nn.Module) -> Tensor:
    """``mlp(norm(x))`` over blocks of :data:`BLOCK_ROWS` tokens (see
    :func:`norm_mlp_applies`): through :class:`NormMlpFunction` where autograd records,
    else the same blocked forward keeping nothing (inference: no hidden-sized tensor at
    all, the activation of a block computed in place in a reused buffer).

    Args:
        x (Tensor): Tokens (..., C).
        norm (nn.LayerNorm): The LayerNorm.
        mlp (nn.Module): An MLP with ``fc1``, ``act`` (GELU) and ``fc2``.

    Returns:
        Tensor: (..., C).
    """
    args = (norm.weight, norm.bias, norm.eps, mlp.fc1.weight, mlp.fc1.bias,
            mlp.fc2.weight, mlp.fc2.bias)
    if torch.is_grad_enabled():
        return NormMlpFunction.apply(x, *args)
    out = x.new_empty(x.shape)
    _forward_blocks(x.reshape(-1, x.shape[-1]), *args, out.view(-1, x.shape[-1]),
                    BLOCK_ROWS, keep_hidden=False)
    return out


__all__: Tuple[str, ...] = ('NormMlpFunction', 'norm_mlp', 'norm_mlp_applies')
