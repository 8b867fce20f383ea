"""ResTV2 checkpoints: every published layout through init_cfg, the load hook and the CLI;
the other version's weights, other archs and unsafe files are refused by name."""
import logging
from typing import Callable, Dict

import pytest
import torch
from _backbone_helpers import backbone_part, double
from _restv2_helpers import authors_state_dict
from _tools import load_script
from reference_rest import random_authors_state_dict as random_v1_state_dict
from reference_rest_v2 import reference_features, reference_logits
from torch import nn

from mmrest.models import ResT, ResTV2
from mmrest.models.utils import convert_rest_checkpoint, rest_checkpoint_family
from mmrest.utils import CheckpointError

cli = load_script('tools/model_converters/rest_to_mmrest.py')
pytestmark = [pytest.mark.stack, pytest.mark.usefixtures('one_intra_op_thread')]


def authors_output_norms(sd: Dict[str, torch.Tensor], style: str) -> Dict[str, torch.Tensor]:
    """Our ``norm1``-``norm3`` and ``norm`` renamed as the authors' downstream backbones
    name their output norms: ``norm_1.0`` ... ``norm_4.0`` (detectron2) or ``norm_1`` ...
    ``norm_4`` (mmseg 0.x)."""
    suffix = '.0' if style == 'detectron2' else ''
    out = {}
    for key, value in backbone_part(sd).items():
        head, _, rest = key.partition('.')
        if head in ('norm1', 'norm2', 'norm3', 'norm'):
            head = f'norm_{head[-1] if head != "norm" else 4}{suffix}'
        out[f'{head}.{rest}'] = value
    return out


# Each layout: how a ResTV2 with the authors'-layout state dict ``sd`` is saved by its tool.
LAYOUTS: Dict[str, Callable[[Dict[str, torch.Tensor]], dict]] = {
    # the authors' ImageNet files
    'authors': lambda sd: {'model': dict(sd), 'epoch': 299, 'max_accuracy': 82.3},
    # the authors' detectron2 detectors (no final ``norm``; output norms norm_i.0)
    'detectron2': lambda sd: {
        'model': {
            **{'backbone.bottom_up.' + k: v
               for k, v in authors_output_norms(sd, 'detectron2').items()},
            'backbone.fpn_lateral2.weight': torch.zeros(256, 96, 1, 1),
        },
        'iteration': 269999,
    },
    # the authors' mmseg 0.x segmentors (output norms norm_i)
    'mmseg0x': lambda sd: {
        'meta': {'mmseg_version': '0.24.0'},
        'state_dict': {
            **{'backbone.' + k: v for k, v in authors_output_norms(sd, 'mmseg0x').items()},
            'decode_head.conv_seg.weight': torch.zeros(150, 512, 1, 1),
        },
    },
    # mmdet / mmseg / mmpretrain checkpoints of this project
    'mmdet': lambda sd: {'state_dict': {'backbone.' + k: v
                                        for k, v in backbone_part(sd).items()}},
    # saved from DistributedDataParallel
    'ddp': lambda sd: {'module.' + k: v for k, v in sd.items()},
    # a plain backbone state dict
    'plain': lambda sd: backbone_part(sd),
}


def warnings_in(records) -> list:
    return [r.getMessage() for r in records if r.levelno >= logging.WARNING]


def assert_matches_reference(model: ResTV2, sd: Dict[str, torch.Tensor],
                             out_norms=(0, 1, 2)) -> None:
    """Eval outputs equal the oracle with the authors' weights ``sd`` (float64)."""
    model.eval().double()
    x = torch.randn(1, 3, 57, 83, generator=torch.Generator().manual_seed(11),
                    dtype=torch.float64)
    with torch.no_grad():
        outs = model(x)
        refs = reference_features(double(sd), x, 'tiny', out_norms=out_norms)
    for i, out in zip(model.out_indices, outs):
        assert (out - refs[i]).abs().max() < 1e-9, f'stage {i}'


