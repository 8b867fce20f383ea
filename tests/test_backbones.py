"""What ResT and ResT V2 do alike: shapes, values against the oracles, options, errors,
freezing, gradient checkpointing, drop path and the registries. Each test runs on both
backbones; what one does alone is in tests/test_rest_backbone.py or test_restv2_backbone.py."""
import functools
import re
from collections import namedtuple

import pytest
import torch
from _backbone_helpers import (ATTN_IMPLS, attn_impl_results, check_as_accurate_as_the_oracle,
                               check_authors_param_count, check_output_shapes, double,
                               expected_shapes, frozen_prefixes, is_frozen, shapes)
from _restv2_helpers import eval_model, model_with_authors_weights
from mmcv.cnn.bricks import DropPath
from reference_rest import ARCHS as V1_ARCHS
from reference_rest import reference_features as v1_features
from reference_rest_v2 import ARCHS as V2_ARCHS
from reference_rest_v2 import reference_features as v2_features
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from mmrest.models import ResT, ResTV2

pytestmark = pytest.mark.stack

#: a backbone class, its smallest arch, the oracle's archs, the name of its patch
#: embeddings less the stage, a factory of a float32 model with the authors' weights, one
#: of a shared eval model per arch, the oracle ``(sd, x, arch, **kw)``, the authors'
#: parameter counts (with their 1000-class head), its BatchNorms, the float64 bound
Family = namedtuple('Family', 'cls arch archs patch_prefix with_authors_weights eval_model '
                    'oracle params bns tol64')
V1_PARAMS = {'lite': 10_508_300, 'small': 13_679_708, 'base': 30_327_052,
             'large': 51_676_156}
V2_PARAMS = {'tiny': 30_434_776, 'small': 41_205_976, 'base': 55_965_208,
             'large': 86_532_520}
ARCH_CASES = [('ResT', a) for a in V1_ARCHS] + [('ResTV2', a) for a in V2_ARCHS]


@pytest.fixture(params=['ResT', 'ResTV2'])
def family(request) -> Family:
    if request.param == 'ResT':
        return Family(ResT, 'lite', V1_ARCHS, 'patch_embed_',
                      request.getfixturevalue('rest_with_authors_weights'),
                      request.getfixturevalue('eval_rest'),
                      lambda sd, x, arch, **kw: v1_features(sd, x, V1_ARCHS[arch]['depths'],
                                                            **kw),
                      V1_PARAMS, ['stem.norm1', 'stem.norm2', 'patch_embed_2.norm',
                                  'patch_embed_3.norm', 'patch_embed_4.norm'], 1e-10)
    # ResT V2 cases run on one intra-op thread, as all of tests/test_restv2_backbone.py
    # (the thread count is restored after each test by tests/conftest.py)
    torch.set_num_threads(1)
    return Family(ResTV2, 'tiny', V2_ARCHS, 'patch_',
                  functools.partial(model_with_authors_weights, dtype=torch.float32),
                  eval_model, v2_features, V2_PARAMS, ['stem.proj.1', 'stem.proj.4'], 1e-9)


# -------------------------------------------------------------------- sizes, values
_SIZES = [(2, 224, 224), (2, 225, 225), (2, 97, 131), (2, 131, 97), (2, 32, 32)]
#: (batch, H, W) of each arch's output shapes; ResT: also sizes of mmdet / mmseg pipelines,
#: on which the authors' code fails
OUTPUT_SIZES = {('ResT', 'lite'): _SIZES + [(1, 800, 1333)],
                ('ResT', 'small'): _SIZES + [(1, 512, 683)], ('ResT', 'base'): _SIZES,
                ('ResT', 'large'): [(2, 33, 47)],
                **{('ResTV2', a): [(2, 64, 64), (2, 97, 97), (2, 65, 47), (2, 32, 45)]
                   for a in V2_ARCHS}}


@pytest.mark.parametrize('family,arch', ARCH_CASES, indirect=['family'])
def test_output_shapes(family, arch):
    """Square, odd and non-square inputs: expected shapes, finite and contiguous maps."""
    for batch, h, w in OUTPUT_SIZES[family.cls.__name__, arch]:
        outs = check_output_shapes(family.eval_model(arch), family.archs[arch]['embed_dims'],
                                   batch, h, w)
        assert all(o.is_contiguous() for o in outs)


@pytest.mark.parametrize('family,arch', ARCH_CASES, indirect=['family'])
def test_parameter_counts_match_authors(family, arch):
    check_authors_param_count(family.cls, arch, family.archs[arch]['embed_dims'],
                              family.params[arch])


