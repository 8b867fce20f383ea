"""ResT backbone: shapes, values against the independent oracle, options and errors."""
import math
import re
from typing import List, Sequence

import pytest
import torch
from mmcv.cnn.bricks import DropPath
from reference_rest import ARCHS, reference_features
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from mmrest.models import ResT

pytestmark = pytest.mark.stack

ALL_ARCHS = ('lite', 'small', 'base', 'large')
ATTN_IMPLS = ('lean', 'dense', 'reference')
# Parameter counts of the authors' models with their 1000-class linear head.
AUTHORS_PARAMS = {'lite': 10_508_300, 'small': 13_679_708, 'base': 30_327_052,
                  'large': 51_676_156}


def expected_shapes(arch: str, batch: int, h: int, w: int,
                    indices: Sequence[int] = (0, 1, 2, 3)) -> List[tuple]:
    dims = ARCHS[arch]['embed_dims']
    return [(batch, dims[i], math.ceil(h / 2**(i + 2)), math.ceil(w / 2**(i + 2)))
            for i in indices]


def shapes(outs) -> List[tuple]:
    return [tuple(o.shape) for o in outs]


# ----------------------------------------------------------------------------- shapes
@pytest.mark.parametrize('arch', ['lite', 'small', 'base'])
@pytest.mark.parametrize('hw', [(224, 224), (225, 225), (97, 131), (131, 97), (32, 32)])
def test_output_shapes(eval_rest, arch, hw):
    h, w = hw
    with torch.no_grad():
        outs = eval_rest(arch)(torch.randn(2, 3, h, w))
    assert shapes(outs) == expected_shapes(arch, 2, h, w)
    assert all(torch.isfinite(o).all() for o in outs)


def test_output_shapes_large_small_input(eval_rest):
    with torch.no_grad():
        outs = eval_rest('large')(torch.randn(2, 3, 33, 47))
    assert shapes(outs) == expected_shapes('large', 2, 33, 47)
    assert all(torch.isfinite(o).all() for o in outs)


@pytest.mark.parametrize('arch,hw', [('small', (512, 683)), ('lite', (800, 1333))])
def test_output_shapes_detection_sizes(eval_rest, arch, hw):
    """Sizes of mmdet/mmseg pipelines, on which the authors' code fails."""
    h, w = hw
    with torch.no_grad():
        outs = eval_rest(arch)(torch.randn(1, 3, h, w))
    assert shapes(outs) == expected_shapes(arch, 1, h, w)
    assert all(torch.isfinite(o).all() for o in outs)


@pytest.mark.parametrize('out_indices,expected', [
    ((3, ), (3, )),
    (-1, (3, )),
    ((0, 2), (0, 2)),
    ((-1, -4), (0, 3)),
    ((1, -2), (1, 2)),
    (2, (2, )),
])
def test_out_indices(out_indices, expected):
    model = ResT('lite', out_indices=out_indices, drop_path_rate=0.).eval()
    assert model.out_indices == expected
    # An output LayerNorm exists exactly for the selected stages 0-2.
    assert [i for i in range(3) if hasattr(model, f'norm{i + 1}')] == \
        [i for i in expected if i < 3]
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 70, 45))
    assert shapes(outs) == expected_shapes('lite', 1, 70, 45, expected)


def test_custom_arch_channels_and_in_channels():
    arch = dict(embed_dims=[32, 64, 96, 128], depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8],
                mlp_ratios=[2, 2, 2, 2], sr_ratios=[8, 4, 2, 1])
    model = ResT(arch, in_channels=1, drop_path_rate=0.).eval()
    assert len(model.stage3) == 2 and model.stage1[0].mlp.fc1.out_features == 64
    with torch.no_grad():
        outs = model(torch.randn(3, 1, 65, 64))
    assert shapes(outs) == [(3, 32, 17, 16), (3, 64, 9, 8), (3, 96, 5, 4), (3, 128, 3, 2)]


