"""Fused, query-blocked and memory-lean EMSA attention core.

:func:`emsa_fused` computes the same function as
:func:`mmrest.models.layers.emsa.emsa_reference` (without attention dropout) but never
holds a whole (B, heads, N, M) score tensor, neither in the forward nor in the backward
pass. Per batch item, with :math:`S_h = \\mathrm{scale}\\, Q_h K_h^T` (N x M) for head
:math:`h`, the reference computes

.. math::

    S'_g = \\sum_h W_{gh} S_h + b_g, \\qquad P_g = \\mathrm{softmax}(S'_g), \\qquad
    \\mathrm{out}_g = \\mathrm{IN}(P_g)\\, V_g.

Three exact identities make it cheap:

1. The bias :math:`b_g` is constant along the keys, so it cancels in the softmax (its
   gradient is exactly 0).
2. Every softmax row sums to 1, so the instance-norm mean of :math:`P_g` is exactly
   :math:`1/M` and its (biased) variance is :math:`\\overline{P_g^2} - 1/M^2`. Hence
   :math:`\\mathrm{IN}(P_g) V_g = (P_g V_g - 1 \\otimes \\bar V_g) / s_g` with
   :math:`s_g = \\sqrt{\\overline{P_g^2} - 1/M^2 + \\epsilon}` and :math:`\\bar V_g` the
   mean of the values over the keys. Only the scalar :math:`\\sum P_g^2` needs the whole
   map; it is accumulated block by block over the queries, and the normalisation is
   applied to the small N x head_dim output instead of the N x M map.
3. Without head mixing (one head) EMSA is plain softmax attention, for which PyTorch's
   ``scaled_dot_product_attention`` has a memory-lean (flash) CPU kernel.

The head mixing is a (heads x heads) matmul over each small (heads, rows, M) block of raw
scores; folding it into the ``Q K^T`` matmul instead multiplies that matmul's cost by the
number of heads and measured 2-4x slower here.

Backward (:class:`EMSATransformFunction`) saves q, k, v, the mixing weight, the output
and per-(batch, head) and per-row statistics only, and recomputes the scores block by
block. With :math:`G` the output gradient, :math:`O = P V` and
:math:`\\mu = \\bar V`:

.. math::

    \\partial V &= P^T G / s + \\tfrac{1}{M} 1 \\otimes \\partial\\mu, \\quad
    \\partial\\mu = -\\tfrac{1}{s} \\textstyle\\sum_n G_n, \\\\
    \\partial P &= G V^T / s + c P, \\quad
    c = -\\frac{\\sum (G \\circ \\mathrm{out})}{s^2 N M}, \\\\
    \\partial S' &= P \\circ (\\partial P - D), \\quad
    D_n = \\langle G_n, \\mathrm{out}_n\\rangle + \\langle G_n, \\mu\\rangle / s
    + c \\textstyle\\sum_m P_{nm}^2,

then :math:`\\partial W = \\partial S' S^T`, :math:`\\partial S = W^T \\partial S'`,
:math:`\\partial Q = \\mathrm{scale}\\,\\partial S K`,
:math:`\\partial K = \\mathrm{scale}\\,\\partial S^T Q`.

Limits: where a head's map has one element (N = M = 1), and wherever there is a single
key (M = 1), the variance is 0 and the normalised map and the output are exactly 0, as in
the reference.

Mixed precision: under ``torch.autocast('cpu', dtype=torch.bfloat16)`` the queries, keys
and values are cast to bfloat16 and the score blocks, softmax and matmuls run in
bfloat16 (as the reference does under autocast), while the sums of squared
probabilities, the instance-norm statistics and the gradient accumulators are float32,
so the result stays finite. The output is bfloat16; the normalisation divides by
``s >= sqrt(eps)``, which amplifies bfloat16 rounding, so expect errors of a few 1e-2
relative to the output's scale compared with float32.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

#: ``eps`` of the InstanceNorm2d applied to the attention map (PyTorch's default).
INSTANCE_NORM_EPS = 1e-5

#: Bytes of one block of scores (batch x heads x query rows x keys) that the blocked
#: kernel aims at when ``block_size`` is None. Measured on a 2-core AVX2 machine
#: (1 MB L2 per core, 8 MB L3); see ``tools/analysis/bench_emsa.py``.
DEFAULT_BLOCK_BYTES = 2 * 1024 * 1024

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _block_rows(block_size: Optional[int], batch_heads: int, num_keys: int,
                num_queries: int, itemsize: int) -> int:
    """Number of query rows per block (at least 1, at most ``num_queries``)."""
    if block_size is None:
        block_size = DEFAULT_BLOCK_BYTES // max(1, batch_heads * num_keys * itemsize)
    return int(max(1, min(block_size, num_queries)))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of statistics: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _softmax_(x: Tensor) -> Tensor:
    """Softmax over the last dim, in place (the CPU kernel reads a row before writing it)."""
    return torch.ops.aten._softmax.out(x, -1, False, out=x)


def _mix_heads(weight: Tensor, x: Tensor, out: Tensor) -> Tensor:
    """``out[b] = weight @ x[b]`` for x, out of shape (B, heads, L)."""
    if x.shape[0] == 1:
        torch.mm(weight, x[0], out=out[0])
    else:
        torch.matmul(weight, x, out=out)
    return out


def _scores_block(qb: Tensor, kt: Tensor, weight: Tensor, raw: Tensor,
                  mixed: Tensor) -> Tensor:
    """Raw scores of a query block into ``raw`` and their softmax-ed mixture into ``mixed``.

    Args:
        qb (Tensor): Query block (B * heads, n, head_dim).
        kt (Tensor): Transposed keys (B * heads, head_dim, M).
        weight (Tensor): Mixing matrix (heads, heads) with the score scale folded in.
        raw (Tensor): Buffer (B * heads, n, M) for ``qb @ kt``.
        mixed (Tensor): Buffer (B, heads, n * M) for the probabilities.

    Returns:
        Tensor: The probabilities, a (B * heads, n, M) view of ``mixed``.
    """
    torch.bmm(qb, kt, out=raw)
    B, h = mixed.shape[:2]
    _mix_heads(weight, raw.view(B, h, -1), mixed)
    return _softmax_(mixed.view(raw.shape))


def _emsa_transform_forward(
        q: Tensor, k: Tensor, v: Tensor, weight: Tensor, eps: float, rows: int,
        need_rowsq: bool) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Query-blocked forward of EMSA with head mixing and instance norm.

    Args:
        q (Tensor): Queries (B, heads, N, head_dim), any strides.
        k (Tensor): Contiguous keys (B, heads, M, head_dim).
        v (Tensor): Contiguous values (B, heads, M, head_dim).
        weight (Tensor): Mixing matrix (heads, heads) with the score scale folded in,
            in the dtype of q.
        eps (float): ``eps`` of the instance norm.
        rows (int): Query rows per block.
        need_rowsq (bool): Whether to return the per-row sums of squared probabilities
            (the backward pass needs them).

    Returns:
        tuple[Tensor, Tensor, Tensor | None]: The output, contiguous in the layout
        (B, N, heads, head_dim); the instance-norm std ``s`` (B, heads); if
        ``need_rowsq``, the per-row sums of squared probabilities (B, heads, N). The
        statistics are float32 (float64 for float64 inputs).
    """
    B, h, N, d = q.shape
    M = k.shape[2]
    bh = B * h
    acc = _acc_dtype(q.dtype)
    kt = k.view(bh, M, d).transpose(1, 2)
    vv = v.view(bh, M, d)
    out = q.new_empty(B, N, h, d)
    raw_buf = q.new_empty(bh * rows * M)
    mixed_buf = q.new_empty(bh * rows * M)
    o_buf = q.new_empty(bh * rows * d)
    rowsq = q.new_empty(B, h, N, dtype=acc)
    for start in range(0, N, rows):
        n = min(rows, N - start)
        qb = q[:, :, start:start + n].reshape(bh, n, d)
        probs = _scores_block(qb, kt, weight, raw_buf[:bh * n * M].view(bh, n, M),
                              mixed_buf[:bh * n * M].view(B, h, n * M))
        rowsq[:, :, start:start + n] = torch.linalg.vector_norm(
            probs, dim=-1, dtype=acc).view(B, h, n)
        ob = torch.bmm(probs, vv, out=o_buf[:bh * n * d].view(bh, n, d))
        out[:, start:start + n] = ob.view(B, h, n, d).transpose(1, 2)
    rowsq.square_()
    var = rowsq.sum(-1).div_(N * M).sub_(1.0 / (M * M)).clamp_(min=0)
    std = var.add_(eps).sqrt_()
    mean_v = v.mean(2, dtype=acc)
    # out = (P V - mean_v) / s, in place in the (B, N, h, d) layout.
    out.sub_(mean_v.to(out.dtype).unsqueeze(1))
    out.mul_(std.reciprocal().to(out.dtype)[:, None, :, None])
    return out, std, (rowsq if need_rowsq else None)


