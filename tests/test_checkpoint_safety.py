"""Checkpoints load safely and are written atomically.

A checkpoint that would run code when unpickled (the control test shows it does) is refused
by every entry point (train --resume, load_from, tools/test.py, init_cfg, mmengine's APIs in
a fresh process with only ``custom_imports=dict(imports=['mmrest'])``); non-checkpoints and
damaged files get another message. With that ``custom_imports`` alone, mmengine's
``load_checkpoint``, ``Runner.resume`` and ``load_from`` read tools/train.py's checkpoints.
"""
import collections
import errno
import functools
import http.server
import json
import os
import os.path as osp
import pickle
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

from _engine_helpers import (PYTHON, TEST, demo_config_text, make_shapes_data, run,
                             tool_env, train_cmd, write_config)
from _tools import WritesMarker, load_script

from mmrest.utils import torch_allowlist_usable

pytestmark = pytest.mark.stack


def _malicious_checkpoint(path: str, marker: str) -> str:
    """A checkpoint that looks like an mmengine one, with the payload in ``meta``."""
    torch.save(
        dict(meta=dict(iter=3, epoch=0, payload=WritesMarker(marker)),
             state_dict={'backbone.patch_embed_1.proj.weight': torch.zeros(2)}), path)
    return path


class _GetattrEscape:
    """Uses the (restricted) ``builtins.getattr`` stand-in on a non-HistoryBuffer object."""

    def __reduce__(self):
        return (getattr, (collections.OrderedDict, '__class__'))


@pytest.fixture
def torch_allowlist():
    """Give torch's weights-only allowlist back as it was, whatever the test did to it."""
    saved = torch.serialization.get_safe_globals()
    yield
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals(saved)


@pytest.fixture(scope='module')
def demo_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp('safety')
    data = make_shapes_data(str(root / 'data'), num_train=4, num_val=4)
    config = write_config(str(root / 'cfg.py'), demo_config_text(data, max_iters=2))
    marker = str(root / 'MARKER')
    evil = _malicious_checkpoint(str(root / 'iter_3.pth'), marker)
    return dict(root=root, data=data, config=config, marker=marker, evil=evil)


def test_payload_is_real_under_plain_pickle(tmp_path):
    """Control: without safe loading the payload runs (in a child process)."""
    marker = str(tmp_path / 'CONTROL')
    blob = str(tmp_path / 'blob.pkl')
    with open(blob, 'wb') as f:
        pickle.dump(WritesMarker(marker), f)
    code = f'import pickle; pickle.load(open({blob!r}, "rb"))'
    subprocess.run([sys.executable, '-c', code], check=True, timeout=60)
    assert osp.isfile(marker)


# --- the tools -------------------------------------------------------------------------

def _assert_refused(proc: subprocess.CompletedProcess, evil: str, marker: str) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert f'refusing to load {evil}' in out, out[-3000:]
    assert 'could run code (Unsupported global: GLOBAL exec' in out  # names the global
    assert not osp.exists(marker)


@pytest.mark.ops
@pytest.mark.slow
@pytest.mark.parametrize('tool', ['resume', 'load_from', 'test'])
def test_tools_refuse(demo_setup, tool):
    """train.py --resume PATH, train.py with load_from, test.py."""
    s = demo_setup
    work_dir = str(s['root'] / f'w_{tool}')
    proc = run({'resume': train_cmd(s['config'], work_dir, '--resume', s['evil']),
                'load_from': train_cmd(s['config'], work_dir, '--cfg-options',
                                       f'load_from={s["evil"]}'),
                'test': [PYTHON, TEST, s['config'], s['evil'], '--work-dir', work_dir]}[tool])
    _assert_refused(proc, s['evil'], s['marker'])
    if tool != 'load_from':
        script = 'test.py' if tool == 'test' else 'train.py'
        assert f'{script}: error: UnsafeCheckpointError' in proc.stderr


@pytest.mark.ops
@pytest.mark.slow
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


@pytest.mark.ops
def test_backbone_init_cfg_refuses(demo_setup):
    from mmrest.models import ResT
    from mmrest.utils import CheckpointError
    s = demo_setup
    model = ResT(arch='lite', init_cfg=dict(type='Pretrained', checkpoint=s['evil']))
    with pytest.raises(CheckpointError, match='refusing to load') as info:
        model.init_weights()
    assert s['evil'] in str(info.value)
    assert not osp.exists(s['marker'])


# --- mmengine's own APIs in a fresh process, with custom_imports only ------------------