@pytest.mark.parametrize('arch', ALL_ARCHS)
def test_parameter_counts_match_authors(arch):
    model = ResT(arch, out_indices=(3, ))
    head = ARCHS[arch]['embed_dims'][-1] * 1000 + 1000
    assert sum(p.numel() for p in model.parameters()) + head == AUTHORS_PARAMS[arch]
    # Each extra output stage adds one LayerNorm (weight and bias).
    full = ResT(arch, out_indices=(0, 1, 2, 3))
    extra = sum(p.numel() for p in full.parameters()) - sum(
        p.numel() for p in model.parameters())
    assert extra == 2 * sum(ARCHS[arch]['embed_dims'][:3])


@pytest.mark.parametrize('alias, arch', [('s', 'small'), ('b', 'base'), ('l', 'large')])
def test_aliases_mean_what_they_mean_in_mmpretrain(alias, arch):
    """'l' is large, as in mmpretrain (ResT-Lite has no one-letter alias)."""
    assert ResT.arch_zoo[alias] == ResT.arch_zoo[arch]
    model = ResT(alias, out_indices=(3, ))
    head = ARCHS[arch]['embed_dims'][-1] * 1000 + 1000
    assert sum(p.numel() for p in model.parameters()) + head == AUTHORS_PARAMS[arch]
    assert 'L' not in ResT.arch_zoo
    assert [k for k, v in ResT.arch_zoo.items() if v == ResT.arch_zoo['lite']] == ['lite']


# ----------------------------------------------------------------------------- values
@pytest.mark.parametrize('attn_impl', ATTN_IMPLS)
@pytest.mark.parametrize('arch', ALL_ARCHS)
def test_features_match_reference_float64(rest_with_authors_weights, to_double, arch,
                                          attn_impl):
    model, sd = rest_with_authors_weights(arch, attn_impl=attn_impl)
    model.double()
    shape = (1, 3, 33, 41) if arch == 'large' else (2, 3, 65, 47)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        outs = model(x)
    refs = reference_features(to_double(sd), x, ARCHS[arch]['depths'], out_norms=(0, 1, 2))
    for i, (out, ref) in enumerate(zip(outs, refs)):
        assert out.dtype == torch.float64
        err = (out - ref).abs().max().item()
        assert err < 1e-10, f'stage {i}: max abs error {err:.3g}'


@pytest.mark.parametrize('attn_impl', ATTN_IMPLS)
@pytest.mark.parametrize('arch', ['lite', 'small'])
def test_features_float32_224_as_accurate_as_the_oracle(rest_with_authors_weights, to_double,
                                                         arch, attn_impl):
    """float32 maps at 224x224 are about as close to the float64 truth as the oracle's.

    Through the depth of a random network float32 rounding alone reaches a few 1e-4 on
    the O(1) values of the last stages (the oracle's own float32 error), so the bound is
    relative to that error. (The logits' absolute 1e-4 bound is checked in
    test_classifier_logits.py.)
    """
    model, sd = rest_with_authors_weights(arch, attn_impl=attn_impl)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    depths = ARCHS[arch]['depths']
    with torch.no_grad():
        outs = model(x)
        oracle32 = reference_features(sd, x, depths, out_norms=(0, 1, 2))
        truth = reference_features(to_double(sd), x.double(), depths, out_norms=(0, 1, 2))
    for i, (out, ref, true) in enumerate(zip(outs, oracle32, truth)):
        assert out.dtype == torch.float32
        err = (out.double() - true).abs().max().item()
        oracle_err = (ref.double() - true).abs().max().item()
        # a few oracle errors, plus float32 rounding at the maps' scale: the order of
        # the sums differs between CPUs (AVX2, AVX-512) and thread counts
        bound = 4 * oracle_err + 64 * torch.finfo(torch.float32).eps * true.abs().max().item()
        assert err < bound, \
            f'stage {i}: max abs error {err:.3g}, oracle in float32: {oracle_err:.3g}'
        assert err < 2e-3


