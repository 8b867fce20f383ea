"""Resume: the next iteration after a checkpoint equals the uninterrupted run's, on torch
>= 2.6 with weights-only loading; damaged checkpoints are named and skipped.
"""
import json
import os
import os.path as osp
import shutil
import subprocess
import sys

import pytest
import torch

from _engine_helpers import (PYTHON, TEST, assert_same_tensors, cls_config_text, load_ckpt,
                             make_shapes_data, read_last_checkpoint, run, seg_config_text,
                             train_cmd, train_demo_reference, write_cls_annotations,
                             write_config)

# The globals (pickle GLOBAL opcodes) of an mmengine 0.10.7 training checkpoint of mmdet;
# mmrest.utils.mmengine_safe_globals() must cover exactly these, plus the numpy dtype
# classes (used by BUILD, not named by GLOBAL).
MMENGINE_CKPT_GLOBALS = {
    'builtins.getattr',
    'mmengine.logging.history_buffer.HistoryBuffer',
    'numpy._core.multiarray._reconstruct',
    'numpy._core.multiarray.scalar',
    'numpy.dtype',
    'numpy.ndarray',
}


# what torch >= 2.6 allows by default
_TORCH_GLOBALS = set(torch._weights_only_unpickler._get_allowed_globals())


def _pickle_globals(path: str) -> set:
    """Every global a checkpoint's pickle refers to (GLOBAL opcodes), independent of
    what is registered with torch in this process."""
    import pickletools
    import zipfile
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith('data.pkl'))
        data = archive.read(name)
    names = set()
    for opcode, arg, _ in pickletools.genops(data):
        if opcode.name == 'GLOBAL':
            module, attr = arg.split(' ')
            names.add(f"{'builtins' if module == '__builtin__' else module}.{attr}")
    return names


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """An uninterrupted 3-iteration run with a checkpoint after every iteration."""
    root = tmp_path_factory.mktemp('resume')
    config, ref = train_demo_reference(str(root), num_train=8, num_val=4, max_iters=3,
                                       ckpt_interval=1, with_val=False)
    return dict(root=root, config=config, ref=ref)


def _resume_from_iter2(runs, name: str, strip_rng: bool = False) -> str:
    """Copy the reference run as it was after iteration 2, and resume it."""
    work_dir = str(runs['root'] / name)
    os.makedirs(work_dir)
    ckpt = osp.join(work_dir, 'iter_2.pth')
    shutil.copy(osp.join(runs['ref'], 'iter_2.pth'), ckpt)
    if strip_rng:
        from mmrest.utils import atomic_torch_save
        state = load_ckpt(ckpt)
        del state['rng_state']
        atomic_torch_save(state, ckpt)
    with open(osp.join(work_dir, 'last_checkpoint'), 'w') as f:
        f.write(ckpt)
    proc = run(train_cmd(runs['config'], work_dir, '--resume'))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert 'resumed epoch: 0, iter: 2' in out
    return work_dir


@pytest.mark.slow
def test_resume_next_iteration_equals_uninterrupted(runs):
    work_dir = _resume_from_iter2(runs, 'resumed')
    ref = load_ckpt(osp.join(runs['ref'], 'iter_3.pth'))
    res = load_ckpt(osp.join(work_dir, 'iter_3.pth'))
    assert ref['meta']['iter'] == res['meta']['iter'] == 3
    assert_same_tensors(ref['state_dict'], res['state_dict'])
    # optimizer: AdamW moments and step counts of every parameter, and the param groups
    ref_opt, res_opt = ref['optimizer'], res['optimizer']
    assert ref_opt['param_groups'] == res_opt['param_groups']
    assert sorted(ref_opt['state']) == sorted(res_opt['state'])
    for idx in ref_opt['state']:
        assert_same_tensors(ref_opt['state'][idx], res_opt['state'][idx],
                            what=f'optimizer.state[{idx}]')
    assert ref['param_schedulers'] == res['param_schedulers']
    assert ref['rng_state']['world_size'] == res['rng_state']['world_size'] == 1
    ref_rng, res_rng = ref['rng_state']['ranks'][0], res['rng_state']['ranks'][0]
    assert torch.equal(ref_rng['torch'], res_rng['torch'])
    assert ref_rng['python'] == res_rng['python']
    assert all((a == b).all() if hasattr(a, 'shape') else a == b
               for a, b in zip(ref_rng['numpy'], res_rng['numpy']))
    # the logged loss of iteration 3 is the same too
    assert ref['message_hub']['log_scalars']['train/loss'].current() == \
        res['message_hub']['log_scalars']['train/loss'].current()


