"""EMSA module: ``attn_impl='lean'`` and ``'dense'`` against ``'reference'`` with identical
weights, and where :func:`~mmrest.models.layers.emsa.attend` runs the reference instead."""
import itertools

import pytest
import torch
from torch import nn

from mmrest.models.layers.emsa import EMSA

#: tolerance on max |fused - reference|, relative to max(1, max |reference|)
TOL = 1e-4

#: (sr_ratio, num_heads) of the four ResT stages, plus the other combinations.
CONFIGS = list(itertools.product([8, 4, 2, 1], [1, 2, 4, 8]))
HW_SHAPES = [(25, 33), (1, 1), (3, 2)]


#: Small cases whose ops take microseconds: on one intra-op thread (see conftest.py).
pytestmark = [pytest.mark.stack, pytest.mark.usefixtures('one_intra_op_thread')]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1)).item()


def make_pair(embed_dims: int, num_heads: int, sr_ratio: int, seed: int,
              impl: str = 'lean', **kwargs):
    torch.manual_seed(seed)
    ref = EMSA(embed_dims, num_heads=num_heads, sr_ratio=sr_ratio, attn_impl='reference',
               **kwargs)
    # non-trivial LayerNorm and head-mixing parameters
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    fused = EMSA(embed_dims, num_heads=num_heads, sr_ratio=sr_ratio, attn_impl=impl,
                 **kwargs)
    fused.load_state_dict(ref.state_dict(), strict=True)
    return ref, fused


@pytest.mark.parametrize('sr_ratio,num_heads', CONFIGS)
@pytest.mark.parametrize('hw_shape', HW_SHAPES)
@pytest.mark.parametrize('batch', [1, 2])
@pytest.mark.parametrize('impl', ['lean', 'dense'])
def test_matches_reference(impl, sr_ratio, num_heads, hw_shape, batch):
    embed_dims = 8 * num_heads
    ref, fused = make_pair(embed_dims, num_heads, sr_ratio,
                           seed=sr_ratio * 10 + num_heads, impl=impl)
    assert [n for n, _ in ref.named_parameters()] == \
        [n for n, _ in fused.named_parameters()]
    x = torch.randn(batch, hw_shape[0] * hw_shape[1], embed_dims)
    x_ref = x.clone().requires_grad_()
    x_fused = x.clone().requires_grad_()
    out_ref = ref(x_ref, hw_shape)
    out_fused = fused(x_fused, hw_shape)
    assert out_fused.shape == out_ref.shape == x.shape
    assert rel_err(out_fused, out_ref) < TOL
    grad = torch.randn_like(out_ref)
    out_ref.backward(grad)
    out_fused.backward(grad)
    assert rel_err(x_fused.grad, x_ref.grad) < TOL
    # module-wide gradient scale, for the gradients that vanish by symmetry
    grad_scale = max(1.0, max(p.grad.abs().max().item() for p in ref.parameters()))
    for (name, p_ref), p_fused in zip(ref.named_parameters(), fused.parameters()):
        assert p_fused.grad is not None, name
        if name == 'transform_conv.bias':
            # cancels in the softmax: exactly 0 in the lean kernel (rounding noise in
            # the others)
            assert impl != 'lean' or torch.all(p_fused.grad == 0)
            assert (p_fused.grad - p_ref.grad).abs().max().item() < TOL * grad_scale
        elif name in ('kv.bias', 'sr_norm.bias') and num_heads > 1:
            # a shift shared by all keys cancels in the softmax, and one shared by all
            # values cancels in the instance-normalised map (its rows sum to 0): both
            # gradients are 0 up to rounding, in either implementation
            assert (p_fused.grad - p_ref.grad).abs().max().item() < TOL * grad_scale
        else:
            assert rel_err(p_fused.grad, p_ref.grad) < TOL, name


def test_parameter_names_and_shapes_are_the_authors():
    emsa = EMSA(64, num_heads=2, sr_ratio=4)
    shapes = {n: tuple(p.shape) for n, p in emsa.state_dict().items()}
    assert shapes == {
        'q.weight': (64, 64), 'q.bias': (64, ),
        'kv.weight': (128, 64), 'kv.bias': (128, ),
        'proj.weight': (64, 64), 'proj.bias': (64, ),
        'sr.weight': (64, 1, 5, 5), 'sr.bias': (64, ),
        'sr_norm.weight': (64, ), 'sr_norm.bias': (64, ),
        'transform_conv.weight': (2, 2, 1, 1), 'transform_conv.bias': (2, ),
    }