@pytest.mark.parametrize('family,alias,arch', [
    ('ResT', 's', 'small'), ('ResT', 'b', 'base'), ('ResT', 'l', 'large'),
    ('ResTV2', 't', 'tiny'), ('ResTV2', 's', 'small'), ('ResTV2', 'b', 'base'),
    ('ResTV2', 'l', 'large')], indirect=['family'])
def test_aliases_mean_what_they_mean_in_mmpretrain(family, alias, arch):
    """'l' is large, as in mmpretrain (ResT-Lite has no one-letter alias)."""
    zoo = family.cls.arch_zoo
    assert zoo[alias] == zoo[arch] and 'L' not in zoo
    model = family.cls(alias, out_indices=(3, ))
    head = family.archs[arch]['embed_dims'][-1] * 1000 + 1000
    assert sum(p.numel() for p in model.parameters()) + head == family.params[arch]
    if family.cls is ResT:
        assert [k for k, v in zoo.items() if v == zoo['lite']] == ['lite']


@pytest.mark.parametrize('attn_impl', ATTN_IMPLS)
@pytest.mark.parametrize('family,arch', ARCH_CASES, indirect=['family'])
def test_features_match_reference_float64(family, arch, attn_impl):
    """Odd, non-square inputs (ResTV2 crops its up-sampled values) and, for ResTV2, a
    multiple of 32 (nothing cropped: the authors' own function); all four output norms."""
    model, sd = family.with_authors_weights(arch, attn_impl=attn_impl)
    model.double()
    sd = double(sd)
    sizes = [(2, 3, 65, 47), (1, 3, 64, 96)]
    if family.cls is ResT:
        sizes = [(1, 3, 33, 41)] if arch == 'large' else sizes[:1]
    g = torch.Generator().manual_seed(1)
    for size in sizes:
        x = torch.randn(*size, generator=g, dtype=torch.float64)
        with torch.no_grad():
            outs = model(x)
        refs = family.oracle(sd, x, arch, out_norms=(0, 1, 2))
        assert all(o.dtype == torch.float64 for o in outs)
        errs = [(o - r).abs().max().item() for o, r in zip(outs, refs)]
        assert max(errs) < family.tol64, (size, errs)
        assert min(r.abs().max().item() for r in refs) > 1  # O(1) maps, not ~0


@pytest.mark.parametrize('attn_impl', ATTN_IMPLS)
@pytest.mark.parametrize('family,arch', [('ResT', 'lite'), ('ResT', 'small'),
                                         ('ResTV2', 'tiny')], indirect=['family'])
def test_features_float32_as_accurate_as_the_oracle(family, arch, attn_impl):
    """float32 maps at 224x224 (ResTV2: and an odd size) are about as close to the float64
    truth as the oracle's own float32 maps (whose error through the depth of a random
    network reaches a few 1e-4; the logits' 1e-4: test_classifier_logits.py)."""
    model, sd = family.with_authors_weights(arch, attn_impl=attn_impl)
    g = torch.Generator().manual_seed(2)
    sizes = [(2, 3, 224, 224)] + ([(1, 3, 97, 131)] if family.cls is ResTV2 else [])
    for size in sizes:
        x = torch.randn(*size, generator=g)
        with torch.no_grad():
            outs = model(x)
            oracle32 = family.oracle(sd, x, arch, out_norms=(0, 1, 2))
            truth = family.oracle(double(sd), x.double(), arch, out_norms=(0, 1, 2))
        bound = 2e-3 if family.cls is ResT else 1e-3
        check_as_accurate_as_the_oracle(outs, oracle32, truth, bound, where=(size, ))


@pytest.mark.parametrize('family', ['ResT', 'ResTV2'], indirect=True)
def test_attn_impls_agree_in_training_mode(family):
    """Outputs and every gradient of every EMSA implementation agree with the reference's
    (float64, odd size)."""
    v1 = family.cls is ResT
    x = torch.randn(2, 3, 40, 56 if v1 else 57, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(3))
    results = attn_impl_results(
        lambda impl: family.with_authors_weights(family.arch, attn_impl=impl)[0].double(), x)
    l2, gx2, g2 = results[-1]  # the reference
    for l1, gx1, g1 in results[:-1]:
        torch.testing.assert_close(l1, l2, rtol=1e-10 if v1 else 1e-12, atol=1e-10)
        torch.testing.assert_close(gx1, gx2, rtol=1e-8 if v1 else 1e-10,
                                   atol=1e-10 if v1 else 1e-12)
        assert g1.keys() == g2.keys() and all(g is not None for g in g1.values())
        for name in g1:
            # ResT: float64 rounding of the two op orders, amplified by the instance norms
            # of the later stages, reaches ~1e-8 of a gradient's scale on isolated elements
            tol = (dict(rtol=1e-8, atol=1e-8 * max(g2[name].abs().max().item(), 1e-3))
                   if v1 else dict(rtol=1e-9, atol=1e-11))
            torch.testing.assert_close(g1[name], g2[name], msg=name, **tol)