# Builds the config's model and a Runner the way a user's script would, with nothing but
# the config's custom_imports; prints what each API did as JSON.
OPENMMLAB_APIS = textwrap.dedent('''
    import copy, json, sys
    report = dict(mmrest_before_config='mmrest' in sys.modules)
    import torch
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope
    from mmengine.runner import Runner, load_checkpoint
    from mmengine.runner.checkpoint import CheckpointLoader, load_from_local
    config, ckpt, work_dir = sys.argv[1:4]
    cfg = Config.fromfile(config)
    report['mmrest_after_config'] = 'mmrest' in sys.modules
    report['local_loader_is_mmengines'] = CheckpointLoader._get_checkpoint_loader(
        ckpt) is load_from_local
    init_default_scope(cfg.default_scope)

    def attempt(name, call):
        try:
            report[name] = call()
        except Exception as err:
            report[name] = f'{type(err).__name__}: {err}'

    def mmengine_load_checkpoint():
        checkpoint = load_checkpoint(MODELS.build(cfg.model), ckpt, map_location='cpu')
        return dict(iter=checkpoint['meta']['iter'],
                    classes=list(checkpoint['meta']['dataset_meta']['classes']))

    def runner(resume):
        run_cfg = copy.deepcopy(cfg)
        run_cfg.work_dir = f'{work_dir}/{"resume" if resume else "load_from"}'
        run_cfg.experiment_name = 'resume' if resume else 'load_from'
        run_cfg.load_from, run_cfg.resume = ckpt, resume
        built = Runner.from_cfg(run_cfg)
        built.load_or_resume()
        return dict(iter=built.iter)

    attempt('load_checkpoint', mmengine_load_checkpoint)
    attempt('runner_resume', lambda: runner(True))
    attempt('runner_load_from', lambda: runner(False))
    print('REPORT ' + json.dumps(report))
''')


def _openmmlab_apis(config_text: str, ckpt: str, tmp_path) -> dict:
    config = write_config(str(tmp_path / 'user_cfg.py'), config_text +
                          "custom_imports = dict(imports=['mmrest'], "
                          "allow_failed_imports=False)\n")
    proc = subprocess.run([PYTHON, '-c', OPENMMLAB_APIS, config, ckpt, str(tmp_path / 'w')],
                          capture_output=True, text=True, timeout=600, env=tool_env())
    lines = [line for line in proc.stdout.splitlines() if line.startswith('REPORT ')]
    assert proc.returncode == 0 and lines, (proc.stdout + proc.stderr)[-4000:]
    report = json.loads(lines[-1][len('REPORT '):])
    assert report['mmrest_before_config'] is False and report['mmrest_after_config'] is True
    # mmrest registers its safe loader of local files with mmengine
    assert report['local_loader_is_mmengines'] is False
    return report


@pytest.mark.slow
class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # no request lines in the test output
        pass


