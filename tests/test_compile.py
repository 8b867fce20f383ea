"""torch.compile: each backbone is one graph (``fullgraph=True``) equal to eager, forward
and backward; ``--cfg-options compile=True`` trains the demo config with inductor (losses
equal eager's). Compiled, the EMSA core takes its shape-generic form
(``emsa_ops.trace_friendly``): the blocked kernel would break the graph at every
``torch.get_num_threads`` and its backward fails in inductor on ``out=`` views."""
import math

import pytest
import torch
from mmengine.config import Config, ConfigDict

import mmrest.models
from _engine_helpers import (demo_config_text, make_shapes_data, run, scalars, train_cmd,
                             write_config)
from mmrest.engine import PlainParamGroupsHook, prepare_compile

TINY = dict(embed_dims=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8],
            mlp_ratios=[4, 4, 4, 4], sr_ratios=[8, 4, 2, 1])


def _backbones():
    cases = [pytest.param('ResT', TINY, id='ResT-tiny')]
    if hasattr(mmrest.models, 'ResTV2'):
        zoo = getattr(mmrest.models.ResTV2, 'arch_zoo', {})
        arch = 'tiny' if 'tiny' in zoo else next(iter(zoo))
        cases.append(pytest.param('ResTV2', arch, id=f'ResTV2-{arch}'))
    return cases


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures('one_intra_op_thread')]


def build(name: str, arch) -> torch.nn.Module:
    torch.manual_seed(0)
    model = getattr(mmrest.models, name)(arch=arch, drop_path_rate=0.)
    model.init_weights()
    return model


def _outputs(model, x):
    out = model(x)
    return list(out) if isinstance(out, (list, tuple)) else [out]


@pytest.mark.parametrize('name,arch', _backbones())
@pytest.mark.parametrize('train', [False, True], ids=['eval', 'train'])
def test_backbone_is_one_graph(name, arch, train):
    """``torch._dynamo.explain``: one graph, no break, in eval (no grad) and in training."""
    torch._dynamo.reset()
    model = build(name, arch).train(train)
    with torch.set_grad_enabled(train):
        explained = torch._dynamo.explain(model)(torch.randn(2, 3, 64, 96))
    reasons = [f'{b.reason.splitlines()[0]} at {b.user_stack[-1] if b.user_stack else "?"}'
               for b in explained.break_reasons]
    assert explained.graph_break_count == 0, reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize('name,arch', _backbones())
def test_compiled_forward_and_backward_equal_eager(name, arch):
    """``torch.compile(fullgraph=True)`` (``aot_eager``) captures the training forward and
    backward as one graph; outputs and gradients equal eager's within float32 rounding."""
    torch._dynamo.reset()
    model = build(name, arch).train()
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(2))

    def run_step(fn):
        model.zero_grad(set_to_none=True)
        outs = _outputs(fn, x)
        sum(o.square().mean() for o in outs).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return [o.detach() for o in outs], grads

    outs, compiled = run_step(torch.compile(model, fullgraph=True, backend='aot_eager'))
    expected_outs, eager = run_step(model)
    for a, b in zip(outs, expected_outs):
        assert (a - b).abs().max() < 1e-4 * b.abs().max()
    assert set(compiled) == set(eager) == {n for n, _ in model.named_parameters()}
    scale = max(float(g.abs().max()) for g in eager.values())
    for n, g in eager.items():
        err = float((compiled[n] - g).abs().max())
        assert err <= 1e-4 * float(g.abs().max()) + 1e-6 * scale, (n, err)


def test_prepare_compile_makes_parameter_groups_plain_dicts():
    """mmengine builds ``paramwise_cfg`` groups as ConfigDicts, which torch 2.14's dynamo
    cannot trace in the optimizer step; the hook swaps them for equal plain dicts."""
    from mmengine.optim import build_optim_wrapper
    cfg = Config(dict(compile=True, custom_hooks=[dict(type='mmrest.RNGStateHook')]))
    assert prepare_compile(cfg)
    assert [h['type'] for h in cfg.custom_hooks] == ['mmrest.RNGStateHook',
                                                     'mmrest.PlainParamGroupsHook']
    assert prepare_compile(cfg) and len(cfg.custom_hooks) == 2  # added once
    assert not prepare_compile(Config(dict(compile=False)))

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    # a config's optim_wrapper, as the Runner hands it over
    wrapper = build_optim_wrapper(model, ConfigDict(
        optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.05),
        paramwise_cfg=dict(norm_decay_mult=0.0)))
    groups = wrapper.optimizer.param_groups
    assert all(isinstance(g, ConfigDict) for g in groups)
    before = [(list(g['params']), g['lr'], g['weight_decay']) for g in groups]

    class FakeRunner:
        optim_wrapper = wrapper

    PlainParamGroupsHook().before_train(FakeRunner())
    assert all(type(g) is dict for g in wrapper.optimizer.param_groups)
    after = [(g['params'], g['lr'], g['weight_decay']) for g in wrapper.optimizer.param_groups]
    assert after == before


@pytest.mark.slow
def test_compile_true_trains_the_demo_config(tmp_path):
    """``tools/train.py DEMO --cfg-options compile=True``: mmengine compiles the training
    step (inductor) and trains; the first iteration's losses equal those of the same run
    in eager mode (same seed, same weights) within 1e-3."""
    data = make_shapes_data(str(tmp_path / 'data'), num_train=4, num_val=2)
    config = write_config(str(tmp_path / 'cfg.py'),
                          demo_config_text(data, max_iters=1, ckpt_interval=1,
                                           with_val=False, drop_path_rate=0.0))
    losses = {}
    for mode, extra in (('eager', []), ('compiled', ['--cfg-options', 'compile=True'])):
        work_dir = str(tmp_path / mode)
        proc = run(train_cmd(config, work_dir, *extra), timeout=900)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-4000:]
        assert ('Model has been "compiled"' in out) == (mode == 'compiled')
        losses[mode] = [s for s in scalars(work_dir) if 'loss' in s]
    assert [s['iter'] for s in losses['compiled']] == [1]
    for key in ('loss', 'loss_cls', 'loss_bbox'):
        a, b = losses['compiled'][0][key], losses['eager'][0][key]
        assert math.isfinite(a) and abs(a - b) <= 1e-3 * abs(b), (key, a, b)
