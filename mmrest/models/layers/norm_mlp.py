"""The block's second half, ``fc2(GELU(fc1(LN(x))))``, over blocks of tokens on the CPU,
without hidden-sized tensors.

Autograd would keep x, LN(x), the pre-activation h and GELU(h): 10C per token.
:class:`NormMlpFunction` keeps x, the LayerNorm's mean and inverse std and h (5C; up to
:data:`RECOMPUTE_MAX_CHANNELS` channels not even h) and recomputes the rest in the
backward pass with the ATen kernels autograd would use. Inference keeps nothing.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

#: Tokens per block: enough rows for efficient products, few enough for the caches.
BLOCK_ROWS = 1024
#: Up to this many channels the pre-activation is recomputed in the backward pass instead
#: of kept (cheaper than streaming it through memory at these widths).
RECOMPUTE_MAX_CHANNELS = 128


def _forward_blocks(x: Tensor, ln_weight: Tensor, ln_bias: Tensor, eps: float,
                    w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, out: Tensor,
                    block_rows: int, keep_stats: bool,
                    keep_hidden: bool) -> Tuple[Optional[Tensor], ...]:
    """``fc2(GELU(fc1(LayerNorm(x))))`` of (rows, C) tokens over blocks of rows, into
    ``out``; returns the LayerNorm's mean and inverse std (``keep_stats``) and the
    pre-activation (``keep_hidden``), else None."""
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
    def forward(ctx, x: Tensor, ln_weight: Tensor, ln_bias: Tensor, eps: float, w1: Tensor,
                b1: Tensor, w2: Tensor, b2: Tensor, block_rows: Optional[int] = None,
                recompute_hidden: Optional[bool] = None) -> Tensor:
        """Tokens (..., C) -> (..., C); ``block_rows`` defaults to :data:`BLOCK_ROWS`,
        ``recompute_hidden`` to C <= :data:`RECOMPUTE_MAX_CHANNELS`."""
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
        # the LayerNorm backward's outputs of a block (the out= overload needs all three):
        # scratch for grad_x where unneeded and for the (C,) parameter gradients
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


def norm_mlp(x: Tensor, norm: nn.LayerNorm, mlp: nn.Module) -> Tensor:
    """``mlp(norm(x))`` over blocks of tokens: through :class:`NormMlpFunction` where
    autograd records, else the blocked forward keeping nothing."""
    args = (norm.weight, norm.bias, norm.eps, mlp.fc1.weight, mlp.fc1.bias,
            mlp.fc2.weight, mlp.fc2.bias)
    if torch.is_grad_enabled():
        return NormMlpFunction.apply(x, *args)
    out = x.new_empty(x.shape)
    _forward_blocks(x.reshape(-1, x.shape[-1]), *args, out.view(-1, x.shape[-1]),
                    BLOCK_ROWS, keep_stats=False, keep_hidden=False)
    return out


__all__: Tuple[str, ...] = ('NormMlpFunction', 'norm_mlp')
