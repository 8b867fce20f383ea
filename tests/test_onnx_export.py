"""ONNX export (tools/deployment/export_onnx.py) is right at every size, and its numpy pre-
and post-processing (onnx_pipeline.py) equals mmdet's and mmseg's. Each model is exported
once per module and compared with PyTorch at other sizes and batches (1e-4 of the
output's largest magnitude)."""
import io
import os.path as osp
from contextlib import redirect_stdout
from unittest import mock

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from mmengine.config import Config

from _deploy_helpers import (load_tool, photo, tiny_mask_rcnn_text, tiny_retinanet_text,
                             tiny_upernet_text, write_text)
from mmrest.models import ResT
from mmrest.models.layers import dispatch, emsa_ops
from reference_rest import ARCHS, random_authors_state_dict, reference_features

export_onnx = load_tool('export_onnx')
onnx_pipeline = load_tool('onnx_pipeline')

pytestmark = pytest.mark.usefixtures('one_intra_op_thread')


def session(path: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])


def assert_close(ours, reference, rel: float = 1e-4) -> None:
    """max |ours - reference| < rel * max |reference|, output by output."""
    assert len(ours) == len(reference)
    for i, (a, b) in enumerate(zip(ours, reference)):
        b = b.detach().numpy() if isinstance(b, torch.Tensor) else b
        assert a.shape == b.shape, (i, a.shape, b.shape)
        scale = float(np.abs(b).max())
        err = float(np.abs(a - b).max())
        assert scale > 0 and err < rel * scale, (i, err, scale)


# --------------------------------------------------------------------------- backbone
@pytest.fixture(scope='module')
def lite(tmp_path_factory):
    """ResT-Lite exported by the CLI from an authors'-layout file ({'model': ...}), traced
    at 64x96 with batch 1; the calls of the attention paths during the export."""
    root = tmp_path_factory.mktemp('onnx_lite')
    sd = random_authors_state_dict('lite', seed=3, out_norms=(0, 1, 2))
    ckpt = str(root / 'rest_lite_authors.pth')
    torch.save({'model': sd}, ckpt)
    out = str(root / 'lite.onnx')
    dense = mock.patch.object(dispatch, 'emsa_dense', wraps=emsa_ops.emsa_dense)
    blocked = mock.patch.object(emsa_ops, '_emsa_transform_forward',
                                wraps=emsa_ops._emsa_transform_forward)
    printed = io.StringIO()
    with dense as dense_spy, blocked as blocked_spy, redirect_stdout(printed):
        assert export_onnx.main(['--arch', 'lite', '--checkpoint', ckpt, '--out', out,
                                 '--trace-shape', '64', '96', '--trace-batch', '1']) == 0
    return dict(sd=sd, ckpt=ckpt, out=out, printed=printed.getvalue(),
                dense_calls=dense_spy.call_count, blocked_calls=blocked_spy.call_count)


def test_export_prints_a_checked_model_with_dynamic_axes(lite):
    printed = lite['printed']
    assert 'onnx.checker: ok' in printed
    assert 'input: float32 [batch, 3, height, width]' in printed
    for i, channels in enumerate(ARCHS['lite']['embed_dims']):
        stride = 4 * 2**i
        assert (f'stage{i + 1}: float32 [batch, {channels}, (((height - 1)//{stride})) + 1, '
                f'(((width - 1)//{stride})) + 1]') in printed
    assert 'dynamic axes: input: 0=batch, 2=height, 3=width' in printed
    onnx.checker.check_model(lite['out'], full_check=True)
    meta = onnx_pipeline.load_meta(lite['out'])
    assert meta['task'] == 'backbone' and meta['trace_shape'] == [64, 96]


def test_export_takes_the_shape_generic_attention(lite):
    """Under export every EMSA layer runs the dense core and the blocked loop is never
    traced (it would be frozen at 64x96)."""
    assert lite['dense_calls'] >= sum(ARCHS['lite']['depths'])
    assert lite['blocked_calls'] == 0


@pytest.mark.parametrize('shape', [(1, 96, 96), (3, 97, 131), (1, 161, 75), (3, 32, 32)],
                         ids=['square-b1', 'odd-b3', 'tall-b1', 'one-pixel-stage4-b3'])