@pytest.fixture
def web(tmp_path, monkeypatch):
    """A folder served over HTTP on 127.0.0.1 (no network), and torch hub's folder in
    tmp_path."""
    root = tmp_path / 'www'
    root.mkdir()
    server = http.server.ThreadingHTTPServer(
        ('127.0.0.1', 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    yield root, f'http://127.0.0.1:{server.server_address[1]}'
    server.shutdown()
    server.server_close()


@pytest.mark.ops
def test_checkpoints_at_http_addresses_are_downloaded_then_read_safely(demo_setup, web):
    """mmengine reads http(s) checkpoints with torch.hub (weights_only=False); the tools
    and the backbone download them and read the file like a local one."""
    from mmrest.models import ResT
    from mmrest.utils import (CheckpointError, UnsafeCheckpointError, atomic_torch_save,
                              fetch_checkpoint)
    s = demo_setup
    root, url = web
    marker = str(root / 'MARKER')
    _malicious_checkpoint(str(root / 'evil.pth'), marker)
    atomic_torch_save(dict(meta=dict(), state_dict={}), str(root / 'good.pth'))
    hub = osp.join(os.environ['TORCH_HOME'], 'hub', 'checkpoints')

    local = fetch_checkpoint(f'{url}/evil.pth')
    assert local == osp.join(hub, 'evil.pth') and osp.isfile(local)
    train_tool, test_tool = load_script('tools/train.py'), load_script('tools/test.py')
    with pytest.raises(UnsafeCheckpointError, match='could run code'):
        train_tool.build_config(train_tool.parse_args(
            [s['config'], '--cfg-options', f'load_from={url}/evil.pth']))
    with pytest.raises(UnsafeCheckpointError, match='could run code'):
        test_tool.build_config(test_tool.parse_args([s['config'], f'{url}/evil.pth']))
    with pytest.raises(CheckpointError, match='refusing to load'):
        ResT('lite', init_cfg=dict(type='Pretrained', checkpoint=f'{url}/evil.pth')
             ).init_weights()
    assert not osp.exists(marker)

    cfg = test_tool.build_config(test_tool.parse_args([s['config'], f'{url}/good.pth']))
    assert cfg.load_from == osp.join(hub, 'good.pth')
    with pytest.raises(CheckpointError, match='download failed'):
        fetch_checkpoint(f'{url}/missing.pth')
    with pytest.raises(CheckpointError, match=r'open-mmlab:// checkpoints with torch.hub'):
        fetch_checkpoint('open-mmlab://resnet50_v1c')
    assert fetch_checkpoint('s3://bucket/x.pth') == 's3://bucket/x.pth'  # torch.load's default


@pytest.mark.ops
def test_mmengine_apis_refuse_code_with_custom_imports_alone(demo_setup, tmp_path):
    s = demo_setup
    with open(s['config']) as f:
        config_text = f.read()
    report = _openmmlab_apis(config_text, s['evil'], tmp_path)
    for api in ('load_checkpoint', 'runner_resume', 'runner_load_from'):
        message = report[api]
        # mmrest's loader, which setup_safe_loading registers with mmengine
        assert isinstance(message, str) and message.startswith('UnsafeCheckpointError'), (
            api, message)
        assert 'Unsupported global: GLOBAL exec ' in message, (api, message)
    assert not osp.exists(s['marker'])


@pytest.fixture(scope='module')
def tool_checkpoint(demo_setup):
    """A checkpoint written by tools/train.py (one iteration of the demo config)."""
    s = demo_setup
    text = demo_config_text(s['data'], max_iters=1, ckpt_interval=1, with_val=False)
    config = write_config(str(s['root'] / 'one_iter.py'), text)
    work_dir = str(s['root'] / 'w_tool')
    proc = run(train_cmd(config, work_dir))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return text, osp.join(work_dir, 'iter_1.pth')


@pytest.mark.ops
@pytest.mark.slow
def test_mmengine_apis_read_our_checkpoints_with_custom_imports_alone(tool_checkpoint,
                                                                     tmp_path):
    from mmrest.testing import DEMO_CLASSES
    text, ckpt = tool_checkpoint
    report = _openmmlab_apis(text, ckpt, tmp_path)
    assert report['load_checkpoint'] == dict(iter=1, classes=list(DEMO_CLASSES))
    assert report['runner_resume'] == dict(iter=1)
    assert report['runner_load_from'] == dict(iter=0)


# --- safe_load_checkpoint: what is refused, and with which message ---------------------

@pytest.mark.ops
def test_mmengine_load_checkpoint_refuses_in_this_process(demo_setup):
    """The test process imported mmrest: mmengine's loader refuses code the same way."""
    from mmengine.runner.checkpoint import load_checkpoint
    s = demo_setup
    from mmrest.utils import UnsafeCheckpointError
    with pytest.raises(UnsafeCheckpointError, match='Unsupported global: GLOBAL exec '):
        load_checkpoint(torch.nn.Linear(2, 2), s['evil'])
    assert not osp.exists(s['marker'])


def test_restricted_getattr_refuses_other_objects(tmp_path):
    """``builtins.getattr`` is allowed only for HistoryBuffer's statistics methods."""
    from mmrest.utils import UnsafeCheckpointError, safe_load_checkpoint
    path = str(tmp_path / 'getattr.pth')
    torch.save({'x': _GetattrEscape()}, path)
    with pytest.raises(UnsafeCheckpointError, match='refusing getattr'):
        safe_load_checkpoint(path)


def _zip_of_text(path: str) -> str:
    import zipfile
    with zipfile.ZipFile(path, 'w') as archive:
        archive.writestr('notes.txt', 'not a checkpoint')
    return path


@pytest.mark.parametrize('content', [
    b'garbage',  # 7 bytes of text
    b'\x80\x02garbage',  # a pickle header, then something torch never writes
    b'',
    'zip',
], ids=['text', 'bad-pickle', 'empty', 'foreign-zip'])
def test_foreign_or_corrupt_files_are_told_apart_from_unsafe_ones(tmp_path, content):
    from mmrest.utils import (CheckpointError, UnsafeCheckpointError, safe_load_checkpoint,
                              verify_checkpoint_file)
    path = str(tmp_path / 'file.pth')
    if content == 'zip':
        _zip_of_text(path)
    else:
        with open(path, 'wb') as f:
            f.write(content)
    with pytest.raises(CheckpointError) as info:
        safe_load_checkpoint(path)
    assert not isinstance(info.value, UnsafeCheckpointError)
    message = str(info.value)
    assert message.startswith(f'cannot read checkpoint {path}: it is not a torch '
                              'checkpoint, or it is truncated or corrupted'), message
    assert 'could run code' not in message
    if content != b'\x80\x02garbage':  # the header looks right: only unpickling tells
        with pytest.raises(CheckpointError):
            verify_checkpoint_file(path)


@pytest.mark.ops
def test_unsafe_file_message_names_the_global(demo_setup):
    from mmrest.utils import UnsafeCheckpointError, safe_load_checkpoint
    s = demo_setup
    with pytest.raises(UnsafeCheckpointError) as info:
        safe_load_checkpoint(s['evil'])
    message = str(info.value)
    assert message.startswith(f'refusing to load {s["evil"]}: it contains objects other '
                              'than tensors and plain containers, and loading it could run '
                              'code (Unsupported global: GLOBAL exec ')
    assert 'not a torch checkpoint' not in message
    assert not osp.exists(s['marker'])


def _history_buffer_file(path: str) -> str:
    import numpy as np
    from mmengine.logging import HistoryBuffer
    buf = HistoryBuffer()
    buf.update(1.5)
    buf.update(2.5)
    obj = dict(buf=buf, arr=np.arange(3, dtype=np.int64), f=np.float64(0.25),
               u=np.array([7], dtype=np.uint32), flag=np.bool_(True))
    torch.save(obj, path)
    return path


def test_allowed_types_still_load(tmp_path):
    """The allowlist covers what mmengine writes: HistoryBuffer, numpy arrays/scalars."""
    import numpy as np

    from mmrest.utils import safe_load_checkpoint
    loaded = safe_load_checkpoint(_history_buffer_file(str(tmp_path / 'ok.pth')))
    assert loaded['buf'].mean() == 2.0 and loaded['buf'].current() == 2.5
    assert loaded['arr'].tolist() == [0, 1, 2] and loaded['f'] == 0.25
    assert loaded['u'].dtype == np.uint32 and bool(loaded['flag'])


@pytest.mark.skipif(not torch_allowlist_usable(),
                    reason='torch < 2.6: safe loading uses mmrest.utils.RestrictedUnpickler '
                    '(tests/test_stack.py), not the allowlist of torch')
def test_setup_safe_loading_adds_exactly_the_allowlist(tmp_path, torch_allowlist):
    """What ``import mmrest`` adds to torch, and that it is needed: without it torch's
    weights-only load refuses the same file (``safe_load_checkpoint`` adds it again
    before each load)."""
    from mmrest.utils import mmengine_safe_globals, safe_load_checkpoint, setup_safe_loading
    path = _history_buffer_file(str(tmp_path / 'hb.pth'))
    torch.serialization.clear_safe_globals()
    with pytest.raises(pickle.UnpicklingError, match='HistoryBuffer'):
        torch.load(path, weights_only=True)
    setup_safe_loading()
    setup_safe_loading()  # idempotent
    added = torch.serialization.get_safe_globals()
    assert len(added) == len(mmengine_safe_globals())
    assert set(map(repr, added)) == set(map(repr, mmengine_safe_globals()))
    assert safe_load_checkpoint(path)['buf'].mean() == 2.0


# --- atomic writing through mmengine's file backends -----------------------------------

def test_atomic_backend_is_selected_by_backend_args(tmp_path):
    from mmengine.fileio import get_file_backend

    from mmrest.engine import ATOMIC_BACKEND
    from mmrest.utils import AtomicLocalBackend
    backend = get_file_backend(str(tmp_path), backend_args=dict(backend=ATOMIC_BACKEND))
    assert isinstance(backend, AtomicLocalBackend)
    path = str(tmp_path / 'sub' / 'f.pth')
    backend.put(b'first', path)
    backend.put(b'second', path)
    backend.put_text('text', str(tmp_path / 'last_checkpoint'))
    assert open(path, 'rb').read() == b'second'
    assert sorted(os.listdir(tmp_path)) == ['last_checkpoint', 'sub']
    assert os.listdir(tmp_path / 'sub') == ['f.pth']


def test_atomic_backend_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    from mmengine.fileio.backends import LocalBackend

    from mmrest.utils import AtomicLocalBackend
    path = str(tmp_path / 'f.pth')
    backend = AtomicLocalBackend()
    backend.put(b'previous', path)

    def disk_full(self, obj, filepath):
        with open(filepath, 'wb') as f:
            f.write(obj[:len(obj) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filepath))

    monkeypatch.setattr(LocalBackend, 'put', disk_full)
    with pytest.raises(OSError, match='No space left'):
        backend.put(b'new content', path)
    assert open(path, 'rb').read() == b'previous'
    assert os.listdir(tmp_path) == ['f.pth']