def test_attn_impls_agree_in_training_mode(rest_with_authors_weights):
    """Every EMSA implementation gives the reference's outputs and gradients (float64)."""
    results = []
    for impl in ATTN_IMPLS:
        model, _ = rest_with_authors_weights('lite', attn_impl=impl)
        model.double().train()
        x = torch.randn(2, 3, 40, 56, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(3), requires_grad=True)
        loss = sum((o * o.detach().roll(1, 1)).sum() for o in model(x))
        loss.backward()
        results.append((loss.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}))
    l2, gx2, g2 = results[-1]  # the reference
    for l1, gx1, g1 in results[:-1]:
        torch.testing.assert_close(l1, l2, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(gx1, gx2, rtol=1e-8, atol=1e-10)
        for name in g1:
            # float64 rounding of the two op orders, amplified by the instance norms of
            # the later stages, reaches ~1e-8 of a gradient's scale on isolated elements
            scale = max(g2[name].abs().max().item(), 1e-3)
            torch.testing.assert_close(g1[name], g2[name], rtol=1e-8, atol=1e-8 * scale,
                                       msg=name)


@pytest.mark.parametrize('out_indices', [(0, 1, 2, 3), (1, 2, 3), (1, 3)])
def test_out_norm_in_main_path(rest_with_authors_weights, to_double, out_indices):
    """True: the next stage consumes the normalised map; False: output-only norms."""
    main, sd = rest_with_authors_weights('lite', out_indices=out_indices,
                                         out_norm_in_main_path=True)
    side, _ = rest_with_authors_weights('lite', out_indices=out_indices,
                                        out_norm_in_main_path=False)
    plain = ResT('lite', out_indices=(3, ), drop_path_rate=0.).eval()
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
    # With output-only norms, the main path is the plain (classification) backbone.
    assert torch.equal(out_side[-1], out_plain[-1])
    out_norms = tuple(i for i in out_indices if i < 3)
    sd64 = to_double(sd)
    for main_path, outs in ((True, out_main), (False, out_side)):
        refs = reference_features(sd64, x, ARCHS['lite']['depths'], out_norms=out_norms,
                                  main_path=main_path)
        for i, out in zip(out_indices, outs):
            assert (out - refs[i]).abs().max() < 1e-10, (main_path, i)


# ----------------------------------------------------------------------------- errors
def test_bad_arch_name_lists_accepted_names():
    with pytest.raises(KeyError, match=r"Unknown ResT arch 'tiny'.*'lite'.*'small'") as info:
        ResT('tiny')
    for name in ALL_ARCHS:
        assert repr(name) in str(info.value)


def test_arch_of_wrong_type():
    with pytest.raises(TypeError, match='arch must be a str or a dict, got list'):
        ResT([64, 128, 256, 512])


def _arch_dict(**overrides) -> dict:
    arch = {k: list(v) for k, v in ResT.arch_zoo['lite'].items()}
    arch.update(overrides)
    return arch


def test_arch_dict_missing_keys():
    arch = _arch_dict()
    del arch['sr_ratios'], arch['depths']
    with pytest.raises(KeyError, match=r"missing the keys \['depths', 'sr_ratios'\]"):
        ResT(arch)


def test_arch_dict_unknown_keys():
    with pytest.raises(KeyError, match=r"unknown keys \['qkv_bias'\]"):
        ResT(_arch_dict(qkv_bias=True))


@pytest.mark.parametrize('key, value', [
    ('depths', [2, 2, 2]), ('depths', 2), ('num_heads', [0, 2, 4, 8]),
    ('sr_ratios', [8, 4, 2, -1]), ('embed_dims', [64.0, 128, 256, 512]),
    ('depths', [True, 2, 2, 2]), ('mlp_ratios', [4, 4, 4, 0])])
def test_arch_dict_bad_values(key, value):
    """Four positive integers per entry (mlp_ratios: positive numbers), named in the
    error; not a ZeroDivisionError or an AttributeError later."""
    kind = 'numbers' if key == 'mlp_ratios' else 'integers'
    with pytest.raises(ValueError, match=rf"arch\['{key}'\] needs 4 positive {kind}, "
                       rf'got {re.escape(repr(value))}'):
        ResT(_arch_dict(**{key: value}))
    assert ResT(_arch_dict(mlp_ratios=[4, 4, 2.5, 4])).arch_settings['mlp_ratios'][2] == 2.5


def test_arch_dict_heads_not_dividing_dims():
    with pytest.raises(ValueError, match=r'embed_dims \(64\).*num_heads \(3\)'):
        ResT(_arch_dict(num_heads=[3, 2, 4, 8]))


@pytest.mark.parametrize('bad', [4, -5, (0, 4), (1, 1), (0, -4), (), (0.5, ), True, (1, False)])
def test_out_indices_out_of_range(bad):
    with pytest.raises(ValueError, match='out_indices'):
        ResT('lite', out_indices=bad)


def test_out_indices_message_names_value():
    with pytest.raises(ValueError, match=r'got 7'):
        ResT('lite', out_indices=(0, 7))


@pytest.mark.parametrize('bad', [-2, 5, 2.0, True])
def test_frozen_stages_out_of_range(bad):
    with pytest.raises(ValueError, match=rf'frozen_stages must be in \[-1, 4\], got {bad}'):
        ResT('lite', frozen_stages=bad)


def test_unknown_attn_impl():
    with pytest.raises(ValueError, match="'bogus'"):
        ResT('lite', attn_impl='bogus')


# --------------------------------------------------------------- freezing, norm_eval
def frozen_prefixes(frozen_stages: int) -> List[str]:
    """Module names frozen by ``frozen_stages`` as documented (all outputs selected)."""
    names = ['stem'] if frozen_stages >= 0 else []
    for i in range(1, frozen_stages + 1):
        if i > 1:
            names.append(f'patch_embed_{i}')
        names += [f'stage{i}', 'norm' if i == 4 else f'norm{i}']
    return names


def is_frozen(name: str, prefixes: List[str]) -> bool:
    return any(name == p or name.startswith(p + '.') for p in prefixes)


@pytest.mark.parametrize('frozen_stages', [-1, 0, 1, 2, 3, 4])
def test_frozen_stages(frozen_stages):
    model = ResT('lite', frozen_stages=frozen_stages, drop_path_rate=0.)
    prefixes = frozen_prefixes(frozen_stages)
    for _ in range(2):  # re-applied on every train()
        model.train()
        for name, param in model.named_parameters():
            assert param.requires_grad == (not is_frozen(name, prefixes)), name
        for name, module in model.named_modules():
            if name:
                assert module.training == (not is_frozen(name, prefixes)), name
        model.eval()
        assert not any(m.training for m in model.modules())
    # Frozen BatchNorms keep their statistics during a training forward; others update.
    model.train()
    before = {n: m.running_mean.clone() for n, m in model.named_modules()
              if isinstance(m, _BatchNorm)}
    model(torch.randn(2, 3, 64, 64))
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm):
            changed = not torch.equal(before[name], module.running_mean)
            assert changed == (not is_frozen(name, prefixes)), name


