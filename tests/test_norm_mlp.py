"""The memory-lean LayerNorm + MLP of the blocks against the plain modules."""
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import mmrest.models.layers.norm_mlp as norm_mlp_module
from mmrest.models.layers import EMSA, PreNormBlock
from mmrest.models.layers.block import Mlp
from mmrest.models.layers.dispatch import blocked_norm_mlp
from mmrest.models.layers.norm_mlp import NormMlpFunction, norm_mlp

pytestmark = pytest.mark.usefixtures('one_intra_op_thread')


def make(C: int = 16, dtype=torch.float64, seed: int = 0):
    torch.manual_seed(seed)
    norm, mlp = nn.LayerNorm(C), Mlp(C, 4 * C)
    with torch.no_grad():  # non-trivial affine LayerNorm
        norm.weight.normal_(1, 0.2)
        norm.bias.normal_(0, 0.2)
    return norm.to(dtype), mlp.to(dtype)


def grads(fn, x, modules):
    params = [p for m in modules for p in m.parameters()]
    out = fn(x)
    g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(3))
    return out, torch.autograd.grad(out, [x] + params, g)


@pytest.mark.parametrize('dtype, tol', [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_same_function_and_gradients_as_the_modules(dtype, tol):
    norm, mlp = make(dtype=dtype)
    x = torch.randn(2, 37, 16, dtype=dtype, requires_grad=True)
    assert blocked_norm_mlp(x, norm, mlp)
    ref, ref_grads = grads(lambda t: mlp(norm(t)), x, (norm, mlp))
    out, out_grads = grads(lambda t: norm_mlp(t, norm, mlp), x, (norm, mlp))
    assert torch.equal(out, ref)  # the forward runs the modules' own ops
    for g, g_ref in zip(out_grads, ref_grads):
        assert ((g - g_ref).abs().max() / g_ref.abs().max().clamp(min=1)).item() < tol


@pytest.mark.parametrize('dtype, tol', [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize('block_rows', [1, 7, 74, 1000])
@pytest.mark.parametrize('recompute', [False, True])
def test_blocks_of_rows_compute_the_same_function(recompute, block_rows, dtype, tol):
    """74 tokens in blocks of 1 and 7 (the last one short), one block, a block larger
    than the input, the pre-activation kept or recomputed: the same values and
    gradients as the modules."""
    norm, mlp = make(dtype=dtype)
    params = list(norm.parameters()) + list(mlp.parameters())
    x = torch.randn(2, 37, 16, dtype=dtype, requires_grad=True)
    ref, ref_grads = grads(lambda t: mlp(norm(t)), x, (norm, mlp))
    out, out_grads = grads(
        lambda t: NormMlpFunction.apply(t, norm.weight, norm.bias, norm.eps, *params[2:],
                                        block_rows, recompute), x, (norm, mlp))
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    for g, g_ref in zip(out_grads, ref_grads):
        assert ((g - g_ref).abs().max() / g_ref.abs().max().clamp(min=1)).item() < tol


@pytest.mark.parametrize('block_rows', [4, 1024])
@pytest.mark.parametrize('recompute', [False, True])
def test_gradcheck(block_rows, recompute):
    norm, mlp = make(C=4)
    x = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    params = [norm.weight, norm.bias, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight,
              mlp.fc2.bias]

    def fn(x_, *p):
        return NormMlpFunction.apply(x_, p[0], p[1], norm.eps, *p[2:], block_rows,
                                     recompute)

    assert torch.autograd.gradcheck(fn, [x] + params)


def saved_bytes(fn) -> int:
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


@pytest.mark.parametrize('C', [norm_mlp_module.RECOMPUTE_MAX_CHANNELS,
                               norm_mlp_module.RECOMPUTE_MAX_CHANNELS + 8])
def test_keeps_half_of_what_autograd_keeps_or_a_tenth(C):
    """x, the statistics and the hidden pre-activation (5C per token) instead of x, the
    normalised tokens, the pre-activation and the activation (10C), plus weights; up to
    RECOMPUTE_MAX_CHANNELS channels not the pre-activation either (C per token)."""
    tokens = 1024
    norm, mlp = make(C=C, dtype=torch.float32)
    x = torch.randn(1, tokens, C, requires_grad=True)
    weights = sum(p.numel() * 4 for p in (*norm.parameters(), *mlp.parameters()))
    plain = saved_bytes(lambda: mlp(norm(x))) - weights
    lean = saved_bytes(lambda: norm_mlp(x, norm, mlp)) - weights
    assert plain >= tokens * 10 * C * 4
    kept = C + 2 if C <= norm_mlp_module.RECOMPUTE_MAX_CHANNELS else 5 * C + 2
    assert tokens * (kept - 2) * 4 <= lean <= tokens * kept * 4


class FreshStorages(TorchDispatchMode):
    """Records the bytes of every storage that an op creates (views and out= writes
    create none). It keeps them alive, so that no address is reused."""

    def __init__(self) -> None:
        super().__init__()
        self.seen, self.fresh, self.kept = set(), [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = tree_flatten((args, kwargs))[0]
        self.seen.update(t.untyped_storage().data_ptr() for t in inputs
                         if isinstance(t, torch.Tensor))
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                key = t.untyped_storage().data_ptr()
                if key not in self.seen:
                    self.seen.add(key)
                    self.kept.append(t.untyped_storage())
                    self.fresh.append(t.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize('dtype, tol', [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize('block_rows', [7, 1024])
def test_inference_blocks_compute_the_same_function(block_rows, dtype, tol, monkeypatch):
    monkeypatch.setattr(norm_mlp_module, 'BLOCK_ROWS', block_rows)
    norm, mlp = make(dtype=dtype)
    x = torch.randn(2, 37, 16, dtype=dtype)
    with torch.no_grad():
        ref = mlp(norm(x))
        with FreshStorages() as mode:
            out = norm_mlp(x, norm, mlp)
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    # in blocks no hidden-sized tensor at all; in one block its buffer is the only one
    assert sum(n >= 74 * 64 * x.element_size() for n in mode.fresh) == (
        0 if block_rows < 74 else 1)


@pytest.mark.parametrize('recompute, expected', [(False, [1, 4]), (True, [0, 4])])
def test_hidden_sized_tensors_are_allocated_once_per_step_or_never(recompute, expected):
    """Over blocks, the kept pre-activation is the only hidden-sized tensor (none where
    recomputed); the rest lives in block buffers (hidden-sized in one block)."""
    C, rows, block_rows = 16, 4096, 256
    norm, mlp = make(C=C, dtype=torch.float32)
    params = list(norm.parameters()) + list(mlp.parameters())
    x = torch.randn(rows, C, requires_grad=True)
    hidden_bytes = rows * 4 * C * 4
    counts = []
    for block in (block_rows, rows):
        with FreshStorages() as mode:
            NormMlpFunction.apply(x, norm.weight, norm.bias, norm.eps, *params[2:],
                                  block, recompute).sum().backward()
        counts.append(sum(n >= hidden_bytes for n in mode.fresh))
    assert counts == expected


@pytest.mark.parametrize('frozen', [
    'norm.weight', 'norm.bias', 'fc1.weight', 'fc1.bias', 'fc2.weight', 'fc2.bias', 'x',
    'norm.weight,norm.bias,x', 'norm.weight,norm.bias,fc1.weight,fc1.bias,x'
])
@pytest.mark.parametrize('recompute', [False, True])
def test_frozen_inputs_get_no_gradient(frozen, recompute):
    """Each parameter frozen alone, x without gradient, the LayerNorm frozen, only fc2
    trainable: the others get the modules' gradients (blocks of 4 rows)."""
    norm, mlp = make()
    named = dict(norm.named_parameters(prefix='norm'))
    named.update(mlp.named_parameters())
    frozen = frozen.split(',')
    for name in frozen:
        if name != 'x':
            named[name].requires_grad_(False)
    x = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad='x' not in frozen)
    ref_x = x.detach().clone().requires_grad_(x.requires_grad)
    g = torch.randn(2, 9, 16, dtype=torch.float64)
    params = [named[k] for k in ('fc1.weight', 'fc1.bias', 'fc2.weight', 'fc2.bias')]
    NormMlpFunction.apply(x, norm.weight, norm.bias, norm.eps, *params, 4,
                          recompute).backward(g)
    grads = {name: p.grad for name, p in named.items()}
    for p in named.values():
        p.grad = None
    mlp(norm(ref_x)).backward(g)
    if 'x' in frozen:
        assert x.grad is None
    else:
        torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-12, atol=1e-12)
    for name, p in named.items():
        if name in frozen:
            assert grads[name] is None and p.grad is None
        else:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-12, atol=1e-12)


def test_output_takes_in_place_ops_like_the_modules():
    norm, mlp = make()
    x = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
    out = norm_mlp(x, norm, mlp)
    out += 1  # an in-place op on a view output of a custom function would raise
    out.sum().backward()
    assert x.grad is not None


def test_applies_only_where_it_is_the_same_function():
    norm, mlp = make(dtype=torch.float32)
    x = torch.randn(2, 9, 16, requires_grad=True)
    assert blocked_norm_mlp(x, norm, mlp)
    with torch.no_grad():
        assert blocked_norm_mlp(x, norm, mlp)  # inference runs the blocks too
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert not blocked_norm_mlp(x, norm, mlp)
    assert not blocked_norm_mlp(x.to(torch.bfloat16), norm, mlp)
    assert not blocked_norm_mlp(torch.empty(2, 9, 16, device='meta'), norm, mlp)
    dropout = Mlp(16, 64, drop=0.1).train()
    assert not blocked_norm_mlp(x, norm, dropout)
    assert blocked_norm_mlp(x, norm, dropout.eval())
    tanh = Mlp(16, 64)
    tanh.act = nn.GELU(approximate='tanh')
    assert not blocked_norm_mlp(x, norm, tanh)
    assert not blocked_norm_mlp(x, nn.LayerNorm(16, elementwise_affine=False), mlp)


@pytest.mark.parametrize('attn_impl', ['lean', 'reference'])
@pytest.mark.parametrize('sr_ratio, heads', [(2, 2), (1, 1)])
def test_block_trains_like_its_modules(sr_ratio, heads, attn_impl):
    """The block takes the blocked path whatever its attention, and computes its modules'
    function, values and gradients (float64)."""
    torch.manual_seed(0)
    block = PreNormBlock(32, EMSA(32, heads, sr_ratio=sr_ratio, attn_impl=attn_impl))
    block = block.double().train()
    x = torch.randn(2, 6 * 5, 32, dtype=torch.float64, requires_grad=True)
    calls = []
    original = NormMlpFunction.apply
    try:
        NormMlpFunction.apply = lambda *a: calls.append(1) or original(*a)
        out = block(x, (6, 5))
    finally:
        NormMlpFunction.apply = original
    assert calls
    mid = x + block.attn(block.norm1(x), (6, 5))
    out_ref = mid + block.mlp(block.norm2(mid))
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
    g = torch.randn(out.shape, dtype=out.dtype)
    grads = torch.autograd.grad(out, [x, *block.parameters()], g)
    grads_ref = torch.autograd.grad(out_ref, [x, *block.parameters()], g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize('recompute', [False, True])
def test_empty_and_non_contiguous_tokens(recompute):
    norm, mlp = make()
    params = [norm.weight, norm.bias, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight,
              mlp.fc2.bias]
    for x in (torch.randn(2, 0, 16, dtype=torch.float64),
              torch.randn(2, 16, 9, dtype=torch.float64).transpose(1, 2)):
        x.requires_grad_()
        ref, ref_grads = grads(lambda t: mlp(norm(t)), x, (norm, mlp))
        out, out_grads = grads(
            lambda t: NormMlpFunction.apply(t, *params[:2], norm.eps, *params[2:], 4,
                                            recompute), x, (norm, mlp))
        assert out.shape == x.shape
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        for g, g_ref in zip(out_grads, ref_grads):
            torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)


class KeepOutput:
    """A forward hook that keeps each output and a copy of it taken when the module
    returned: an in-place write into the output after that would make them differ."""

    def __init__(self) -> None:
        self.kept = []

    def __call__(self, module: nn.Module, args, output: torch.Tensor) -> None:
        self.kept.append((output, output.clone()))

    def unchanged(self) -> bool:
        return bool(self.kept) and all(torch.equal(o, c) for o, c in self.kept)


def block_by_hand(block, x: torch.Tensor, hw) -> torch.Tensor:
    """The block's function from its modules."""
    x = x + block.attn(block.norm1(x), hw)
    return x + block.mlp(block.norm2(x))


@pytest.mark.parametrize('hooked', ['norm2', 'mlp', 'mlp.fc1', 'mlp.act', 'mlp.fc2'])
def test_modules_with_hooks_are_called(hooked):
    """The blocked path calls none of its modules: not where one has a forward hook (in
    inference) or a backward hook (in training), which then run as for the modules."""
    torch.manual_seed(0)
    block = PreNormBlock(32, EMSA(32, 2, sr_ratio=2)).eval()
    x = torch.randn(1, 7 * 11, 32)
    with torch.no_grad():
        hook = KeepOutput()
        handle = block.get_submodule(hooked).register_forward_hook(hook)
        out = block(x, (7, 11))
        handle.remove()
        assert hook.unchanged()
        torch.testing.assert_close(out, block_by_hand(block, x, (7, 11)), rtol=1e-5, atol=1e-5)
    block.train()
    x.requires_grad_()
    seen = []
    handle = block.get_submodule(hooked).register_full_backward_hook(
        lambda m, grad_in, grad_out: seen.append(grad_out[0].clone()))
    block(x, (7, 11)).square().sum().backward()
    handle.remove()
    assert len(seen) == 1
    grad_x, x.grad = x.grad.clone(), None
    block_by_hand(block, x, (7, 11)).square().sum().backward()
    torch.testing.assert_close(grad_x, x.grad, rtol=1e-5, atol=1e-5)


def test_dynamically_quantized_blocks_run_their_modules():
    """After ``quantize_dynamic`` (a common CPU deployment step) the linear layers are
    quantized modules: the blocked path, which reads float weights, is not taken."""
    from mmrest.models import ResTV2
    torch.manual_seed(0)
    model = ResTV2('tiny', drop_path_rate=0.).eval()
    quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    block = quantized.stage1[0]
    assert type(block.mlp.fc1) is not nn.Linear
    x = torch.randn(2, 9 * 13, model.embed_dims[0])
    with torch.no_grad():
        torch.testing.assert_close(block(x, (9, 13)), block_by_hand(block, x, (9, 13)),
                                   rtol=1e-5, atol=1e-5)
