"""ResT and ResT V2 checkpoints: every published layout through init_cfg, the load hook and
the conversion CLI; other archs, the other version's weights and unsafe files refused."""
import functools
import logging
import os
import os.path as osp
import subprocess
import sys
from collections import namedtuple
from typing import Callable, Dict

import pytest
import torch
from _backbone_helpers import backbone_part, double
from _restv2_helpers import authors_state_dict
from _tools import WritesMarker, load_script
from reference_rest import ARCHS
from reference_rest import random_authors_state_dict as random_v1_state_dict
from reference_rest import reference_features
from reference_rest_v2 import reference_features as v2_features
from torch import nn

from mmrest.models import ResT, ResTV2
from mmrest.models.utils import convert_rest_checkpoint
from mmrest.utils import CheckpointError

pytestmark = pytest.mark.stack

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
CLI = osp.join(REPO, 'tools', 'model_converters', 'rest_to_mmrest.py')


cli = load_script('tools/model_converters/rest_to_mmrest.py')


# Each layout: how a ResT with the authors' state dict ``sd`` is saved by its tool.
LAYOUTS: Dict[str, Callable[[Dict[str, torch.Tensor]], dict]] = {
    # the authors' ImageNet files
    'authors': lambda sd: {'model': dict(sd), 'epoch': 299, 'max_accuracy': 79.6},
    # the authors' detectron2 detectors
    'detectron2': lambda sd: {
        'model': {
            **{'backbone.bottom_up.' + k: v for k, v in backbone_part(sd).items()},
            'backbone.fpn_lateral3.weight': torch.zeros(256, 128, 1, 1),
            'roi_heads.box_predictor.cls_score.weight': torch.zeros(81, 1024),
        },
        'iteration': 89999,
    },
    # mmdet / mmseg checkpoints
    'mmdet': lambda sd: {
        'meta': {'epoch': 12, 'mmdet_version': '3.3.0'},
        'state_dict': {
            **{'backbone.' + k: v for k, v in backbone_part(sd).items()},
            'neck.lateral_convs.0.conv.weight': torch.zeros(256, 64, 1, 1),
            'decode_head.conv_seg.weight': torch.zeros(150, 512, 1, 1),
        },
    },
    # saved from DistributedDataParallel
    'ddp': lambda sd: {'module.' + k: v for k, v in sd.items()},
    # a plain backbone state dict
    'plain': lambda sd: backbone_part(sd),
}


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
V2_LAYOUTS: Dict[str, Callable[[Dict[str, torch.Tensor]], dict]] = {
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


def assert_matches_reference(model, sd: Dict[str, torch.Tensor], out_norms=()) -> None:
    """The eval outputs of a ResT-Lite or ResTV2-Tiny (converted to float64 in place) equal
    the oracle's with the authors' weights ``sd``."""
    model.eval().double()
    x = torch.randn(1, 3, 57, 83, generator=torch.Generator().manual_seed(11),
                    dtype=torch.float64)
    v2 = isinstance(model, ResTV2)
    with torch.no_grad():
        outs = model(x)
        refs = (v2_features(double(sd), x, 'tiny', out_norms=out_norms) if v2 else
                reference_features(double(sd), x, ARCHS['lite']['depths'], out_norms=out_norms))
    for i, out in zip(model.out_indices, outs):
        assert (out - refs[i]).abs().max() < (1e-9 if v2 else 1e-10), f'stage {i}'


#: a backbone class, its smallest arch, its layouts, the output indices and norms of the
#: round trips, and a factory of random authors' weights ``(seed, out_norms, arch)``
Family = namedtuple('Family', 'cls arch layouts out_indices out_norms weights')


@pytest.fixture(params=['ResT', 'ResTV2'])
def family(request) -> Family:
    if request.param == 'ResT':
        return Family(ResT, 'lite', LAYOUTS, (3, ), (),
                      functools.partial(request.getfixturevalue('authors_weights'), 'lite'))
    torch.set_num_threads(1)  # restored after the test by tests/conftest.py
    return Family(ResTV2, 'tiny', V2_LAYOUTS, (0, 1, 2, 3), (0, 1, 2),
                  lambda seed=0, out_norms=(): dict(authors_state_dict('tiny', seed,
                                                                       tuple(out_norms))))


# --------------------------------------------------------------- init_cfg round trip
@pytest.mark.parametrize('family,layout', [('ResT', k) for k in sorted(LAYOUTS)] +
                         [('ResTV2', k) for k in sorted(V2_LAYOUTS)], indirect=['family'])
def test_init_cfg_and_cli_load_every_layout(tmp_path, log_records, capsys, family, layout):
    """Round trip through a file of each layout: init_cfg, and the converter's output
    (tensors only, no temporary file left; loads strictly and through init_cfg)."""
    sd = family.weights(seed=1, out_norms=family.out_norms)
    path = str(tmp_path / f'{layout}.pth')
    torch.save(family.layouts[layout](sd), path)
    model = family.cls(family.arch, out_indices=family.out_indices, drop_path_rate=0.,
                       init_cfg=dict(type='Pretrained', checkpoint=path))
    model.init_weights()
    torch.testing.assert_close(model.state_dict(), backbone_part(sd), rtol=0, atol=0)
    assert not warnings_in(log_records)
    assert_matches_reference(model, sd, family.out_norms)

    dst = str(tmp_path / 'converted' / 'dst.pth')
    assert cli.main([path, dst]) == 0
    assert 'dst.pth' in capsys.readouterr().out
    converted = torch.load(dst, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in converted.values())
    assert set(converted) == set(backbone_part(sd))
    assert all(torch.equal(v, sd[k]) for k, v in converted.items())
    assert not [f for f in os.listdir(osp.dirname(dst)) if f.endswith('.tmp')]
    family.cls(family.arch, out_indices=family.out_indices).load_state_dict(converted,
                                                                            strict=True)
    model = family.cls(family.arch, out_indices=family.out_indices,
                       init_cfg=dict(type='Pretrained', checkpoint=dst))
    model.init_weights()
    torch.testing.assert_close(model.state_dict(), backbone_part(sd), rtol=0, atol=0)


def test_init_cfg_logs_missing_output_norms_by_name(tmp_path, log_records, family):
    """An ImageNet file into a backbone with output norms: one warning names the new norms
    (which keep LayerNorm's initialisation) and nothing else."""
    sd = family.weights(seed=2)
    path = str(tmp_path / 'authors.pth')
    torch.save({'model': sd}, path)
    model = family.cls(family.arch, out_indices=(0, 1, 2, 3), drop_path_rate=0.,
                       init_cfg=dict(type='Pretrained', checkpoint=path))
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith('norm1.')}
    model.init_weights()
    missing = [w for w in warnings_in(log_records) if 'missing' in w.lower()]
    assert len(missing) == 1 and path in missing[0]
    for i in (1, 2, 3):
        assert f"'norm{i}.weight'" in missing[0] and f"'norm{i}.bias'" in missing[0]
    assert 'stage' not in missing[0] and "'norm.weight'" not in missing[0]
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k], v)
    assert torch.equal(model.norm.weight, sd['norm.weight'])
    for i, c in enumerate(model.embed_dims[:3], start=1):
        sd[f'norm{i}.weight'], sd[f'norm{i}.bias'] = torch.ones(c), torch.zeros(c)
    assert_matches_reference(model, sd, out_norms=(0, 1, 2))