@pytest.mark.slow
def test_without_rng_state_the_resumed_run_differs(runs):
    """Control: drop path draws from torch's generator; without its saved state the
    resumed iteration is different, so the test above does test the RNG restore."""
    work_dir = _resume_from_iter2(runs, 'no_rng', strip_rng=True)
    ref = load_ckpt(osp.join(runs['ref'], 'iter_3.pth'))['state_dict']
    res = load_ckpt(osp.join(work_dir, 'iter_3.pth'))['state_dict']
    assert any(not torch.equal(ref[k], res[k]) for k in ref)


@pytest.mark.slow
def test_checkpoint_needs_exactly_the_allowlisted_types(runs):
    """torch's default weights-only load refuses mmengine's checkpoint; the allowlist
    covers exactly the globals it names."""
    ckpt = osp.join(runs['ref'], 'iter_3.pth')
    code = f'import torch; torch.load({ckpt!r})'
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and 'Weights only load failed' in proc.stderr
    names = _pickle_globals(ckpt) - _TORCH_GLOBALS
    assert names == MMENGINE_CKPT_GLOBALS

    from mmrest.utils import mmengine_safe_globals
    registered = set()
    for entry in mmengine_safe_globals():
        if isinstance(entry, tuple):
            registered.add(entry[1])
        else:
            registered.add(f'{entry.__module__}.{entry.__qualname__}')
    assert names <= registered
    state = load_ckpt(ckpt)  # safe loading with the allowlist
    assert state['meta']['iter'] == 3 and 'optimizer' in state


@pytest.mark.slow
def test_checkpoint_carries_dataset_meta(runs):
    """mmengine's Runner writes the training set's metainfo into ``meta.dataset_meta``
    (mmseg's init_model and mmdet's inferencers read the class names from there)."""
    from mmrest.testing import DEMO_CLASSES
    meta = load_ckpt(osp.join(runs['ref'], 'iter_3.pth'))['meta']
    assert tuple(meta['dataset_meta']['classes']) == tuple(DEMO_CLASSES)
    assert len(meta['dataset_meta']['palette']) == len(DEMO_CLASSES)


@pytest.mark.slow
def test_work_dir_keeps_previous_checkpoint(runs):
    """max_keep_ckpts=1 is raised to 2 and last_checkpoint names the newest."""
    files = sorted(f for f in os.listdir(runs['ref']) if f.endswith('.pth'))
    assert files == ['iter_2.pth', 'iter_3.pth']
    assert read_last_checkpoint(runs['ref']).endswith('iter_3.pth')
    assert not [f for f in os.listdir(runs['ref']) if f.endswith('.tmp')]


# --- segmentation (iteration-based) and classification (epoch-based) -------------------

def _train_resume_compare(root, config: str, first: str, last: str, metric: str,
                          classes: tuple) -> None:
    """Uninterrupted run vs. a run resumed from its first checkpoint; then test.py."""
    ref = str(root / 'ref')
    proc = run(train_cmd(config, ref))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert _pickle_globals(osp.join(ref, last)) - _TORCH_GLOBALS == MMENGINE_CKPT_GLOBALS
    meta = load_ckpt(osp.join(ref, last))['meta']
    assert tuple(meta['dataset_meta']['classes']) == classes
    work_dir = str(root / 'resumed')
    os.makedirs(work_dir)
    shutil.copy(osp.join(ref, first), work_dir)
    with open(osp.join(work_dir, 'last_checkpoint'), 'w') as f:
        f.write(osp.join(work_dir, first))
    proc = run(train_cmd(config, work_dir, '--resume'))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    a, b = load_ckpt(osp.join(ref, last)), load_ckpt(osp.join(work_dir, last))
    assert a['meta']['iter'] == b['meta']['iter']
    assert_same_tensors(a['state_dict'], b['state_dict'])
    for idx in a['optimizer']['state']:
        assert_same_tensors(a['optimizer']['state'][idx], b['optimizer']['state'][idx],
                            what=f'optimizer.state[{idx}]')
    proc = run([PYTHON, TEST, config, osp.join(work_dir, last), '--work-dir',
                str(root / 'test')])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    with open(root / 'test' / 'test_metrics.json') as f:
        assert metric in json.load(f)['metrics']


