"""mmrest in the environment a user already has: the stack check at import, plain
``pip install .`` leaving the stack alone, renamed toolbox distributions, the restricted
unpickler of older torch, and one-line refusals of what needs a newer torch."""
import io
import json
import os
import os.path as osp
import pickle
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch
from mmengine.logging.history_buffer import HistoryBuffer

from mmrest.stack_check import (REQUIREMENTS, check_stack, resolve_renamed_toolboxes,
                                stack_problem)
from mmrest.utils import (RestrictedUnpickler, UnsafeCheckpointError, restricted_torch_load,
                          safe_load_checkpoint, torch_allowlist_usable)
from mmrest.utils.checkpoint import RefusedGlobalError
from mmrest.utils.torch_compat import (autocast_dtype, autocast_off, is_recording_graph,
                                       require_torch)

pytestmark = pytest.mark.stack

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
# what `pip install .` must leave as it is
STACK_PREFIXES = ('torch', 'numpy', 'mmcv', 'mmengine', 'mmdet', 'mmsegmentation',
                  'mmpretrain', 'onedl')


def test_stack_problems_name_what_was_found_and_what_is_needed():
    assert stack_problem('torch', '2.1.2+cu121') is None
    assert stack_problem('torch', '2.14.1') is None
    assert stack_problem('mmcv', '2.3.6') is None
    assert stack_problem('mmengine', '0.10.12') is None
    assert stack_problem('torch', '2.0.1') == (
        f'mmrest needs torch>=2.1.0,<3.0.0, found torch 2.0.1 ({REQUIREMENTS["torch"][2]})')
    assert stack_problem('mmcv', '2.0.0rc4').startswith(
        'mmrest needs mmcv>=2.1.0,<2.4.0, found mmcv 2.0.0rc4')
    assert stack_problem('mmengine', None).startswith(
        'mmrest needs mmengine>=0.10.4,<1.0.0, which is not installed')
    check_stack()  # this environment is supported


@pytest.mark.parametrize('module, version, expected', [
    ('torch', '2.0.1', 'mmrest needs torch>=2.1.0,<3.0.0, found torch 2.0.1'),
    ('mmcv', '1.7.2', 'mmrest needs mmcv>=2.1.0,<2.4.0, found mmcv 1.7.2'),
])
def test_import_refuses_an_unsupported_stack_in_one_line(tmp_path, module, version, expected):
    """A stand-in package of the old version shadows the real one: ``import mmrest``
    ends in one line naming it, before anything of mmrest needs the real one."""
    fake = tmp_path / module
    fake.mkdir()
    (fake / '__init__.py').write_text(f'__version__ = {version!r}\n')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), REPO]))
    proc = subprocess.run([sys.executable, '-c', 'import mmrest'], cwd=str(tmp_path),
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f'ImportError: {expected} ('), proc.stderr


def _installed() -> dict:
    out = subprocess.run([sys.executable, '-m', 'pip', 'list', '--format=json'],
                         capture_output=True, text=True, check=True, timeout=300).stdout
    return {p['name'].lower(): p['version'] for p in json.loads(out)}


def _mmrest_install_state():
    """How mmrest is installed now: None, or the location pip shows (with 'editable')."""
    proc = subprocess.run([sys.executable, '-m', 'pip', 'show', 'mmrest'],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        return None
    return 'editable' if 'Editable project location' in proc.stdout else 'regular'


def test_pip_install_leaves_the_stack_unchanged():
    """``pip install .`` (build isolation, dependency resolution, as a user runs it) into
    this environment installs mmrest and nothing else: no stack package changes."""
    state = _mmrest_install_state()
    before = _installed()
    try:
        proc = subprocess.run([sys.executable, '-m', 'pip', 'install', '.'], cwd=REPO,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        after = _installed()
    finally:  # leave mmrest installed as it was
        if state == 'editable':
            subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-deps',
                            '--no-build-isolation', '-e', '.'], cwd=REPO, check=True,
                           timeout=900)
        elif state is None:
            subprocess.run([sys.executable, '-m', 'pip', 'uninstall', '-y', '-q', 'mmrest'],
                           check=True, timeout=300)
    changed = {name: (before.get(name), after.get(name))
               for name in set(before) | set(after)
               if before.get(name) != after.get(name) and name != 'mmrest'}
    assert changed == {}, f'pip install . changed {changed}'
    assert after.get('mmrest') is not None
    assert any(k.startswith(STACK_PREFIXES) for k in before)


