"""End to end: tools/demo.py generates data, trains, evaluates and draws (a shortened run)."""
import json
import os.path as osp
import subprocess
import sys

import cv2
import pytest
from mmengine.config import Config

from mmrest.testing import read_generator_settings

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIG = osp.join(REPO, 'configs', 'demo', 'retinanet_rest_lite_shapes.py')


def test_demo_config_and_generator_cli_agree():
    """The CLI's defaults write exactly the dataset the demo config trains on."""
    sys.path.insert(0, osp.join(REPO, 'tools', 'dataset_converters'))
    try:
        import make_synthetic_shapes as cli
    finally:
        sys.path.pop(0)
    args = cli.parse_args([])
    cfg = Config.fromfile(CONFIG)
    gen = cfg.synthetic_shapes
    assert args.out_dir.rstrip('/') + '/' == cfg.data_root
    assert (args.num_train, args.num_val) == (gen.num_train, gen.num_val)
    assert tuple(args.img_size) == tuple(gen.img_size)
    assert (args.min_shapes, args.max_shapes) == (gen.min_shapes, gen.max_shapes)
    assert tuple(args.size_range) == tuple(gen.size_range)
    assert tuple(args.classes) == tuple(gen.classes) == tuple(cfg.metainfo.classes)
    assert args.seed == gen.seed and args.rotate == gen.rotate
    assert args.max_overlap == gen.max_overlap
    assert args.class_colors == gen.class_colors
    assert args.min_visible == gen.min_visible and args.noise_std == gen.noise_std
    assert cfg.model.bbox_head.num_classes == len(gen.classes)
    assert cfg.model.backbone.type == 'mmrest.ResT'
    assert gen.num_val >= 100, 'the demo evaluates on at least 100 val images'


@pytest.mark.parametrize('iters', [1, 2, 7, 200])
def test_demo_schedule_scales_to_any_length(tmp_path, iters):
    """``--iters`` rescales the warm-up and the decay; even a run of one iteration keeps
    schedulers that mmengine accepts."""
    import torch
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import PARAM_SCHEDULERS
    sys.path.insert(0, osp.join(REPO, 'tools'))
    try:
        import demo
    finally:
        sys.path.pop(0)
    cfg = Config.fromfile(CONFIG)
    old = cfg.train_cfg.max_iters
    demo.configure(cfg, demo.parse_args(['--iters', str(iters)]), str(tmp_path))
    assert cfg.train_cfg.max_iters == iters
    warmup, decay = cfg.param_scheduler
    assert warmup.begin == 0 and warmup.end == max(1, round(100 * iters / old))
    assert decay.begin == round(100 * iters / old)
    assert decay.end == max(iters, decay.begin + 1)
    optim = build_optim_wrapper(torch.nn.Linear(2, 2), cfg.optim_wrapper)
    for sched in cfg.param_scheduler:
        PARAM_SCHEDULERS.build(dict(sched, optimizer=optim))  # raises on end <= begin


# The shortened demo of the test: 200 of the demo's iterations (its schedule and
# evaluation points scaled to that length), 400 training and 60 validation images.
# Measured here: bbox mAP 0.18 (the full demo reaches about 0.81). An untrained or broken
# detector scores 0 (no box of the right class where a shape is); the floor is well above
# that and well below what the run reaches.
SHORT_RUN = ['--iters', '200', '--num-train', '400', '--num-val', '60']
MAP_FLOOR = 0.08


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    work_dir = tmp_path / 'work'
    data_root = tmp_path / 'data'
    cmd = [sys.executable, osp.join(REPO, 'tools', 'demo.py'), '--work-dir', str(work_dir),
           '--data-root', str(data_root)]
    proc = subprocess.run(cmd + SHORT_RUN + ['--num-pictures', '3', '--expect-map',
                                             str(MAP_FLOOR)],
                          capture_output=True, text=True, cwd=REPO, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    settings = read_generator_settings(str(data_root))
    assert settings['num_train'] == 400 and settings['num_val'] == 60
    result = json.loads((work_dir / 'demo_result.json').read_text())
    assert result['iterations'] == 200 and result['num_val_images'] == 60
    assert result['bbox_mAP'] >= MAP_FLOOR, result['summary']
    assert result['metrics']['coco/bbox_mAP'] == result['bbox_mAP']
    assert result['bbox_mAP_50'] == result['metrics']['coco/bbox_mAP_50'] > result['bbox_mAP']
    cfg = Config.fromfile(CONFIG)
    classes = list(cfg.synthetic_shapes.classes)
    assert list(result['per_class_AP']) == classes
    assert all(0 <= ap <= 1 for ap in result['per_class_AP'].values())
    assert result['device'] in ('cpu', 'cuda')

    # a learning curve: several evaluations, each with the training loss since the last
    curve = result['learning_curve']
    assert len(curve) >= 4, curve
    assert [p['iter'] for p in curve] == sorted({p['iter'] for p in curve})
    assert curve[-1]['iter'] == 200 and curve[-1]['bbox_mAP'] == result['bbox_mAP']
    for point in curve:
        assert point['loss'] is not None and 0 < point['loss'] < 100, point
        assert 0 <= point['bbox_mAP'] <= point['bbox_mAP_50'] <= 1, point
        assert list(point['per_class_AP']) == classes
    assert curve[-1]['loss'] < curve[0]['loss'], 'the training loss goes down'

    summary = [line for line in proc.stdout.splitlines() if line.startswith('demo: bbox mAP')]
    assert summary == [result['summary']]
    assert 'on 60 val images after 200 iterations' in summary[0]
    if result['device'] == 'cpu':
        n = result['threads']
        assert n >= 1 and summary[0].endswith(f', CPU, {n} thread{"s" if n > 1 else ""})')
    else:
        assert result['threads'] is None and summary[0].endswith(')')
    assert result['device'] == 'cpu' or f", {result['device']}" in summary[0]
    picture = cv2.imread(result['picture'])
    assert picture is not None and picture.shape[0] >= 2 * 128
    assert picture.shape[1] >= 2 * picture.shape[0] / 3, 'ground truth beside predictions'
    assert osp.abspath(result['picture']) in proc.stdout
    plot = cv2.imread(result['learning_curve_picture'])
    assert plot is not None and plot.shape[0] >= 200 and plot.shape[1] >= 400
    assert osp.dirname(result['learning_curve_picture']) == osp.dirname(result['picture'])
    assert osp.abspath(result['learning_curve_picture']) in proc.stdout
    assert osp.isfile(result['checkpoint'])
    assert 'photo' not in result and not (work_dir / 'photo_prediction.png').exists()

    # a bad argument fails cleanly, naming the value
    bad = subprocess.run(cmd + ['--iters', '0'], capture_output=True, text=True, cwd=REPO,
                         timeout=600)
    assert bad.returncode == 1
    assert '--iters must be >= 1, got 0' in bad.stderr
