"""ResTV2 backbone: shapes, values against the independent oracle, the up-sampling crop,
gradients, options and errors (what it does as ResT does: tests/test_backbones.py)."""
import math
from typing import List

import pytest
import torch
from _backbone_helpers import (ATTN_IMPLS, attn_impl_results, backbone_part,
                               check_as_accurate_as_the_oracle, check_authors_param_count,
                               check_output_shapes, double)
from _restv2_helpers import ARCHS, eval_model, model_with_authors_weights
from reference_rest_v2 import ARCHS as REF_ARCHS
from reference_rest_v2 import attention as reference_attention
from reference_rest_v2 import random_authors_state_dict, reference_features
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from mmrest.models import ResT, ResTV2
from mmrest.models.layers import EMSAv2

pytestmark = [pytest.mark.stack, pytest.mark.usefixtures('one_intra_op_thread')]

# Parameter counts of the authors' models with their 1000-class linear head.
AUTHORS_PARAMS = {'tiny': 30_434_776, 'small': 41_205_976, 'base': 55_965_208,
                  'large': 86_532_520}


def max_err(outs, refs) -> List[float]:
    return [(o - r).abs().max().item() for o, r in zip(outs, refs)]


# ----------------------------------------------------------------------------- shapes
@pytest.mark.parametrize('arch', ARCHS)
def test_output_shapes_square_odd_and_non_square(arch):
    for h, w in ((64, 64), (97, 97), (65, 47), (32, 45)):
        outs = check_output_shapes(eval_model(arch), REF_ARCHS[arch]['embed_dims'], 2, h, w)
        assert all(o.is_contiguous() for o in outs)


@pytest.mark.parametrize('arch', ARCHS)
def test_parameter_counts_match_authors(arch):
    check_authors_param_count(ResTV2, arch, REF_ARCHS[arch]['embed_dims'],
                              AUTHORS_PARAMS[arch])


@pytest.mark.parametrize('alias, arch', [('t', 'tiny'), ('s', 'small'), ('b', 'base'),
                                         ('l', 'large')])
def test_aliases_mean_what_they_mean_in_mmpretrain(alias, arch):
    assert ResTV2.arch_zoo[alias] == ResTV2.arch_zoo[arch]
    assert ResTV2(alias).depths == REF_ARCHS[arch]['depths']


# ----------------------------------------------------------------------------- values
@pytest.mark.parametrize('attn_impl', ATTN_IMPLS)
@pytest.mark.parametrize('arch', ARCHS)
def test_features_match_reference_float64(arch, attn_impl):
    """Odd and non-square inputs (the up-sampled values are cropped) and a multiple of 32
    (nothing cropped: the authors' own function), batch 2, all four output norms."""
    model, sd = model_with_authors_weights(arch, attn_impl=attn_impl)
    g = torch.Generator().manual_seed(1)
    for shape in ((2, 3, 65, 47), (1, 3, 64, 96)):
        x = torch.randn(*shape, generator=g, dtype=torch.float64)
        with torch.no_grad():
            outs = model(x)
        refs = reference_features(sd, x, arch, out_norms=(0, 1, 2))
        assert all(o.dtype == torch.float64 for o in outs)
        assert max(max_err(outs, refs)) < 1e-9, (shape, max_err(outs, refs))
        assert min(r.abs().max().item() for r in refs) > 1  # O(1) maps, not ~0


