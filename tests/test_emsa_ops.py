"""The EMSA attention kernels (lean and dense) against the straightforward reference."""
import itertools
from typing import List, Optional, Tuple

import pytest
import torch
from torch import Tensor

from mmrest.models.layers.emsa_ops import (EMSATransformFunction, emsa_dense, emsa_lean,
                                           emsa_reference)

#: fp32 tolerance on max |fused - reference|, relative to max(1, max |reference|).
TOL_FP32 = 1e-4


#: Small cases whose ops take microseconds: on one intra-op thread (see conftest.py).
pytestmark = [pytest.mark.stack, pytest.mark.usefixtures('one_intra_op_thread')]


def make_inputs(B: int, h: int, N: int, M: int, d: int,
                dtype: torch.dtype = torch.float32, seed: int = 0,
                requires_grad: bool = True) -> List[Optional[Tensor]]:
    """q, k, v in the (non-contiguous) layouts EMSA makes them in, plus conv weights."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        t = (torch.randn(*shape, generator=gen, dtype=dtype) * std)
        return t.requires_grad_(requires_grad)

    q = randn(B, N, h, d).transpose(1, 2)  # a view of the output of a linear layer
    kv = randn(B, M, 2, h, d)
    k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
    weight = randn(h, h, 1, 1, std=h**-0.5) if h > 1 else None
    bias = randn(h, std=h**-0.5) if h > 1 else None
    return [q, k, v, weight, bias, kv]


def leaves(inputs: List[Optional[Tensor]]) -> List[Tensor]:
    """The tensors gradients are taken with respect to."""
    q, _, _, weight, bias, kv = inputs
    return [t for t in (q, kv, weight, bias) if t is not None]


def max_err(a: Tensor, b: Tensor) -> float:
    """max |a - b| relative to max(1, max |b|)."""
    return ((a.double() - b.double()).abs().max() /
            b.double().abs().max().clamp(min=1)).item()


def run_both(inputs: List[Optional[Tensor]], scale: float,
             block_size: Optional[int] = None,
             dense: bool = False) -> Tuple[Tensor, Tensor, list, list]:
    """Outputs and input gradients of the reference and the lean (or dense) kernel for
    one random output gradient."""
    q, k, v, weight, bias, _ = inputs
    ref = emsa_reference(q, k, v, scale, weight, bias)
    fused = (emsa_dense(q, k, v, scale, weight, transform_bias=bias) if dense else
             emsa_lean(q, k, v, scale, weight, bias, block_size=block_size))
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1),
                       dtype=ref.dtype)
    ref_grads = torch.autograd.grad(ref, leaves(inputs), grad)
    fused_grads = torch.autograd.grad(fused, leaves(inputs), grad)
    return ref, fused, ref_grads, fused_grads


SIZES = list(itertools.product([1, 2], [1, 2, 4, 8], [1, 7, 50, 333], [1, 5, 64]))


@pytest.mark.parametrize('B,h,N,M', SIZES)
def test_matches_reference_fp32(B, h, N, M):
    d = 8 if h > 2 else 16
    inputs = make_inputs(B, h, N, M, d, seed=B * 1000 + h * 100 + N + M)
    # a block size that splits N unevenly, and the default (one block here)
    for block_size in (None, 16):
        ref, fused, ref_grads, fused_grads = run_both(inputs, d**-0.5, block_size)
        assert fused.shape == ref.shape and fused.dtype == ref.dtype
        assert max_err(fused, ref) < TOL_FP32
        for name, g_fused, g_ref in zip(('q', 'kv', 'weight', 'bias'), fused_grads,
                                        ref_grads):
            if name == 'bias':
                # cancels in the softmax: exactly 0; the reference's is rounding noise
                assert torch.all(g_fused == 0)
                scale_w = fused_grads[2].abs().max().clamp(min=1)
                assert (g_ref.abs().max() / scale_w).item() < TOL_FP32
            else:
                assert max_err(g_fused, g_ref) < TOL_FP32, name


@pytest.mark.parametrize('B,h,N,M', itertools.product([1, 2], [1, 4], [1, 50], [1, 64]))
def test_dense_matches_reference(B, h, N, M):
    """The dense core, in float32 and float64 (1e-9), values and gradients."""
    inputs = make_inputs(B, h, N, M, 8, seed=B + h + N + M)
    ref, dense, ref_grads, dense_grads = run_both(inputs, 0.35, dense=True)
    assert max_err(dense, ref) < TOL_FP32
    for name, g_dense, g_ref in zip(('q', 'kv', 'weight', 'bias'), dense_grads, ref_grads):
        if name == 'bias':
            # cancels in the softmax: both are float32 rounding noise around 0, whose
            # size depends on the CPU and torch version, so each is bounded on its own
            scale_w = ref_grads[2].abs().max().clamp(min=1)
            for g in (g_dense, g_ref):
                assert (g.abs().max() / scale_w).item() < TOL_FP32
        else:
            assert max_err(g_dense, g_ref) < TOL_FP32, name
    q, k, v, weight, bias, _ = make_inputs(B, h, N, M, 8, torch.float64,
                                           requires_grad=False)
    torch.testing.assert_close(emsa_dense(q, k, v, 0.35, weight, transform_bias=bias),
                               emsa_reference(q, k, v, 0.35, weight, bias),
                               rtol=1e-9, atol=1e-9)


def test_scores_of_realistic_size_match():
    """A larger, multi-block case with peaked attention (large score scale)."""
    inputs = make_inputs(1, 4, 700, 150, 32, seed=7)
    ref, fused, ref_grads, fused_grads = run_both(inputs, 0.5, block_size=64)
    assert max_err(fused, ref) < TOL_FP32
    for g_fused, g_ref in zip(fused_grads[:3], ref_grads[:3]):
        assert max_err(g_fused, g_ref) < TOL_FP32


def test_float64_forward_is_tight():
    q, k, v, weight, bias, _ = make_inputs(2, 4, 33, 9, 8, torch.float64,
                                           requires_grad=False)
    ref = emsa_reference(q, k, v, 0.3, weight, bias)
    fused = emsa_lean(q, k, v, 0.3, weight, bias, block_size=5)
    assert fused.dtype == torch.float64
    torch.testing.assert_close(fused, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('B,h,N,M,block_size', [
    (2, 2, 5, 3, 2),
    (1, 4, 6, 7, None),
    (1, 3, 7, 4, 3),
    (1, 2, 3, 1, 1),  # one key
    (2, 2, 1, 1, None),  # one-element maps
    (1, 1, 5, 4, None),  # plain softmax attention
    (2, 2, 4, 5, None),
])
def test_gradcheck_float64(B, h, N, M, block_size):
    q, k, v, weight, bias, kv = make_inputs(B, h, N, M, 3, torch.float64)

    def fn(q_, kv_, *w):
        k_, v_ = kv_.permute(2, 0, 3, 1, 4).unbind(0)
        return emsa_lean(q_, k_, v_, 0.7, *w, block_size=block_size)

    args = [q, kv] + [t for t in (weight, bias) if t is not None]
    assert torch.autograd.gradcheck(fn, args)


def test_no_grad_path_equals_autograd_path():
    q, k, v, weight, bias, _ = make_inputs(2, 4, 50, 64, 8)
    with_grad = emsa_lean(q, k, v, 0.35, weight, bias, block_size=16)
    assert with_grad.grad_fn is not None
    with torch.no_grad():
        no_grad = emsa_lean(q, k, v, 0.35, weight, bias, block_size=16)
    assert no_grad.grad_fn is None
    torch.testing.assert_close(no_grad, with_grad, rtol=0, atol=0)


def test_block_size_does_not_change_result():
    q, k, v, weight, bias, _ = make_inputs(2, 2, 50, 5, 8, requires_grad=False)
    outs = [emsa_lean(q, k, v, 0.35, weight, bias, block_size=bs)
            for bs in (1, 7, 50, 1000, None)]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('layout', ['contiguous', 'strided'])
def test_other_input_layouts(layout):
    gen = torch.Generator().manual_seed(5)
    B, h, N, M, d = 2, 4, 37, 11, 6
    if layout == 'contiguous':
        q, k, v = (torch.randn(B, h, L, d, generator=gen) for L in (N, M, M))
    else:  # every other element of the last dim, and heads with a gap
        q = torch.randn(B, N, h + 1, 2 * d, generator=gen)[:, :, :h, ::2].transpose(1, 2)
        k = torch.randn(B, h, 2 * M, d, generator=gen)[:, :, ::2]
        v = torch.randn(B, M, h, d, generator=gen).transpose(1, 2)
    weight = torch.randn(h, h, 1, 1, generator=gen) * 0.5
    bias = torch.randn(h, generator=gen)
    inputs = [t.requires_grad_() for t in (q, k, v, weight, bias)]
    ref = emsa_reference(*inputs[:3], 0.4, *inputs[3:])
    fused = emsa_lean(*inputs[:3], 0.4, *inputs[3:], block_size=8)
    assert max_err(fused, ref) < TOL_FP32
    grad = torch.randn(ref.shape, generator=gen)
    ref_grads = torch.autograd.grad(ref, inputs[:4], grad)
    fused_grads = torch.autograd.grad(fused, inputs[:4], grad)
    for g_fused, g_ref in zip(fused_grads, ref_grads):
        assert max_err(g_fused, g_ref) < TOL_FP32


def test_output_layout_is_token_major():
    q, k, v, weight, bias, _ = make_inputs(2, 4, 7, 5, 8, requires_grad=False)
    out = emsa_lean(q, k, v, 0.35, weight, bias)
    # free reshape to (B, N, C) for the output projection
    assert out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize('h', [2, 4, 8])
def test_single_key_and_single_element_limits(h):
    for N, M in ((1, 1), (7, 1)):
        inputs = make_inputs(2, h, N, M, 4)
        q, k, v, weight, bias, _ = inputs
        fused = emsa_lean(q, k, v, 0.5, weight, bias)
        ref = emsa_reference(q, k, v, 0.5, weight, bias)
        assert torch.all(fused == 0) and torch.all(ref == 0)
        grads = torch.autograd.grad(fused.sum() + (fused * fused).sum(), leaves(inputs))
        for g in grads:
            assert torch.all(torch.isfinite(g))
            assert g.abs().max().item() < 1e-6
    # plain softmax attention of one key returns that key's value
    q, k, v, _, _, _ = make_inputs(1, 1, 3, 1, 4, requires_grad=False)
    torch.testing.assert_close(emsa_lean(q, k, v, 0.5), v.expand(1, 1, 3, 4))


def test_bias_gradient_is_exactly_zero_and_present():
    inputs = make_inputs(1, 4, 20, 6, 8)
    q, k, v, weight, bias, _ = inputs
    emsa_lean(q, k, v, 0.5, weight, bias).pow(2).sum().backward()
    assert bias.grad is not None and torch.all(bias.grad == 0)
    assert weight.grad is not None and weight.grad.abs().max() > 0


def test_double_backward_is_refused():
    q, k, v, weight, bias, _ = make_inputs(1, 2, 5, 4, 4, torch.float64)
    out = emsa_lean(q, k, v, 0.5, weight, bias)
    (gq,) = torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError):
        gq.sum().backward()


# bf16 autocast: errors relative to the fp32 result, scaled by max(1, max |fp32|).
# One head (bfloat16 softmax attention): measured 0.005-0.007. With head mixing the fused
# core runs in float32 and only its inputs and output are rounded: measured 0.002.
TOL_BF16 = {1: 0.03, 4: 0.01}


@pytest.mark.parametrize('h', [1, 4])
def test_bf16_autocast_is_finite_and_close(h):
    inputs = make_inputs(2, h, 333, 64, 16, seed=3)
    q, k, v, weight, bias, _ = inputs
    ref = emsa_reference(q, k, v, 0.25, weight, bias)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2))
    ref_grads = torch.autograd.grad(ref, leaves(inputs), grad)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = emsa_lean(q, k, v, 0.25, weight, bias)
    if h > 1:
        assert out.dtype == torch.bfloat16
    assert torch.all(torch.isfinite(out))
    assert max_err(out, ref) < TOL_BF16[h]
    grads = torch.autograd.grad(out, leaves(inputs), grad.to(out.dtype))
    for g, g_ref in zip(grads[:3], ref_grads[:3]):
        assert g.dtype == torch.float32  # the leaves' dtype
        assert torch.all(torch.isfinite(g))
        assert max_err(g, g_ref) < TOL_BF16[h]


@pytest.mark.parametrize('near_uniform', [False, True])
def test_dense_core_under_bf16_autocast_runs_head_mixing_in_float32(near_uniform):
    """Under bfloat16 autocast the dense core keeps the float32 head-mixing core (in
    bfloat16 near-uniform maps lose their deviations: the reference errs by 0.05 of 0.05)."""
    q, k, v, weight, bias, _ = make_inputs(2, 4, 200, 64, 8, seed=5, requires_grad=False)
    if near_uniform:
        q = q * 1e-3
    ref = emsa_reference(q, k, v, 0.1, weight, bias)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = emsa_dense(q, k, v, 0.1, weight, transform_bias=bias)
    assert out.dtype == torch.bfloat16
    assert max_err(out, ref) < (1e-3 if near_uniform else TOL_BF16[4])
    # without autocast: the same function in the inputs' precision
    torch.testing.assert_close(emsa_dense(q, k, v, 0.1, weight, transform_bias=bias), ref,
                               rtol=1e-5, atol=1e-5)
    dense64 = emsa_dense(q.double(), k.double(), v.double(), 0.1, weight.double(),
                         transform_bias=bias.double())
    assert dense64.dtype == torch.float64


def test_bf16_autocast_nearly_uniform_attention_stays_finite():
    """Near-uniform attention (var << eps), where the normalisation amplifies most: the
    reference's bfloat16 core errs by 0.05 (of an output of 0.05), the fused one by 1e-4."""
    q, k, v, weight, bias, _ = make_inputs(1, 2, 200, 64, 8, requires_grad=False)
    q = q * 1e-3
    ref = emsa_reference(q, k, v, 0.1, weight, bias)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = emsa_lean(q, k, v, 0.1, weight, bias)
        ref_bf16 = emsa_reference(q, k, v, 0.1, weight, bias)
    assert torch.all(torch.isfinite(out)) and out.dtype == torch.bfloat16
    assert max_err(out, ref) < 1e-3 < 0.02 < max_err(ref_bf16, ref)


def saved_bytes(fn) -> Tuple[int, int]:
    """Total and largest bytes of tensors autograd saves while running ``fn``."""
    sizes = []

    def pack(t):
        sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(sizes), max(sizes, default=0)


def test_function_saves_no_score_sized_tensor():
    B, h, N, M, d = 1, 4, 600, 200, 16
    q, k, v, weight, bias, _ = make_inputs(B, h, N, M, d)
    score_bytes = B * h * N * M * 4
    ref_total, ref_max = saved_bytes(
        lambda: emsa_reference(q, k, v, 0.25, weight, bias))
    holder = []
    fused_total, fused_max = saved_bytes(
        lambda: holder.append(emsa_lean(q, k, v, 0.25, weight, bias)))
    # the output is a transposed view of the Function's output
    node = holder[0].grad_fn.next_functions[0][0]
    assert node._forward_cls is EMSATransformFunction
    assert ref_max >= score_bytes  # the check can see a score tensor
    assert fused_max < score_bytes / 10
    # q, k, v, output and O(B * h) statistics
    io_bytes = (B * h * N * d * 2 + B * h * M * d * 2) * 4
    assert fused_total <= io_bytes + 4096
    assert fused_total < ref_total / 10