@pytest.mark.parametrize('frozen_stages', [0, 2, 3])
def test_gradients_do_not_reach_frozen_parameters(frozen_stages):
    torch.manual_seed(0)
    model = ResT('lite', frozen_stages=frozen_stages, drop_path_rate=0.).train()
    prefixes = frozen_prefixes(frozen_stages)
    x = torch.randn(2, 3, 64, 64)
    sum(o.square().mean() for o in model(x)).backward()
    for name, param in model.named_parameters():
        if is_frozen(name, prefixes):
            assert param.grad is None, name
        else:
            assert param.grad is not None, name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_norm_eval_keeps_batchnorms_in_eval():
    model = ResT('lite', norm_eval=True, drop_path_rate=0.)
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert len(bns) == 5  # stem (2) and three patch embeddings
    for _ in range(2):
        model.train()
        assert not any(bn.training for bn in bns)
        assert model.stage1[0].training and model.patch_embed_2.conv.training
    before = [bn.running_mean.clone() for bn in bns]
    model(torch.randn(2, 3, 64, 64))
    assert all(torch.equal(b, bn.running_mean) for b, bn in zip(before, bns))
    # Without norm_eval the BatchNorms train.
    model = ResT('lite', drop_path_rate=0.).train()
    assert all(m.training for m in model.modules() if isinstance(m, _BatchNorm))