def test_pretrained_output_norms_load_when_present(tmp_path, authors_weights):
    """A detection checkpoint with norm1-norm3 restores them (nothing missing)."""
    sd = authors_weights('lite', seed=3, out_norms=(0, 1, 2))
    path = str(tmp_path / 'det.pth')
    torch.save(LAYOUTS['detectron2'](sd), path)
    model = ResT('lite', drop_path_rate=0., init_cfg=dict(type='Pretrained', checkpoint=path))
    model.init_weights()
    assert torch.equal(model.norm2.bias, sd['norm2.bias'])
    assert_matches_reference(model, sd, out_norms=(0, 1, 2))
    # ... and into a classification backbone with output-only norms, the extra norms
    # are just ignored.
    model = ResT('lite', out_indices=(3, ), drop_path_rate=0., out_norm_in_main_path=False,
                 init_cfg=dict(type='Pretrained', checkpoint=path))
    model.init_weights()
    assert_matches_reference(model, sd)


@pytest.mark.parametrize('out_indices, dropped', [((3, ), 'norm1'), ((1, 2, 3), 'norm1'),
                                                  ((0, 1, 3), 'norm3')])
def test_main_path_output_norms_are_not_dropped(tmp_path, authors_weights, out_indices,
                                                dropped):
    """A checkpoint trained with the output norm of stage i in the main path cannot
    load, by any path, into a backbone that lacks that norm (its later stages would
    compute another function); the error names the norm and the two ways out."""
    sd = authors_weights('lite', seed=3, out_norms=(0, 1, 2))
    path = str(tmp_path / 'det.pth')
    torch.save(LAYOUTS['detectron2'](sd), path)
    model = ResT('lite', out_indices=out_indices, drop_path_rate=0.,
                 init_cfg=dict(type='Pretrained', checkpoint=path))
    with pytest.raises(CheckpointError, match=dropped) as info:
        model.init_weights()
    assert path in str(info.value)
    for text in ('out_norm_in_main_path=False', f'out_indices={list(out_indices)}'):
        assert text in str(info.value)
    # the same through load_state_dict, as mmengine's load_from and resume load
    detector = nn.Module()
    detector.backbone = model
    weights = {'backbone.' + k: v for k, v in backbone_part(sd).items()}
    with pytest.raises(CheckpointError, match=dropped):
        detector.load_state_dict(weights, strict=False)
    # a backbone with every norm the checkpoint has loads it
    full = ResT('lite', out_indices=(0, 1, 2, 3), drop_path_rate=0.)
    full.load_state_dict(backbone_part(sd), strict=True)
    assert_matches_reference(full, sd, out_norms=(0, 1, 2))