@pytest.mark.slow
def test_segmentation_resume_and_test(tmp_path):
    data = make_shapes_data(str(tmp_path / 'data'), num_train=8, num_val=4)
    config = write_config(str(tmp_path / 'seg.py'), seg_config_text(data, max_iters=2,
                                                                     ckpt_interval=1))
    from mmrest.testing import DEMO_CLASSES
    _train_resume_compare(tmp_path, config, 'iter_1.pth', 'iter_2.pth', 'mIoU',
                          ('background', ) + tuple(DEMO_CLASSES))
    # mmseg's own API reads the checkpoint's meta (here: in this process, where the
    # imported mmrest has allowed mmengine's types)
    from mmseg.apis import init_model
    model = init_model(config, str(tmp_path / 'ref' / 'iter_2.pth'), device='cpu')
    assert tuple(model.dataset_meta['classes']) == ('background', ) + tuple(DEMO_CLASSES)


@pytest.mark.slow
def test_classification_epoch_resume_and_test(tmp_path):
    """Epoch-based, with Mixup/CutMix drawing from numpy and torch inside the model."""
    data = make_shapes_data(str(tmp_path / 'data'), num_train=4, num_val=4)
    write_cls_annotations(data)
    config = write_config(str(tmp_path / 'cls.py'), cls_config_text(data, max_epochs=2))
    from mmrest.testing import DEMO_CLASSES
    _train_resume_compare(tmp_path, config, 'epoch_1.pth', 'epoch_2.pth', 'accuracy/top1',
                          tuple(DEMO_CLASSES))


# --- choosing the checkpoint to resume from (no training) ------------------------------

def _fake_ckpt(path: str, it: int) -> str:
    from mmrest.utils import atomic_torch_save
    atomic_torch_save(dict(meta=dict(iter=it, epoch=0),
                           state_dict={'w': torch.full((64, 64), float(it))}), path)
    return path


