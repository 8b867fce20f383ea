"""ResT backbone: shapes, values against the independent oracle, options and errors (what
it does as ResT V2 does: tests/test_backbones.py)."""
import re

import pytest
import torch
from _backbone_helpers import (ATTN_IMPLS, attn_impl_results, check_as_accurate_as_the_oracle,
                               check_authors_param_count, check_output_shapes, double, shapes)
from reference_rest import ARCHS, reference_features
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from mmrest.models import ResT

pytestmark = pytest.mark.stack

ALL_ARCHS = ('lite', 'small', 'base', 'large')
# Parameter counts of the authors' models with their 1000-class linear head.
AUTHORS_PARAMS = {'lite': 10_508_300, 'small': 13_679_708, 'base': 30_327_052,
                  'large': 51_676_156}


# ----------------------------------------------------------------------------- shapes
@pytest.mark.parametrize('arch', ['lite', 'small', 'base'])
@pytest.mark.parametrize('hw', [(224, 224), (225, 225), (97, 131), (131, 97), (32, 32)])
def test_output_shapes(eval_rest, arch, hw):
    check_output_shapes(eval_rest(arch), ARCHS[arch]['embed_dims'], 2, *hw)


def test_output_shapes_large_small_input(eval_rest):
    check_output_shapes(eval_rest('large'), ARCHS['large']['embed_dims'], 2, 33, 47)


@pytest.mark.parametrize('arch,hw', [('small', (512, 683)), ('lite', (800, 1333))])
def test_output_shapes_detection_sizes(eval_rest, arch, hw):
    """Sizes of mmdet/mmseg pipelines, on which the authors' code fails."""
    check_output_shapes(eval_rest(arch), ARCHS[arch]['embed_dims'], 1, *hw)


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
    check_authors_param_count(ResT, arch, ARCHS[arch]['embed_dims'], AUTHORS_PARAMS[arch])


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
def test_features_match_reference_float64(rest_with_authors_weights, arch, attn_impl):
    model, sd = rest_with_authors_weights(arch, attn_impl=attn_impl)
    model.double()
    shape = (1, 3, 33, 41) if arch == 'large' else (2, 3, 65, 47)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        outs = model(x)
    refs = reference_features(double(sd), x, ARCHS[arch]['depths'], out_norms=(0, 1, 2))
    for i, (out, ref) in enumerate(zip(outs, refs)):
        assert out.dtype == torch.float64
        err = (out - ref).abs().max().item()
        assert err < 1e-10, f'stage {i}: max abs error {err:.3g}'


@pytest.mark.parametrize('attn_impl', ATTN_IMPLS)
@pytest.mark.parametrize('arch', ['lite', 'small'])
def test_features_float32_224_as_accurate_as_the_oracle(rest_with_authors_weights, arch,
                                                        attn_impl):
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
        truth = reference_features(double(sd), x.double(), depths, out_norms=(0, 1, 2))
    check_as_accurate_as_the_oracle(outs, oracle32, truth, 2e-3)


def test_attn_impls_agree_in_training_mode(rest_with_authors_weights):
    """Every EMSA implementation gives the reference's outputs and gradients (float64)."""
    x = torch.randn(2, 3, 40, 56, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(3))
    results = attn_impl_results(
        lambda impl: rest_with_authors_weights('lite', attn_impl=impl)[0].double(), x)
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
def test_out_norm_in_main_path(rest_with_authors_weights, out_indices):
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
    sd64 = double(sd)
    for main_path, outs in ((True, out_main), (False, out_side)):
        refs = reference_features(sd64, x, ARCHS['lite']['depths'], out_norms=out_norms,
                                  main_path=main_path)
        for i, out in zip(out_indices, outs):
            assert (out - refs[i]).abs().max() < 1e-10, (main_path, i)


# ----------------------------------------------------------------------------- errors
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


# ------------------------------------------------------------------------ norm_eval
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
