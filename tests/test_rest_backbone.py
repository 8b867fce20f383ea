"""ResT backbone alone: a custom arch (what it does as ResT V2 does: tests/test_backbones.py)."""
import pytest
import torch
from _backbone_helpers import shapes

from mmrest.models import ResT

pytestmark = pytest.mark.stack


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
