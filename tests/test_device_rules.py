"""Device rules of ResT and ResT V2, proved without a GPU on the ``meta`` device: a tensor
made on the CPU by mistake shows up as a device mismatch or a CPU gradient, as on a GPU.
32 intra-op threads (a GPU node); every arch and ``attn_impl``, the lean kernel with one
block of scores per layer and with many, training with checkpointing and a frozen stage."""
from typing import Dict, List

import pytest
import torch

from mmrest.models import ResT, ResTV2
from mmrest.models.layers import dispatch, emsa_ops

ARCHS = ('lite', 'small', 'base', 'large')
V2_ARCHS = ('tiny', 'small', 'base', 'large')
META = torch.device('meta')
#: What ``frozen_stages=1`` freezes.
FROZEN = ('stem.', 'stage1.', 'norm1.')

#: (attn_impl, score blocks) of each case; ``'default'`` leaves the block size alone.
BRANCHES = {
    'lean': ('lean', 'default'),
    'lean-many-blocks': ('lean', 'many'),
    'dense': ('dense', 'default'),
    'reference': ('reference', 'default'),
}


class Spy:
    """Records which attention paths ran (wraps module functions)."""

    NAMES = ('_emsa_transform_forward', '_emsa_transform_backward', '_block_rows',
             'emsa_dense')

    def __init__(self, monkeypatch) -> None:
        self.calls: Dict[str, List] = {name: [] for name in self.NAMES}
        for name in self.NAMES:
            module = dispatch if name == 'emsa_dense' else emsa_ops
            original = getattr(module, name)
            monkeypatch.setattr(module, name, self._wrap(name, original))

    def _wrap(self, name, fn):
        def wrapper(*args, **kwargs):
            result = fn(*args, **kwargs)
            self.calls[name].append((args, result))
            return result
        return wrapper


def meta_model(cls, arch: str, **kwargs):
    with torch.device(META):
        model = cls(arch, drop_path_rate=0.1, **kwargs)
    assert all(p.device == META for p in model.parameters())
    return model