def _emsa_transform_backward(
        grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, weight: Tensor, out: Tensor,
        std: Tensor, rowsq: Tensor, rows: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Query-blocked backward of :func:`_emsa_transform_forward`.

    Args:
        grad_out (Tensor): Gradient of the output, (B, N, heads, head_dim).
        q (Tensor): Queries (B, heads, N, head_dim), any strides.
        k (Tensor): Contiguous keys (B, heads, M, head_dim).
        v (Tensor): Contiguous values (B, heads, M, head_dim).
        weight (Tensor): Mixing matrix (heads, heads) with the score scale folded in.
        out (Tensor): Output of the forward pass, (B, N, heads, head_dim).
        std (Tensor): Instance-norm std (B, heads) of the forward pass.
        rowsq (Tensor): Per-row sums of squared probabilities (B, heads, N).
        rows (int): Query rows per block.

    Returns:
        tuple[Tensor, Tensor, Tensor, Tensor]: Gradients of q (B, heads, N, head_dim),
        k and v (B, heads, M, head_dim) in the dtype of q, and of ``weight``
        (heads, heads) in the statistics dtype.
    """
    B, h, N, d = q.shape
    M = k.shape[2]
    bh = B * h
    dtype = q.dtype
    acc = _acc_dtype(dtype)
    low = dtype in _LOW_PRECISION
    grad_out = grad_out.contiguous()
    inv = std.reciprocal()  # (B, h)
    mean_v = v.mean(2, dtype=acc)  # (B, h, d)
    g_acc = grad_out.to(acc)
    g_dot_out = torch.einsum('bnhd,bnhd->bnh', g_acc, out.to(acc))  # (B, N, h)
    c = g_dot_out.sum(1).mul_(inv.square()).div_(-N * M)  # (B, h)
    # D_n = <G_n, out_n> + <G_n, mean_v> / s + c * sum_m P_nm^2
    row_d = torch.einsum('bnhd,bhd->bhn', g_acc, mean_v).mul_(inv.unsqueeze(-1))
    row_d.add_(g_dot_out.transpose(1, 2)).addcmul_(rowsq, c.unsqueeze(-1))
    grad_mean_v = g_acc.sum(1).mul_(-inv.unsqueeze(-1))  # (B, h, d)
    del g_acc, g_dot_out
    # G / s, gathered per head: (B, h, N, d).
    g_scaled = (grad_out * inv.to(dtype)[:, None, :, None]).transpose(1, 2)
    row_d = row_d.to(dtype)
    c = c.to(dtype).view(bh, 1, 1)

    kk = k.view(bh, M, d)
    kt = kk.transpose(1, 2)
    vt = v.view(bh, M, d).transpose(1, 2)
    grad_q = q.new_empty(B, N, h, d)
    grad_k = torch.zeros(bh, M, d, dtype=acc if low else dtype)
    grad_v = torch.zeros(bh, M, d, dtype=acc if low else dtype)
    grad_w = torch.zeros(B, h, h, dtype=acc if low else dtype)
    weight_t = weight.t()
    raw_buf = q.new_empty(bh * rows * M)
    mixed_buf = q.new_empty(bh * rows * M)
    tmp_buf = q.new_empty(bh * rows * M)
    dq_buf = q.new_empty(bh * rows * d)
    for start in range(0, N, rows):
        n = min(rows, N - start)
        qb = q[:, :, start:start + n].reshape(bh, n, d)
        gb = g_scaled[:, :, start:start + n].reshape(bh, n, d)
        raw = raw_buf[:bh * n * M].view(bh, n, M)
        probs = _scores_block(qb, kt, weight, raw,
                              mixed_buf[:bh * n * M].view(B, h, n * M))
        # dS' = P * (G V^T / s + c P - D)
        gs = torch.bmm(gb, vt, out=tmp_buf[:bh * n * M].view(bh, n, M))
        gs.sub_(row_d[:, :, start:start + n].reshape(bh, n, 1))
        gs.addcmul_(probs, c).mul_(probs)
        gs_bh = gs.view(B, h, n * M)
        raw_bh = raw.view(B, h, n * M)
        if low:
            grad_w.add_(torch.bmm(gs_bh, raw_bh.transpose(1, 2)))
        else:
            grad_w.baddbmm_(gs_bh, raw_bh.transpose(1, 2))
        # dS = W^T dS', overwriting the raw scores.
        dsc = _mix_heads(weight_t, gs_bh, raw_bh).view(bh, n, M)
        dqb = torch.bmm(dsc, kk, out=dq_buf[:bh * n * d].view(bh, n, d))
        grad_q[:, start:start + n] = dqb.view(B, h, n, d).transpose(1, 2)
        if low:
            grad_k.add_(torch.bmm(dsc.transpose(1, 2), qb))
            grad_v.add_(torch.bmm(probs.transpose(1, 2), gb))
        else:
            grad_k.baddbmm_(dsc.transpose(1, 2), qb)
            grad_v.baddbmm_(probs.transpose(1, 2), gb)
    grad_v = grad_v.view(B, h, M, d).add_(grad_mean_v.unsqueeze(2), alpha=1.0 / M)
    return (grad_q.transpose(1, 2), grad_k.view(B, h, M, d).to(dtype), grad_v.to(dtype),
            grad_w.sum(0, dtype=acc))


class EMSATransformFunction(torch.autograd.Function):
    """Autograd function of EMSA with head mixing and instance norm.

    Saves q, k, v, the mixing weight, the output and small statistics (no score tensor);
    the backward pass recomputes the scores block by block.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, weight: Tensor,
                bias: Optional[Tensor], scale: float, eps: float,
                rows: int) -> Tensor:
        """Forward.

        Args:
            q (Tensor): Queries (B, heads, N, head_dim).
            k (Tensor): Contiguous keys (B, heads, M, head_dim), dtype of q.
            v (Tensor): Contiguous values (B, heads, M, head_dim), dtype of q.
            weight (Tensor): Head-mixing weight (heads, heads, 1, 1).
            bias (Tensor, optional): Head-mixing bias (heads,); it cancels.
            scale (float): Multiplier of the scores.
            eps (float): ``eps`` of the instance norm.
            rows (int): Query rows per block.

        Returns:
            Tensor: Output (B, N, heads, head_dim), contiguous.
        """
        with torch.autocast('cpu', enabled=False):
            h = weight.shape[0]
            w_scaled = (weight.detach().reshape(h, h).to(_acc_dtype(q.dtype)) *
                        scale).to(q.dtype)
            out, std, rowsq = _emsa_transform_forward(q, k, v, w_scaled, eps, rows,
                                                      need_rowsq=True)
        ctx.save_for_backward(q, k, v, w_scaled, out, std, rowsq)
        ctx.scale = scale
        ctx.rows = rows
        ctx.weight_dtype = weight.dtype
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        """Backward; the bias gradient is exactly 0."""
        q, k, v, w_scaled, out, std, rowsq = ctx.saved_tensors
        with torch.autocast('cpu', enabled=False):
            grad_q, grad_k, grad_v, grad_w = _emsa_transform_backward(
                grad_out, q, k, v, w_scaled, out, std, rowsq, ctx.rows)
        h = w_scaled.shape[0]
        grad_w = grad_w.mul_(ctx.scale).to(ctx.weight_dtype).view(h, h, 1, 1)
        grad_b = grad_w.new_zeros(h) if ctx.has_bias else None
        return grad_q, grad_k, grad_v, grad_w, grad_b, None, None, None