def test_crop_is_inactive_where_the_authors_code_runs():
    """At sides that are multiples of 32 every block's up-sampled map is exactly its query
    map (the authors' ``H // r`` reshape works there and nothing is cropped); at other
    sizes some are larger, never smaller, and are cropped."""
    model = ResTV2('tiny', attn_impl='reference', drop_path_rate=0.).eval()
    seen = []
    hooks = [m.up.register_forward_hook(lambda mod, args, out: seen.append(out.shape[-2:]))
             for m in model.modules() if isinstance(m, EMSAv2)]
    try:
        for h, w, cropped in ((64, 96, False), (65, 47, True)):
            seen.clear()
            with torch.no_grad():
                model(torch.randn(1, 3, h, w))
            queries = [(math.ceil(h / 2**(i + 2)), math.ceil(w / 2**(i + 2)))
                       for i, depth in enumerate(model.depths) for _ in range(depth)]
            assert len(seen) == len(queries)
            assert all(s[0] >= q[0] and s[1] >= q[1] for s, q in zip(seen, queries))
            assert any(tuple(s) != q for s, q in zip(seen, queries)) == cropped
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize('attn_impl', ATTN_IMPLS)
@pytest.mark.parametrize('sr,heads,hw', [(8, 1, (13, 19)), (4, 2, (9, 6)), (2, 4, (7, 5)),
                                         (1, 2, (5, 3)), (8, 2, (16, 24))])
def test_attention_matches_reference_equations(attn_impl, sr, heads, hw):
    """EMSAv2 alone on token maps whose sides are not multiples of the ratio (cropped) and
    are (not cropped), float64."""
    C = 8 * heads
    torch.manual_seed(sr + heads)
    attn = EMSAv2(C, num_heads=heads, sr_ratio=sr, attn_impl=attn_impl).double().eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.3)
    H, W = hw
    x = torch.randn(2, H * W, C, dtype=torch.float64)
    sd = {f'a.{k}': v for k, v in attn.state_dict().items()}
    with torch.no_grad():
        err = (attn(x, hw) - reference_attention(x, H, W, sd, 'a', heads, sr)).abs().max()
    assert err < 1e-12


def test_features_float32_as_accurate_as_the_oracle():
    """float32 maps are as close to the float64 truth as the oracle's own float32 maps
    (float32 rounding through the depth of the network), at 224x224 and an odd size."""
    model, sd = model_with_authors_weights('tiny', dtype=torch.float32)
    g = torch.Generator().manual_seed(2)
    sd64 = double(sd)
    for shape in ((2, 3, 224, 224), (1, 3, 97, 131)):
        x = torch.randn(*shape, generator=g)
        with torch.no_grad():
            outs = model(x)
            oracle32 = reference_features(sd, x, 'tiny', out_norms=(0, 1, 2))
            truth = reference_features(sd64, x.double(), 'tiny', out_norms=(0, 1, 2))
        check_as_accurate_as_the_oracle(outs, oracle32, truth, 1e-3, where=(shape, ))