def test_init_cfg_prefix_takes_the_weights_under_it(tmp_path, authors_weights):
    """mmengine's ``prefix`` of a Pretrained init: the weights under it, stripped (with or
    without the final dot, as mmengine takes it, and never those of a longer name); a
    prefix nothing is under raises and names the keys there are."""
    sd = authors_weights('lite', seed=5)
    other = authors_weights('lite', seed=6)
    path = str(tmp_path / 'two_models.pth')
    torch.save({'state_dict': {**{'teacher.' + k: v for k, v in backbone_part(other).items()},
                               **{'student.' + k: v for k, v in backbone_part(sd).items()},
                               'student2.stem.conv1.weight': torch.zeros(1)}},
               path)
    for prefix in ('student.', 'student'):
        model = ResT('lite', out_indices=(3, ), drop_path_rate=0.,
                     init_cfg=dict(type='Pretrained', checkpoint=path, prefix=prefix,
                                   map_location='cpu'))
        model.init_weights()
        assert model.is_init
        assert_matches_reference(model, sd)
    model = ResT('lite', init_cfg=dict(type='Pretrained', checkpoint=path, prefix='backbone.'))
    with pytest.raises(CheckpointError, match="no weights under the prefix 'backbone.'") as info:
        model.init_weights()
    assert 'teacher.stem' in str(info.value)


