r"""Fused, query-blocked and memory-lean EMSA attention core.

:func:`emsa_fused` computes the same function as
:func:`mmrest.models.layers.emsa.emsa_reference` (without attention dropout) but never
holds a whole (B, heads, N, M) score tensor, neither in the forward nor in the backward
pass. Per batch item, with :math:`S_h = \mathrm{scale}\, Q_h K_h^T` (N x M) for head
:math:`h`, the reference computes

.. math::

    S'_g = \sum_h W_{gh} S_h + b_g, \qquad P_g = \mathrm{softmax}(S'_g), \qquad
    \mathrm{out}_g = \mathrm{IN}(P_g)\, V_g.

Three exact identities make it cheap:

1. The bias :math:`b_g` is constant along the keys, so it cancels in the softmax (its
   gradient is exactly 0).
2. Every softmax row sums to 1, so the instance-norm mean of :math:`P_g` is exactly
   :math:`1/M` and its (biased) variance is :math:`\overline{P_g^2} - 1/M^2`. Hence
   :math:`\mathrm{IN}(P_g) V_g = ((P_g - 1/M) V_g) / s_g` with
   :math:`s_g = \sqrt{\overline{(P_g - 1/M)^2} + \epsilon}`. Only the scalar
   :math:`\sum (P_g - 1/M)^2` needs the whole map; it is accumulated block by block over
   the queries, and the division by :math:`s_g` is applied to the small N x head_dim
   output instead of the N x M map. Centring each block on 1/M first (rather than using
   :math:`\overline{P^2} - 1/M^2` and :math:`P V - \bar V`) avoids catastrophic
   cancellation in float32 when the attention is nearly uniform.
3. Without head mixing (one head) EMSA is plain softmax attention, for which PyTorch's
   ``scaled_dot_product_attention`` has a memory-lean (flash) CPU kernel. Its backward
   parallelises over (batch, head) pairs only, so where there are fewer of them than
   intra-op threads (batch 1, one head) :class:`AttentionFunction` pairs the flash
   forward with a query-blocked backward whose matmuls use every thread.

The head mixing is a (heads x heads) matmul over each small (heads, rows, M) block of raw
scores; folding it into the ``Q K^T`` matmul instead multiplies that matmul's cost by the
number of heads and measured 2-4x slower here.

Backward (:class:`EMSATransformFunction`) saves q, k, v, the mixing weight, the output
and the per-(batch, head) std only, and recomputes the scores block by block. With
:math:`G` the output gradient, :math:`W' = \mathrm{scale}\, W` and
:math:`R_h = Q_h K_h^T` (so :math:`S'_g = \sum_h W'_{gh} R_h`):

.. math::

    \partial V &= (P - 1/M)^T G / s, \\
    \partial P &= G V^T / s + c P, \quad
    c = -\frac{\sum (G \circ \mathrm{out})}{s^2 N M}, \\
    \partial S' &= P \circ (\partial P - \textstyle\sum_m P \circ \partial P)
    \quad \text{(softmax backward, row sums over the keys)}, \\
    \partial W'_{gh} &= \textstyle\sum_{n,m} \partial S'_{g,nm} R_{h,nm}, \quad
    \partial R = W'^T \partial S', \quad
    \partial Q = \partial R\, K, \quad \partial K = \partial R^T Q,

with :math:`\partial W = \mathrm{scale}\, \partial W'`. The first line folds the
gradient through the mean of the values into the block, so that with a single key it is
exactly 0, as in the reference.

Limits: where a head's map has one element (N = M = 1), and wherever there is a single
key (M = 1), the variance is 0 and the normalised map and the output are exactly 0, as in
the reference.

Mixed precision: under ``torch.autocast`` (CPU bfloat16, CUDA float16/bfloat16), or with
bfloat16/float16 inputs, the core with head mixing runs in float32 and its output is cast
to the low-precision dtype. The instance norm divides the centred probabilities
:math:`P - 1/M`, which nearly cancel, by :math:`s \ge \sqrt{\epsilon}`; computed in
bfloat16 that loses most of their bits (the reference, which runs the core in bfloat16
under CPU autocast, is off by 20-45% at stages 2-4 of ResT-Lite). Plain softmax attention
(one head) has no such amplification and runs in the low-precision dtype; its blocked
backward (:class:`AttentionFunction`) keeps the gradient accumulators in float32.

Devices: every buffer follows the device of ``q``. The choices tuned on a CPU (the
query-major layout and the blocked single-head backward, both chosen by the intra-op
thread count; :data:`DEFAULT_BLOCK_BYTES`, sized for CPU caches; the softmax written over
its own input) are taken for CPU tensors only (:func:`cpu_tuned`). On other devices one
head is PyTorch's ``scaled_dot_product_attention`` forward and backward (its CUDA
kernels), and head mixing is the blocked kernel with blocks of
:data:`ACCELERATOR_BLOCK_BYTES` (one to four blocks per layer for an 800x1344 image).

Export and compile: while ``torch.export`` / ``torch.onnx.export``, TorchScript tracing or
``torch.compile`` records the graph (:func:`trace_friendly`), the blocked Python loop would
be frozen at the traced size, so the core switches by itself to :func:`emsa_dense`, the
same function written with shape-generic ops (SDPA for one head; materialised scores for
head mixing).
"""
import contextlib
from typing import ContextManager, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