@pytest.mark.parametrize('threads', ['one', 'many'])
def test_attn_impls_agree_in_training_mode(request, threads):
    """Outputs and every gradient of every implementation agree with the reference's
    (float64, odd size), on one thread and on 32 (as on a many-core node)."""
    if threads == 'many':
        request.getfixturevalue('many_threads')
    x = torch.randn(2, 3, 40, 57, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(3))
    results = attn_impl_results(
        lambda impl: model_with_authors_weights('tiny', attn_impl=impl)[0], x)
    l2, gx2, g2 = results[-1]  # the reference
    for l1, gx1, g1 in results[:-1]:
        torch.testing.assert_close(l1, l2, rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(gx1, gx2, rtol=1e-10, atol=1e-12)
        assert g1.keys() == g2.keys() and all(g is not None for g in g1.values())
        for name in g1:
            torch.testing.assert_close(g1[name], g2[name], rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize('attn_impl', ATTN_IMPLS)
@pytest.mark.parametrize('sr,hw',
                         [pytest.param(4, (7, 9), marks=pytest.mark.slow), (1, (3, 4))])
def test_attention_gradcheck(attn_impl, sr, hw):
    """gradcheck of EMSAv2 in its input and its q, kv and up-sampling weights (float64, a
    cropped map for sr 4)."""
    torch.manual_seed(0)
    attn = EMSAv2(8, num_heads=2, sr_ratio=sr, attn_impl=attn_impl).double()
    names = ('q.weight', 'kv.weight', 'up.0.weight', 'up_norm.weight', 'proj.bias')
    params = {n: p.detach().clone().requires_grad_() for n, p in attn.named_parameters()
              if n in names}
    x = torch.randn(2, hw[0] * hw[1], 8, dtype=torch.float64, requires_grad=True)

    def fn(x, *weights):
        return torch.func.functional_call(attn, dict(zip(params, weights)), (x, hw))

    assert torch.autograd.gradcheck(fn, (x, *params.values()))


def test_whole_backbone_gradcheck():
    """gradcheck of a small ResTV2 (every kind of layer, odd input) in its input."""
    arch = dict(embed_dims=[8, 16, 16, 32], depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4],
                mlp_ratios=[2, 2, 2, 2], sr_ratios=[8, 4, 2, 1])
    torch.manual_seed(0)
    model = ResTV2(arch, drop_path_rate=0.).double().eval()  # BN statistics fixed
    x = torch.randn(1, 3, 33, 38, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: model(t), (x, ), fast_mode=True)


@pytest.mark.parametrize('out_indices',
                         [(0, 1, 2, 3), pytest.param((1, 3), marks=pytest.mark.slow)])
def test_out_norm_in_main_path(out_indices):
    """False (the default, the authors' v2 downstream code): output norms on the returned
    maps only, and stage 4 equals the classification backbone's; True: the next stage
    consumes the normalised map."""
    side, sd = model_with_authors_weights('tiny', out_indices=out_indices)
    main, _ = model_with_authors_weights('tiny', out_indices=out_indices,
                                         out_norm_in_main_path=True)
    plain = ResTV2('tiny', out_indices=(3, ), drop_path_rate=0.).double().eval()
    plain.load_state_dict({k: v for k, v in side.state_dict().items()
                           if not k.startswith(('norm1.', 'norm2.', 'norm3.'))}, strict=True)
    assert not ResTV2('tiny').out_norm_in_main_path
    x = torch.randn(2, 3, 71, 64, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out_side, out_main, out_plain = side(x), main(x), plain(x)
    assert torch.equal(out_side[-1], out_plain[-1])
    for a, b in zip(out_main[1:], out_side[1:]):
        assert (a - b).abs().max() > 1e-3
    out_norms = tuple(i for i in out_indices if i < 3)
    for main_path, outs in ((False, out_side), (True, out_main)):
        refs = reference_features(sd, x, 'tiny', out_norms=out_norms, main_path=main_path)
        for i, out in zip(out_indices, outs):
            assert (out - refs[i]).abs().max() < 1e-9, (main_path, i)


# ----------------------------------------------------------------------------- errors
def _arch_dict(**overrides) -> dict:
    arch = {k: list(v) for k, v in ResTV2.arch_zoo['tiny'].items()}
    arch.update(overrides)
    return arch


@pytest.mark.parametrize('arch,error,match', [
    ([96, 192, 384, 768], TypeError, 'arch must be a str or a dict, got list'),
    ({'embed_dims': [96] * 4}, KeyError,
     r"ResTV2 arch dict is missing the keys \['depths', 'num_heads', 'mlp_ratios', "
     r"'sr_ratios'\]"),
    (_arch_dict(drop_path=0.1), KeyError, r"unknown keys \['drop_path'\]"),
    (_arch_dict(depths=[1, 2, 6]), ValueError, r"arch\['depths'\] needs 4 positive integers"),
    (_arch_dict(num_heads=[5, 2, 4, 8]), ValueError, r'embed_dims \(96\).*num_heads \(5\)'),
    (_arch_dict(sr_ratios=[8, 3, 2, 1]), ValueError, 'sr_ratio must be 1 or even, got 3'),
])
def test_bad_arch_dicts(arch, error, match):
    with pytest.raises(error, match=match):
        ResTV2(arch)


@pytest.mark.parametrize('kwargs,match', [
    (dict(out_indices=(0, 4)), 'out_indices.*got 4'),
    (dict(out_indices=(1, 1)), 'non-empty and unique'),
    (dict(frozen_stages=5), r'frozen_stages must be in \[-1, 4\], got 5'),
    (dict(attn_impl='flash'), "attn_impl must be one of.*'flash'"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ResTV2('tiny', **kwargs)


@pytest.mark.parametrize('shape,match', [
    ((2, 4, 64, 64), r'ResTV2 was built for 3 input channels.*\(2, 4, 64, 64\)'),
    ((3, 64, 64), r'ResTV2 expects a 4-D \(N, C, H, W\) tensor, got \(3, 64, 64\)'),
    ((0, 3, 64, 64), r'ResTV2 got an empty batch: input shape \(0, 3, 64, 64\)'),
])
def test_bad_inputs(shape, match):
    with pytest.raises(ValueError, match=match):
        eval_model('tiny')(torch.zeros(shape))


# ------------------------------------------------------------------------ norm_eval
def test_norm_eval_keeps_the_stem_batchnorms_in_eval():
    model = ResTV2('tiny', norm_eval=True, drop_path_rate=0.)
    bns = [n for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
    assert bns == ['stem.proj.1', 'stem.proj.4']
    model.train()
    assert not any(model.get_submodule(n).training for n in bns)
    assert model.stem.proj[0].training and model.stage1[0].training
    before = [model.get_submodule(n).running_var.clone() for n in bns]
    model(torch.randn(2, 3, 64, 64))
    assert all(torch.equal(b, model.get_submodule(n).running_var)
               for b, n in zip(before, bns))


# ----------------------------------------------------------------- norms, init, names
def test_norm_configs():
    model = ResTV2('tiny', embed_norm_cfg=dict(type='SyncBN'), drop_path_rate=0.)
    assert [n for n, m in model.named_modules() if isinstance(m, nn.SyncBatchNorm)] == [
        'stem.proj.1', 'stem.proj.4']
    lns = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    # stem/patch norms, norm1/norm2/up_norm per block, sr_norm where sr > 1, outputs
    depths, srs = REF_ARCHS['tiny']['depths'], [8, 4, 2, 1]
    assert len(lns) == 4 + sum(d * (4 if s > 1 else 3) for d, s in zip(depths, srs)) + 4
    assert all(m.eps == 1e-6 for m in lns)
    eps5 = ResTV2('tiny', norm_cfg=dict(type='LN', eps=1e-5))
    assert all(m.eps == 1e-5 for m in eps5.modules() if isinstance(m, nn.LayerNorm))


def test_authors_initialisation():
    torch.manual_seed(0)
    model = ResTV2('tiny')
    model.init_weights()
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if m.weight.numel() >= 1000:
                assert m.weight.std().item() == pytest.approx(0.02, rel=0.1), name
            assert m.bias is None or not m.bias.any(), name
        elif isinstance(m, (nn.LayerNorm, _BatchNorm)):
            assert (m.weight == 1).all() and not m.bias.any(), name


def test_state_dict_keys_are_the_authors():
    """The classification backbone's keys are the authors' (without ``head``)."""
    sd = random_authors_state_dict('small', num_classes=0)
    own = ResTV2('small', out_indices=(3, )).state_dict()
    assert set(own) == set(backbone_part(sd))
    assert all(own[k].shape == v.shape for k, v in sd.items())


def test_v1_and_v2_share_the_family_code():
    """One base class; ResT keeps its own defaults."""
    from mmengine.model import BaseModule

    from mmrest.models.backbones.base import ResTBase
    assert ResT.__bases__ == ResTV2.__bases__ == (ResTBase, )
    assert ResTBase is not BaseModule and issubclass(ResTBase, BaseModule)
    # the forward, the checkpoint loading and the freezing are the base class's
    for name in ('forward', 'load_pretrained', 'train', '_freeze_stages'):
        assert name not in vars(ResT) and name not in vars(ResTV2), name
    assert ResT('lite').out_norm_in_main_path and not ResTV2('tiny').out_norm_in_main_path
