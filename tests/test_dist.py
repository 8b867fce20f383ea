"""Two CPU processes (tools/dist_train.sh: torchrun, gloo).

* Resume restores each rank's own generators (``diff_rank_seed=True``: after a resume each
  rank draws what it drew uninterrupted; recorded by tests/_probe_hooks.py).
* 2 processes x 2 images train like 1 x 4; tools/dist_test.sh evaluates like tools/test.py.
"""
import json
import os
import os.path as osp
import shutil
import socket

import pytest
import torch

from _engine_helpers import (PYTHON, REPO, TEST, cls_config_text, demo_config_text,
                             load_ckpt, make_shapes_data, probe_hooks_text, read_probe, run,
                             tool_env, train_cmd, write_cls_annotations, write_config)

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _dist(script: str, *args: str) -> str:
    env = tool_env(dict(PYTHON=PYTHON, PORT=str(_free_port())))
    proc = run(['bash', osp.join(REPO, 'tools', script), *args], env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    return out


def _draws(records, start: int):
    return [(r['iter'], r['stage'], r['torch'], r['numpy'], r['python'], r.get('losses'))
            for r in records if r['iter'] >= start]


def test_resume_restores_each_ranks_own_random_streams(tmp_path):
    """Detection demo config (drop path draws from torch, RandomFlip from numpy), 4
    iterations with a checkpoint every 2; the second run resumes from iteration 2."""
    data = make_shapes_data(str(tmp_path / 'data'), num_train=16, num_val=4)
    config = write_config(str(tmp_path / 'cfg.py'), demo_config_text(
        data, max_iters=4, ckpt_interval=2, with_val=False,
        extra=probe_hooks_text('RecordRandomStreams')
        + 'randomness = dict(seed=0, diff_rank_seed=True, deterministic=True)\n'))
    ref = str(tmp_path / 'ref')
    out = _dist('dist_train.sh', config, '2', '--work-dir', ref)
    assert 'Distributed training: True' in out and 'GPU number: 2' in out  # world size 2

    saved = load_ckpt(osp.join(ref, 'iter_2.pth'))['rng_state']
    assert saved['world_size'] == 2 and len(saved['ranks']) == 2
    assert not torch.equal(saved['ranks'][0]['torch'], saved['ranks'][1]['torch'])

    resumed = str(tmp_path / 'resumed')
    os.makedirs(resumed)
    shutil.copy(osp.join(ref, 'iter_2.pth'), resumed)
    with open(osp.join(resumed, 'last_checkpoint'), 'w') as f:
        f.write(osp.join(resumed, 'iter_2.pth'))
    out = _dist('dist_train.sh', config, '2', '--work-dir', resumed, '--resume')
    assert 'resumed epoch: 0, iter: 2' in out
    assert 'restored the random generator state of iteration 2' in out

    streams = {}
    for rank in (0, 1):
        expected = _draws(read_probe(ref, rank), 2)
        got = _draws(read_probe(resumed, rank), 2)
        assert [r[:2] for r in expected] == [(2, 'before_train_iter'), (2, 'after_train_iter'),
                                             (3, 'before_train_iter'), (3, 'after_train_iter')]
        assert got == expected, f'rank {rank}'
        streams[rank] = expected
    # the ranks' streams differ (so rank 1 restored with rank 0's state would not match)
    for a, b in zip(streams[0], streams[1]):
        assert a[2:5] != b[2:5] and all(x != y for x, y in zip(a[2:5], b[2:5])), (a, b)
    final_ref = load_ckpt(osp.join(ref, 'iter_4.pth'))['state_dict']
    final_res = load_ckpt(osp.join(resumed, 'iter_4.pth'))['state_dict']
    assert all(torch.equal(final_ref[k], final_res[k]) for k in final_ref)


# Classification with a per-sample mean loss and nothing that depends on the batch split:
# the backbone's BatchNorms in eval mode (norm_eval), no Mixup/CutMix (they mix within a
# batch), no random flip or drop path (each rank would draw its own), plain SGD. Then the
# averaged gradient of 2 x 2 images equals the gradient of 4 images up to the rounding
# of the summation order.
EXACT_SPLIT = '''
model = dict(
    backbone=dict(
        arch=dict(_delete_=True, embed_dims=[32, 64, 128, 256], depths=[1, 1, 1, 1],
                  num_heads=[1, 2, 4, 8], mlp_ratios=[4, 4, 4, 4], sr_ratios=[8, 4, 2, 1]),
        drop_path_rate=0.0, norm_eval=True, init_cfg=None),
    head=dict(in_channels=256, num_classes=5),
    train_cfg=None)
optim_wrapper = dict(_delete_=True, type='OptimWrapper',
                     optimizer=dict(type='SGD', lr=0.005, momentum=0.0))
param_scheduler = []
'''


def test_two_processes_train_like_one_with_the_same_total_batch(tmp_path):
    """2 processes x 2 images vs 1 process x 4 images, 4 SGD steps: equal up to float
    rounding for this classifier (not for a detector: per-rank anchors and BatchNorm
    statistics). Measured: weights within 1.2e-7, mean loss within 1e-6 relative."""
    data = make_shapes_data(str(tmp_path / 'data'), num_train=8, num_val=8)
    write_cls_annotations(data)
    text = cls_config_text(data, max_epochs=2, flip_prob=0.0,
                           extra=EXACT_SPLIT + probe_hooks_text('RecordRandomStreams'))
    config = write_config(str(tmp_path / 'cls.py'), text)
    two, one = str(tmp_path / 'two'), str(tmp_path / 'one')
    _dist('dist_train.sh', config, '2', '--work-dir', two, '--cfg-options',
          'train_dataloader.batch_size=2')
    proc = run(train_cmd(config, one, '--cfg-options', 'train_dataloader.batch_size=4'))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    single = [r['losses']['loss'] for r in read_probe(one) if r['stage'] == 'after_train_iter']
    ranks = [[r['losses']['loss'] for r in read_probe(two, k) if r['stage'] == 'after_train_iter']
             for k in (0, 1)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 4  # 2 epochs of 2 iterations
    for it, (loss, loss0, loss1) in enumerate(zip(single, *ranks)):
        # each rank's loss is the mean over its 2 images; their mean is the 4-image mean
        assert abs((loss0 + loss1) / 2 - loss) <= 1e-5 * abs(loss), (it, loss, loss0, loss1)
    assert abs(ranks[0][0] - ranks[1][0]) > 1e-3, 'the ranks saw the same images'
    a = load_ckpt(osp.join(two, 'epoch_2.pth'))['state_dict']
    b = load_ckpt(osp.join(one, 'epoch_2.pth'))['state_dict']
    start = load_ckpt(osp.join(one, 'epoch_1.pth'))['state_dict']
    for key in b:
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-6), key
    assert any(not torch.allclose(start[k], b[k], rtol=1e-4, atol=1e-6) for k in b)

    metrics = {}
    for name, work_dir in (('two', two), ('one', one)):
        ckpt = osp.join(work_dir, 'epoch_2.pth')
        test_dir = str(tmp_path / f'test_{name}')
        if name == 'two':
            _dist('dist_test.sh', config, ckpt, '2', '--work-dir', test_dir)
        else:
            proc = run([PYTHON, TEST, config, ckpt, '--work-dir', test_dir])
            assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        with open(osp.join(test_dir, 'test_metrics.json')) as f:
            record = json.load(f)
        assert record['checkpoint'] == ckpt
        metrics[name] = record['metrics']['accuracy/top1']
    assert metrics['two'] == metrics['one']