def emsa_fused(q: Tensor,
               k: Tensor,
               v: Tensor,
               scale: float,
               transform_weight: Optional[Tensor] = None,
               transform_bias: Optional[Tensor] = None,
               eps: float = INSTANCE_NORM_EPS,
               block_size: Optional[int] = None) -> Tensor:
    """EMSA attention core, query-blocked and memory-lean (no attention dropout).

    Same function as :func:`mmrest.models.layers.emsa.emsa_reference` with
    ``attn_drop=0``, forward and backward, without materialising the (B, heads, N, M)
    scores. See the module docstring for the identities used and for the bfloat16
    behaviour under ``torch.autocast``.

    Args:
        q (Tensor): Queries of shape (B, heads, N, head_dim); any strides.
        k (Tensor): Keys of shape (B, heads, M, head_dim); any strides.
        v (Tensor): Values of shape (B, heads, M, head_dim); any strides.
        scale (float): Multiplier of the scores ``q @ k^T``.
        transform_weight (Tensor, optional): Weight (heads, heads, 1, 1) of the 1x1 conv
            that mixes the heads of the scores before the softmax; the instance norm of
            the attention map follows. ``None`` means plain softmax attention.
            Defaults to None.
        transform_bias (Tensor, optional): Bias (heads,) of that conv. It cancels in the
            softmax; it receives an exact zero gradient. Defaults to None.
        eps (float): ``eps`` of the instance norm. Defaults to 1e-5.
        block_size (int, optional): Query rows per block; None picks it so that a block
            of scores takes about ``DEFAULT_BLOCK_BYTES``. Defaults to None.

    Returns:
        Tensor: Output of shape (B, heads, N, head_dim). With head mixing it is a
        transposed view of a contiguous (B, N, heads, head_dim) tensor, so
        ``out.transpose(1, 2).reshape(B, N, C)`` is free.
    """
    if transform_weight is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    if torch.is_autocast_enabled('cpu') and dtype.is_floating_point:
        dtype = torch.get_autocast_dtype('cpu')
    q = q.to(dtype)
    k = k.to(dtype).contiguous()
    v = v.to(dtype).contiguous()
    B, h, N, _ = q.shape
    rows = _block_rows(block_size, B * h, k.shape[2], N, q.element_size())
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad
        for t in (q, k, v, transform_weight, transform_bias))
    if needs_grad:
        out = EMSATransformFunction.apply(q, k, v, transform_weight, transform_bias,
                                          scale, eps, rows)
    else:
        with torch.autocast('cpu', enabled=False):
            w_scaled = (transform_weight.reshape(h, h).to(_acc_dtype(dtype)) *
                        scale).to(dtype)
            out = _emsa_transform_forward(q, k, v, w_scaled, eps, rows,
                                          need_rowsq=False)[0]
    return out.transpose(1, 2)