@pytest.mark.parametrize('layout', sorted(LAYOUTS))
def test_init_cfg_and_cli_load_every_layout(tmp_path, log_records, layout, capsys):
    """Round trip through a file of each layout: init_cfg, and the converter's output."""
    sd = authors_state_dict('tiny', 1, (0, 1, 2))
    path = str(tmp_path / f'{layout}.pth')
    torch.save(LAYOUTS[layout](sd), path)
    model = ResTV2('tiny', drop_path_rate=0.,
                   init_cfg=dict(type='Pretrained', checkpoint=path))
    model.init_weights()
    torch.testing.assert_close(model.state_dict(), backbone_part(sd), rtol=0, atol=0)
    assert not warnings_in(log_records)
    assert_matches_reference(model, sd)

    dst = str(tmp_path / 'converted' / 'restv2_tiny.pth')
    assert cli.main([path, dst]) == 0
    assert 'restv2_tiny.pth' in capsys.readouterr().out
    converted = torch.load(dst, weights_only=True)
    assert set(converted) == set(backbone_part(sd))
    assert all(torch.equal(v, sd[k]) for k, v in converted.items())
    ResTV2('tiny').load_state_dict(converted, strict=True)


def test_authors_imagenet_file_leaves_only_the_new_output_norms(tmp_path, log_records):
    sd = authors_state_dict('tiny', 2)
    path = str(tmp_path / 'restv2_tiny_224.pth')
    torch.save({'model': sd}, path)
    model = ResTV2('tiny', drop_path_rate=0., init_cfg=dict(type='Pretrained', checkpoint=path))
    model.init_weights()
    missing = [w for w in warnings_in(log_records) if 'missing' in w.lower()]
    assert len(missing) == 1 and path in missing[0]
    for i in (1, 2, 3):
        assert f"'norm{i}.weight'" in missing[0] and f"'norm{i}.bias'" in missing[0]
    assert "'norm.weight'" not in missing[0] and 'stage' not in missing[0]
    assert torch.equal(model.norm.weight, sd['norm.weight'])
    # the new norms keep LayerNorm's initialisation
    with_norms = dict(sd)
    for i, c in zip((1, 2, 3), (96, 192, 384)):
        with_norms[f'norm{i}.weight'], with_norms[f'norm{i}.bias'] = torch.ones(c), torch.zeros(c)
    assert_matches_reference(model, with_norms)


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


# ------------------------------------------------------------------ wrong weights
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


@pytest.mark.parametrize('src,dst,match', [
    ('tiny', 'small', r"missing from the checkpoint \['stage3.6."),
    ('small', 'tiny', r"not in the model \['stage3.6."),
    ('large', 'tiny', r'shape mismatches, e.g. stem.proj.0.weight: checkpoint \(64, 3, 3, 3\) '
                      r'vs model \(48, 3, 3, 3\)'),
])
def test_weights_of_another_arch_raise(tmp_path, src, dst, match):
    path = str(tmp_path / f'{src}.pth')
    torch.save({'model': authors_state_dict(src)}, path)
    model = ResTV2(dst, init_cfg=dict(type='Pretrained', checkpoint=path))
    with pytest.raises(CheckpointError, match=r'does not fit this ResTV2.*' + match):
        model.init_weights()


def test_unsafe_file_is_refused(tmp_path):
    """The shared safe loading: a pickle that would run code is refused, not run."""
    marker = tmp_path / 'marker'

    class Payload:

        def __reduce__(self):
            return (exec, (f'open({str(marker)!r}, "w").write("x")', ))

    path = str(tmp_path / 'evil.pth')
    torch.save({'model': {**authors_state_dict('tiny'), 'stem.proj.0.weight': Payload()}},
               path)
    with pytest.raises(CheckpointError, match='refusing to load'):
        ResTV2('tiny', init_cfg=dict(type='Pretrained', checkpoint=path)).init_weights()
    assert not marker.exists()


# ------------------------------------------------- whole-detector load_state_dict
def test_detectron2_detector_loads_through_the_pre_hook():
    sd = authors_state_dict('tiny', 6, (0, 1, 2))
    detector = nn.Module()
    detector.backbone = ResTV2('tiny', drop_path_rate=0.)
    detector.neck = nn.Conv2d(768, 8, 1)
    state = {'backbone.bottom_up.' + k: v
             for k, v in authors_output_norms(sd, 'detectron2').items()}
    state.update({'neck.weight': torch.ones(8, 768, 1, 1), 'neck.bias': torch.ones(8)})
    detector.load_state_dict(state, strict=True)
    torch.testing.assert_close(detector.backbone.state_dict(), backbone_part(sd), rtol=0,
                               atol=0)
    assert_matches_reference(detector.backbone, sd)
    assert 'backbone.bottom_up.norm_4.0.weight' in state  # the caller's dict is untouched
