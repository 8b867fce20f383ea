"""Device rules of ResTV2, proved without a GPU on the ``meta`` device (see
``test_device_rules.py`` for the method): every output and every parameter gradient stays
on the input's device, with 32 intra-op threads (a GPU node's setting, under which the
CPU-tuned rules would fire if they were not limited to CPU tensors), for every arch, both
``attn_impl``, with and without gradients (training with gradient checkpointing and a
frozen stage), with the CPU-tuned rules forced on and off."""
import pytest
import torch

from mmrest.models import ResTV2
from mmrest.models.layers import block, embed, emsa, emsa_ops

ARCHS = ('tiny', 'small', 'base', 'large')
META = torch.device('meta')


def force_cpu_rules(monkeypatch, value: bool) -> None:
    for module in (emsa_ops, emsa, block, embed):
        monkeypatch.setattr(module, 'cpu_tuned', lambda x: value)


@pytest.mark.parametrize('grad', [True, False], ids=['grad', 'no-grad'])
@pytest.mark.parametrize('cpu_rules', [False, True], ids=['device-rules', 'cpu-rules'])
@pytest.mark.parametrize('attn_impl', ['fused', 'reference'])
@pytest.mark.parametrize('arch', ARCHS)
def test_whole_backbone_on_meta(many_threads, monkeypatch, arch, attn_impl, cpu_rules, grad):
    force_cpu_rules(monkeypatch, cpu_rules)
    backward_kinds = []
    original = emsa_ops.AttentionFunction.apply
    monkeypatch.setattr(emsa_ops.AttentionFunction, 'apply',
                        lambda *a: backward_kinds.append('blocked') or original(*a))
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
    # the blocked backward (where batch x heads < threads: every unfrozen stage here) is
    # taken under the CPU rules only
    assert bool(backward_kinds) == (grad and cpu_rules and attn_impl == 'fused')
    if not grad:
        assert all(out.grad_fn is None for out in outs)
        return
    sum(out.sum() for out in outs).backward()
    for name, p in model.named_parameters():
        frozen = name.startswith(('stem.', 'stage1.', 'norm1.'))
        assert (p.grad is None) == frozen, name
        assert frozen or p.grad.device == META, name