#: ``eps`` of the InstanceNorm2d applied to the attention map (PyTorch's default).
INSTANCE_NORM_EPS = 1e-5

#: Bytes of one block of scores (batch x heads x query rows x keys) that the blocked
#: kernel aims at when ``block_size`` is None. On a 2-core AVX2 machine (1 MB L2 per
#: core, 8 MB L3) blocks of 2 to 16 MB ran within a few per cent of each other on one
#: thread (the block's matmuls and exps are compute-bound); larger blocks mean fewer
#: ops, hence fewer OpenMP fork/joins, which made them much faster with two threads on
#: busy cores. See ``tools/analysis/bench_emsa.py`` (``--block-size``).
DEFAULT_BLOCK_BYTES = 8 * 1024 * 1024

#: Bytes of one block of scores on devices other than the CPU (GPUs). Large blocks keep
#: the number of kernel launches per layer small: at 800x1344 with batch 2 a stage of
#: ResT-small takes one to four blocks. Not tuned by measurement yet; see
#: ``tools/analysis/gpu_check.py``.
ACCELERATOR_BLOCK_BYTES = 256 * 1024 * 1024

#: Fewest keys at which the forward lays a block of scores out query-major when there
#: are fewer batch items than threads (see ``_emsa_transform_forward``). Measured here
#: with 2 threads and one image: 1050 keys (every stage at 800x1344) ran 15% faster
#: query-major with 2 heads, 4% with 4 and 5% slower with 8; 49 keys (224x224) up to
#: 40% slower. With 2 images, head-major was as fast or faster.
QUERY_MAJOR_MIN_KEYS = 256

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def cpu_tuned(x: Tensor) -> bool:
    """Whether the CPU-tuned choices of this module apply to ``x``: a CPU tensor, in eager
    mode. While a graph is recorded (:func:`trace_friendly`) the plain layouts and
    out-of-place ops are used: the memory-format choices of a channels-last convolution
    depend on whether the batch is 1, which would freeze a dynamic batch dimension."""
    return x.device.type == 'cpu' and not trace_friendly()


def trace_friendly() -> bool:
    """Whether a graph is being recorded, where shape-generic ops are needed.

    True under ``torch.export`` (hence ``torch.onnx.export(dynamo=True)``), the
    TorchScript-based ``torch.onnx.export``, ``torch.jit.trace`` and ``torch.compile``
    (whose tracing of the blocked kernel breaks the graph at every thread-count query
    and fails in inductor on the ``out=`` views of its backward).
    """
    return bool(torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()
                or torch.jit.is_tracing() or torch.compiler.is_compiling())


