"""OpenMMLab's inference APIs, unchanged, on mmrest checkpoints and real photos.

mmdet, mmseg and mmpretrain inferencers and init/inference functions each run in a FRESH
process that imports nothing of mmrest: ``custom_imports=dict(imports=['mmrest'])`` alone
must let them read tools/train.py's checkpoints and converted authors' weights, and refuse
a checkpoint that would run code. Predictions on scikit-image's photos have the right
structure; ``tools/infer.py`` writes pictures and a JSON. The checkpoints come from
one-iteration training runs: those tests are slow.
"""
import json
import os
import os.path as osp
import subprocess
import textwrap

import cv2
import numpy as np
import pytest
import torch

from _deploy_helpers import (PHOTOS, REPO, load_tool, shapes_classes,
                             shapes_mask_rcnn_text, shapes_retinanet_text,
                             write_code_running_checkpoint, write_photos, write_text)
from _engine_helpers import (PYTHON, TRAIN, cls_config_text, make_shapes_data,
                             read_last_checkpoint, run, seg_config_text, tool_env,
                             write_cls_annotations)
from reference_rest import ARCHS, random_authors_state_dict, reference_logits

# detectors and segmentors: mmcv with its compiled ops
pytestmark = pytest.mark.ops

LITE_IMAGENET = osp.join(REPO, 'configs', 'rest_lite_imagenet.py')


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    """Checkpoints of one training iteration by tools/train.py (a detector with boxes, one
    with masks, a segmentor, a classifier; in parallel), the authors'-layout classifier
    converted by the converter, a code-running checkpoint, the photos."""
    root = tmp_path_factory.mktemp('apis')
    data = make_shapes_data(str(root / 'data'), num_train=4, num_val=2)
    write_cls_annotations(data)
    texts = dict(retinanet=shapes_retinanet_text(data), mask_rcnn=shapes_mask_rcnn_text(data),
                 upernet=seg_config_text(data, max_iters=1, ckpt_interval=1),
                 classifier=cls_config_text(data, max_epochs=1))
    configs = {k: write_text(str(root / f'{k}.py'), v) for k, v in texts.items()}
    procs = {k: subprocess.Popen([PYTHON, TRAIN, c, '--work-dir', str(root / k)],
                                 cwd=REPO, env=tool_env(), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
             for k, c in configs.items()}
    ckpts = {}
    for k, proc in procs.items():
        log = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, log[-3000:]
        ckpts[k] = read_last_checkpoint(str(root / k))
    sd = random_authors_state_dict('lite', seed=5)
    authors = str(root / 'rest_lite_authors.pth')
    torch.save({'model': sd}, authors)
    converter = load_tool('model_converters/rest_to_mmrest')
    ckpts['authors'] = str(root / 'rest_lite_cls.pth')
    assert converter.main([authors, ckpts['authors'], '--target', 'classifier']) == 0
    marker = str(root / 'PAYLOAD_RAN')
    evil = write_code_running_checkpoint(str(root / 'evil.pth'), marker)
    configs['authors'] = LITE_IMAGENET
    return dict(root=root, data=data, configs=configs, ckpts=ckpts, evil=evil, marker=marker,
                photos=write_photos(str(root / 'photos')), authors_sd=sd,
                classes=shapes_classes(data))


PRELUDE = '''
import json, os, sys
assert not [m for m in sys.modules if m.split('.')[0] == 'mmrest'], 'mmrest imported early'
args = json.loads(sys.argv[1])
out = {}

def refusal(fn):
    try:
        fn()
    except Exception as err:  # what the API raises for the code-running checkpoint
        return f'{type(err).__name__}: {err}'
    return None

def det_facts(sample):
    p = sample.pred_instances
    b = p.bboxes.numpy()
    facts = dict(ori_shape=list(sample.ori_shape), n=len(b), box_min=b.min(0).tolist(),
                 box_max=b.max(0).tolist(), labels=sorted(set(p.labels.tolist())),
                 score_range=[float(p.scores.min()), float(p.scores.max())])
    if 'masks' in p:
        facts['masks'] = [list(p.masks.shape), str(p.masks.dtype)]
    return facts

def seg_facts(sample):
    label = sample.pred_sem_seg.data
    return dict(shape=list(label.shape), labels=sorted(set(label.unique().tolist())),
                logits=list(sample.seg_logits.data.shape))
'''

SCRIPTS = {
    'DetInferencer': '''
from mmdet.apis import DetInferencer
out['refusal'] = refusal(lambda: DetInferencer(
    model=args['configs']['retinanet'], weights=args['evil'], device='cpu'))
for name in ('retinanet', 'mask_rcnn'):
    api = DetInferencer(model=args['configs'][name], weights=args['ckpts'][name],
                        device='cpu')
    res = api(list(args['photos'].values()), return_datasamples=True, no_save_vis=True)
    out[name] = dict(classes=list(api.model.dataset_meta['classes']),
                     photos=[det_facts(s) for s in res['predictions']])
''',
    'init_detector': '''
from mmdet.apis import inference_detector, init_detector
out['refusal'] = refusal(lambda: init_detector(
    args['configs']['mask_rcnn'], args['evil'], device='cpu'))
for name in ('retinanet', 'mask_rcnn'):
    model = init_detector(args['configs'][name], args['ckpts'][name], device='cpu')
    out[name] = dict(classes=list(model.dataset_meta['classes']),
                     photos=[det_facts(inference_detector(model, p))
                             for p in args['photos'].values()])
''',
    'MMSegInferencer': '''
from mmseg.apis import MMSegInferencer
out['refusal'] = refusal(lambda: MMSegInferencer(
    model=args['configs']['upernet'], weights=args['evil'], device='cpu'))
api = MMSegInferencer(model=args['configs']['upernet'], weights=args['ckpts']['upernet'],
                      device='cpu')
out['upernet'] = dict(classes=list(api.model.dataset_meta['classes']),
                      photos=[seg_facts(api(p, return_datasamples=True))
                              for p in args['photos'].values()])
''',
    'init_model': '''
from mmseg.apis import inference_model, init_model
out['refusal'] = refusal(lambda: init_model(
    args['configs']['upernet'], args['evil'], device='cpu'))
model = init_model(args['configs']['upernet'], args['ckpts']['upernet'], device='cpu')
out['upernet'] = dict(classes=list(model.dataset_meta['classes']),
                      photos=[seg_facts(inference_model(model, p))
                              for p in args['photos'].values()])
''',
    'ImageClassificationInferencer': '''
from mmpretrain.apis import ImageClassificationInferencer
out['refusal'] = refusal(lambda: ImageClassificationInferencer(
    model=args['configs']['classifier'], pretrained=args['evil'], device='cpu'))
for name in ('classifier', 'authors'):
    api = ImageClassificationInferencer(model=args['configs'][name],
                                        pretrained=args['ckpts'][name], device='cpu')
    res = api(list(args['photos'].values()))
    out[name] = dict(classes=list(api.classes),
                     photos=[dict(scores=r['pred_scores'].tolist(), label=int(r['pred_label']),
                                  name=r['pred_class']) for r in res])
''',
    'get_model': '''
import torch
from mmengine.dataset import Compose, pseudo_collate
from mmengine.registry import init_default_scope
from mmpretrain.apis import get_model
out['refusal'] = refusal(lambda: get_model(
    args['configs']['classifier'], pretrained=args['evil'], device='cpu'))
init_default_scope('mmpretrain')
for name in ('classifier', 'authors'):
    model = get_model(args['configs'][name], pretrained=args['ckpts'][name], device='cpu')
    classes = list(model._dataset_meta['classes'])  # where get_model keeps them
    # the model's own test step on its config's test pipeline
    pipeline = Compose(model._config.test_dataloader.dataset.pipeline)
    with torch.no_grad():
        res = [model.test_step(pseudo_collate([pipeline(dict(img_path=p))]))[0]
               for p in args['photos'].values()]
        x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        logits = model(x)
    out[name] = dict(classes=classes, logits=logits.tolist(),
                     photos=[dict(scores=r.pred_score.tolist(), label=int(r.pred_label),
                                  name=classes[int(r.pred_label)]) for r in res])
''',
}


def run_api(setup, api: str) -> dict:
    """Run one API's script in a fresh process; its JSON result."""
    args = {k: setup[k] for k in ('configs', 'ckpts', 'evil', 'photos')}
    script = textwrap.dedent(PRELUDE) + textwrap.dedent(SCRIPTS[api]) + (
        "out['marker'] = os.path.exists(args['marker'])\n"
        "print('RESULT ' + json.dumps(out))\n")
    proc = run([PYTHON, '-c', script, json.dumps(dict(args, marker=setup['marker']))],
               timeout=600, cwd=str(setup['root']))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith('RESULT ')]
    assert lines, proc.stdout[-2000:]
    return json.loads(lines[-1][len('RESULT '):])