def check_forward_backward(model, grad: bool, shape=(2, 3, 67, 90), frozen=()) -> None:
    """Maps and gradients stay on the meta device; parameters of ``frozen`` (name
    prefixes) get no gradient."""
    x = torch.empty(shape, device=META)
    model.train(grad)
    with torch.set_grad_enabled(grad):
        outs = model(x)
    assert len(outs) == 4
    for i, out in enumerate(outs):
        stride = 2**(i + 2)
        assert out.device == META
        assert out.shape == (shape[0], model.embed_dims[i], -(-shape[2] // stride),
                             -(-shape[3] // stride))
        assert out.is_contiguous()  # plain NCHW
    if not grad:
        assert all(out.grad_fn is None for out in outs)
        return
    sum(out.sum() for out in outs).backward()
    params = {n: p for n, p in model.named_parameters() if not n.startswith(frozen)}
    missing = [n for n, p in params.items() if p.grad is None]
    # the mixing bias cancels in the softmax: it gets an exact zero gradient, not None
    assert not missing, missing[:5]
    wrong = [n for n, p in params.items() if p.grad.device != META]
    assert not wrong, wrong[:5]
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith(frozen))


@pytest.mark.parametrize('grad', [True, False], ids=['grad', 'no-grad'])
@pytest.mark.parametrize('branch', list(BRANCHES))
@pytest.mark.parametrize('arch', ARCHS)
def test_whole_backbone_on_meta(monkeypatch, arch, branch, grad):
    impl, blocks = BRANCHES[branch]
    if blocks == 'many':
        monkeypatch.setattr(emsa_ops, 'CPU_BLOCK_BYTES', 4096)
        monkeypatch.setattr(emsa_ops, 'ACCELERATOR_BLOCK_BYTES', 4096)
    spy = Spy(monkeypatch)
    check_forward_backward(meta_model(ResT, arch, attn_impl=impl), grad)
    calls = spy.calls
    # head mixing (stages 2-4) takes the blocked kernel with 'lean' only
    assert bool(calls['_emsa_transform_forward']) == (impl == 'lean')
    assert bool(calls['_emsa_transform_backward']) == (impl == 'lean' and grad)
    assert bool(calls['emsa_dense']) == (impl == 'dense')
    # (block_size, batch x heads, keys, queries, itemsize, device) -> rows per block
    rows = [(args[3], result) for args, result in calls['_block_rows']]
    if blocks == 'many':
        assert all(r < n for n, r in rows if n > 8)
    assert all(args[5] == 'meta' for args, _ in calls['_block_rows'])


def test_blocks_are_sized_by_device_and_maps_are_channels_last_on_the_cpu_only():
    """Blocks of scores are CPU-cache sized on the CPU, larger elsewhere (ResT-small stage 2
    at 800x1344); token maps are channels-last on the CPU only."""
    cpu_rows = emsa_ops._block_rows(None, 4, 1050, 16800, 4, 'cpu')
    device_rows = emsa_ops._block_rows(None, 4, 1050, 16800, 4, 'cuda')
    assert cpu_rows * 4 * 1050 * 4 <= emsa_ops.CPU_BLOCK_BYTES < cpu_rows * 4 * 1050 * 8
    assert -(-16800 // device_rows) <= 2 < -(-16800 // cpu_rows)
    tokens = torch.randn(1, 6 * 7, 5)
    assert dispatch.tokens_to_map(tokens, (6, 7)).is_contiguous(
        memory_format=torch.channels_last)
    meta_map = dispatch.tokens_to_map(tokens.to(META), (6, 7))
    assert meta_map.is_contiguous() and meta_map.shape == (1, 5, 6, 7)


def test_autocast_helpers_accept_devices_without_autocast():
    """``torch.autocast('meta')`` raises; the guarded helpers do not."""
    with pytest.raises(RuntimeError):
        torch.is_autocast_enabled('meta')
    with emsa_ops.autocast_off('meta'):
        pass
    assert emsa_ops.autocast_dtype('meta') is None
    assert emsa_ops.autocast_dtype('cpu') is None
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert emsa_ops.autocast_dtype('cpu') == torch.bfloat16
        with emsa_ops.autocast_off('cpu'):
            assert not torch.is_autocast_enabled('cpu')


@pytest.mark.parametrize('arch', ARCHS)
def test_meta_training_step_with_checkpointing_and_frozen_stages(arch):
    """``with_cp`` and ``frozen_stages`` do not move anything off the input's device."""
    model = meta_model(ResT, arch, with_cp=True, frozen_stages=1)
    check_forward_backward(model, True, (1, 3, 64, 64), frozen=FROZEN)


@pytest.mark.parametrize('grad', [True, False], ids=['grad', 'no-grad'])
@pytest.mark.parametrize('attn_impl', ['lean', 'dense', 'reference'])
@pytest.mark.parametrize('arch', V2_ARCHS)
def test_restv2_whole_backbone_on_meta(arch, attn_impl, grad):
    # training: with gradient checkpointing and stage 1 frozen
    model = meta_model(ResTV2, arch, attn_impl=attn_impl, with_cp=grad,
                       frozen_stages=1 if grad else -1)
    check_forward_backward(model, grad, frozen=FROZEN if grad else ())


@pytest.mark.parametrize('train', [False, True], ids=['eval', 'train'])
@pytest.mark.parametrize('batch', [1, 2])
@pytest.mark.parametrize('cls, arch', [(ResT, 'lite'), (ResTV2, 'tiny')])
def test_cpu_outputs_are_contiguous_nchw(cls, arch, batch, train):
    """The CPU path computes in channels-last internally; what it returns is plain NCHW
    (as mmdet's backbones return), in eval and train mode, at batch 1 and 2."""
    model = cls(arch, drop_path_rate=0.)
    model.train(train)
    with torch.set_grad_enabled(train):
        outs = model(torch.randn(batch, 3, 65, 97))
    assert all(out.is_contiguous() for out in outs)
