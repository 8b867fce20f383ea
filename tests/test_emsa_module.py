"""EMSA module: ``attn_impl='fused'`` against ``attn_impl='reference'`` with identical weights."""
import itertools

import pytest
import torch

from mmrest.models.layers.emsa import EMSA

#: tolerance on max |fused - reference|, relative to max(1, max |reference|)
TOL = 1e-4

#: (sr_ratio, num_heads) of the four ResT stages, plus the other combinations.
CONFIGS = list(itertools.product([8, 4, 2, 1], [1, 2, 4, 8]))
HW_SHAPES = [(25, 33), (1, 1), (3, 2)]


#: Small cases whose ops take microseconds: on one intra-op thread (see conftest.py).
pytestmark = pytest.mark.usefixtures('one_intra_op_thread')


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1)).item()


def make_pair(embed_dims: int, num_heads: int, sr_ratio: int, seed: int, **kwargs):
    torch.manual_seed(seed)
    ref = EMSA(embed_dims, num_heads=num_heads, sr_ratio=sr_ratio, attn_impl='reference',
               **kwargs)
    # non-trivial LayerNorm and head-mixing parameters
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    fused = EMSA(embed_dims, num_heads=num_heads, sr_ratio=sr_ratio, attn_impl='fused',
                 **kwargs)
    fused.load_state_dict(ref.state_dict(), strict=True)
    return ref, fused


@pytest.mark.parametrize('sr_ratio,num_heads', CONFIGS)
@pytest.mark.parametrize('hw_shape', HW_SHAPES)
@pytest.mark.parametrize('batch', [1, 2])
def test_fused_matches_reference(sr_ratio, num_heads, hw_shape, batch):
    embed_dims = 8 * num_heads
    ref, fused = make_pair(embed_dims, num_heads, sr_ratio,
                           seed=sr_ratio * 10 + num_heads)
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
            # cancels in the softmax: exactly 0 (the reference's is rounding noise)
            assert torch.all(p_fused.grad == 0)
            assert p_ref.grad.abs().max().item() < TOL * grad_scale
        elif name in ('kv.bias', 'sr_norm.bias') and num_heads > 1:
            # a shift shared by all keys cancels in the softmax, and one shared by all
            # values cancels in the instance-normalised map (its rows sum to 0): both
            # gradients are 0 up to rounding, in either implementation
            assert (p_fused.grad - p_ref.grad).abs().max().item() < TOL * grad_scale
        else:
            assert rel_err(p_fused.grad, p_ref.grad) < TOL, name


def test_one_head_batch_one_with_two_threads(two_threads, monkeypatch):
    """Batch 1 x 1 head on two threads takes the blocked attention backward, and matches
    the reference there too."""
    from mmrest.models.layers import emsa_ops
    calls = []
    apply = emsa_ops.AttentionFunction.apply

    def spy(*args):
        calls.append(args[0].shape)
        return apply(*args)

    monkeypatch.setattr(emsa_ops.AttentionFunction, 'apply', spy)
    test_fused_matches_reference(8, 1, (25, 33), 1)
    assert calls, 'the blocked attention backward was not used'


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


def test_fused_is_default_and_used(monkeypatch):
    import mmrest.models.layers.emsa as emsa_module
    calls = []
    real = emsa_module.emsa_fused

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(emsa_module, 'emsa_fused', spy)
    emsa = EMSA(16, num_heads=2, sr_ratio=2)
    assert emsa.attn_impl == 'fused'
    emsa(torch.randn(1, 20, 16), (4, 5))
    assert calls


def test_attention_dropout_in_training_falls_back_to_reference(monkeypatch):
    import mmrest.models.layers.emsa as emsa_module

    def fail(*args, **kwargs):
        raise AssertionError('fused kernel used with attention dropout')

    monkeypatch.setattr(emsa_module, 'emsa_fused', fail)
    emsa = EMSA(16, num_heads=2, sr_ratio=2, attn_drop=0.5).train()
    out = emsa(torch.randn(2, 20, 16), (4, 5))
    assert out.shape == (2, 20, 16)
    # in eval the dropout is inactive, so the fused kernel is used
    with pytest.raises(AssertionError, match='fused kernel used'):
        emsa.eval()(torch.randn(2, 20, 16), (4, 5))


def test_fused_matches_reference_in_train_mode_without_dropout():
    ref, fused = make_pair(32, 4, 2, seed=3)
    ref.train()
    fused.train()
    x = torch.randn(2, 99, 32)
    torch.testing.assert_close(fused(x, (9, 11)), ref(x, (9, 11)), rtol=1e-4, atol=1e-4)


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