def check_refusal(result: dict, setup) -> None:
    """The code-running checkpoint was refused as unsafe by mmrest's loader, which
    ``import mmrest`` registers with mmengine (not some other error), and its payload did
    not run."""
    assert result['refusal'] is not None, 'the code-running checkpoint was loaded'
    assert 'loading it could run code' in result['refusal'], result['refusal']
    assert result['marker'] is False and not osp.exists(setup['marker'])


def check_detections(result: dict, setup, with_masks: bool) -> None:
    assert result['classes'] == list(setup['classes'])
    assert [tuple(p['ori_shape']) for p in result['photos']] == list(PHOTOS.values())
    for facts in result['photos']:
        h, w = facts['ori_shape']
        assert facts['n'] >= 1, facts
        assert min(facts['box_min']) >= 0, facts
        assert facts['box_max'][0] <= w and facts['box_max'][2] <= w, facts
        assert facts['box_max'][1] <= h and facts['box_max'][3] <= h, facts
        assert set(facts['labels']) <= set(range(len(setup['classes'])))
        assert 0 <= facts['score_range'][0] <= facts['score_range'][1] <= 1
        if with_masks:
            assert facts['masks'] == [[facts['n'], h, w], 'torch.bool'], facts
        else:
            assert 'masks' not in facts


