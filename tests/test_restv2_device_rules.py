"""Device rules of ResTV2, proved without a GPU on the ``meta`` device (see
``test_device_rules.py`` for the method): every output and every parameter gradient stays
on the input's device, with 32 intra-op threads (a GPU node's setting), for every arch and
``attn_impl``, with and without gradients (training with gradient checkpointing and a
frozen stage)."""
import pytest
import torch

from mmrest.models import ResTV2

ARCHS = ('tiny', 'small', 'base', 'large')
META = torch.device('meta')


@pytest.mark.parametrize('grad', [True, False], ids=['grad', 'no-grad'])
@pytest.mark.parametrize('attn_impl', ['lean', 'dense', 'reference'])
@pytest.mark.parametrize('arch', ARCHS)
def test_whole_backbone_on_meta(many_threads, arch, attn_impl, grad):
    # training: with gradient checkpointing and stage 1 frozen
    with torch.device(META):
        model = ResTV2(arch, attn_impl=attn_impl, drop_path_rate=0.1, with_cp=grad,
                       frozen_stages=1 if grad else -1)
    assert all(p.device == META for p in model.parameters())
    shape = (2, 3, 67, 90)
    model.train(grad)
    with torch.set_grad_enabled(grad):
        outs = model(torch.empty(shape, device=META))
    for i, out in enumerate(outs):
        stride = 2**(i + 2)
        assert out.device == META and out.is_contiguous()
        assert out.shape == (2, model.embed_dims[i], -(-67 // stride), -(-90 // stride))
    if not grad:
        assert all(out.grad_fn is None for out in outs)
        return
    sum(out.sum() for out in outs).backward()
    for name, p in model.named_parameters():
        frozen = name.startswith(('stem.', 'stage1.', 'norm1.'))
        assert (p.grad is None) == frozen, name
        assert frozen or p.grad.device == META, name
