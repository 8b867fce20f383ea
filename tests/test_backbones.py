"""What ResT and ResT V2 do alike: output selection, freezing, gradient checkpointing,
drop path and the registries. Each test runs on both backbones; what one of them does
alone is in tests/test_rest_backbone.py or tests/test_restv2_backbone.py."""
import functools
from collections import namedtuple

import pytest
import torch
from _backbone_helpers import expected_shapes, frozen_prefixes, is_frozen, shapes
from _restv2_helpers import model_with_authors_weights
from mmcv.cnn.bricks import DropPath
from reference_rest import ARCHS as V1_ARCHS
from reference_rest_v2 import ARCHS as V2_ARCHS
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from mmrest.models import ResT, ResTV2

pytestmark = pytest.mark.stack

#: a backbone class, its smallest arch, the oracle's archs, the name of its patch
#: embeddings less the stage, and a factory of a float32 model with the authors' weights
Family = namedtuple('Family', 'cls arch archs patch_prefix with_authors_weights')


@pytest.fixture(params=['ResT', 'ResTV2'])
def family(request) -> Family:
    if request.param == 'ResT':
        return Family(ResT, 'lite', V1_ARCHS, 'patch_embed_',
                      request.getfixturevalue('rest_with_authors_weights'))
    # ResT V2 cases run on one intra-op thread, as all of tests/test_restv2_backbone.py
    # (the thread count is restored after each test by tests/conftest.py)
    torch.set_num_threads(1)
    return Family(ResTV2, 'tiny', V2_ARCHS, 'patch_',
                  functools.partial(model_with_authors_weights, dtype=torch.float32))


# ------------------------------------------------------------------------- outputs
@pytest.mark.parametrize('out_indices,expected', [
    ((3, ), (3, )),
    (-1, (3, )),
    ((0, 2), (0, 2)),
    ((-1, -4), (0, 3)),
    ((1, -2), (1, 2)),
    (2, (2, )),
])
def test_out_indices(family, out_indices, expected):
    model = family.cls(family.arch, out_indices=out_indices, drop_path_rate=0.).eval()
    assert model.out_indices == expected
    # An output LayerNorm exists exactly for the selected stages 0-2.
    assert [i for i in range(3) if hasattr(model, f'norm{i + 1}')] == \
        [i for i in expected if i < 3]
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 70, 45))
    dims = family.archs[family.arch]['embed_dims']
    assert shapes(outs) == expected_shapes(dims, 1, 70, 45, expected)


def test_stages_after_the_last_output_do_not_run(family):
    full = family.cls(family.arch, drop_path_rate=0.).eval()
    part = family.cls(family.arch, out_indices=(0, 1, 2), drop_path_rate=0.).eval()
    part.load_state_dict(full.state_dict())
    x = torch.randn(1, 3, 70, 45)
    with torch.no_grad():
        expected = full(x)[:3]
    calls = []
    for i in (3, 4):
        getattr(part, f'stage{i}')[0].register_forward_pre_hook(
            lambda module, args, i=i: calls.append(i))
    with torch.no_grad():
        outs = part(x)
    assert len(outs) == 3 and calls == [3]
    for out, ref in zip(outs, expected):
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


# --------------------------------------------------------------- freezing, gradients
@pytest.mark.parametrize('frozen_stages', [-1, 0, 1, 2, 3, 4])
def test_frozen_stages(family, frozen_stages):
    """Frozen parameters get no gradient and frozen modules (BatchNorms: their
    statistics) stay in eval mode, re-applied on every ``train()``."""
    torch.manual_seed(0)
    model = family.cls(family.arch, frozen_stages=frozen_stages, drop_path_rate=0.)
    prefixes = frozen_prefixes(frozen_stages, family.patch_prefix)
    trainable = {n: not is_frozen(n, prefixes) for n, _ in model.named_parameters()}
    in_train_mode = {n: not is_frozen(n, prefixes) for n, _ in model.named_modules() if n}
    for _ in range(2):  # re-applied on every train()
        model.train()
        assert {n: p.requires_grad for n, p in model.named_parameters()} == trainable
        assert {n: m.training for n, m in model.named_modules() if n} == in_train_mode
        model.eval()
        assert not any(m.training for m in model.modules())
    model.train()
    bns = {n: m for n, m in model.named_modules() if isinstance(m, _BatchNorm)}
    before = {n: m.running_mean.clone() for n, m in bns.items()}
    loss = sum(o.square().mean() for o in model(torch.randn(2, 3, 64, 64)))
    assert loss.requires_grad == (frozen_stages < 4)
    if loss.requires_grad:
        loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert {n: not torch.equal(before[n], m.running_mean) for n, m in bns.items()} == \
        {n: in_train_mode[n] for n in bns}  # frozen BatchNorms keep their statistics
    assert {n: p.grad is not None for n, p in model.named_parameters()} == trainable


