"""ResT V2 checkpoints alone: the converter's classifier file gives the authors' logits, and
the other version's weights are refused by name (what ResT V2 checkpoints do as ResT's:
tests/test_rest_checkpoint.py)."""
import pytest
import torch
from _restv2_helpers import authors_state_dict
from _tools import load_script
from reference_rest import random_authors_state_dict as random_v1_state_dict
from reference_rest_v2 import reference_logits

from mmrest.models import ResT, ResTV2
from mmrest.models.utils import convert_rest_checkpoint, rest_checkpoint_family
from mmrest.utils import CheckpointError

cli = load_script('tools/model_converters/rest_to_mmrest.py')
pytestmark = [pytest.mark.stack, pytest.mark.usefixtures('one_intra_op_thread')]


def test_classifier_target_gives_the_authors_logits(tmp_path):
    """The converter's classifier file in an mmpretrain ImageClassifier with ResTV2: the
    logits equal the oracle's classifier (fp32, 224x224)."""
    from mmengine.runner import load_checkpoint
    from mmpretrain.registry import MODELS
    sd = authors_state_dict('tiny', 3)
    src, dst = tmp_path / 'restv2_tiny_224.pth', tmp_path / 'cls.pth'
    torch.save({'model': sd}, src)
    assert cli.main([str(src), str(dst), '--target', 'classifier']) == 0
    model = MODELS.build(dict(
        type='ImageClassifier', _scope_='mmpretrain',
        backbone=dict(type='mmrest.ResTV2', arch='tiny', out_indices=(3, ), drop_path_rate=0.),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=1000, in_channels=768)))
    assert sum(p.numel() for p in model.parameters()) == 30_434_776
    load_checkpoint(model, str(dst), map_location='cpu', strict=True)
    model.eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        logits = model(x, mode='tensor')
        ref = reference_logits(sd, x, 'tiny')
    assert ref.std() > 0.1
    assert (logits - ref).abs().max() < 1e-4


def test_v1_weights_into_v2_and_back_are_refused_by_name(tmp_path):
    v1 = str(tmp_path / 'rest_base.pth')
    torch.save({'model': random_v1_state_dict('base')}, v1)
    model = ResTV2('tiny', init_cfg=dict(type='Pretrained', checkpoint=v1))
    before = model.stage1[0].attn.q.weight.clone()
    with pytest.raises(CheckpointError, match=r"holds ResT weights \(keys such as "
                       r"'stem.conv1.weight'\), but the model is a ResTV2") as info:
        model.init_weights()
    assert v1 in str(info.value)
    assert torch.equal(model.stage1[0].attn.q.weight, before)  # nothing was loaded
    v2 = str(tmp_path / 'restv2_tiny.pth')
    torch.save({'model': authors_state_dict('tiny')}, v2)
    with pytest.raises(CheckpointError, match=r'holds ResTV2 weights.*model is a ResT'):
        ResT('base', init_cfg=dict(type='Pretrained', checkpoint=v2)).init_weights()
    assert rest_checkpoint_family(convert_rest_checkpoint(torch.load(v1))) == 'ResT'
    assert rest_checkpoint_family({'stage1.0.attn.q.weight': torch.zeros(1)}) is None