def check_mmdet(result: dict, setup, api: str) -> None:
    check_detections(result['retinanet'], setup, with_masks=False)
    check_detections(result['mask_rcnn'], setup, with_masks=True)


def check_mmseg(result: dict, setup, api: str) -> None:
    seg = result['upernet']
    classes = ['background'] + list(setup['classes'])
    assert seg['classes'] == classes
    for facts, (h, w) in zip(seg['photos'], PHOTOS.values()):
        assert facts['shape'] == [1, h, w]
        assert facts['logits'] == [len(classes), h, w]
        assert set(facts['labels']) <= set(range(len(classes)))


def _expected_authors_scores(setup) -> np.ndarray:
    """Softmax of the independent oracle's logits on mmpretrain's pre-processing of the
    photos (that pipeline is not what is under test here)."""
    from mmengine.config import Config
    from mmengine.dataset import Compose
    from mmengine.registry import init_default_scope
    from mmpretrain.models.utils import ClsDataPreprocessor
    cfg = Config.fromfile(LITE_IMAGENET)
    init_default_scope('mmpretrain')
    pipeline = Compose(cfg.test_dataloader.dataset.pipeline)
    pre = ClsDataPreprocessor(mean=cfg.data_preprocessor.mean, std=cfg.data_preprocessor.std,
                              to_rgb=cfg.data_preprocessor.to_rgb)
    data = [pipeline(dict(img_path=p)) for p in setup['photos'].values()]
    x = pre(dict(inputs=[d['inputs'] for d in data]), False)['inputs']
    logits = reference_logits(setup['authors_sd'], x, ARCHS['lite']['depths'])
    return logits.softmax(-1).numpy()


def check_classification(result: dict, setup, authors: bool) -> None:
    classes = result['classes']
    if not authors:
        assert classes == list(setup['classes'])
    else:
        assert len(classes) == 1000  # the config's ImageNet names: the file has no meta
    for photo in result['photos']:
        scores = np.asarray(photo['scores'])
        assert scores.shape == (len(classes), ) and abs(scores.sum() - 1) < 1e-4
        assert photo['label'] == int(scores.argmax()) and photo['name'] == classes[photo['label']]
    if authors:
        got = np.asarray([p['scores'] for p in result['photos']])
        np.testing.assert_allclose(got, _expected_authors_scores(setup), atol=1e-5)


def check_mmpretrain(result: dict, setup, api: str) -> None:
    check_classification(result['classifier'], setup, authors=False)
    check_classification(result['authors'], setup, authors=True)
    if api == 'get_model':
        x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        expected = reference_logits(setup['authors_sd'], x, ARCHS['lite']['depths'])
        got = torch.tensor(result['authors']['logits'])
        assert (got - expected).abs().max() < 1e-4 * expected.abs().max()


CHECKS = dict(DetInferencer=check_mmdet, init_detector=check_mmdet,
              MMSegInferencer=check_mmseg, init_model=check_mmseg,
              ImageClassificationInferencer=check_mmpretrain, get_model=check_mmpretrain)


@pytest.mark.slow
@pytest.mark.parametrize('api', list(SCRIPTS))
def test_api_in_a_fresh_process(setup, api):
    """The code-running checkpoint refused, then predictions on the photos."""
    result = run_api(setup, api)
    check_refusal(result, setup)
    CHECKS[api](result, setup, api)