@pytest.mark.parametrize('init_cfg, message', [
    ([dict(type='Pretrained', checkpoint='x.pth'), dict(type='Constant', val=0, layer='Linear')],
     'give it alone'),
    (dict(type='Pretrained', checkpoint='x.pth', revise_keys=[]), r"not \['revise_keys'\]"),
    (dict(type='Pretrained'), "takes 'checkpoint'"),
])
def test_init_cfg_pretrained_errors(init_cfg, message):
    """A Pretrained init this loader would not follow as written is an error, not a
    silent partial load."""
    with pytest.raises(ValueError, match=message):
        ResT('lite', init_cfg=init_cfg).init_weights()


def test_other_init_cfg_goes_to_mmengine_and_non_affine_norms_init():
    model = ResT('lite', init_cfg=dict(type='Constant', val=0.5, layer='Linear'))
    model.init_weights()
    assert model.is_init and torch.all(model.stage1[0].attn.q.weight == 0.5)
    model = ResT('lite', norm_cfg=dict(type='LN', elementwise_affine=False))
    model.init_weights()  # the authors' init skips the absent affine parameters
    assert model.stage1[0].norm1.weight is None and model.is_init


# ------------------------------------------------------------------ bad checkpoints
@pytest.mark.parametrize('state,match,named', [
    ({'state_dict': {'head.fc.weight': torch.zeros(10, 512), 'neck.gap.weight': torch.zeros(1)}},
     'no ResT backbone weights found', 'head.fc.weight'),
    ({'stage1.9.mlp.fc1.weight': torch.zeros(256, 64)}, 'none of its keys match', '')])
def test_checkpoints_without_fitting_keys_raise(tmp_path, state, match, named):
    """No backbone key at all (the keys there are named), or ResT-like keys none of which
    the model has."""
    path = str(tmp_path / 'other.pth')
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=match) as info:
        ResT('lite', init_cfg=dict(type='Pretrained', checkpoint=path)).init_weights()
    assert path in str(info.value) and named in str(info.value)


@pytest.mark.parametrize('family,src,dst,match', [
    ('ResT', 'lite', 'small', r"missing from the checkpoint \['stage3.2."),
    ('ResT', 'small', 'lite', r"not in the model \['stage3.2."),
    ('ResT', 'base', 'large', r"missing from the checkpoint \['stage3.6."),
    ('ResT', 'large', 'base', r"not in the model \['stage3.6."),
    ('ResT', 'base', 'small', r'shape mismatches, e.g. stem.conv1.weight: checkpoint '
                              r'\(48, 3, 3, 3\) vs model \(32, 3, 3, 3\)'),
    ('ResTV2', 'tiny', 'small', r"missing from the checkpoint \['stage3.6."),
    ('ResTV2', 'small', 'tiny', r"not in the model \['stage3.6."),
    ('ResTV2', 'large', 'tiny', r'shape mismatches, e.g. stem.proj.0.weight: checkpoint '
                                r'\(64, 3, 3, 3\) vs model \(48, 3, 3, 3\)'),
], indirect=['family'])
def test_weights_of_another_arch_raise(tmp_path, family, src, dst, match):
    """Other widths: the shape mismatches, by name; same widths, other depths: the blocks
    missing or left over. The path is named and nothing is loaded."""
    path = str(tmp_path / f'{src}.pth')
    sd = (random_v1_state_dict if family.cls is ResT else authors_state_dict)(src)
    torch.save({'model': sd}, path)
    model = family.cls(dst, init_cfg=dict(type='Pretrained', checkpoint=path))
    before = next(model.parameters()).clone()
    with pytest.raises(CheckpointError,
                       match=rf'does not fit this {family.cls.__name__}.*' + match) as info:
        model.init_weights()
    assert path in str(info.value)
    assert torch.equal(next(model.parameters()), before)