def autocast_off(device_type: str) -> ContextManager:
    """``torch.autocast(device_type, enabled=False)``, or nothing where the device has
    no autocast (e.g. ``meta``, on which ``torch.autocast`` raises)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype of ``device_type`` if autocast is on there, else None."""
    if (torch.amp.is_autocast_available(device_type)
            and torch.is_autocast_enabled(device_type)):
        return torch.get_autocast_dtype(device_type)
    return None


def _block_rows(block_size: Optional[int], batch_heads: int, num_keys: int,
                num_queries: int, itemsize: int, cpu: bool = True) -> int:
    """Number of query rows per block (at least 1, at most ``num_queries``)."""
    if block_size is None:
        budget = DEFAULT_BLOCK_BYTES if cpu else ACCELERATOR_BLOCK_BYTES
        block_size = budget // max(1, batch_heads * num_keys * itemsize)
    return int(max(1, min(block_size, num_queries)))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of statistics: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scaled_mixing(weight: Tensor, scale: float, dtype: torch.dtype) -> Tensor:
    """The (heads, heads) mixing matrix with the score scale folded in, in ``dtype``."""
    h = weight.shape[0]
    return (weight.detach().reshape(h, h).to(_acc_dtype(dtype)) * scale).to(dtype)


def _softmax_(x: Tensor) -> Tensor:
    """Softmax over the last dim; use the returned tensor.

    On the CPU it is written over ``x`` (the CPU kernel reads a row before writing it);
    elsewhere it is a new tensor, as aliasing input and output is not known to be safe
    for other kernels.
    """
    if cpu_tuned(x):
        return torch.ops.aten._softmax.out(x, -1, False, out=x)
    return torch.softmax(x, -1)


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


def _query_major(batch: int, num_keys: int, cpu: bool) -> bool:
    """Whether the forward lays a block of scores out query-major (see below).

    Head-major, the head mixing runs in parallel over the batch items only: with fewer
    items than CPU threads that idles threads. CPU tensors only (it is decided by the
    CPU's thread count).
    """
    return cpu and batch < torch.get_num_threads() and num_keys >= QUERY_MAJOR_MIN_KEYS


def _mix_heads_query_major(weight: Tensor, x: Tensor, out: Tensor) -> Tensor:
    """``out[i] = weight @ x[i]`` for x, out of shape (rows * B, heads, M)."""
    return torch.bmm(weight.expand(x.shape[0], *weight.shape), x, out=out)