def test_renamed_toolbox_scopes_map_to_their_modules(monkeypatch):
    """A scope whose distribution name is missing but whose module imports is mapped to
    the module; scopes that resolve, and modules that do not exist, are left alone."""
    from mmengine.config import utils as config_utils
    mapping = {'json': 'no-such-distribution', 'nosuchmodule_mmrest': 'also-missing',
               'pytest': 'pytest', 'mmengine': 'mmengine'}
    monkeypatch.setattr(config_utils, 'MODULE2PACKAGE', mapping)
    resolve_renamed_toolboxes()
    assert mapping == {'json': 'json', 'nosuchmodule_mmrest': 'also-missing',
                       'pytest': 'pytest', 'mmengine': 'mmengine'}


def test_mmseg_bases_resolve_whatever_the_distribution_is_called():
    """The UperNet config inherits ``mmseg::`` bases; with ``import mmrest`` they resolve
    with upstream mmsegmentation and with onedl-mmsegmentation alike."""
    import mmrest  # noqa: F401
    from mmengine.config import Config
    cfg = Config.fromfile(osp.join(REPO, 'configs', 'upernet_rest_small_ade20k.py'))
    assert cfg.model.decode_head.type == 'UPerHead'
    assert cfg.default_scope == 'mmseg'


def _mmengine_like_checkpoint() -> dict:
    buffer = HistoryBuffer()
    buffer.update(0.5)
    buffer.update(0.25)
    return {
        'state_dict': OrderedDict(w=torch.arange(6.).reshape(2, 3),
                                  b=torch.nn.Parameter(torch.ones(2))),
        'message_hub': {'log_scalars': {'loss': buffer}},
        'meta': {'epoch': np.int64(3), 'time': np.float64(1.5), 'seed': 7,
                 'mean': np.array([1., 2.], dtype=np.float32), 'shape': torch.Size([2, 3]),
                 'dtype': torch.float16, 'classes': ('a', 'b'), 'blob': b'\x00\x01'},
    }


def test_restricted_unpickler_reads_mmengine_checkpoints(tmp_path):
    """On every torch version: tensors, parameters, HistoryBuffer, numpy scalars and
    arrays, dtypes, sizes and bytes come back equal."""
    path = tmp_path / 'ckpt.pth'
    torch.save(_mmengine_like_checkpoint(), path)
    loaded = restricted_torch_load(path)
    assert torch.equal(loaded['state_dict']['w'], torch.arange(6.).reshape(2, 3))
    assert isinstance(loaded['state_dict']['b'], torch.nn.Parameter)
    buffer = loaded['message_hub']['log_scalars']['loss']
    assert isinstance(buffer, HistoryBuffer) and buffer.mean() == 0.375
    meta = loaded['meta']
    assert meta['epoch'] == 3 and meta['time'] == 1.5 and meta['blob'] == b'\x00\x01'
    assert meta['mean'].tolist() == [1., 2.] and meta['mean'].dtype == np.float32
    assert meta['shape'] == torch.Size([2, 3]) and meta['dtype'] is torch.float16
    # the path this torch takes gives the same
    assert safe_load_checkpoint(path)['meta']['time'] == 1.5


class _RunsCode:

    def __reduce__(self):
        return (os.system, ('touch ran_code',))