# ------------------------------------------------------------------ with_cp, drop path
def test_with_cp_same_outputs_and_gradients(family, monkeypatch):
    """Checkpointed blocks (``use_reentrant=False``, in training only) give the same
    outputs and gradients."""
    calls = []
    original = torch.utils.checkpoint.checkpoint

    def spy(*args, **kwargs):
        calls.append(kwargs.get('use_reentrant'))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, 'checkpoint', spy)
    x = torch.randn(2, 3, 48, 65, generator=torch.Generator().manual_seed(5))
    results = []
    for with_cp in (False, True):
        model, _ = family.with_authors_weights(family.arch, with_cp=with_cp)
        inputs = x.clone().requires_grad_()
        outs = model.train()(inputs)
        sum((o * o).mean() for o in outs).backward()
        results.append(([o.detach() for o in outs], inputs.grad,
                        {n: p.grad for n, p in model.named_parameters()}))
        model.eval()
        with torch.no_grad():
            model(x)  # not checkpointed outside training
    assert calls == [False] * sum(family.archs[family.arch]['depths'])
    (o1, gx1, g1), (o2, gx2, g2) = results
    for a, b in zip(o1, o2):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.testing.assert_close(gx1, gx2, rtol=1e-5, atol=1e-7)
    assert g1.keys() == g2.keys()
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize('family,arch,rate', [
    ('ResT', 'small', 0.1), ('ResT', 'large', 0.2), ('ResT', 'lite', 0.35),
    ('ResTV2', 'tiny', 0.1), ('ResTV2', 'base', 0.3), ('ResTV2', 'large', 0.5)],
    indirect=['family'])
def test_drop_path_linear_schedule(family, arch, rate):
    model = family.cls(arch, drop_path_rate=rate)
    blocks = [b for i in range(1, 5) for b in getattr(model, f'stage{i}')]
    n = sum(family.archs[arch]['depths'])
    assert len(blocks) == n
    assert isinstance(blocks[0].drop_path, nn.Identity)  # the first rate is 0
    for j, block in enumerate(blocks[1:], start=1):
        assert isinstance(block.drop_path, DropPath)
        assert block.drop_path.drop_prob == pytest.approx(rate * j / (n - 1), abs=1e-6)


def test_drop_path_zero_is_identity_and_active_only_in_training(family):
    model = family.cls(family.arch, drop_path_rate=0.)
    assert all(isinstance(b.drop_path, nn.Identity)
               for i in range(1, 5) for b in getattr(model, f'stage{i}'))
    torch.manual_seed(0)
    model = family.cls(family.arch, drop_path_rate=0.5, norm_eval=True).train()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert not torch.equal(model(x)[3], model(x)[3])
        model.eval()
        assert torch.equal(model(x)[3], model(x)[3])


# ------------------------------------------------------------------- arch, registry
@pytest.mark.parametrize('name,wrong,match', [
    ('ResT', 'tiny', r"Unknown ResT arch 'tiny'.*'lite'.*'small'"),
    ('ResTV2', 'lite', r"Unknown ResTV2 arch 'lite'")])
def test_bad_arch_name_lists_accepted_names(name, wrong, match):
    cls, archs = {'ResT': (ResT, V1_ARCHS), 'ResTV2': (ResTV2, V2_ARCHS)}[name]
    with pytest.raises(KeyError, match=match) as info:
        cls(wrong)
    for arch in archs:
        assert repr(arch) in str(info.value)


@pytest.mark.parametrize('name,size,alias', [('ResT', 'base', 'lite'), ('ResTV2', 'small', 't')])
def test_builds_from_the_registries(name, size, alias):
    from mmengine.registry import MODELS

    from mmrest.registry import MODELS as REST_MODELS
    cls = {'ResT': ResT, 'ResTV2': ResTV2}[name]
    model = MODELS.build(dict(type=f'mmrest.{name}', arch=size, out_indices=(1, 3),
                              frozen_stages=1))
    assert type(model) is cls
    assert model.embed_dims == [96, 192, 384, 768] and model.out_indices == (1, 3)
    assert not any(p.requires_grad for p in model.stem.parameters())
    assert not any(p.requires_grad for p in model.stage1.parameters())
    assert type(REST_MODELS.build(dict(type=name, arch=alias))) is cls
    with pytest.raises(KeyError, match=f"Unknown {name} arch 'huge'"):
        MODELS.build(dict(type=f'mmrest.{name}', arch='huge'))