@pytest.mark.parametrize('family,out_indices', [
    ('ResT', (0, 1, 2, 3)), ('ResT', (1, 2, 3)), ('ResT', (1, 3)), ('ResTV2', (0, 1, 2, 3)),
    pytest.param('ResTV2', (1, 3), marks=pytest.mark.slow)], indirect=['family'])
def test_out_norm_in_main_path(family, out_indices):
    """True: the next stage consumes the normalised map; False (ResTV2's default, the
    authors' v2 downstream code): output-only norms, and stage 4 is the classifier's."""
    arch = family.arch
    main, sd = family.with_authors_weights(arch, out_indices=out_indices,
                                           out_norm_in_main_path=True)
    side, _ = family.with_authors_weights(arch, out_indices=out_indices,
                                          out_norm_in_main_path=False)
    plain = family.cls(arch, out_indices=(3, ), drop_path_rate=0.).eval()
    plain.load_state_dict({k: v for k, v in side.state_dict().items()
                           if not k.startswith(('norm1.', 'norm2.', 'norm3.'))}, strict=True)
    for m in (main, side, plain):
        m.double()
    x = torch.randn(2, 3, 71, 64, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out_main, out_side, out_plain = main(x), side(x), plain(x)
    # The first selected stage has seen no output norm yet: identical in both modes.
    assert torch.equal(out_main[0], out_side[0])
    # Every later stage differs: upstream norms changed what it consumed.
    for a, b in zip(out_main[1:], out_side[1:]):
        assert (a - b).abs().max() > 1e-3
    assert torch.equal(out_side[-1], out_plain[-1])
    out_norms = tuple(i for i in out_indices if i < 3)
    for main_path, outs in ((True, out_main), (False, out_side)):
        refs = family.oracle(double(sd), x, arch, out_norms=out_norms, main_path=main_path)
        for i, out in zip(out_indices, outs):
            assert (out - refs[i]).abs().max() < family.tol64, (main_path, i)


# -------------------------------------------------------------------------- errors
def _arch_dict(family, drop=(), **overrides) -> dict:
    arch = {k: list(v) for k, v in family.cls.arch_zoo[family.arch].items() if k not in drop}
    arch.update(overrides)
    return arch


@pytest.mark.parametrize('drop,overrides,error,match', [
    ((), dict(qkv_bias=True), KeyError, r"arch dict has unknown keys \['qkv_bias'\]"),
    ((), dict(drop_path=0.1), KeyError, r"arch dict has unknown keys \['drop_path'\]"),
    (('sr_ratios', 'depths'), {}, KeyError,
     r"arch dict is missing the keys \['depths', 'sr_ratios'\]"),
    (('depths', 'num_heads', 'mlp_ratios', 'sr_ratios'), {}, KeyError,
     r"arch dict is missing the keys \['depths', 'num_heads', 'mlp_ratios', 'sr_ratios'\]"),
    ((), dict(num_heads=[5, 2, 4, 8]), ValueError, r'embed_dims \(DIM\).*num_heads \(5\)'),
])
def test_bad_arch_dicts(family, drop, overrides, error, match):
    match = match.replace('DIM', str(family.cls.arch_zoo[family.arch]['embed_dims'][0]))
    with pytest.raises(error, match=rf'^.?The {family.cls.__name__} {match}'
                       if error is KeyError else match):
        family.cls(_arch_dict(family, drop, **overrides))
    with pytest.raises(TypeError, match='arch must be a str or a dict, got list'):
        family.cls([96, 192, 384, 768])


@pytest.mark.parametrize('key, value', [
    ('depths', [2, 2, 2]), ('depths', [1, 2, 6]), ('depths', 2), ('num_heads', [0, 2, 4, 8]),
    ('sr_ratios', [8, 4, 2, -1]), ('embed_dims', [64.0, 128, 256, 512]),
    ('depths', [True, 2, 2, 2]), ('mlp_ratios', [4, 4, 4, 0])])
def test_arch_dict_bad_values(family, key, value):
    """Four positive integers per entry (mlp_ratios: positive numbers), named in the
    error; not a ZeroDivisionError or an AttributeError later."""
    kind = 'numbers' if key == 'mlp_ratios' else 'integers'
    with pytest.raises(ValueError, match=rf"arch\['{key}'\] needs 4 positive {kind}, "
                       rf'got {re.escape(repr(value))}'):
        family.cls(_arch_dict(family, **{key: value}))
    model = family.cls(_arch_dict(family, mlp_ratios=[4, 4, 2.5, 4]))
    assert model.arch_settings['mlp_ratios'][2] == 2.5


@pytest.mark.parametrize('bad', [4, -5, (0, 4), (1, 1), (0, -4), (), (0.5, ), True, (1, False)])
def test_out_indices_out_of_range(family, bad):
    with pytest.raises(ValueError, match='out_indices'):
        family.cls(family.arch, out_indices=bad)


@pytest.mark.parametrize('kwargs,match', [
    (dict(out_indices=(0, 7)), 'out_indices.*got 7'),
    (dict(out_indices=(0, 4)), 'out_indices.*got 4'),
    (dict(out_indices=(1, 1)), 'non-empty and unique'),
    (dict(attn_impl='bogus'), "attn_impl must be one of.*'bogus'"),
    (dict(frozen_stages=-2), r'frozen_stages must be in \[-1, 4\], got -2'),
    (dict(frozen_stages=5), r'frozen_stages must be in \[-1, 4\], got 5'),
    (dict(frozen_stages=2.0), r'frozen_stages must be in \[-1, 4\], got 2.0'),
    (dict(frozen_stages=True), r'frozen_stages must be in \[-1, 4\], got True'),
])
def test_bad_options(family, kwargs, match):
    with pytest.raises(ValueError, match=match):
        family.cls(family.arch, **kwargs)


@pytest.mark.parametrize('x,match', [
    (torch.zeros(2, 4, 64, 64), r'was built for 3 input channels.*\(2, 4, 64, 64\)'),
    (torch.zeros(2, 1, 64, 64), r'was built for 3 input channels.*\(2, 1, 64, 64\)'),
    (torch.zeros(3, 64, 64), r'expects a 4-D \(N, C, H, W\) tensor, got \(3, 64, 64\)'),
    (torch.zeros(1, 1, 3, 64, 64),
     r'expects a 4-D \(N, C, H, W\) tensor, got \(1, 1, 3, 64, 64\)'),
    (torch.zeros(0, 3, 64, 64), r'got an empty batch: input shape \(0, 3, 64, 64\)'),
    ([[0.0]], 'expects a 4-D .* got list'),
])
def test_bad_inputs(family, x, match):
    with pytest.raises(ValueError, match=f'^{family.cls.__name__} {match}'):
        family.eval_model(family.arch)(x)


# ------------------------------------------------------------------------- norms
def test_norm_eval_keeps_the_batchnorms_in_eval(family):
    model = family.cls(family.arch, norm_eval=True, drop_path_rate=0.)
    bns = [n for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
    assert bns == family.bns
    for _ in range(2):
        model.train()
        assert all(m.training != isinstance(m, _BatchNorm) for m in model.modules())
    before = [model.get_submodule(n).running_mean.clone() for n in bns]
    before += [model.get_submodule(n).running_var.clone() for n in bns]
    model(torch.randn(2, 3, 64, 64))
    after = [model.get_submodule(n).running_mean for n in bns]
    after += [model.get_submodule(n).running_var for n in bns]
    assert all(torch.equal(b, a) for b, a in zip(before, after))
    # Without norm_eval the BatchNorms train.
    model = family.cls(family.arch, drop_path_rate=0.).train()
    assert all(m.training for m in model.modules() if isinstance(m, _BatchNorm))


def test_norm_configs(family):
    """embed_norm_cfg sets the BatchNorms (same weights, same outputs), norm_cfg all the
    LayerNorms and only them."""
    model = family.cls(family.arch, embed_norm_cfg=dict(type='SyncBN'), drop_path_rate=0.)
    assert [n for n, m in model.named_modules() if isinstance(m, nn.SyncBatchNorm)] == \
        family.bns
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    # the authors' LayerNorm eps by default: torch's for ResT, 1e-6 for ResT V2
    default_eps = 1e-6 if family.cls is ResTV2 else 1e-5
    assert all(m.eps == default_eps for m in model.modules() if isinstance(m, nn.LayerNorm))
    reference, _ = family.with_authors_weights(family.arch)
    model.load_state_dict(reference.state_dict(), strict=True)
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(model(x), reference(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # per block norm1, norm2, sr_norm where sr > 1 and (ResTV2) up_norm; the output norms
    # and (ResTV2) the stem / patch embedding norms
    v2 = family.cls is ResTV2
    depths, srs = family.archs[family.arch]['depths'], [8, 4, 2, 1]
    expected = sum(d * (2 + (s > 1) + v2) for d, s in zip(depths, srs)) + 4 + 4 * v2
    for eps in (1e-5, 1e-6):
        model = family.cls(family.arch, norm_cfg=dict(type='LN', eps=eps))
        lns = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
        assert len(lns) == expected and all(m.eps == eps for m in lns)
        assert all(m.eps == 1e-5 for m in model.modules() if isinstance(m, _BatchNorm))


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
