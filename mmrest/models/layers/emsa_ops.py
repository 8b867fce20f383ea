"""The EMSA attention core in its three formulations, one per ``attn_impl``:
:func:`emsa_lean` (``'lean'``), :func:`emsa_dense` (``'dense'``, and ``'lean'`` while a
graph is recorded) and :func:`emsa_reference` (``'reference'``, the authors' equations);
:func:`mmrest.models.layers.dispatch.attend` picks one.

The blocked kernel with head mixing rests on two exact identities (the mixing bias cancels
in the softmax; the instance-norm mean of a softmax map is 1/M), and its backward pass
recomputes the scores block by block: docs/design.md derives both. With head mixing the
core runs in float32 under mixed precision; plain softmax attention in the input's dtype.
"""
import contextlib
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ...utils.torch_compat import autocast_dtype, autocast_off, is_recording_graph

#: ``eps`` of the InstanceNorm2d applied to the attention map (PyTorch's default).
INSTANCE_NORM_EPS = 1e-5
#: Bytes of a block of scores on the CPU, sized for its caches.
CPU_BLOCK_BYTES = 8 * 1024 * 1024
#: Bytes of a block of scores elsewhere (GPUs): few blocks per layer, few kernel launches.
ACCELERATOR_BLOCK_BYTES = 256 * 1024 * 1024

__all__ = ['INSTANCE_NORM_EPS', 'emsa_dense', 'emsa_lean', 'emsa_reference', 'trace_friendly',
           'autocast_dtype', 'autocast_off']


#: Whether a graph is being recorded (export, ONNX, tracing, compile): shape-generic ops.
trace_friendly = is_recording_graph