def test_lean_is_default_and_used_and_fused_is_its_former_name(monkeypatch):
    from mmrest.models.layers import dispatch as emsa_module
    calls = []
    real = emsa_module.emsa_lean
    monkeypatch.setattr(emsa_module, 'emsa_lean',
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    assert EMSA(16, num_heads=2, sr_ratio=2).attn_impl == 'lean'
    emsa = EMSA(16, num_heads=2, sr_ratio=2, attn_impl='fused')
    assert emsa.attn_impl == 'lean'
    emsa(torch.randn(1, 20, 16), (4, 5))
    assert calls
    with pytest.raises(ValueError, match='attn_impl must be one of'):
        EMSA(16, num_heads=2, attn_impl='flash')


@pytest.mark.parametrize('impl', ['lean', 'dense'])
def test_attention_dropout_in_training_runs_the_reference(monkeypatch, impl):
    from mmrest.models.layers import dispatch as emsa_module

    def fail(*args, **kwargs):
        raise AssertionError('kernel used with attention dropout')

    monkeypatch.setattr(emsa_module, f'emsa_{impl}', fail)
    emsa = EMSA(16, num_heads=2, sr_ratio=2, attn_drop=0.5, attn_impl=impl).train()
    assert emsa(torch.randn(2, 20, 16), (4, 5)).shape == (2, 20, 16)
    # in eval the dropout is inactive, so the kernel is used
    with pytest.raises(AssertionError, match='kernel used'):
        emsa.eval()(torch.randn(2, 20, 16), (4, 5))


@pytest.mark.parametrize('impl', ['lean', 'dense'])
def test_matches_reference_in_train_mode_without_dropout(impl):
    ref, fused = make_pair(32, 4, 2, seed=3, impl=impl)
    ref.train()
    fused.train()
    x = torch.randn(2, 99, 32)
    torch.testing.assert_close(fused(x, (9, 11)), ref(x, (9, 11)), rtol=1e-4, atol=1e-4)


def _doubles(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    """A forward hook that changes the output: a kernel that skips it is seen."""
    _doubles.calls += 1
    return output * 2


class ScaledConv(nn.Conv2d):
    """A Conv2d subclass with another function (as a quantization-aware conv)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 0.5


@pytest.mark.parametrize('impl', ['lean', 'dense'])
@pytest.mark.parametrize('training', [False, True])
@pytest.mark.parametrize('change', ['hook', 'subclass'])
def test_head_mixing_conv_with_a_hook_or_another_type_is_called(impl, training, change):
    """The kernels read ``transform_conv``'s weights; where it has a hook or is not a
    plain ``nn.Conv2d``, it is called as a module (the reference runs), and the function
    and gradients are those of the reference (float64: equal to rounding)."""
    ref, fused = make_pair(16, 2, 2, seed=5, impl=impl)
    x = torch.randn(2, 7 * 11, 16, dtype=torch.float64, requires_grad=training)
    results = []
    for emsa in (fused.double().train(training), ref.double().train(training)):
        if change == 'hook':
            emsa.transform_conv.register_forward_hook(_doubles)
        else:
            scaled = ScaledConv(2, 2, 1).double()
            scaled.load_state_dict(emsa.transform_conv.state_dict())
            emsa.transform_conv = scaled
        _doubles.calls = 0
        with torch.set_grad_enabled(training):
            out = emsa(x, (7, 11))
        assert change != 'hook' or _doubles.calls == 1
        grads = torch.autograd.grad(out.square().sum(), [x] + list(
            emsa.parameters())) if training else ()
        results.append((out.detach(), grads))
    (got, got_grads), (want, want_grads) = results
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)


def test_reduce_tokens_matches_nchw_conv():
    """The channels-last token map is the same function as the plain NCHW conv."""
    torch.manual_seed(0)
    for batch, hw in ((1, (25, 33)), (2, (9, 7)), (1, (1, 1))):
        emsa = EMSA(32, num_heads=2, sr_ratio=4)
        x = torch.randn(batch, hw[0] * hw[1], 32)
        x_map = x.transpose(1, 2).contiguous().view(batch, 32, *hw)
        expected = emsa.sr_norm(emsa.sr(x_map).flatten(2).transpose(1, 2))
        torch.testing.assert_close(emsa.reduce_tokens(x, hw)[0], expected,
                                   rtol=1e-5, atol=1e-5)