# ------------------------------------------------------------------ with_cp, drop path
def test_with_cp_same_outputs_and_gradients(rest_with_authors_weights, monkeypatch):
    calls = []
    original = torch.utils.checkpoint.checkpoint

    def spy(*args, **kwargs):
        calls.append(kwargs.get('use_reentrant'))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, 'checkpoint', spy)
    results = []
    for with_cp in (False, True):
        model, _ = rest_with_authors_weights('lite', with_cp=with_cp)
        model.train()
        x = torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(5),
                        requires_grad=True)
        outs = model(x)
        sum((o * o).mean() for o in outs).backward()
        results.append(([o.detach() for o in outs], x.grad,
                        {n: p.grad for n, p in model.named_parameters()}))
        model.eval()
        with torch.no_grad():
            model(x)  # not checkpointed outside training
    assert calls == [False] * sum(ARCHS['lite']['depths'])
    (o1, gx1, g1), (o2, gx2, g2) = results
    for a, b in zip(o1, o2):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.testing.assert_close(gx1, gx2, rtol=1e-5, atol=1e-7)
    assert g1.keys() == g2.keys()
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize('arch,rate', [('small', 0.1), ('large', 0.2), ('lite', 0.35)])
def test_drop_path_linear_schedule(arch, rate):
    model = ResT(arch, drop_path_rate=rate)
    blocks = [b for i in range(1, 5) for b in getattr(model, f'stage{i}')]
    n = sum(ARCHS[arch]['depths'])
    assert len(blocks) == n
    assert isinstance(blocks[0].drop_path, nn.Identity)  # the first rate is 0
    for j, block in enumerate(blocks[1:], start=1):
        assert isinstance(block.drop_path, DropPath)
        assert block.drop_path.drop_prob == pytest.approx(rate * j / (n - 1), abs=1e-6)


def test_drop_path_zero_is_identity_and_active_only_in_training():
    model = ResT('lite', drop_path_rate=0.)
    assert all(isinstance(b.drop_path, nn.Identity)
               for i in range(1, 5) for b in getattr(model, f'stage{i}'))
    torch.manual_seed(0)
    model = ResT('lite', drop_path_rate=0.5, norm_eval=True).train()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert not torch.equal(model(x)[3], model(x)[3])
        model.eval()
        assert torch.equal(model(x)[3], model(x)[3])


# ------------------------------------------------------------------------ norm configs
def test_syncbn_through_embed_norm_cfg(rest_with_authors_weights):
    model = ResT('lite', embed_norm_cfg=dict(type='SyncBN'), drop_path_rate=0.)
    syncbns = [n for n, m in model.named_modules() if isinstance(m, nn.SyncBatchNorm)]
    assert syncbns == ['stem.norm1', 'stem.norm2', 'patch_embed_2.norm',
                       'patch_embed_3.norm', 'patch_embed_4.norm']
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    reference, _ = rest_with_authors_weights('lite')
    model.load_state_dict(reference.state_dict(), strict=True)
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(model(x), reference(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_norm_cfg_applies_to_all_layernorms_only():
    model = ResT('lite', norm_cfg=dict(type='LN', eps=1e-6))
    lns = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    sr = [8, 4, 2, 1]
    # norm1/norm2 per block, sr_norm where sr > 1, norm1-norm3 and norm.
    expected = sum(d * (3 if s > 1 else 2) for d, s in zip(ARCHS['lite']['depths'], sr)) + 4
    assert len(lns) == expected
    assert all(m.eps == 1e-6 for m in lns)
    assert all(m.eps == 1e-5 for m in model.modules() if isinstance(m, _BatchNorm))


# ---------------------------------------------------------------------------- registry
def test_builds_from_mmengine_registry():
    from mmengine.registry import MODELS

    from mmrest.registry import MODELS as REST_MODELS
    model = MODELS.build(dict(type='mmrest.ResT', arch='base', out_indices=(1, 3),
                              frozen_stages=1))
    assert type(model) is ResT
    assert model.embed_dims == [96, 192, 384, 768] and model.out_indices == (1, 3)
    assert not any(p.requires_grad for p in model.stem.parameters())
    assert type(REST_MODELS.build(dict(type='ResT', arch='lite'))) is ResT
    with pytest.raises(KeyError, match="Unknown ResT arch 'huge'"):
        MODELS.build(dict(type='mmrest.ResT', arch='huge'))