def test_restricted_unpickler_refuses_code_before_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': {'w': torch.zeros(1)}, 'x': _RunsCode()}, path)
    with pytest.raises(RefusedGlobalError, match='GLOBAL posix.system'):
        restricted_torch_load(path)
    with pytest.raises(UnsafeCheckpointError, match='could run code'):
        safe_load_checkpoint(path)
    assert not (tmp_path / 'ran_code').exists()
    # a getattr other than HistoryBuffer's statistics is refused too
    data = pickle.dumps(getattr, protocol=2)
    assert RestrictedUnpickler(io.BytesIO(data)).load() is not getattr


def test_safe_loading_path_follows_the_torch_version():
    assert torch_allowlist_usable() == (torch.__version__ >= '2.6')


def test_version_shims_answer_on_this_torch():
    assert is_recording_graph() is False
    assert autocast_dtype('meta') is None
    assert autocast_dtype('cpu') is None
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert autocast_dtype('cpu') == torch.bfloat16
        with autocast_off('cpu'):
            assert autocast_dtype('cpu') is None
    with autocast_off('meta'):
        pass
    with pytest.raises(RuntimeError, match=r'^frobnication needs torch >= 99.0, found torch '):
        require_torch('99.0', 'frobnication')
    require_torch('2.1', 'anything mmrest supports')


@pytest.mark.parametrize('family, variant',
                         [('ResT', a) for a in ('lite', 'small', 'base', 'large')]
                         + [('ResTV2', a) for a in ('tiny', 'small', 'base', 'large')])
def test_every_arch_trains_at_an_odd_size(family, variant):
    """Forward and backward of every arch at an odd size (oracle comparisons:
    tests/test_backbones.py): maps of ceil(size / stride), finite gradients everywhere."""
    import mmrest.models as models
    torch.manual_seed(0)
    model = getattr(models, family)(arch=variant).train()
    model.init_weights()
    x = torch.randn(2, 3, 39, 53, requires_grad=True)
    outs = model(x)
    assert [tuple(o.shape[2:]) for o in outs] == [(10, 14), (5, 7), (3, 4), (2, 2)]
    assert [o.shape[1] for o in outs] == model.embed_dims
    sum((o * torch.randn_like(o)).sum() for o in outs).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name


@pytest.mark.skipif(not torch_allowlist_usable(), reason='torch < 2.6 has no safe_globals '
                    'context; mmrest.utils.RestrictedUnpickler reads checkpoints there')
def test_safe_loading_survives_a_safe_globals_context(tmp_path):
    """torch's ``safe_globals`` context removes on exit what it added, also entries that
    were registered before it (onedl-mmengine loads checkpoints inside one): mmrest's
    safe loading still reads mmengine checkpoints after it."""
    path = tmp_path / 'ckpt.pth'
    torch.save(_mmengine_like_checkpoint(), path)
    with torch.serialization.safe_globals([HistoryBuffer, np.ndarray, np.dtype]):
        pass
    loaded = safe_load_checkpoint(path)
    assert loaded['message_hub']['log_scalars']['loss'].mean() == 0.375


def test_mmengine_loader_refuses_code_on_this_torch(tmp_path, monkeypatch):
    """mmengine's ``load_checkpoint`` refuses a code-running file with nothing run, through
    the loader mmrest registers, also where the stack alone would unpickle it (torch < 2.6,
    the OneDL fork's retry with ``weights_only=False``)."""
    from mmengine.runner.checkpoint import _load_checkpoint
    monkeypatch.chdir(tmp_path)
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': {'w': torch.zeros(1)}, 'x': _RunsCode()}, path)
    with pytest.raises(UnsafeCheckpointError, match='could run code'):
        _load_checkpoint(str(path), map_location='cpu')
    assert not (tmp_path / 'ran_code').exists()
    good = tmp_path / 'good.pth'
    torch.save(_mmengine_like_checkpoint(), good)
    assert _load_checkpoint(str(good))['meta']['time'] == 1.5
