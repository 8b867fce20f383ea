"""Training killed at any point loses nothing: tools/train.py --resume ends with the weights,
bit for bit, of an uninterrupted run (the shrunk demo config as a subprocess on one
deterministic CPU thread, so ``torch.equal``).

Scenarios: SIGKILL at a random point after the first checkpoint; in the middle of a save
(a launcher slows ``os.replace``); a full disk (``ENOSPC`` half-way); a truncated newest
checkpoint. Each kill is at a known point whatever the machine's speed: the process writes
a marker and waits (tests/_probe_hooks.py or the slow rename) until the test kills it.
"""
import os
import os.path as osp
import random
import shutil
import signal
import subprocess
import time
from typing import List, Tuple

import pytest

from _engine_helpers import (PYTHON, TRAIN, assert_same_tensors, load_ckpt, probe_hooks_text,
                             read_last_checkpoint, run, tool_env, train_cmd,
                             train_demo_reference, write_config)

pytestmark = pytest.mark.slow

MAX_ITERS = 9
INTERVAL = 3
# Seed of the random kill point; set MMREST_KILL_SEED to try others.
KILL_SEED = int(os.environ.get('MMREST_KILL_SEED', '20261201'))


def kill_points() -> List[Tuple[int, str]]:
    """Every (runner.iter, stage) of tests/_probe_hooks.py's StopAtKillPoint that comes
    after the first checkpoint (saved in ``after_train_iter`` of iteration INTERVAL - 1,
    before that probe runs) and before the last one."""
    points = [(i, 'after_train_iter') for i in range(INTERVAL - 1, MAX_ITERS - 1)]
    points += [(i, 'before_train_iter') for i in range(INTERVAL, MAX_ITERS)]
    points += [(i, 'before_val') for i in range(INTERVAL, MAX_ITERS, INTERVAL)]
    return sorted(points)

# Runs tools/train.py with one fault injected into the N-th checkpoint save.
FAULT_LAUNCHER = '''
import errno, os, runpy, sys, time
mode = os.environ['FAULT_MODE']
target = int(os.environ['FAULT_SAVE'])
flag = os.environ['FAULT_FLAG']
count = [0]
if mode == 'slow_rename':
    real_replace = os.replace
    def replace(src, dst, *args, **kwargs):
        if str(src).endswith('.tmp') and str(dst).endswith('.pth'):
            count[0] += 1
            if count[0] == target:
                with open(flag, 'w') as f:
                    f.write(str(src))
                time.sleep(600)
        return real_replace(src, dst, *args, **kwargs)
    os.replace = replace
elif mode == 'disk_full':
    from mmengine.fileio.backends import local_backend
    real_put = local_backend.LocalBackend.put
    def put(self, obj, filepath):
        if str(filepath).endswith('.tmp'):
            count[0] += 1
            if count[0] == target:
                with open(filepath, 'wb') as f:
                    f.write(obj[:len(obj) // 2])
                with open(flag, 'w') as f:
                    f.write(str(filepath))
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filepath))
        return real_put(self, obj, filepath)
    local_backend.LocalBackend.put = put
train = os.environ['TRAIN_TOOL']
sys.argv = [train] + sys.argv[1:]
runpy.run_path(train, run_name='__main__')
'''


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp('kill')
    config, ref = train_demo_reference(
        str(root), num_train=12, num_val=4, max_iters=MAX_ITERS, ckpt_interval=INTERVAL,
        val_interval=INTERVAL, extra=probe_hooks_text('StopAtKillPoint'))
    launcher = write_config(str(root / 'fault_launcher.py'), FAULT_LAUNCHER)
    return dict(root=root, config=config, launcher=launcher, ref=ref,
                ref_state=load_ckpt(osp.join(ref, f'iter_{MAX_ITERS}.pth')))


def _assert_same_final(setup, work_dir: str) -> None:
    state = load_ckpt(osp.join(work_dir, f'iter_{MAX_ITERS}.pth'))
    assert state['meta']['iter'] == MAX_ITERS
    assert_same_tensors(setup['ref_state']['state_dict'], state['state_dict'])
    ref_opt = setup['ref_state']['optimizer']['state']
    for idx in ref_opt:
        assert_same_tensors(ref_opt[idx], state['optimizer']['state'][idx],
                            what=f'optimizer.state[{idx}]')


def _resume(setup, work_dir: str) -> str:
    proc = run(train_cmd(setup['config'], work_dir, '--resume'))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert not [f for f in os.listdir(work_dir) if f.endswith('.tmp')]
    return out


