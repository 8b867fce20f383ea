"""Device rules of the backbone, proved without a GPU on the ``meta`` device.

Tensors of the ``meta`` device carry shapes, dtypes and devices but no data, so a whole
forward and backward pass runs in milliseconds and any tensor created on the CPU by
mistake (e.g. a bare ``torch.zeros``) shows up as a device mismatch or a CPU gradient,
exactly as it would on a GPU. The tests run with 32 intra-op threads, the setting of a
GPU node, under which the CPU-tuned rules of ``mmrest.models.layers.emsa_ops`` (chosen
by thread counts) would fire for small batches if they were not limited to CPU tensors.

Every dispatch branch of the attention is forced in turn: one head (SDPA and the
blocked backward) and head mixing (query-major and head-major score blocks, one block
and many), with and without gradients, with the CPU-tuned rules applied and not.
"""
from typing import Dict, List

import pytest
import torch

from mmrest.models import ResT
from mmrest.models.layers import block, embed, emsa, emsa_ops

ARCHS = ('lite', 'small', 'base', 'large')
META = torch.device('meta')

#: (name, CPU-tuned rules, query-major layout, score blocks) of each forced branch set.
#: ``None`` leaves that choice to the dispatch.
BRANCHES = {
    'device-rules': (False, None, 'default'),
    'device-rules-many-blocks': (False, None, 'many'),
    'cpu-rules-query-major-one-block': (True, True, 'one'),
    'cpu-rules-query-major-many-blocks': (True, True, 'many'),
    'cpu-rules-head-major-many-blocks': (True, False, 'many'),
}
BLOCK_BYTES = {'one': 1 << 40, 'many': 4096}


class Spy:
    """Records which attention paths ran (wraps module functions of ``emsa_ops``)."""

    NAMES = ('_attention_backward', '_emsa_transform_forward', '_emsa_transform_backward',
             '_block_rows', '_query_major', 'emsa_dense')

    def __init__(self, monkeypatch) -> None:
        self.calls: Dict[str, List] = {name: [] for name in self.NAMES}
        for name in self.NAMES:
            original = getattr(emsa_ops, name)
            monkeypatch.setattr(emsa_ops, name, self._wrap(name, original))

    def _wrap(self, name, fn):
        def wrapper(*args, **kwargs):
            result = fn(*args, **kwargs)
            self.calls[name].append((args, result))
            return result
        return wrapper

    def results(self, name: str) -> set:
        return {result for _, result in self.calls[name]}


def force_branches(monkeypatch, branch: str) -> None:
    """Apply one entry of :data:`BRANCHES` to every module that asks ``cpu_tuned``."""
    cpu_rules, query_major, blocks = BRANCHES[branch]
    for module in (emsa_ops, emsa, block, embed):
        monkeypatch.setattr(module, 'cpu_tuned', lambda x, value=cpu_rules: value)
    if query_major is not None:
        monkeypatch.setattr(emsa_ops, 'QUERY_MAJOR_MIN_KEYS', 0 if query_major else 1 << 30)
    if blocks != 'default':
        monkeypatch.setattr(emsa_ops, 'DEFAULT_BLOCK_BYTES', BLOCK_BYTES[blocks])
        monkeypatch.setattr(emsa_ops, 'ACCELERATOR_BLOCK_BYTES', BLOCK_BYTES[blocks])


def meta_rest(arch: str, attn_impl: str) -> ResT:
    with torch.device(META):
        model = ResT(arch=arch, attn_impl=attn_impl, drop_path_rate=0.1)
    assert all(p.device == META for p in model.parameters())
    return model


def check_forward_backward(model: ResT, grad: bool, shape=(2, 3, 67, 90)) -> None:
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
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.grad is None]
    # the mixing bias cancels in the softmax: it gets an exact zero gradient, not None
    assert not missing, missing[:5]
    wrong = [n for n, p in params.items() if p.grad.device != META]
    assert not wrong, wrong[:5]


FUSED_CASES = [(arch, 'fused', branch) for arch in ARCHS for branch in BRANCHES]
REFERENCE_CASES = [(arch, 'reference', branch) for arch in ARCHS
                   for branch in ('device-rules', 'cpu-rules-query-major-one-block')]


