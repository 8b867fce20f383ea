"""tools/dist_train.sh: 2 CPU processes (torchrun, gloo) train the demo config; then
tools/test.py evaluates the checkpoint they wrote (COCO bbox mAP)."""
import json
import os.path as osp
import socket

import pytest

from _engine_helpers import (PYTHON, REPO, TEST, demo_config_text, load_ckpt,
                             make_shapes_data, run, tool_env, write_config)

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_two_process_training_then_test(tmp_path):
    data = make_shapes_data(str(tmp_path / 'data'), num_train=16, num_val=8)
    config = write_config(
        str(tmp_path / 'cfg.py'),
        demo_config_text(data, max_iters=4, ckpt_interval=4, with_val=False))
    work_dir = str(tmp_path / 'dist')
    env = tool_env(dict(PYTHON=PYTHON, PORT=str(_free_port())))
    proc = run(['bash', osp.join(REPO, 'tools', 'dist_train.sh'), config, '2', '--work-dir',
                work_dir], env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert 'Distributed launcher: pytorch' in out and 'Distributed training: True' in out
    # the two ranks trained together: world size 2 in the runner's environment log
    assert 'GPU number: 2' in out  # mmengine's name for the world size
    ckpt = osp.join(work_dir, 'iter_4.pth')
    state = load_ckpt(ckpt)
    assert state['meta']['iter'] == 4
    assert not any(k.startswith('module.') for k in state['state_dict'])

    test_dir = str(tmp_path / 'test')
    # 4 iterations leave every score below the config's 0.05 threshold; without boxes
    # mmdet's CocoMetric reports nothing, so keep them all
    proc = run([PYTHON, TEST, config, ckpt, '--work-dir', test_dir,
                '--out', str(tmp_path / 'preds.pkl'), '--cfg-options',
                'model.test_cfg.score_thr=0.0'])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    with open(osp.join(test_dir, 'test_metrics.json')) as f:
        record = json.load(f)
    assert record['checkpoint'] == ckpt
    metrics = record['metrics']
    assert 'coco/bbox_mAP' in metrics and 0.0 <= metrics['coco/bbox_mAP'] <= 1.0
    assert 'coco/bbox_mAP_50' in metrics
    assert osp.getsize(tmp_path / 'preds.pkl') > 0