def test_payload_of_the_refused_checkpoint_is_real(tmp_path):
    """Control: unpickled without the weights-only restriction, the checkpoint runs its
    payload (in a child process), so the refusals above are not vacuous."""
    marker = str(tmp_path / 'RAN')
    evil = write_code_running_checkpoint(str(tmp_path / 'evil.pth'), marker)
    code = f'import torch; torch.load({evil!r}, weights_only=False)'
    subprocess.run([PYTHON, '-c', code], check=True, timeout=120, env=tool_env())
    assert osp.exists(marker)


# ------------------------------------------------------------------------ tools/infer.py
@pytest.mark.slow
@pytest.mark.parametrize('task,model', [('detection', 'mask_rcnn'),
                                        ('segmentation', 'upernet'),
                                        ('classification', 'classifier')])
def test_infer_tool_writes_pictures_and_json(setup, tmp_path, capsys, task, model):
    infer = load_tool('infer')
    out_dir = str(tmp_path / 'out')
    photos = list(setup['photos'].values())
    assert infer.main([setup['configs'][model], setup['ckpts'][model], *photos,
                       '--out-dir', out_dir, '--device', 'cpu', '--score-thr', '0']) == 0
    with open(osp.join(out_dir, 'predictions.json')) as f:
        result = json.load(f)
    assert result['task'] == task and len(result['images']) == 3
    assert osp.join(out_dir, 'predictions.json') in capsys.readouterr().out
    for entry, (h, w) in zip(result['images'], PHOTOS.values()):
        picture = cv2.imread(entry['visualization'])
        assert picture is not None, entry['visualization']
        if task == 'detection':
            assert picture.shape[:2] == (h, w)
            boxes = np.asarray(entry['bboxes'])
            assert len(boxes) == len(entry['labels']) == len(entry['masks_rle']) >= 1
            assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= w).all()
            assert (boxes[:, [1, 3]] <= h).all()
            assert set(entry['label_names']) <= set(setup['classes'])
            assert all(tuple(m['size']) == (h, w) for m in entry['masks_rle'])
        elif task == 'segmentation':
            assert entry['shape'] == [h, w]
            assert sum(entry['pixels_per_class'].values()) == h * w
            label = cv2.imread(entry['sem_seg_file'], cv2.IMREAD_UNCHANGED)
            assert label.shape == (h, w)
        else:
            assert entry['pred_class'] == list(setup['classes'])[entry['pred_label']]
            assert abs(sum(entry['pred_scores']) - 1) < 1e-4


@pytest.mark.slow
def test_infer_tool_refuses_bad_input(setup, tmp_path, capsys):
    infer = load_tool('infer')
    missing = str(tmp_path / 'none.jpg')
    assert infer.main([setup['configs']['upernet'], setup['ckpts']['upernet'], missing,
                       '--out-dir', str(tmp_path)]) == 1
    assert f'no such file: {missing}' in capsys.readouterr().err
    odd = write_text(str(tmp_path / 'odd.py'), "default_scope = 'mmocr'\n")
    assert infer.main([odd, setup['ckpts']['upernet'], setup['photos']['coffee'],
                       '--out-dir', str(tmp_path)]) == 1
    assert "default_scope must be one of ['mmdet', 'mmpretrain', 'mmseg'], got 'mmocr'" in \
        capsys.readouterr().err
    # a checkpoint that would run code when unpickled: refused, in one line
    unsafe = str(tmp_path / 'unsafe.pth')
    torch.save({'state_dict': _RunsCode()}, unsafe)
    assert infer.main([setup['configs']['upernet'], unsafe, setup['photos']['coffee'],
                       '--out-dir', str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith(f'error: refusing to load {unsafe}') and '\n' not in \
        captured.err.strip() and 'GLOBAL print' in captured.err
    assert 'unpickled' not in captured.out


class _RunsCode:
    """Unpickling this would call ``print``: a weights-only load refuses it."""

    def __reduce__(self):
        return (print, ('unpickled',))


@pytest.mark.slow
def test_infer_tool_from_the_command_line(setup, tmp_path):
    """The script itself (a fresh process), on one photo."""
    proc = run([PYTHON, osp.join(REPO, 'tools', 'infer.py'), setup['configs']['retinanet'],
                setup['ckpts']['retinanet'], setup['photos']['chelsea'], '--out-dir',
                str(tmp_path), '--device', 'cpu'])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert osp.isfile(tmp_path / 'vis' / 'chelsea.png')
    assert os.path.getsize(tmp_path / 'predictions.json') > 0