def test_onnx_runtime_matches_pytorch_at_other_sizes(lite, shape):
    """Sizes and batches other than the traced 1x64x96 one; also the reference oracle."""
    model = ResT('lite', drop_path_rate=0.)
    model.load_pretrained(lite['ckpt'])
    model.eval()
    x = torch.randn(shape[0], 3, *shape[1:], generator=torch.Generator().manual_seed(1))
    outs = session(lite['out']).run(None, {'input': x.numpy()})
    with torch.no_grad():
        expected = model(x)
    assert_close(outs, expected)
    oracle = reference_features(lite['sd'], x, ARCHS['lite']['depths'], out_norms=(0, 1, 2))
    assert_close(outs, oracle)


def test_eager_forward_does_not_take_the_export_path(lite):
    """Outside export the lean kernel runs (never the dense core) and its output equals
    the independent oracle."""
    model = ResT('lite', drop_path_rate=0.)
    model.load_pretrained(lite['ckpt'])
    model.eval()
    x = torch.randn(2, 3, 97, 131, generator=torch.Generator().manual_seed(2))
    with mock.patch.object(dispatch, 'emsa_dense', wraps=emsa_ops.emsa_dense) as dense, \
            mock.patch.object(emsa_ops, '_emsa_transform_forward',
                              wraps=emsa_ops._emsa_transform_forward) as blocked, \
            torch.no_grad():
        outs = model(x)
    assert dense.call_count == 0
    assert blocked.call_count == 6  # the head-mixing layers of stages 2-4
    assert not emsa_ops.trace_friendly()
    oracle = reference_features(lite['sd'], x, ARCHS['lite']['depths'], out_norms=(0, 1, 2))
    assert_close([o.numpy() for o in outs], oracle)


def test_cli_refuses_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        export_onnx.parse_args(['--arch', 'lite'])
    assert '--checkpoint is required' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        export_onnx.parse_args(['--arch', 'lite', '--checkpoint', str(tmp_path / 'no.pth')])
    assert 'no such file' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        export_onnx.parse_args([])
    assert 'give either a CONFIG or --arch' in capsys.readouterr().err
    with pytest.raises(KeyError, match='Unknown ResT arch'):
        export_onnx.backbone_spec('tiny', None)


class _RunsCode:
    """Unpickling this would call ``print``: a weights-only load refuses it."""

    def __reduce__(self):
        return (print, ('unpickled',))


def test_cli_ends_model_and_checkpoint_errors_in_one_line(tmp_path, capsys):
    """An unknown arch, a checkpoint of another arch and a checkpoint that would run
    code: exit status 1 and one line naming the problem, no traceback."""
    unsafe = str(tmp_path / 'unsafe.pth')
    torch.save({'model': _RunsCode()}, unsafe)
    other = str(tmp_path / 'small.pth')
    torch.save({'model': random_authors_state_dict('small', seed=0)}, other)
    out = str(tmp_path / 'x.onnx')
    cases = [(['--arch', 'tiny', '--checkpoint', other], "KeyError: Unknown ResT arch 'tiny'"),
             (['--arch', 'lite', '--checkpoint', other],
              f'CheckpointError: {other} does not fit this ResT'),
             (['--arch', 'lite', '--checkpoint', unsafe], 'UnsafeCheckpointError: refusing')]
    for argv, message in cases:
        assert export_onnx.main([*argv, '--out', out]) == 1
        captured = capsys.readouterr()
        err = captured.err.strip().splitlines()
        assert err[-1].startswith('export_onnx.py: error: ' + message), err
        assert 'Traceback' not in captured.err and 'unpickled' not in captured.out
    assert not osp.exists(out)


def test_shape_generic_adaptive_pool_equals_pytorch():
    """The export replacement of ``nn.AdaptiveAvgPool2d`` computes the same bins."""
    x = torch.randn(2, 3, 13, 22)
    for size in [1, 2, 3, 6, (4, 5), (None, 3)]:
        expected = torch.nn.AdaptiveAvgPool2d(size)(x)
        got = export_onnx.ShapeGenericAdaptiveAvgPool2d(size)(x)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------ whole models
def _spec(tmp_path_factory, name: str, text: str):
    config = write_text(str(tmp_path_factory.mktemp(name) / f'{name}.py'), text)
    torch.manual_seed(0)
    return export_onnx.config_spec(config, None), Config.fromfile(config)