def test_non_tensor_entry_raises(tmp_path, authors_weights):
    sd = authors_weights('lite')
    sd['stage2.0.attn.q.weight'] = [[0.1, 0.2], [0.3, 0.4]]
    path = str(tmp_path / 'list.pth')
    torch.save({'model': sd}, path)
    model = ResT('lite', init_cfg=dict(type='Pretrained', checkpoint=path))
    with pytest.raises(CheckpointError,
                       match=r"'stage2.0.attn.q.weight' is a list, not a tensor"):
        model.init_weights()
    assert cli.main([path, str(tmp_path / 'out.pth')]) == 1
    assert not (tmp_path / 'out.pth').exists()


def test_truncated_and_missing_files(tmp_path, authors_weights, capsys):
    good = tmp_path / 'good.pth'
    torch.save({'model': authors_weights('lite')}, good)
    bad = tmp_path / 'truncated.pth'
    bad.write_bytes(good.read_bytes()[:good.stat().st_size // 2])
    model = ResT('lite', init_cfg=dict(type='Pretrained', checkpoint=str(bad)))
    with pytest.raises(CheckpointError, match='truncated or corrupted'):
        model.init_weights()
    assert cli.main([str(bad), str(tmp_path / 'out.pth')]) == 1
    assert 'truncated.pth' in capsys.readouterr().err
    missing = str(tmp_path / 'nowhere.pth')
    with pytest.raises(FileNotFoundError, match='nowhere.pth'):
        ResT('lite', init_cfg=dict(type='Pretrained', checkpoint=missing)).init_weights()
    assert cli.main([missing, str(tmp_path / 'out.pth')]) == 1
    assert 'not found' in capsys.readouterr().err


# ---------------------------------------------------------------- malicious pickles
def _evil_checkpoint(path: str, marker: str, sd: Dict[str, torch.Tensor]) -> None:
    torch.save({'model': {**sd, 'stem.conv1.weight': WritesMarker(marker)}}, path)


def test_payload_runs_under_unsafe_loading(tmp_path, authors_weights):
    """Positive control: the crafted file really executes code when unpickled unsafely."""
    marker = tmp_path / 'control_marker'
    path = str(tmp_path / 'control.pth')
    _evil_checkpoint(path, str(marker), authors_weights('lite'))
    torch.load(path, weights_only=False)
    assert marker.read_text() == 'pwned'


def test_malicious_pickle_refused_by_init_cfg_and_cli(tmp_path, authors_weights):
    marker = tmp_path / 'marker'
    path = str(tmp_path / 'evil.pth')
    _evil_checkpoint(path, str(marker), authors_weights('lite'))
    model = ResT('lite', init_cfg=dict(type='Pretrained', checkpoint=path))
    with pytest.raises(CheckpointError, match='refusing to load') as info:
        model.init_weights()
    assert path in str(info.value)
    out = str(tmp_path / 'out.pth')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [REPO] + [p for p in [os.environ.get('PYTHONPATH')] if p]))
    proc = subprocess.run([sys.executable, CLI, path, out], capture_output=True, text=True,
                          cwd=str(tmp_path), env=env)
    assert proc.returncode == 1, proc.stderr
    assert 'refusing to load' in proc.stderr and path in proc.stderr
    assert 'Traceback' not in proc.stderr
    assert not marker.exists() and not osp.exists(out)
    # the same safe loading for ResTV2
    torch.save({'model': {**authors_state_dict('tiny'),
                          'stem.proj.0.weight': WritesMarker(str(marker))}}, path)
    with pytest.raises(CheckpointError, match='refusing to load'):
        ResTV2('tiny', init_cfg=dict(type='Pretrained', checkpoint=path)).init_weights()
    assert not marker.exists()


