"""mmpretrain ImageClassifier with a ResT backbone computes the authors' classifier.

The authors'-layout weights (random, see ``reference_rest.random_authors_state_dict``) go
through the one conversion (``target='classifier'``); the logits must equal the independent
oracle ``reference_logits`` (fp32, max abs error < 1e-4 at 224x224; README "Pretrained weights").
"""
import os.path as osp

import pytest
import torch
from _tools import load_script
from mmengine.runner import load_checkpoint
from mmpretrain.registry import MODELS as PRETRAIN_MODELS
from reference_rest import ARCHS, reference_logits

from mmrest.models.utils import convert_rest_checkpoint

pytestmark = pytest.mark.stack

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
AUTHORS_PARAMS = {'lite': 10_508_300, 'small': 13_679_708}


def build_classifier(arch: str, attn_impl: str = 'lean'):
    cfg = dict(
        type='ImageClassifier',
        backbone=dict(type='mmrest.ResT', arch=arch, out_indices=(3, ), drop_path_rate=0.,
                      attn_impl=attn_impl),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=1000,
                  in_channels=ARCHS[arch]['embed_dims'][-1],
                  loss=dict(type='CrossEntropyLoss')))
    return PRETRAIN_MODELS.build(cfg)


@pytest.mark.parametrize('attn_impl', ['lean', 'reference'])
@pytest.mark.parametrize('arch', ['lite', 'small'])
def test_logits_equal_reference_fp32_224(authors_weights, arch, attn_impl):
    sd = authors_weights(arch, seed=7)
    model = build_classifier(arch, attn_impl)
    assert sum(p.numel() for p in model.parameters()) == AUTHORS_PARAMS[arch]
    model.load_state_dict(convert_rest_checkpoint({'model': sd}, target='classifier'),
                          strict=True)
    model.eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        logits = model(x, mode='tensor')
        ref = reference_logits(sd, x, ARCHS[arch]['depths'])
        preds = model(x, mode='predict')
    assert logits.shape == (2, 1000)
    err = (logits - ref).abs().max().item()
    assert err < 1e-4, f'max abs logit error {err:.3g}'
    assert ref.std() > 0.1  # the comparison is not between near-constant logits
    for pred, r in zip(preds, ref):
        torch.testing.assert_close(pred.pred_score, r.softmax(-1), rtol=0, atol=1e-6)
        assert pred.pred_label.item() == r.argmax().item()


def test_logits_equal_reference_float64(authors_weights):
    sd = {k: v.double() if v.is_floating_point() else v
          for k, v in authors_weights('lite', seed=9).items()}
    model = build_classifier('lite')
    model.load_state_dict(convert_rest_checkpoint(sd, target='classifier'), strict=True)
    model.double().eval()
    x = torch.randn(1, 3, 97, 131, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        err = (model(x, mode='tensor') - reference_logits(sd, x, ARCHS['lite']['depths']))
    assert err.abs().max() < 1e-10


def test_cli_output_loads_into_classifier(tmp_path, authors_weights):
    """The converter's classifier file loads strictly with mmengine's load_checkpoint."""
    cli = load_script('tools/model_converters/rest_to_mmrest.py')
    sd = authors_weights('lite', seed=11)
    src, dst = tmp_path / 'rest_lite.pth', tmp_path / 'rest_lite_cls.pth'
    torch.save({'model': sd, 'epoch': 299}, src)
    assert cli.main([str(src), str(dst), '--target', 'classifier']) == 0
    model = build_classifier('lite')
    load_checkpoint(model, str(dst), map_location='cpu', strict=True)
    model.eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        err = (model(x, mode='tensor') - reference_logits(sd, x, ARCHS['lite']['depths']))
    assert err.abs().max() < 1e-4