def _wait_for(path: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not osp.exists(path):
        assert proc.poll() is None, f'training ended (status {proc.returncode}) before ' \
                                    f'{path} appeared'
        assert time.time() < deadline, f'{path} did not appear within {timeout} s'
        time.sleep(0.05)


def _inspect_ok(path: str) -> None:
    from mmrest.engine import inspect_checkpoint
    inspect_checkpoint(path)


def _sigkill_when_flagged(flag: str, proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` once ``flag`` exists; a process still alive after that is killed."""
    try:
        _wait_for(flag, proc)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigkill_at_random_point_then_resume(setup):
    iteration, stage = random.Random(KILL_SEED).choice(kill_points())
    point = f'kill point: iteration {iteration}, {stage} (MMREST_KILL_SEED={KILL_SEED})'
    print(point)
    work_dir = str(setup['root'] / f'random_kill_{KILL_SEED}')
    marker = str(setup['root'] / f'random_kill_{KILL_SEED}.flag')
    log = open(osp.join(setup['root'], f'random_kill_{KILL_SEED}.log'), 'w')
    env = tool_env(dict(MMREST_KILL_AT=f'{iteration}:{stage}', MMREST_KILL_MARKER=marker))
    proc = subprocess.Popen(train_cmd(setup['config'], work_dir), env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        _sigkill_when_flagged(marker, proc)
    finally:
        log.close()
    latest = read_last_checkpoint(work_dir)
    _inspect_ok(latest)  # what last_checkpoint names is always complete
    # the newest checkpoint saved before that point
    expected = INTERVAL * ((iteration + (stage == 'after_train_iter')) // INTERVAL)
    assert latest == osp.join(work_dir, f'iter_{expected}.pth'), point
    out = _resume(setup, work_dir)
    assert f'resumed epoch: 0, iter: {expected}' in out, point
    _assert_same_final(setup, work_dir)


def _run_with_fault(setup, name: str, mode: str, save: int) -> tuple:
    work_dir = str(setup['root'] / name)
    flag = str(setup['root'] / f'{name}.flag')
    env = tool_env(dict(FAULT_MODE=mode, FAULT_SAVE=str(save), FAULT_FLAG=flag,
                        TRAIN_TOOL=TRAIN))
    cmd = [PYTHON, setup['launcher'], setup['config'], '--work-dir', work_dir]
    return work_dir, flag, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT, text=True)


def test_sigkill_during_save_keeps_previous_checkpoint(setup):
    work_dir, flag, proc = _run_with_fault(setup, 'kill_in_save', 'slow_rename', save=2)
    try:
        _sigkill_when_flagged(flag, proc)
    finally:
        proc.stdout.close()
    tmp_file = open(flag).read()
    # the interrupted save left only its temporary file; the final name never existed
    assert osp.isfile(tmp_file) and osp.basename(tmp_file).startswith('.iter_6.pth.')
    assert not osp.exists(osp.join(work_dir, 'iter_6.pth'))
    assert read_last_checkpoint(work_dir) == osp.join(work_dir, 'iter_3.pth')
    _inspect_ok(osp.join(work_dir, 'iter_3.pth'))
    out = _resume(setup, work_dir)
    assert f'removed {tmp_file}: an incomplete checkpoint of an interrupted run' in out
    assert 'resumed epoch: 0, iter: 3' in out
    _assert_same_final(setup, work_dir)


def test_full_disk_during_save_then_resume(setup):
    work_dir, flag, proc = _run_with_fault(setup, 'disk_full', 'disk_full', save=2)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1, out[-4000:]
    final = osp.join(work_dir, 'iter_6.pth')
    previous = osp.join(work_dir, 'iter_3.pth')
    assert (f'saving checkpoint {final} failed (OSError: [Errno 28] No space left on device'
            in out), out[-3000:]
    assert f'the previous checkpoint {previous} is intact' in out
    assert not osp.exists(final)
    assert not [f for f in os.listdir(work_dir) if f.endswith('.tmp')]
    assert read_last_checkpoint(work_dir) == previous
    _inspect_ok(previous)
    out = _resume(setup, work_dir)
    assert 'resumed epoch: 0, iter: 3' in out
    _assert_same_final(setup, work_dir)


def test_truncated_latest_falls_back_to_previous(setup):
    work_dir = str(setup['root'] / 'truncated')
    shutil.copytree(setup['ref'], work_dir)
    latest = osp.join(work_dir, f'iter_{MAX_ITERS}.pth')
    previous = osp.join(work_dir, f'iter_{MAX_ITERS - INTERVAL}.pth')
    with open(osp.join(work_dir, 'last_checkpoint'), 'w') as f:
        f.write(latest)
    with open(latest, 'r+b') as f:
        f.truncate(os.path.getsize(latest) // 3)
    out = _resume(setup, work_dir)
    assert f'cannot resume from {latest}: checkpoint {latest} is truncated' in out
    assert f'falling back to the previous good checkpoint {previous}' in out
    assert f'resumed epoch: 0, iter: {MAX_ITERS - INTERVAL}' in out
    _assert_same_final(setup, work_dir)