# ------------------------------------------------------------------------ the CLI
def test_cli_classifier_target(tmp_path, authors_weights, capsys):
    sd = authors_weights('lite', seed=5)
    src, dst = str(tmp_path / 'src.pth'), str(tmp_path / 'cls.pth')
    torch.save(LAYOUTS['ddp'](sd), src)
    assert cli.main([src, dst, '--target', 'classifier']) == 0
    converted = torch.load(dst, weights_only=True)
    assert set(converted) == {'backbone.' + k for k in backbone_part(sd)} | {
        'head.fc.weight', 'head.fc.bias'}
    assert torch.equal(converted['head.fc.weight'], sd['head.weight'])
    assert torch.equal(converted['backbone.norm.bias'], sd['norm.bias'])
    # Same function as the library's conversion.
    expected = convert_rest_checkpoint(LAYOUTS['ddp'](sd), target='classifier')
    assert list(converted) == list(expected)
    # A detector checkpoint has no head: converted, with a warning.
    torch.save(LAYOUTS['mmdet'](sd), src)
    capsys.readouterr()
    assert cli.main([src, dst, '--target', 'classifier']) == 0
    assert 'no classification head' in capsys.readouterr().err
    assert 'head.fc.weight' not in torch.load(dst, weights_only=True)


def test_classifier_target_keeps_an_mmpretrain_head(authors_weights):
    """An mmpretrain ImageClassifier (``head.fc.*``) converts to itself, head included."""
    sd = authors_weights('lite', seed=5)
    classifier = convert_rest_checkpoint(sd, target='classifier')
    again = convert_rest_checkpoint({'state_dict': classifier, 'meta': {}},
                                    target='classifier')
    assert list(again) == list(classifier)
    assert torch.equal(again['head.fc.weight'], sd['head.weight'])
    assert torch.equal(again['head.fc.bias'], sd['head.bias'])


def test_two_weights_for_one_key_are_refused(authors_weights):
    """Keys of two layouts that name the same weight with different values (here the
    final norm as ``norm`` and as the authors' ``norm_4``) are an error, not a silent
    choice; the same value twice is taken."""
    sd = backbone_part(authors_weights('lite', seed=5))
    clash = dict(sd, **{'norm_4.weight': sd['norm.weight'] + 1})
    with pytest.raises(ValueError, match=r"two different weights for 'norm.weight': "
                                         r"'norm.weight' and 'norm_4.weight'"):
        convert_rest_checkpoint(clash)
    same = dict(sd, **{'norm_4.weight': sd['norm.weight'].clone()})
    assert torch.equal(convert_rest_checkpoint(same)['norm.weight'], sd['norm.weight'])


def test_cli_errors(tmp_path, capsys):
    src = str(tmp_path / 'noresT.pth')
    torch.save({'state_dict': {'neck.conv.weight': torch.zeros(2)}}, src)
    assert cli.main([src, str(tmp_path / 'out.pth')]) == 1
    err = capsys.readouterr().err
    assert 'no ResT backbone weights found' in err and src in err
    assert cli.main([src, src]) == 1
    assert 'refusing to overwrite the input' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([src, str(tmp_path / 'out.pth'), '--target', 'detector'])
    assert "invalid choice: 'detector'" in capsys.readouterr().err


# ------------------------------------------------- whole-detector load_state_dict
def test_detectron2_detector_loads_through_the_pre_hook(family):
    sd = family.weights(seed=6, out_norms=family.out_norms)
    detector = nn.Module()
    detector.backbone = family.cls(family.arch, out_indices=family.out_indices,
                                   drop_path_rate=0.)
    c = detector.backbone.embed_dims[-1]
    detector.neck = nn.Conv2d(c, 8, 1)
    state = {k: v for k, v in family.layouts['detectron2'](sd)['model'].items()
             if k.startswith('backbone.bottom_up.')}
    state.update({'neck.weight': torch.ones(8, c, 1, 1), 'neck.bias': torch.ones(8)})
    keys = list(state)
    detector.load_state_dict(state, strict=True)
    torch.testing.assert_close(detector.backbone.state_dict(), backbone_part(sd), rtol=0,
                               atol=0)
    assert_matches_reference(detector.backbone, sd, family.out_norms)
    assert torch.equal(detector.neck.bias, torch.ones(8))
    assert list(state) == keys  # the caller's dict is untouched