@pytest.fixture(scope='module')
def retinanet(tmp_path_factory):
    """Tiny RetinaNet (COCO head), raw head outputs, dynamic shapes, traced at 256x320;
    classification bias 0 so that many scores pass the threshold."""
    spec, cfg = _spec(tmp_path_factory, 'retinanet', tiny_retinanet_text())
    model = spec.module.model
    torch.nn.init.zeros_(model.bbox_head.retina_cls.bias)
    out = str(tmp_path_factory.mktemp('retinanet_onnx') / 'retinanet.onnx')
    export_onnx.export_onnx(spec, out, trace_shape=(256, 320))
    return dict(spec=spec, cfg=cfg, model=model, out=out, meta=onnx_pipeline.load_meta(out))


@pytest.mark.slow
def test_retinanet_raw_outputs_match_on_photos(retinanet):
    """Two photos through the numpy pre-processing (neither at the traced size) and a
    batch of 3."""
    sess = session(retinanet['out'])
    names = [o.name for o in sess.get_outputs()]
    assert names == retinanet['spec'].output_names
    for name in ('astronaut', 'chelsea'):
        batch, info = onnx_pipeline.preprocess(photo(name), retinanet['meta'])
        assert batch.shape[2:] != (256, 320)
        with torch.no_grad():
            assert_close(sess.run(None, {'input': batch}),
                         retinanet['spec'].module(torch.from_numpy(batch)))
    x = torch.randn(3, 3, 160, 224)
    with torch.no_grad():
        assert_close(sess.run(None, {'input': x.numpy()}), retinanet['spec'].module(x))


@pytest.mark.slow
def test_preprocess_equals_the_mmdet_pipeline(retinanet):
    """The numpy pre-processing gives the tensor and metadata of mmdet's test pipeline
    and data preprocessor."""
    from mmdet.utils import get_test_pipeline_cfg
    from mmengine.dataset import Compose
    cfg = retinanet['cfg']
    steps = [t for t in get_test_pipeline_cfg(cfg) if 'LoadAnnotations' not in t['type']]
    steps[0] = dict(type='mmdet.LoadImageFromNDArray')
    for name in ('chelsea', 'coffee'):
        img = photo(name)
        data = Compose(steps)(dict(img=img, img_id=0))
        data = retinanet['model'].data_preprocessor(
            dict(inputs=[data['inputs']], data_samples=[data['data_samples']]), False)
        batch, info = onnx_pipeline.preprocess(img, retinanet['meta'])
        np.testing.assert_allclose(batch, data['inputs'].numpy(), atol=1e-5)
        meta = data['data_samples'][0].metainfo
        assert info['img_shape'] == meta['img_shape']
        assert info['ori_shape'] == meta['ori_shape'] == img.shape[:2]
        assert info['pad_shape'] == meta['batch_input_shape']
        assert np.allclose(info['scale_factor'], meta['scale_factor'])


def _match_detections(ours: dict, theirs) -> None:
    """Same boxes, scores and labels, in either order among near-equal scores."""
    boxes, scores, labels = (theirs.bboxes.numpy(), theirs.scores.numpy(),
                             theirs.labels.numpy())
    assert len(ours['bboxes']) == len(boxes) > 20
    for box, score, label in zip(ours['bboxes'], ours['scores'], ours['labels']):
        hit = np.flatnonzero((labels == label) & (np.abs(scores - score) < 1e-5)
                             & (np.abs(boxes - box).max(1) < 1e-3))
        assert len(hit) == 1, (box, score, label)
    order = np.argsort(-ours['scores'], kind='stable')
    assert (np.diff(ours['scores'][order]) <= 0).all()
    assert (order == np.arange(len(order))).all()  # best first


@pytest.mark.slow
def test_detection_postprocess_equals_mmdet_on_the_same_raw_outputs(retinanet):
    """ONNX Runtime's raw outputs of two photos, post-processed by the numpy helper and by
    mmdet's ``predict_by_feat`` (noise added to the logits: equal scores have no order)."""
    sess = session(retinanet['out'])
    meta = retinanet['meta']
    head = retinanet['model'].bbox_head
    levels = len(meta['strides'])
    rng = np.random.default_rng(0)
    for name in ('astronaut', 'chelsea'):
        batch, info = onnx_pipeline.preprocess(photo(name), meta)
        raw = sess.run(None, {'input': batch})
        raw = [r + rng.standard_normal(r.shape).astype(np.float32) if i < levels else r
               for i, r in enumerate(raw)]
        ours = onnx_pipeline.detection_postprocess(raw, meta, [info])[0]
        img_meta = dict(img_shape=info['img_shape'], ori_shape=info['ori_shape'],
                        scale_factor=info['scale_factor'], pad_shape=info['pad_shape'])
        theirs = head.predict_by_feat([torch.from_numpy(r) for r in raw[:levels]],
                                      [torch.from_numpy(r) for r in raw[levels:]],
                                      batch_img_metas=[img_meta], rescale=True)[0]
        _match_detections(ours, theirs)
        h, w = info['ori_shape']
        assert (ours['bboxes'] >= 0).all()
        assert (ours['bboxes'][:, [0, 2]] <= w).all() and (ours['bboxes'][:, [1, 3]] <= h).all()


