"""ResTV2 backbone alone: the up-sampling crop, the attention against the oracle,
gradcheck, init and keys (what it does as ResT does: tests/test_backbones.py)."""
import math

import pytest
import torch
from _backbone_helpers import ATTN_IMPLS, backbone_part
from reference_rest_v2 import attention as reference_attention
from reference_rest_v2 import random_authors_state_dict
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from mmrest.models import ResT, ResTV2
from mmrest.models.layers import EMSAv2

pytestmark = [pytest.mark.stack, pytest.mark.usefixtures('one_intra_op_thread')]


# ----------------------------------------------------------------------------- values
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


# ----------------------------------------------------------------- norms, init, names
def test_odd_sr_ratio_is_refused():
    """The pixel-shuffle up-sampling needs a reduction ratio of 1 or an even one."""
    arch = {k: list(v) for k, v in ResTV2.arch_zoo['tiny'].items()}
    arch['sr_ratios'] = [8, 3, 2, 1]
    with pytest.raises(ValueError, match='sr_ratio must be 1 or even, got 3'):
        ResTV2(arch)


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