def _emsa_transform_forward(q: Tensor, k: Tensor, v: Tensor, weight: Tensor,
                            eps: float, rows: int) -> Tuple[Tensor, Tensor]:
    """Query-blocked forward of EMSA with head mixing and instance norm.

    By default a block of scores is laid out head-major, (B, heads, rows, M), and the
    head mixing is one (heads x heads) @ (heads x rows * M) product per batch item,
    run in parallel over the items. With fewer items than threads and many keys
    (``M >= QUERY_MAJOR_MIN_KEYS``, e.g. one image at detection resolution) that leaves
    threads idle, and the block is laid out query-major, (rows, B, heads, M): the heads
    of one (query, key) pair sit ``M`` apart in a small (heads, M) matrix per query, and
    the mixing is one batched (heads x heads) @ (heads x M) product over the queries,
    in parallel. The (batch, head) pairs keep the single stride ``M``, so ``Q K^T`` and
    ``P V`` stay one strided batched product each, without copies.

    Args:
        q (Tensor): Queries (B, heads, N, head_dim), any strides.
        k (Tensor): Keys (B, heads, M, head_dim), any strides.
        v (Tensor): Values (B, heads, M, head_dim), any strides.
        weight (Tensor): Mixing matrix (heads, heads) with the score scale folded in,
            in the dtype of q.
        eps (float): ``eps`` of the instance norm.
        rows (int): Query rows per block.

    Returns:
        tuple[Tensor, Tensor]: The output, contiguous in the layout
        (B, N, heads, head_dim), and the instance-norm std ``s`` (B, heads), in the dtype
        of q (float32 or float64: :func:`emsa_fused` runs this core in float32 for
        low-precision inputs).
    """
    B, h, N, d = q.shape
    M = k.shape[2]
    bh = B * h
    query_major = _query_major(B, M, cpu_tuned(q))
    # (B * heads, L, head_dim) views (copies only where B > 1 makes them necessary)
    qq = q.reshape(bh, N, d)
    kt = k.reshape(bh, M, d).transpose(1, 2)
    vv = v.reshape(bh, M, d)
    raw_buf = q.new_empty(rows * bh * M)
    mixed_buf = q.new_empty(rows * bh * M)
    # per (batch, head) and query: the squared-norm statistics and the un-normalised
    # output, indexed (B * heads, N[, head_dim]) whatever the layout
    if query_major:
        rownorm = q.new_empty(N, bh).t()
        o_raw = q.new_empty(N, bh, d).transpose(0, 1)
    else:
        rownorm = q.new_empty(bh, N)
        o_raw = q.new_empty(bh, N, d)
    for start in range(0, N, rows):
        n = min(rows, N - start)
        if query_major:
            raw = raw_buf[:n * bh * M].view(n, bh, M)
            mixed = mixed_buf[:n * bh * M].view(n, bh, M)
            torch.bmm(qq[:, start:start + n], kt, out=raw.transpose(0, 1))
            _mix_heads_query_major(weight, raw.view(n * B, h, M), mixed.view(n * B, h, M))
            probs = _softmax_(mixed).transpose(0, 1)
        else:
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
    """Query-blocked backward of :func:`_emsa_transform_forward`.

    Args:
        grad_out (Tensor): Gradient of the output, (B, N, heads, head_dim).
        q (Tensor): Queries (B, heads, N, head_dim), any strides.
        k (Tensor): Keys (B, heads, M, head_dim), any strides.
        v (Tensor): Values (B, heads, M, head_dim), any strides.
        weight (Tensor): Mixing matrix (heads, heads) with the score scale folded in.
        out (Tensor): Output of the forward pass, (B, N, heads, head_dim).
        std (Tensor): Instance-norm std (B, heads) of the forward pass.
        rows (int): Query rows per block.

    Returns:
        tuple[Tensor, Tensor, Tensor, Tensor]: Gradients of q (B, heads, N, head_dim),
        k and v (B, heads, M, head_dim), and of ``weight`` (heads, heads), in the dtype
        of q (float32 or float64: :func:`emsa_fused` runs this core in float32 for
        low-precision inputs).
    """
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
            k (Tensor): Keys (B, heads, M, head_dim), dtype of q.
            v (Tensor): Values (B, heads, M, head_dim), dtype of q.
            weight (Tensor): Head-mixing weight (heads, heads, 1, 1).
            bias (Tensor, optional): Head-mixing bias (heads,); it cancels.
            scale (float): Multiplier of the scores.
            eps (float): ``eps`` of the instance norm.
            rows (int): Query rows per block.

        Returns:
            Tensor: Output (B, N, heads, head_dim), contiguous.
        """
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


def _attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, scale: float,
                        rows: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Query-blocked backward of plain softmax attention ``softmax(scale q k^T) v``.

    Args:
        grad_out (Tensor): Gradient of the output, (B, heads, N, head_dim).
        q (Tensor): Queries (B, heads, N, head_dim), any strides.
        k (Tensor): Keys (B, heads, M, head_dim), any strides.
        v (Tensor): Values (B, heads, M, head_dim), any strides.
        scale (float): Multiplier of the scores.
        rows (int): Query rows per block.

    Returns:
        tuple[Tensor, Tensor, Tensor]: Gradients of q, k and v, in the dtype of q.
    """
    B, h, N, d = q.shape
    M = k.shape[2]
    bh = B * h
    dtype = q.dtype
    low = dtype in _LOW_PRECISION
    acc = _acc_dtype(dtype) if low else dtype
    qq = q.reshape(bh, N, d)
    kk = k.reshape(bh, M, d)
    kt = kk.transpose(1, 2)
    k_scaled = kk * scale
    vt = v.reshape(bh, M, d).transpose(1, 2)
    gg = grad_out.reshape(bh, N, d)
    grad_q = q.new_empty(bh, N, d)
    grad_k = q.new_zeros(bh, M, d, dtype=acc)
    grad_v = q.new_zeros(bh, M, d, dtype=acc)
    probs_buf = q.new_empty(bh * rows * M)
    tmp_buf = q.new_empty(bh * rows * M)
    for start in range(0, N, rows):
        n = min(rows, N - start)
        qb = qq[:, start:start + n]
        gb = gg[:, start:start + n]
        probs = probs_buf[:bh * n * M].view(bh, n, M)
        torch.baddbmm(probs, qb, kt, beta=0, alpha=scale, out=probs)
        probs = _softmax_(probs)
        # dS = P * (dP - rowsum(P * dP)), dP = G V^T
        ds = torch.bmm(gb, vt, out=tmp_buf[:bh * n * M].view(bh, n, M)).mul_(probs)
        ds.addcmul_(probs, ds.sum(-1, keepdim=True), value=-1)
        torch.bmm(ds, k_scaled, out=grad_q[:, start:start + n])
        if low:
            grad_k.add_(torch.bmm(ds.transpose(1, 2), qb))
            grad_v.add_(torch.bmm(probs.transpose(1, 2), gb))
        else:
            grad_k.baddbmm_(ds.transpose(1, 2), qb)
            grad_v.baddbmm_(probs.transpose(1, 2), gb)
    return (grad_q.view(B, h, N, d), grad_k.mul_(scale).view(B, h, M, d).to(dtype),
            grad_v.view(B, h, M, d).to(dtype))