@pytest.mark.slow
def test_postprocess_refuses_other_exports(retinanet, lite):
    with pytest.raises(ValueError, match="task 'backbone'"):
        onnx_pipeline.detection_postprocess([], onnx_pipeline.load_meta(lite['out']), [])
    with pytest.raises(ValueError, match='expected 10 outputs'):
        onnx_pipeline.detection_postprocess([np.zeros(1)], retinanet['meta'], [{}])


@pytest.fixture(scope='module')
def upernet(tmp_path_factory):
    """Tiny UperNet (ADE20K head), decode-head logits, dynamic shapes, traced at 256x320."""
    spec, cfg = _spec(tmp_path_factory, 'upernet', tiny_upernet_text())
    out = str(tmp_path_factory.mktemp('upernet_onnx') / 'upernet.onnx')
    export_onnx.export_onnx(spec, out, trace_shape=(256, 320))
    model = spec.module.model
    model.cfg = cfg
    return dict(spec=spec, cfg=cfg, model=model, out=out, meta=onnx_pipeline.load_meta(out))


@pytest.mark.slow
def test_upernet_end_to_end_equals_mmseg_on_photos(upernet):
    """numpy pre-processing, ONNX Runtime and numpy post-processing equal mmseg's
    ``inference_model`` (logits; labels where the two best classes are apart)."""
    from mmseg.apis import inference_model
    meta = upernet['meta']
    assert sorted(meta['replaced_for_export']) == [
        f'model.decode_head.psp_modules.{i}.0' for i in range(4)]
    sess = session(upernet['out'])
    for name in ('coffee', 'chelsea'):
        img = photo(name)
        batch, info = onnx_pipeline.preprocess(img, meta)
        ours = onnx_pipeline.segmentation_postprocess(
            sess.run(None, {'input': batch})[0], meta, [info])[0]
        with torch.no_grad():
            theirs = inference_model(upernet['model'], img)
        logits = theirs.seg_logits.data.numpy()
        assert ours['seg_logits'].shape == logits.shape == (150, ) + img.shape[:2]
        assert_close([ours['seg_logits']], [logits])
        top2 = np.sort(logits, axis=0)[-2:]
        clear = (top2[1] - top2[0]) > 1e-3 * np.abs(logits).max()
        assert clear.mean() > 0.9
        label = theirs.pred_sem_seg.data.numpy()[0]
        assert (ours['sem_seg'][clear] == label[clear]).all()


@pytest.mark.slow
def test_upernet_raw_logits_at_a_batch_of_three(upernet):
    x = torch.randn(3, 3, 97, 161)
    with torch.no_grad():
        expected = upernet['spec'].module(x)
    assert_close(session(upernet['out']).run(None, {'input': x.numpy()}), expected)


@pytest.mark.slow
def test_mask_rcnn_features_with_a_static_size(tmp_path_factory):
    """Mask R-CNN up to the FPN, height and width fixed (the batch stays dynamic)."""
    spec, _ = _spec(tmp_path_factory, 'mask_rcnn', tiny_mask_rcnn_text())
    assert spec.output_names == [f'fpn_{i}' for i in range(5)]
    out = str(tmp_path_factory.mktemp('mask_rcnn_onnx') / 'mask_rcnn.onnx')
    export_onnx.export_onnx(spec, out, trace_shape=(160, 224), dynamic_hw=False)
    sess = session(out)
    assert [d for d in sess.get_inputs()[0].shape] == ['batch', 3, 160, 224]
    for batch in (1, 3):
        x = torch.randn(batch, 3, 160, 224)
        with torch.no_grad():
            expected = spec.module.model.extract_feat(x)
        assert_close(sess.run(None, {'input': x.numpy()}), expected)
    assert osp.isfile(out.replace('.onnx', '.json'))
