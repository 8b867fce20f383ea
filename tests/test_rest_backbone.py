"""ResT backbone alone: shapes and its EMSA implementations (what it does as ResT V2 does:
tests/test_backbones.py)."""
import pytest
import torch
from _backbone_helpers import attn_impl_results, check_output_shapes, shapes
from reference_rest import ARCHS

from mmrest.models import ResT

pytestmark = pytest.mark.stack


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
    with pytest.raises(ValueError, match='built for 1 input channels'):
        model(torch.randn(1, 3, 32, 40))


# ----------------------------------------------------------------------------- values
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