class AttentionFunction(torch.autograd.Function):
    """Plain softmax attention: the flash-attention forward, a query-blocked backward.

    PyTorch's CPU flash-attention backward spreads its work over batch x heads only, so
    with a single (batch, head) pair it runs on one thread. This backward recomputes the
    probabilities block by block like :class:`EMSATransformFunction` and runs every
    block's matmuls on all intra-op threads. Saves q, k and v only.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float, rows: int) -> Tensor:
        """``softmax(scale q k^T) v`` for (B, heads, L, head_dim) inputs of one dtype."""
        with autocast_off(q.device.type):
            out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        ctx.save_for_backward(q, k, v)
        ctx.scale = scale
        ctx.rows = rows
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        """Backward."""
        q, k, v = ctx.saved_tensors
        with autocast_off(q.device.type):
            grads = _attention_backward(grad_out, q, k, v, ctx.scale, ctx.rows)
        return grads + (None, None)


def _blocked_attention_backward_pays(batch_heads: int, cpu: bool) -> bool:
    """Whether :class:`AttentionFunction` beats the flash-attention backward.

    The CPU flash backward parallelises over (batch, head) pairs only: with fewer of
    them than intra-op threads, some threads would idle. CPU tensors only: on other
    devices PyTorch's own backward kernels are used.
    """
    return cpu and batch_heads < torch.get_num_threads()


def emsa_dense(q: Tensor,
               k: Tensor,
               v: Tensor,
               scale: float,
               transform_weight: Optional[Tensor] = None,
               eps: float = INSTANCE_NORM_EPS,
               transform_bias: Optional[Tensor] = None) -> Tensor:
    """The EMSA core of :func:`emsa_fused` written with shape-generic ops only.

    Used under export and ``torch.compile`` (:func:`trace_friendly`): no Python loop over
    blocks, so nothing depends on the traced size. One head is
    ``scaled_dot_product_attention``; with head mixing the scores are materialised and
    the instance norm uses the exact mean 1/M (identity 2 of the module docstring), so it
    is the same function as the blocked kernel, with the same single-key and
    single-element limits. The mixing bias cancels in the softmax; it is added as in the
    reference, so that it gets a gradient (of rounding size) when ``torch.compile``
    trains, as every parameter should.

    Args:
        q (Tensor): Queries (B, heads, N, head_dim).
        k (Tensor): Keys (B, heads, M, head_dim).
        v (Tensor): Values (B, heads, M, head_dim).
        scale (float): Multiplier of the scores ``q @ k^T``.
        transform_weight (Tensor, optional): Head-mixing weight (heads, heads, 1, 1);
            None means plain softmax attention. Defaults to None.
        eps (float): ``eps`` of the instance norm. Defaults to 1e-5.
        transform_bias (Tensor, optional): Head-mixing bias (heads,). Defaults to None.

    Returns:
        Tensor: Output (B, heads, N, head_dim).
    """
    if transform_weight is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    # in float32 under bfloat16 / float16 autocast or inputs, as the blocked kernel (see
    # emsa_fused): the instance norm of nearly uniform maps would lose most of the bits
    device = q.device.type
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    cast = autocast_dtype(device)
    if cast is not None:
        dtype = cast
    compute = torch.float32 if dtype in _LOW_PRECISION else dtype
    with autocast_off(device) if cast is not None else contextlib.nullcontext():
        q, k, v = q.to(compute), k.to(compute), v.to(compute)
        bias = None if transform_bias is None else transform_bias.to(compute)
        # the head mixing as the reference writes it, a 1x1 conv (an einsum here would
        # let the traced graph depend on whether the batch is 1)
        scores = F.conv2d(q @ k.transpose(-2, -1), transform_weight.to(compute) * scale,
                          bias)
        # centred probabilities P - 1/M, as in the blocked kernel
        probs = scores.softmax(-1) - 1.0 / k.shape[2]
        std = (probs.square().mean(dim=(-2, -1), keepdim=True) + eps).sqrt()
        out = (probs @ v) / std
    return out.to(dtype)


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
    scores. Without ``transform_weight`` it is ``scaled_dot_product_attention`` (on the
    CPU with :class:`AttentionFunction`'s backward where batch x heads is below the
    number of threads); with it, :class:`EMSATransformFunction` (or its forward alone
    when no gradient is needed). Under export it is :func:`emsa_dense`. See the module
    docstring for the identities used, the device rules and the bfloat16 behaviour
    under ``torch.autocast``.

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
            of scores takes about :data:`DEFAULT_BLOCK_BYTES` on the CPU and
            :data:`ACCELERATOR_BLOCK_BYTES` elsewhere. Defaults to None.

    Returns:
        Tensor: Output of shape (B, heads, N, head_dim). With head mixing it is a
        transposed view of a contiguous (B, N, heads, head_dim) tensor, so
        ``out.transpose(1, 2).reshape(B, N, C)`` is free.
    """
    B, h, N, _ = q.shape
    device = q.device.type
    cpu = cpu_tuned(q)
    if trace_friendly():
        return emsa_dense(q, k, v, scale, transform_weight, eps, transform_bias)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad
        for t in (q, k, v, transform_weight, transform_bias))
    if transform_weight is None and not (
            needs_grad and _blocked_attention_backward_pays(B * h, cpu)):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    cast = autocast_dtype(device)
    if cast is not None and dtype.is_floating_point:
        dtype = cast
    # With head mixing, the instance norm divides the centred probabilities P - 1/M,
    # which nearly cancel, by s >= sqrt(eps): in bfloat16 or float16 that loses most of
    # their bits (errors of 30-50% of the output at stages 3-4 of ResT-Lite in bfloat16),
    # so that core runs in float32 and only its output is cast back.
    compute = (torch.float32 if transform_weight is not None and dtype in _LOW_PRECISION
               else dtype)
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    rows = _block_rows(block_size, B * h, k.shape[2], N, q.element_size(), cpu)
    if transform_weight is None:
        return AttentionFunction.apply(q, k, v, scale, rows)
    if needs_grad:
        out = EMSATransformFunction.apply(q, k, v, transform_weight, transform_bias,
                                          scale, eps, rows)
    else:
        with autocast_off(device):
            out = _emsa_transform_forward(q, k, v,
                                          _scaled_mixing(transform_weight, scale, compute),
                                          eps, rows)[0]
    return out.transpose(1, 2).to(dtype)
