"""PA in CPU training (PixelAttentionFunction, which keeps x only) against the plain
module ops, ``x * sigmoid(dwconv3x3(x))``."""
import pytest
import torch

from mmrest.models.layers import PixelAttention
from mmrest.models.layers.embed import PixelAttentionFunction

pytestmark = pytest.mark.usefixtures('one_intra_op_thread')


def count_calls(monkeypatch) -> list:
    calls = []
    original = PixelAttentionFunction.apply
    monkeypatch.setattr(PixelAttentionFunction, 'apply',
                        lambda *a: calls.append(1) or original(*a))
    return calls


def make(channels: int = 8, dtype=torch.float64) -> PixelAttention:
    torch.manual_seed(0)
    return PixelAttention(channels).to(dtype)


def plain(pa: PixelAttention, x: torch.Tensor) -> torch.Tensor:
    return x * pa.pa_conv(x).sigmoid()


@pytest.mark.parametrize('dtype, tol', [(torch.float64, 1e-13), (torch.float32, 1e-5)])
@pytest.mark.parametrize('channels_last', [False, True])
def test_same_values_and_gradients_as_the_plain_ops(channels_last, dtype, tol, monkeypatch):
    pa = make(dtype=dtype)
    x = torch.randn(2, 8, 9, 7, dtype=dtype)
    if channels_last:  # the stem's CPU layout
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    calls = count_calls(monkeypatch)
    out = pa(x)
    assert calls  # CPU training takes the function
    ref = plain(pa, x)
    assert torch.equal(out, ref)  # the same ops in the forward pass
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    g = torch.randn(out.shape, dtype=dtype)
    grads = torch.autograd.grad(out, [x, *pa.parameters()], g)
    grads_ref = torch.autograd.grad(ref, [x, *pa.parameters()], g)
    for a, b in zip(grads, grads_ref):
        assert ((a - b).abs().max() / b.abs().max()).item() < tol
    # the weight's own strides (DDP's gradient buckets would copy other ones)
    assert grads[1].stride() == pa.pa_conv.weight.stride()


def test_gradcheck():
    pa = make(channels=3)
    x = torch.randn(1, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(PixelAttentionFunction.apply,
                                    [x, pa.pa_conv.weight, pa.pa_conv.bias])


def saved_storages(fn):
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return kept


def test_keeps_the_input_only():
    """Autograd keeps x and the gate map; the function keeps x (and the weights)."""
    pa = make(dtype=torch.float32)
    x = torch.randn(2, 8, 32, 32, requires_grad=True)
    map_bytes = x.numel() * 4
    big = lambda kept: sorted(n for n in kept.values() if n >= map_bytes)  # noqa: E731
    assert big(saved_storages(lambda: plain(pa, x))) == [map_bytes, map_bytes]
    assert big(saved_storages(lambda: pa(x))) == [map_bytes]


def test_frozen_conv_gets_no_gradient_and_x_still_does():
    pa = make()
    pa.pa_conv.weight.requires_grad_(False)
    pa.pa_conv.bias.requires_grad_(False)
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64, requires_grad=True)
    ref_x = x.detach().clone().requires_grad_()
    pa(x).sum().backward()
    plain(pa, ref_x).sum().backward()
    assert pa.pa_conv.weight.grad is None and pa.pa_conv.bias.grad is None
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-13, atol=1e-13)


def test_input_without_gradient_still_trains_the_conv():
    """E.g. the first PA after frozen stages: x needs no gradient, the conv does."""
    pa = make()
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    out = pa(x)
    ref = plain(pa, x)
    grads = torch.autograd.grad(out.square().sum(), list(pa.parameters()))
    grads_ref = torch.autograd.grad(ref.square().sum(), list(pa.parameters()))
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_inference_autocast_reference_and_other_devices_take_the_plain_ops(monkeypatch):
    pa = make(dtype=torch.float32)
    calls = count_calls(monkeypatch)
    x = torch.randn(1, 8, 4, 4, requires_grad=True)
    with torch.no_grad():
        pa(x)
    with torch.autocast('cpu', dtype=torch.bfloat16):  # backward outside autocast
        out = pa(x)
        ref = plain(pa, x)
    out.float().sum().backward()  # the plain ops' autocast rules, as without the function
    assert torch.equal(out, ref) and x.grad is not None
    meta = PixelAttention(8).to('meta')
    out = meta(torch.randn(1, 8, 4, 4, device='meta', requires_grad=True))
    assert out.device.type == 'meta'
    pa.recompute_gate = False
    pa(x)
    assert not calls


@pytest.mark.parametrize('attn_impl, expected', [('fused', True), ('reference', False)])
def test_backbones_recompute_the_gate_with_the_fused_impl_only(attn_impl, expected):
    from mmrest.models import ResT, ResTV2
    for cls, arch in ((ResT, 'lite'), (ResTV2, 'tiny')):
        model = cls(arch=arch, attn_impl=attn_impl)
        flags = {m.recompute_gate for m in model.modules() if isinstance(m, PixelAttention)}
        assert flags == {expected}