def _truncate(path: str) -> None:
    size = os.path.getsize(path)
    with open(path, 'r+b') as f:
        f.truncate(size // 2)


def _flip_byte(path: str) -> None:
    size = os.path.getsize(path)
    with open(path, 'r+b') as f:
        f.seek(size // 2)
        byte = f.read(1)
        f.seek(size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.fixture
def work_dir(tmp_path):
    for it in (2, 4, 6):
        _fake_ckpt(str(tmp_path / f'iter_{it}.pth'), it)
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'iter_6.pth'))
    return tmp_path


def test_latest_good_checkpoint_is_used(work_dir):
    from mmrest.engine import find_resume_checkpoint
    logs = []
    assert find_resume_checkpoint(str(work_dir), log=logs.append) == \
        str(work_dir / 'iter_6.pth')
    assert logs == []


@pytest.mark.parametrize('damage', [_truncate, _flip_byte, lambda p: open(p, 'w').close()],
                         ids=['truncated', 'flipped-byte', 'empty'])
def test_damaged_latest_falls_back_with_message(work_dir, damage):
    from mmrest.engine import find_resume_checkpoint
    bad = str(work_dir / 'iter_6.pth')
    damage(bad)
    logs = []
    assert find_resume_checkpoint(str(work_dir), log=logs.append) == \
        str(work_dir / 'iter_4.pth')
    assert logs[0].startswith(f'cannot resume from {bad}:')
    assert 'falling back to the previous good checkpoint' in logs[-1]


def test_newer_stale_files_are_not_fallbacks(work_dir):
    """Files newer than last_checkpoint's (e.g. of an older run) are never picked."""
    from mmrest.engine import find_resume_checkpoint
    (work_dir / 'last_checkpoint').write_text(str(work_dir / 'iter_4.pth'))
    _truncate(str(work_dir / 'iter_4.pth'))
    assert find_resume_checkpoint(str(work_dir)) == str(work_dir / 'iter_2.pth')


def test_missing_latest_falls_back(work_dir):
    from mmrest.engine import find_resume_checkpoint
    os.remove(work_dir / 'iter_6.pth')
    logs = []
    assert find_resume_checkpoint(str(work_dir), log=logs.append) == \
        str(work_dir / 'iter_4.pth')
    assert 'does not exist' in logs[0]


def test_moved_work_dir_resumes_from_its_newest(work_dir):
    """``last_checkpoint`` holds the absolute path of the folder the run was in; after the
    work dir moved, the file of that name in the work dir is the newest one."""
    from mmrest.engine import find_resume_checkpoint
    (work_dir / 'last_checkpoint').write_text('/scratch/gone/run/iter_6.pth')
    logs = []
    assert find_resume_checkpoint(str(work_dir), log=logs.append) == \
        str(work_dir / 'iter_6.pth')
    assert logs == []


def test_all_damaged_stops_with_list(work_dir):
    from mmrest.engine import find_resume_checkpoint
    from mmrest.utils import CheckpointError
    for it in (2, 4, 6):
        _truncate(str(work_dir / f'iter_{it}.pth'))
    with pytest.raises(CheckpointError, match='no usable checkpoint') as info:
        find_resume_checkpoint(str(work_dir))
    for it in (2, 4, 6):
        assert str(work_dir / f'iter_{it}.pth') in str(info.value)


def test_empty_work_dir_means_fresh_start(tmp_path):
    from mmrest.engine import find_resume_checkpoint
    assert find_resume_checkpoint(str(tmp_path)) is None


def test_explicit_damaged_path_names_previous_good(work_dir):
    from mmrest.engine import check_resume_path
    from mmrest.utils import CheckpointError
    bad = str(work_dir / 'iter_6.pth')
    _flip_byte(bad)
    with pytest.raises(CheckpointError) as info:
        check_resume_path(bad)
    msg = str(info.value)
    assert msg.startswith(f'--resume {bad}:') and 'CRC-32' in msg
    assert f'--resume {work_dir / "iter_4.pth"}' in msg


def test_candidates_after_a_non_periodic_latest(work_dir):
    """A ``last_checkpoint`` that names no periodic file (a best checkpoint) is tried
    first, then every periodic checkpoint, newest first, each once."""
    from mmrest.engine import checkpoint_candidates
    best = work_dir / 'best_coco_bbox_mAP_iter_5.pth'
    _fake_ckpt(str(best), 5)
    (work_dir / 'last_checkpoint').write_text(str(best))
    assert checkpoint_candidates(str(work_dir)) == [
        str(best)] + [str(work_dir / f'iter_{it}.pth') for it in (6, 4, 2)]
    (work_dir / 'last_checkpoint').unlink()
    assert checkpoint_candidates(str(work_dir), ('ckpt_{}.pth', )) == []
    assert checkpoint_candidates(str(work_dir)) == [
        str(work_dir / f'iter_{it}.pth') for it in (6, 4, 2)]


def test_explicit_damaged_non_periodic_path_names_newest_good(work_dir):
    from mmrest.engine import check_resume_path
    from mmrest.utils import CheckpointError
    bad = str(work_dir / 'best.pth')
    _fake_ckpt(bad, 7)
    _truncate(bad)
    _truncate(str(work_dir / 'iter_6.pth'))
    with pytest.raises(CheckpointError) as info:
        check_resume_path(bad)
    assert str(info.value).endswith(f'--resume {work_dir / "iter_4.pth"}')


def test_not_a_training_checkpoint(tmp_path):
    from mmrest.engine import inspect_checkpoint
    from mmrest.utils import CheckpointError
    path = str(tmp_path / 'weights.pth')
    torch.save({'w': torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match='not an mmengine training checkpoint'):
        inspect_checkpoint(path)
    assert inspect_checkpoint(path, for_resume=False) == {}