def emsa_reference(q: Tensor, k: Tensor, v: Tensor, scale: float,
                   transform_weight: Optional[Tensor] = None,
                   transform_bias: Optional[Tensor] = None,
                   attn_drop: float = 0.,
                   training: bool = False,
                   eps: float = INSTANCE_NORM_EPS,
                   transform: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """The EMSA attention core as the equations are written.

    Args:
        q (Tensor): Queries (B, heads, N, head_dim).
        k (Tensor): Keys (B, heads, M, head_dim).
        v (Tensor): Values (B, heads, M, head_dim).
        scale (float): Multiplier of the scores ``q @ k^T``.
        transform_weight (Tensor, optional): Head-mixing 1x1 conv weight
            (heads, heads, 1, 1); None for plain softmax attention. Defaults to None.
        transform_bias (Tensor, optional): Its bias (heads,). Defaults to None.
        attn_drop (float): Dropout on the attention map. Defaults to 0.
        training (bool): Whether dropout is active. Defaults to False.
        eps (float): ``eps`` of the instance norm. Defaults to 1e-5.
        transform (Callable, optional): The head-mixing module itself (its hooks run),
            in place of the weight and bias. Defaults to None.

    Returns:
        Tensor: Output (B, heads, N, head_dim). The instance norm is written out:
        ``InstanceNorm2d`` refuses a single-element map, whose limit 0 this gives.
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


def _block_rows(block_size: Optional[int], batch_heads: int, num_keys: int,
                num_queries: int, itemsize: int, device_type: str = 'cpu') -> int:
    """Number of query rows per block (at least 1, at most ``num_queries``)."""
    if block_size is None:
        budget = CPU_BLOCK_BYTES if device_type == 'cpu' else ACCELERATOR_BLOCK_BYTES
        block_size = budget // max(1, batch_heads * num_keys * itemsize)
    return int(max(1, min(block_size, num_queries)))


def _scaled_mixing(weight: Tensor, scale: float, dtype: torch.dtype) -> Tensor:
    """The (heads, heads) mixing matrix with the score scale folded in (in float64 for
    float64, else float32), in ``dtype``."""
    h = weight.shape[0]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return (weight.detach().reshape(h, h).to(acc) * scale).to(dtype)


def _core_dtypes(q: Tensor, k: Tensor, v: Tensor) -> Tuple[torch.dtype, torch.dtype, bool]:
    """The output dtype (autocast's where it is on), the dtype the core computes in
    (float32 for low-precision dtypes) and whether autocast is on."""
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    cast = autocast_dtype(q.device.type)
    if cast is not None and dtype.is_floating_point:
        dtype = cast
    compute = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    return dtype, compute, cast is not None


def _mix_heads(weight: Tensor, x: Tensor, out: Tensor) -> Tensor:
    """``out[b] = weight @ x[b]`` for x, out of shape (B, heads, L)."""
    if x.shape[0] == 1:
        torch.mm(weight, x[0], out=out[0])
    else:
        torch.matmul(weight, x, out=out)
    return out


def _scores_block(qb: Tensor, kt: Tensor, weight: Tensor, raw: Tensor,
                  mixed: Tensor) -> Tensor:
    """Raw scores ``qb @ kt`` of a query block into ``raw`` (B * heads, n, M), and the
    softmax of their mixture by ``weight`` (computed in ``mixed``, (B, heads, n * M))."""
    torch.bmm(qb, kt, out=raw)
    B, h = mixed.shape[:2]
    _mix_heads(weight, raw.view(B, h, -1), mixed)
    return torch.softmax(mixed.view(raw.shape), -1)


def _emsa_transform_forward(q: Tensor, k: Tensor, v: Tensor, weight: Tensor,
                            eps: float, rows: int) -> Tuple[Tensor, Tensor]:
    """Query-blocked forward of EMSA with head mixing (``weight``, the score scale folded
    in) and instance norm, ``rows`` queries per block.

    Returns:
        tuple[Tensor, Tensor]: The output, contiguous (B, N, heads, head_dim), and the
        instance-norm std ``s`` (B, heads).
    """
    B, h, N, d = q.shape
    M = k.shape[2]
    bh = B * h
    # (B * heads, L, head_dim) views (copies only where B > 1 makes them necessary)
    qq = q.reshape(bh, N, d)
    kt = k.reshape(bh, M, d).transpose(1, 2)
    vv = v.reshape(bh, M, d)
    raw_buf = q.new_empty(rows * bh * M)
    mixed_buf = q.new_empty(rows * bh * M)
    rownorm = q.new_empty(bh, N)  # per query: the norm of its centred probabilities
    o_raw = q.new_empty(bh, N, d)  # the un-normalised output
    for start in range(0, N, rows):
        n = min(rows, N - start)
        probs = _scores_block(qq[:, start:start + n], kt, weight,
                              raw_buf[:n * bh * M].view(bh, n, M),
                              mixed_buf[:n * bh * M].view(B, h, n * M))
        # Centre the block on the exact instance-norm mean 1/M before squaring and
        # before the product with V: with nearly uniform attention, P V - mean(V) and
        # mean(P^2) - 1/M^2 would cancel catastrophically in float32.
        probs.sub_(1.0 / M)
        torch.linalg.vector_norm(probs, dim=-1, out=rownorm[:, start:start + n])
        torch.bmm(probs, vv, out=o_raw[:, start:start + n])
    # instance-norm variance: mean((P - 1/M)^2)
    std = rownorm.square_().sum(-1).div_(N * M).add_(eps).sqrt_()
    # out = (P - 1/M) V / s, written in the (B, N, h, d) layout
    out = q.new_empty(B, N, h, d)
    torch.mul(o_raw.view(B, h, N, d).transpose(1, 2),
              std.reciprocal().view(B, 1, h, 1), out=out)
    return out, std.view(B, h)


def _emsa_transform_backward(
        grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, weight: Tensor, out: Tensor,
        std: Tensor, rows: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Query-blocked backward of :func:`_emsa_transform_forward`: the gradients of q, k,
    v and ``weight`` (heads, heads)."""
    B, h, N, d = q.shape
    M = k.shape[2]
    bh = B * h
    inv = std.reciprocal()  # (B, h)
    # c = -sum(G * out) / (s^2 N M), per (batch, head)
    g_dot_out = torch.einsum('bnhd,bnhd->bh', grad_out, out)
    c = g_dot_out.mul_(inv.square()).div_(-N * M).view(bh, 1, 1)
    # G / s in the (B * h, N, d) layout of the blocks
    g_scaled = q.new_empty(bh, N, d)
    torch.mul(grad_out.permute(0, 2, 1, 3), inv.view(B, h, 1, 1),
              out=g_scaled.view(B, h, N, d))

    qq = q.reshape(bh, N, d)
    kk = k.reshape(bh, M, d)
    kt = kk.transpose(1, 2)
    vt = v.reshape(bh, M, d).transpose(1, 2)
    grad_q = q.new_empty(bh, N, d)
    grad_k = q.new_zeros(bh, M, d)
    grad_v = q.new_zeros(bh, M, d)
    grad_w = q.new_zeros(B, h, h)
    weight_t = weight.t()
    raw_buf = q.new_empty(bh * rows * M)
    mixed_buf = q.new_empty(bh * rows * M)
    tmp_buf = q.new_empty(bh * rows * M)
    for start in range(0, N, rows):
        n = min(rows, N - start)
        qb = qq[:, start:start + n]
        gb = g_scaled[:, start:start + n]
        raw = raw_buf[:bh * n * M].view(bh, n, M)
        probs = _scores_block(qb, kt, weight, raw,
                              mixed_buf[:bh * n * M].view(B, h, n * M))
        # dS' = P * (dP - D) = P * dP - P * rowsum(P * dP), dP = G V^T / s + c P
        gs = torch.bmm(gb, vt, out=tmp_buf[:bh * n * M].view(bh, n, M))
        gs.addcmul_(probs, c).mul_(probs)
        gs.addcmul_(probs, gs.sum(-1, keepdim=True), value=-1)
        gs_bh = gs.view(B, h, n * M)
        raw_bh = raw.view(B, h, n * M)
        # dW' = dS' S^T, summed over the batch below
        grad_w.baddbmm_(gs_bh, raw_bh.transpose(1, 2))
        # dS = W'^T dS', overwriting the raw scores
        dsc = _mix_heads(weight_t, gs_bh, raw_bh).view(bh, n, M)
        torch.bmm(dsc, kk, out=grad_q[:, start:start + n])
        # dV = (P - 1/M)^T G / s: the mean-of-values term folded into the block
        attn = probs.sub_(1.0 / M).transpose(1, 2)
        grad_k.baddbmm_(dsc.transpose(1, 2), qb)
        grad_v.baddbmm_(attn, gb)
    return (grad_q.view(B, h, N, d), grad_k.view(B, h, M, d), grad_v.view(B, h, M, d),
            grad_w.sum(0))


class EMSATransformFunction(torch.autograd.Function):
    """EMSA with head mixing and instance norm; saves q, k, v, the mixing weight, the
    output and the std (no score tensor) and recomputes the scores in the backward."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, weight: Tensor,
                bias: Optional[Tensor], scale: float, eps: float,
                rows: int) -> Tensor:
        """Output (B, N, heads, head_dim), contiguous; the ``bias`` cancels."""
        with autocast_off(q.device.type):
            w_scaled = _scaled_mixing(weight, scale, q.dtype)
            out, std = _emsa_transform_forward(q, k, v, w_scaled, eps, rows)
        ctx.save_for_backward(q, k, v, w_scaled, out, std)
        ctx.scale = scale
        ctx.rows = rows
        ctx.weight_dtype = weight.dtype
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        """Backward; the bias gradient is exactly 0."""
        q, k, v, w_scaled, out, std = ctx.saved_tensors
        with autocast_off(q.device.type):
            grad_q, grad_k, grad_v, grad_w = _emsa_transform_backward(
                grad_out, q, k, v, w_scaled, out, std, ctx.rows)
        h = w_scaled.shape[0]
        grad_w = grad_w.mul_(ctx.scale).to(ctx.weight_dtype).view(h, h, 1, 1)
        grad_b = grad_w.new_zeros(h) if ctx.has_bias else None
        return grad_q, grad_k, grad_v, grad_w, grad_b, None, None, None


def emsa_dense(q: Tensor, k: Tensor, v: Tensor, scale: float,
               transform_weight: Optional[Tensor] = None,
               transform_bias: Optional[Tensor] = None, eps: float = INSTANCE_NORM_EPS) -> Tensor:
    """The EMSA core with materialised scores and shape-generic ops only (no loop whose
    length depends on the traced size): ``attn_impl='dense'``, and ``'lean'`` while a
    graph is recorded. Arguments and result as :func:`emsa_lean`.

    With head mixing, the instance norm uses the exact mean 1/M as the blocked kernel
    does; the bias is added as in the reference, so that ``torch.compile`` training gives
    it a (rounding-size) gradient.
    """
    if transform_weight is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    dtype, compute, autocast = _core_dtypes(q, k, v)
    with autocast_off(q.device.type) if autocast else contextlib.nullcontext():
        q, k, v = q.to(compute), k.to(compute), v.to(compute)
        bias = None if transform_bias is None else transform_bias.to(compute)
        # a 1x1 conv as the reference (an einsum would make the graph depend on B == 1)
        scores = F.conv2d(q @ k.transpose(-2, -1), transform_weight.to(compute) * scale,
                          bias)
        probs = scores.softmax(-1) - 1.0 / k.shape[2]  # centred, as the blocked kernel
        std = (probs.square().mean(dim=(-2, -1), keepdim=True) + eps).sqrt()
        out = (probs @ v) / std
    return out.to(dtype)


def emsa_lean(q: Tensor, k: Tensor, v: Tensor, scale: float,
              transform_weight: Optional[Tensor] = None, transform_bias: Optional[Tensor] = None,
              eps: float = INSTANCE_NORM_EPS, block_size: Optional[int] = None) -> Tensor:
    """The EMSA core without materialising the (B, heads, N, M) scores:
    ``attn_impl='lean'``. The function of :func:`emsa_reference` without dropout, forward
    and backward: SDPA without ``transform_weight``, else :class:`EMSATransformFunction`
    (or its forward alone where no gradient is needed).

    Args:
        q (Tensor): Queries (B, heads, N, head_dim); any strides.
        k (Tensor): Keys (B, heads, M, head_dim); any strides.
        v (Tensor): Values (B, heads, M, head_dim); any strides.
        scale (float): Multiplier of the scores ``q @ k^T``.
        transform_weight (Tensor, optional): Head-mixing 1x1 conv weight
            (heads, heads, 1, 1), followed by the instance norm of the attention map;
            None for plain softmax attention. Defaults to None.
        transform_bias (Tensor, optional): Its bias (heads,); it cancels in the softmax
            and gets an exact zero gradient. Defaults to None.
        eps (float): ``eps`` of the instance norm. Defaults to 1e-5.
        block_size (int, optional): Query rows per block; None sizes a block of scores
            to :data:`CPU_BLOCK_BYTES` on the CPU, :data:`ACCELERATOR_BLOCK_BYTES`
            elsewhere. Defaults to None.

    Returns:
        Tensor: Output (B, heads, N, head_dim); with head mixing a transposed view of a
        contiguous (B, N, heads, head_dim) tensor.
    """
    if transform_weight is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    B, h, N, _ = q.shape
    device = q.device.type
    dtype, compute, _ = _core_dtypes(q, k, v)
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    rows = _block_rows(block_size, B * h, k.shape[2], N, q.element_size(), device)
    if torch.is_grad_enabled() and any(
            t is not None and t.requires_grad
            for t in (q, k, v, transform_weight, transform_bias)):
        out = EMSATransformFunction.apply(q, k, v, transform_weight, transform_bias,
                                          scale, eps, rows)
    else:
        with autocast_off(device):
            out = _emsa_transform_forward(q, k, v,
                                          _scaled_mixing(transform_weight, scale, compute),
                                          eps, rows)[0]
    return out.transpose(1, 2).to(dtype)
