r"""The block's second half, ``fc2(GELU(fc1(LN(x))))``, over blocks of tokens on the CPU:
memory-lean training and inference without hidden-sized tensors.

Autograd keeps four tensors of that chain for the backward pass: the LayerNorm's input
:math:`x` (C channels per token), its output :math:`b` (C), the hidden pre-activation
:math:`h` (4C) and the activation :math:`g = \mathrm{GELU}(h)` (4C), i.e. 10C per token,
more than half of what a ResT block keeps. :class:`NormMlpFunction` computes the same
function and keeps only :math:`x`, the LayerNorm's per-token mean and inverse std, and
:math:`h` (5C per token); up to :data:`RECOMPUTE_MAX_CHANNELS` channels, where the
product is cheaper than streaming :math:`h` through memory, not even :math:`h` (C per
token). In the backward pass it recomputes :math:`b` from them (one element-wise pass),
:math:`h` from :math:`b` where it was not kept (the forward's product again) and
:math:`g` from :math:`h`, then applies the chain rule with the same ATen kernels
autograd would use::

    dW2 = dm^T g,            db2 = sum(dm),
    dh  = GELU'(h) * (dm W2),
    dW1 = dh^T b,            db1 = sum(dh),
    dx, dgamma, dbeta = LayerNorm backward of (dh W1).

Both passes run over blocks of :data:`BLOCK_ROWS` tokens: the normalised tokens, the
activation and the hidden-sized gradients of a block live in small buffers that are
reused from block to block and stay in the CPU's caches, and the weight gradients are
accumulated block by block; the LayerNorm backward runs block by block into the rows
of dx. The whole-size tensors are only x, h (where kept), the output and dx; inference
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

#: Up to this many channels (C) :class:`NormMlpFunction` keeps no hidden pre-activation
#: for the backward pass and recomputes it block by block (one more ``fc1`` product
#: over a block that is in the caches anyway), which saves 4C floats per token. Measured
#: here (2 threads) on the LayerNorm + MLP forward and backward, recomputing against
#: keeping, at the token counts of ResT's stages at 224x224 batch 32 and 800x1344
#: batch 2: C = 64 and 96 0.90-0.92x the time, C = 128 0.99-1.02x, C = 192 1.05x,
#: C = 256 and 512 1.11-1.16x (there the product costs more than streaming h through
#: memory). For ResT-small at 224x224 batch 32 this drops 0.3 GB of 1.5 GB kept.
RECOMPUTE_MAX_CHANNELS = 128


def _forward_blocks(x: Tensor, ln_weight: Tensor, ln_bias: Tensor, eps: float,
                    w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, out: Tensor,
                    block_rows: int, keep_stats: bool,
                    keep_hidden: bool) -> Tuple[Optional[Tensor], ...]:
    """``fc2(GELU(fc1(LayerNorm(x))))`` over blocks of rows of the (rows, C) tokens,
    written into the (rows, C) ``out``.

    Returns the LayerNorm's (rows, 1) mean and inverse std (with ``keep_stats``, else
    None) and the (rows, hidden) pre-activation (with ``keep_hidden``, else None: the
    pre-activation of a block lives in the activation's reused block buffer).
    """
    C, hidden_dims = x.shape[-1], w1.shape[0]
    rows = x.shape[0]
    block_rows = max(1, min(block_rows, rows))
    act_buf = x.new_empty(block_rows * hidden_dims)
    hidden = x.new_empty(rows, hidden_dims) if keep_hidden else None
    mean = x.new_empty(rows, 1) if keep_stats else None
    rstd = x.new_empty(rows, 1) if keep_stats else None
    for start in range(0, rows, block_rows):
        stop = min(start + block_rows, rows)
        normed, block_mean, block_rstd = torch.native_layer_norm(
            x[start:stop], [C], ln_weight, ln_bias, eps)
        act = act_buf[:(stop - start) * hidden_dims].view(stop - start, hidden_dims)
        if keep_stats:
            mean[start:stop], rstd[start:stop] = block_mean, block_rstd
        # the pre-activation into the kept h, or into the activation's buffer
        h = torch.addmm(b1, normed, w1.t(), out=hidden[start:stop] if keep_hidden else act)
        torch.addmm(b2, torch.ops.aten.gelu.out(h, out=act), w2.t(), out=out[start:stop])
    return mean, rstd, hidden


def _normalise(tokens: Tensor, mean: Tensor, rstd: Tensor, ln_weight: Tensor,
               ln_bias: Tensor, out: Tensor) -> Tensor:
    """The LayerNorm's output of a block recomputed from its statistics, into ``out``
    (the forward's values: the same formula as the CPU LayerNorm kernel)."""
    torch.sub(tokens, mean, out=out)
    return torch.addcmul(ln_bias, out.mul_(rstd), ln_weight, out=out)


class NormMlpFunction(torch.autograd.Function):
    """``fc2(GELU(fc1(LayerNorm(x))))`` keeping x, the LayerNorm statistics and (for
    more than :data:`RECOMPUTE_MAX_CHANNELS` channels) the hidden pre-activation only
    (exact GELU, no dropout), run over blocks of rows."""

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
                block_rows: Optional[int] = None,
                recompute_hidden: Optional[bool] = None) -> Tensor:
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
            recompute_hidden (bool, optional): Recompute the hidden pre-activation in
                the backward pass instead of keeping it; None means for C up to
                :data:`RECOMPUTE_MAX_CHANNELS`. Defaults to None.

        Returns:
            Tensor: (..., C).
        """
        block_rows = BLOCK_ROWS if block_rows is None else block_rows
        C = x.shape[-1]
        if recompute_hidden is None:
            recompute_hidden = C <= RECOMPUTE_MAX_CHANNELS
        tokens = x.reshape(-1, C)
        out = x.new_empty(x.shape)  # a fresh tensor, not a view, for autograd
        mean, rstd, hidden = _forward_blocks(tokens, ln_weight, ln_bias, eps, w1, b1, w2,
                                             b2, out.view(-1, C), block_rows,
                                             keep_stats=True,
                                             keep_hidden=not recompute_hidden)
        # b1 only where h is recomputed (a later in-place change of a saved tensor
        # makes the backward raise, as autograd would)
        ctx.save_for_backward(x, mean, rstd, hidden, ln_weight, ln_bias, w1,
                              b1 if recompute_hidden else None, w2)
        ctx.block_rows = max(1, min(block_rows, tokens.shape[0]))
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        """Backward (recomputes the LayerNorm output, the activation and, if not kept,
        the pre-activation block by block)."""
        x, mean, rstd, hidden, ln_weight, ln_bias, w1, b1, w2 = ctx.saved_tensors
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
        h_buf = x.new_empty(block_rows * hidden_dims) if hidden is None else None
        normed_buf = x.new_empty(block_rows * C)
        # the LayerNorm backward's outputs of a block: its rows of grad_x, and scratch
        # for the (C,) parameter gradients (and for grad_x if unneeded).
        # All three are computed (the out= overload needs every output defined).
        ln_scratch = [x.new_empty(block_rows * C), x.new_empty(C), x.new_empty(C)]
        for start in range(0, rows, block_rows):
            stop = min(start + block_rows, rows)
            n = stop - start
            dm_block, normed = dm[start:stop], normed_buf[:n * C].view(n, C)
            if h_buf is not None or grad_w1 is not None:
                _normalise(tokens[start:stop], mean[start:stop], rstd[start:stop],
                           ln_weight, ln_bias, out=normed)
            if h_buf is None:
                h = hidden[start:stop]
            else:  # the forward's product on the recomputed LayerNorm output
                h = torch.addmm(b1, normed, w1.t(), out=h_buf[:n * hidden_dims].view(n, -1))
            if grad_w2 is not None:
                act = torch.ops.aten.gelu.out(h, out=act_buf[:n * hidden_dims].view(n, -1))
                grad_w2.addmm_(dm_block.t(), act)
            dh = torch.mm(dm_block, w2, out=dh_buf[:n * hidden_dims].view(n, -1))
            torch.ops.aten.gelu_backward.grad_input(dh, h, grad_input=dh)
            if grad_w1 is not None:
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
                None, None)


def norm_mlp_applies(x: Tensor, norm: nn.Module, mlp: nn.Module) -> bool:
    """Whether :func:`norm_mlp` computes ``mlp(norm(x))`` for this call.

    Only where it is the same function and measured to help: the tokens are
    float32/float64 CPU tensors outside autocast (and outside graph recording), the norm
    is an affine ``nn.LayerNorm`` over the last dim, the MLP is ``fc1``, exact ``nn.GELU``,
    ``fc2``, all plain modules (e.g. not the quantized linears of
    ``torch.ao.quantization.quantize_dynamic``) with biases, no dropout is active, and
    no hook would be skipped (:func:`mmrest.models.layers.embed.has_hooks`).
    """
    from .embed import has_hooks
    from .emsa_ops import autocast_dtype, cpu_tuned
    fc1, act, fc2 = (getattr(mlp, name, None) for name in ('fc1', 'act', 'fc2'))
    return (cpu_tuned(x) and x.dtype in (torch.float32, torch.float64)
            and autocast_dtype(x.device.type) is None
            and type(norm) is nn.LayerNorm and norm.elementwise_affine
            and norm.bias is not None and len(norm.normalized_shape) == 1
            and type(act) is nn.GELU and act.approximate == 'none'
            and type(fc1) is nn.Linear and type(fc2) is nn.Linear
            and fc1.bias is not None and fc2.bias is not None
            and (not mlp.training or mlp.drop.p == 0)
            and not has_hooks(norm, *mlp.modules()))


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
                    BLOCK_ROWS, keep_stats=False, keep_hidden=False)
    return out


__all__: Tuple[str, ...] = ('NormMlpFunction', 'norm_mlp', 'norm_mlp_applies')