@pytest.mark.parametrize('grad', [True, False], ids=['grad', 'no-grad'])
@pytest.mark.parametrize('arch,attn_impl,branch', FUSED_CASES + REFERENCE_CASES)
def test_whole_backbone_on_meta(many_threads, monkeypatch, arch, attn_impl, branch, grad):
    force_branches(monkeypatch, branch)
    spy = Spy(monkeypatch)
    check_forward_backward(meta_rest(arch, attn_impl), grad)
    if attn_impl == 'reference':
        assert not any(spy.calls.values())
        return
    cpu_rules, query_major, blocks = BRANCHES[branch]
    calls = spy.calls
    # head mixing (stages 2-4) always takes the blocked kernel
    assert calls['_emsa_transform_forward']
    assert bool(calls['_emsa_transform_backward']) == grad
    # one head: the blocked backward with CPU rules (batch x heads = 2 < 32 threads),
    # PyTorch's SDPA backward otherwise
    assert bool(calls['_attention_backward']) == (grad and cpu_rules)
    if cpu_rules:
        assert spy.results('_query_major') == {query_major}
    else:
        assert spy.results('_query_major') == {False}
    # (block_size, batch x heads, keys, queries, itemsize, cpu) -> rows per block
    rows = [(args[3], result) for args, result in calls['_block_rows']]
    if blocks == 'one':
        assert all(r == n for n, r in rows)
    elif blocks == 'many':
        assert all(r < n for n, r in rows if n > 8)
    assert all(args[5] == cpu_rules for args, _ in calls['_block_rows'])
    assert not calls['emsa_dense']


def test_attention_backward_buffers_follow_the_input_device():
    """The blocked single-head backward allocates its accumulators on q's device."""
    q, k, v, grad = (torch.empty(1, 1, L, 16, device=META) for L in (40, 7, 7, 40))
    grads = emsa_ops._attention_backward(grad, q, k, v, 0.25, 8)
    assert [g.device for g in grads] == [META] * 3
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=False):
        half = [t.to(torch.bfloat16) for t in (q, k, v, grad)]
    grads = emsa_ops._attention_backward(half[3], *half[:3], 0.25, 8)
    assert [(g.device, g.dtype) for g in grads] == [(META, torch.bfloat16)] * 3


def test_dispatch_off_the_cpu_ignores_the_thread_count(many_threads):
    """With 32 threads, one image and one head, a CPU tensor takes the blocked backward
    and a CPU-tuned layout; a tensor of another device takes PyTorch's SDPA, head-major
    blocks of the accelerator's size, and no aliased softmax."""
    def inputs(device, h):
        q = torch.randn(1, h, 300, 16, device=device, requires_grad=True)
        kv = torch.randn(1, h, 300, 16, device=device, requires_grad=True)
        w = torch.randn(h, h, 1, 1, device=device) if h > 1 else None
        return q, kv, w

    q, kv, _ = inputs('cpu', 1)
    assert type(emsa_ops.emsa_fused(q, kv, kv, 0.25).grad_fn).__name__ == \
        'AttentionFunctionBackward'
    q, kv, _ = inputs(META, 1)
    out = emsa_ops.emsa_fused(q, kv, kv, 0.25)
    assert 'AttentionFunction' not in type(out.grad_fn).__name__
    assert not emsa_ops._blocked_attention_backward_pays(1, cpu=False)
    assert not emsa_ops._query_major(1, 1050, cpu=False)
    assert emsa_ops._query_major(1, 1050, cpu=True)
    # blocks: CPU-cache sized on the CPU, much larger elsewhere (800x1344, batch 2,
    # ResT-small stage 2: 2 x 2 heads, 1050 keys, 16800 queries)
    cpu_rows = emsa_ops._block_rows(None, 4, 1050, 16800, 4, cpu=True)
    device_rows = emsa_ops._block_rows(None, 4, 1050, 16800, 4, cpu=False)
    assert cpu_rows * 4 * 1050 * 4 <= emsa_ops.DEFAULT_BLOCK_BYTES < cpu_rows * 4 * 1050 * 8
    assert -(-16800 // device_rows) <= 2 < -(-16800 // cpu_rows)
    # the softmax is written over its input on the CPU only
    x = torch.randn(3, 5)
    assert emsa_ops._softmax_(x).data_ptr() == x.data_ptr()
    m = torch.empty(3, 5, device=META)
    assert emsa_ops._softmax_(m) is not m


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
def test_meta_training_step_with_checkpointing_and_frozen_stages(many_threads, arch):
    """``with_cp`` and ``frozen_stages`` do not move anything off the input's device."""
    with torch.device(META):
        model = ResT(arch=arch, with_cp=True, frozen_stages=1)
    model.train()
    outs = model(torch.empty(1, 3, 64, 64, device=META))
    sum(o.sum() for o in outs).backward()
    for name, p in model.named_parameters():
        frozen = name.startswith(('stem.', 'stage1.', 'norm1.'))
        assert (p.grad is None) == frozen, name
        assert frozen or p.grad.device == META


@pytest.mark.parametrize('train', [False, True], ids=['eval', 'train'])
@pytest.mark.parametrize('batch', [1, 2])
def test_cpu_outputs_are_contiguous_nchw(batch, train):
    """The CPU path computes in channels-last internally; what it returns is plain NCHW
    (as mmdet's backbones return), in eval and train mode, at batch 1 and 2."""
    model = ResT('lite', drop_path_rate=0.)
    model.train(train)
    with torch.set_grad_enabled(train):
        outs = model(torch.randn(batch, 3, 65, 97))
    assert all(out.is_contiguous() for out in outs)
