"""A checkpoint whose loading would run code is refused by every mmrest entry point.

The payload writes a marker file when unpickled. The control test shows that it really
does so under plain pickle; every entry point (tools/train.py --resume PATH, load_from,
tools/test.py, the backbone's init_cfg, mmengine's load_checkpoint after
setup_safe_loading) must refuse it with a message naming the file, and the marker must
never appear.
"""
import collections
import os
import os.path as osp
import pickle
import subprocess
import sys

import pytest
import torch

from _engine_helpers import (PYTHON, TEST, demo_config_text, make_shapes_data, run,
                             train_cmd, write_config)


class _WritesMarker:
    """Unpickling this calls ``exec`` with code that creates a file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f'open({self.marker!r}, "w").write("pwned")', ))


def _malicious_checkpoint(path: str, marker: str) -> str:
    """A checkpoint that looks like an mmengine one, with the payload in ``meta``."""
    torch.save(
        dict(meta=dict(iter=3, epoch=0, payload=_WritesMarker(marker)),
             state_dict={'backbone.patch_embed_1.proj.weight': torch.zeros(2)}), path)
    return path


class _GetattrEscape:
    """Uses the (restricted) ``builtins.getattr`` stand-in on a non-HistoryBuffer object."""

    def __reduce__(self):
        return (getattr, (collections.OrderedDict, '__class__'))


@pytest.fixture(scope='module')
def demo_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp('safety')
    data = make_shapes_data(str(root / 'data'), num_train=4, num_val=4)
    config = write_config(str(root / 'cfg.py'), demo_config_text(data, max_iters=2))
    marker = str(root / 'MARKER')
    evil = _malicious_checkpoint(str(root / 'iter_3.pth'), marker)
    return dict(root=root, config=config, marker=marker, evil=evil)


def test_payload_is_real_under_plain_pickle(tmp_path):
    """Control: without safe loading the payload runs (in a child process)."""
    marker = str(tmp_path / 'CONTROL')
    blob = str(tmp_path / 'blob.pkl')
    with open(blob, 'wb') as f:
        pickle.dump(_WritesMarker(marker), f)
    code = f'import pickle; pickle.load(open({blob!r}, "rb"))'
    subprocess.run([sys.executable, '-c', code], check=True, timeout=60)
    assert osp.isfile(marker)


def _assert_refused(proc: subprocess.CompletedProcess, evil: str, marker: str) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert f'refusing to load {evil}' in out, out[-3000:]
    assert 'could run code' in out
    assert 'exec' in out  # the refused global is named
    assert not osp.exists(marker)


def test_train_resume_path_refuses(demo_setup):
    s = demo_setup
    proc = run(train_cmd(s['config'], str(s['root'] / 'w_resume'), '--resume', s['evil']))
    _assert_refused(proc, s['evil'], s['marker'])
    assert 'train.py: error: UnsafeCheckpointError' in proc.stderr


def test_train_load_from_refuses(demo_setup):
    s = demo_setup
    proc = run(train_cmd(s['config'], str(s['root'] / 'w_load'), '--cfg-options',
                         f'load_from={s["evil"]}'))
    _assert_refused(proc, s['evil'], s['marker'])


def test_train_auto_resume_refuses_and_does_not_fall_back(demo_setup, tmp_path):
    """A tampered newest checkpoint stops auto-resume (no fallback, no fresh start)."""
    s = demo_setup
    work_dir = tmp_path / 'w_auto'
    work_dir.mkdir()
    evil = _malicious_checkpoint(str(work_dir / 'iter_3.pth'), s['marker'])
    (work_dir / 'last_checkpoint').write_text(evil)
    proc = run(train_cmd(s['config'], str(work_dir), '--resume'))
    _assert_refused(proc, evil, s['marker'])
    assert not (work_dir / 'iter_2.pth').exists()  # did not train from scratch


def test_test_tool_refuses(demo_setup):
    s = demo_setup
    proc = run([PYTHON, TEST, s['config'], s['evil'], '--work-dir',
                str(s['root'] / 'w_test')])
    _assert_refused(proc, s['evil'], s['marker'])
    assert 'test.py: error: UnsafeCheckpointError' in proc.stderr


def test_backbone_init_cfg_refuses(demo_setup):
    from mmrest.models import ResT
    from mmrest.utils import CheckpointError
    s = demo_setup
    model = ResT(arch='lite', init_cfg=dict(type='Pretrained', checkpoint=s['evil']))
    with pytest.raises(CheckpointError, match='refusing to load') as info:
        model.init_weights()
    assert s['evil'] in str(info.value)
    assert not osp.exists(s['marker'])


def test_mmengine_load_checkpoint_refuses_after_setup(demo_setup):
    """Users' own runners: mmengine's loader goes through safe loading."""
    from mmengine.runner.checkpoint import load_checkpoint

    from mmrest.engine import setup_safe_loading
    from mmrest.utils import UnsafeCheckpointError
    setup_safe_loading()
    s = demo_setup
    with pytest.raises(UnsafeCheckpointError, match='refusing to load') as info:
        load_checkpoint(torch.nn.Linear(2, 2), s['evil'])
    assert s['evil'] in str(info.value)
    assert not osp.exists(s['marker'])


def test_restricted_getattr_refuses_other_objects(tmp_path):
    """``builtins.getattr`` is allowed only for HistoryBuffer's statistics methods."""
    from mmrest.engine import setup_safe_loading
    from mmrest.utils import UnsafeCheckpointError, safe_load_checkpoint
    setup_safe_loading()
    path = str(tmp_path / 'getattr.pth')
    torch.save({'x': _GetattrEscape()}, path)
    with pytest.raises(UnsafeCheckpointError, match='refusing getattr'):
        safe_load_checkpoint(path)


def test_allowed_types_still_load(tmp_path):
    """The allowlist covers what mmengine writes: HistoryBuffer, numpy arrays/scalars."""
    import numpy as np
    from mmengine.logging import HistoryBuffer

    from mmrest.engine import setup_safe_loading
    from mmrest.utils import safe_load_checkpoint
    setup_safe_loading()
    buf = HistoryBuffer()
    buf.update(1.5)
    buf.update(2.5)
    obj = dict(buf=buf, arr=np.arange(3, dtype=np.int64), f=np.float64(0.25),
               u=np.array([7], dtype=np.uint32), flag=np.bool_(True))
    path = str(tmp_path / 'ok.pth')
    torch.save(obj, path)
    loaded = safe_load_checkpoint(path)
    assert loaded['buf'].mean() == 2.0 and loaded['buf'].current() == 2.5
    assert loaded['arr'].tolist() == [0, 1, 2] and loaded['f'] == 0.25
    assert loaded['u'].dtype == np.uint32 and bool(loaded['flag'])
    assert os.path.getsize(path) > 0
