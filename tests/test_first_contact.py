"""What a user meets first when putting ResT into a config of their own: mmseg's
``model.pretrained`` reaching the backbone, the log line of the new output norms, inputs
too small to train on at batch 1, the exception of a bad arch, the launch scripts'
headers and ``tools/demo.py --help``."""
import copy
import functools
import logging
import os
import os.path as osp
import re
import shutil
import subprocess
import warnings
from typing import Dict, List, Type

import pytest
import torch
from _tools import load_script
from mmengine.config import Config
from mmengine.registry import MODELS, init_default_scope

import mmrest  # noqa: F401  (the registry and safe loading, before any config is read)
from mmrest.models import ResT, ResTV2
from mmrest.models.backbones.base import ResTBase

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
HUB_NAME = 'open-mmlab://resnet50_v1c'  # model.pretrained of mmseg's ResNet bases
#: Small archs of each version (the checks do not depend on the size).
SMALL_ARCH: Dict[Type[ResTBase], dict] = {
    ResT: dict(embed_dims=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8],
               mlp_ratios=[2, 2, 2, 2], sr_ratios=[8, 4, 2, 1]),
    ResTV2: dict(embed_dims=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8],
                 mlp_ratios=[2, 2, 2, 2], sr_ratios=[8, 4, 2, 1]),
}
BACKBONES = [ResT, ResTV2]


def _id(cls: type) -> str:
    return cls.__name__


@functools.lru_cache(maxsize=None)
def _parsed(path: str) -> Config:
    return Config.fromfile(osp.join(REPO, path))


def _mmseg_model_cfg(path: str) -> dict:
    """The model config of an mmseg config here, as the Runner builds it."""
    cfg = copy.deepcopy(_parsed(path))
    init_default_scope(cfg.default_scope)
    model = cfg.model
    model.setdefault('data_preprocessor', cfg.get('data_preprocessor'))
    return model


# ------------------------------------------------------------------------ pretrained
@pytest.mark.parametrize('cls', BACKBONES, ids=_id)
def test_hub_name_in_pretrained_stops_in_one_line_naming_the_fix(cls):
    with pytest.raises(ValueError) as info:
        cls(arch=SMALL_ARCH[cls], pretrained=HUB_NAME)
    message = str(info.value)
    assert '\n' not in message
    assert HUB_NAME in message and cls.__name__ in message
    assert 'model.pretrained=None' in message
    assert "init_cfg=dict(type='Pretrained', checkpoint=PATH)" in message


@pytest.mark.parametrize('path', ['configs/upernet_rest_small_ade20k.py',
                                  'configs/upernet_restv2_tiny_ade20k.py'])
def test_mmseg_base_pretrained_reaching_the_backbone_names_the_fix(path):
    """mmseg's EncoderDecoder hands ``model.pretrained`` to the backbone: a config on a
    ResNet base (whose value is an open-mmlab:// name) stops with the fix, not with
    ``TypeError: ... unexpected keyword argument 'pretrained'``."""
    model = _mmseg_model_cfg(path)
    model.pretrained = HUB_NAME
    with pytest.raises(ValueError) as info:
        MODELS.build(model)
    message = str(info.value)
    assert '\n' not in message
    assert 'model.pretrained=None' in message and 'init_cfg' in message


def _saved_weights(cls: Type[ResTBase], tmp_path) -> Dict[str, torch.Tensor]:
    torch.manual_seed(0)
    source = cls(arch=SMALL_ARCH[cls], drop_path_rate=0.)
    source.init_weights()
    weights = {k: v.clone() for k, v in source.state_dict().items()}
    torch.save(weights, str(tmp_path / 'rest.pth'))
    return weights


@pytest.mark.parametrize('cls', BACKBONES, ids=_id)
def test_pretrained_path_becomes_init_cfg_with_a_deprecation_warning(cls, tmp_path):
    weights = _saved_weights(cls, tmp_path)
    path = str(tmp_path / 'rest.pth')
    with pytest.warns(DeprecationWarning, match='pretrained is deprecated.*init_cfg'):
        model = cls(arch=SMALL_ARCH[cls], drop_path_rate=0., pretrained=path)
    assert model.init_cfg == dict(type='Pretrained', checkpoint=path)
    model.init_weights()
    loaded = model.state_dict()
    assert set(loaded) == set(weights)
    for key, value in weights.items():
        assert torch.equal(loaded[key], value), key


def test_mmseg_pretrained_path_loads_the_backbone(tmp_path):
    """The whole mmseg route: ``model.pretrained`` of ResT weights, no backbone init_cfg."""
    model_cfg = _mmseg_model_cfg('configs/upernet_rest_small_ade20k.py')
    model_cfg.backbone.arch = SMALL_ARCH[ResT]
    model_cfg.backbone.init_cfg = None
    model_cfg.decode_head.in_channels = SMALL_ARCH[ResT]['embed_dims']
    model_cfg.decode_head.channels = 16
    model_cfg.auxiliary_head.in_channels = SMALL_ARCH[ResT]['embed_dims'][2]
    model_cfg.auxiliary_head.channels = 16
    weights = _saved_weights(ResT, tmp_path)
    model_cfg.pretrained = str(tmp_path / 'rest.pth')
    with pytest.warns(DeprecationWarning):
        segmentor = MODELS.build(model_cfg)
    segmentor.init_weights()
    loaded = segmentor.backbone.state_dict()
    for key, value in weights.items():
        assert torch.equal(loaded[key], value), key


@pytest.mark.parametrize('cls', BACKBONES, ids=_id)
def test_pretrained_and_init_cfg_together_are_refused(cls):
    with pytest.raises(ValueError, match='both pretrained=.* and init_cfg=.*give the weights '
                       'once'):
        cls(arch=SMALL_ARCH[cls], pretrained='rest.pth',
            init_cfg=dict(type='Pretrained', checkpoint='other.pth'))
    with pytest.raises(TypeError, match='pretrained must be a str'):
        cls(arch=SMALL_ARCH[cls], pretrained=True)


@pytest.mark.parametrize('cls', BACKBONES, ids=_id)
def test_no_pretrained_no_warning(cls):
    with warnings.catch_warnings():
        warnings.simplefilter('error', DeprecationWarning)
        model = cls(arch=SMALL_ARCH[cls], pretrained=None)
    assert model.init_cfg is None


# ---------------------------------------------------------------------- output norms
def _missing_line(records: List[logging.LogRecord]) -> str:
    lines = [r.getMessage() for r in records
             if r.levelno >= logging.WARNING and 'missing' in r.getMessage().lower()]
    assert len(lines) == 1, lines
    return lines[0]


def _classifier_file(cls: Type[ResTBase], tmp_path) -> str:
    """Weights as the ImageNet files have them: no output norms norm1-norm3."""
    torch.manual_seed(1)
    classifier = cls(arch=SMALL_ARCH[cls], out_indices=(3, ), drop_path_rate=0.)
    classifier.init_weights()
    # non-trivial final norm, so that every stage matters
    with torch.no_grad():
        for p in classifier.norm.parameters():
            p.normal_()
    path = str(tmp_path / 'imagenet.pth')
    torch.save({'model': classifier.state_dict()}, path)
    return path


@pytest.mark.parametrize('cls', BACKBONES, ids=_id)
def test_missing_output_norms_log_says_what_they_are_in_the_main_path(cls, tmp_path,
                                                                      log_records):
    path = _classifier_file(cls, tmp_path)
    model = cls(arch=SMALL_ARCH[cls], drop_path_rate=0., out_norm_in_main_path=True,
                init_cfg=dict(type='Pretrained', checkpoint=path))
    model.init_weights()
    line = _missing_line(log_records)
    assert path in line and "'norm1.weight'" in line and "'norm3.bias'" in line
    assert 'norm1, norm2, norm3 are new output norms' in line
    assert 'the detector or segmentor trains them' in line
    assert 'out_norm_in_main_path=True' in line
    assert 'change the pretrained function' in line
    assert 'out_norm_in_main_path=False applies them to the returned maps only' in line
    assert '\n' not in line

    # ... and what it says is so: the stride-32 map is not the classifier's
    classifier = cls(arch=SMALL_ARCH[cls], out_indices=(3, ), drop_path_rate=0.,
                     init_cfg=dict(type='Pretrained', checkpoint=path))
    classifier.init_weights()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model.eval()(x)[3], classifier.eval()(x)[0]
    assert (ours - theirs).abs().max() > 1e-2


@pytest.mark.parametrize('cls', BACKBONES, ids=_id)
def test_missing_output_norms_log_outside_the_main_path(cls, tmp_path, log_records):
    path = _classifier_file(cls, tmp_path)
    model = cls(arch=SMALL_ARCH[cls], out_indices=(1, 3), drop_path_rate=0.,
                out_norm_in_main_path=False,
                init_cfg=dict(type='Pretrained', checkpoint=path))
    model.init_weights()
    line = _missing_line(log_records)
    assert "'norm2.weight'" in line and "'norm1.weight'" not in line
    assert line.count('are new output norms') == 1 and '. norm2 are new output' in line
    assert 'the detector or segmentor trains them' in line
    assert 'the pretrained function is unchanged' in line

    classifier = cls(arch=SMALL_ARCH[cls], out_indices=(3, ), drop_path_rate=0.,
                     init_cfg=dict(type='Pretrained', checkpoint=path))
    classifier.init_weights()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x)[1], classifier.eval()(x)[0])


def test_nothing_missing_no_note(tmp_path, log_records):
    path = _classifier_file(ResT, tmp_path)
    model = ResT(arch=SMALL_ARCH[ResT], out_indices=(3, ),
                 init_cfg=dict(type='Pretrained', checkpoint=path))
    model.init_weights()
    assert not [r for r in log_records if 'output norms' in r.getMessage()]


# ---------------------------------------------------------------------- small inputs
# (backbone, the deepest BatchNorm, its stride)
SMALLEST = [(ResT, 'patch_embed_4.norm', 32), (ResTV2, 'stem.proj.4', 4)]


@pytest.mark.parametrize('cls, layer, stride', SMALLEST, ids=['ResT', 'ResTV2'])
def test_too_small_to_train_at_batch_1_names_the_layer_and_the_size(cls, layer, stride):
    model = cls(arch=SMALL_ARCH[cls]).train()
    for h, w in ((stride, stride), (stride // 2, stride), (1, 1)):
        with pytest.raises(ValueError) as info:
            model(torch.randn(1, 3, h, w))
        message = str(info.value)
        assert f'BatchNorm {layer} (stride {stride})' in message
        assert f'one {h}x{w} image' in message
        assert f'larger than {stride}x{stride} (at least {stride + 1} px high or ' \
            f'{stride + 1} px wide)' in message
        assert 'norm_eval=True' in message and '\n' not in message


@pytest.mark.parametrize('cls, layer, stride', SMALLEST, ids=['ResT', 'ResTV2'])
def test_smallest_sizes_train_at_batch_1(cls, layer, stride):
    model = cls(arch=SMALL_ARCH[cls]).train()
    for h, w in ((stride + 1, stride + 1), (stride + 1, 1), (1, stride + 1)):
        outs = model(torch.randn(1, 3, h, w))
        sum(o.mean() for o in outs).backward()
        assert [o.shape[2:] for o in outs] == [
            (-(-h // 2**(i + 2)), -(-w // 2**(i + 2))) for i in range(4)]
        assert all(p.grad is not None and torch.isfinite(p.grad).all()
                   for p in model.parameters() if p.requires_grad)
        model.zero_grad()


@pytest.mark.parametrize('cls, layer, stride', SMALLEST, ids=['ResT', 'ResTV2'])
def test_small_inputs_run_where_no_batchnorm_uses_batch_statistics(cls, layer, stride):
    x = torch.randn(1, 3, stride, stride)
    with torch.no_grad():
        assert len(cls(arch=SMALL_ARCH[cls]).eval()(x)) == 4
        assert len(cls(arch=SMALL_ARCH[cls], norm_eval=True).train()(x)) == 4
        # a batch of two images gives each norm two values per channel
        assert len(cls(arch=SMALL_ARCH[cls]).train()(torch.randn(2, 3, stride, stride))) == 4


def test_the_named_layer_follows_freezing():
    """Frozen stages keep their BatchNorms in eval mode (frozen_stages=3 leaves the last
    patch embedding's training); with that norm in eval mode the binding norm is the one
    of the previous stage."""
    model = ResT(arch=SMALL_ARCH[ResT], frozen_stages=4).train()
    assert len(model(torch.randn(1, 3, 32, 32))) == 4  # every BatchNorm frozen
    model = ResT(arch=SMALL_ARCH[ResT], frozen_stages=3).train()
    with pytest.raises(ValueError, match=r'BatchNorm patch_embed_4\.norm \(stride 32\)'):
        model(torch.randn(1, 3, 32, 32))
    model = ResT(arch=SMALL_ARCH[ResT]).train()
    model.patch_embed_4.norm.eval()
    with pytest.raises(ValueError, match=r'BatchNorm patch_embed_3\.norm \(stride 16\)'):
        model(torch.randn(1, 3, 16, 16))
    assert len(model(torch.randn(1, 3, 17, 17))) == 4
    # stage 4 does not run without an output there: the binding norm is stage 3's
    model = ResT(arch=SMALL_ARCH[ResT], out_indices=(0, 1, 2)).train()
    assert len(model(torch.randn(1, 3, 32, 32))) == 3
    with pytest.raises(ValueError, match=r'BatchNorm patch_embed_3\.norm \(stride 16\)'):
        model(torch.randn(1, 3, 16, 16))


def test_syncbn_outside_distributed_training_is_checked_too():
    model = ResT(arch=SMALL_ARCH[ResT], embed_norm_cfg=dict(type='SyncBN')).train()
    with pytest.raises(ValueError, match=r'patch_embed_4\.norm'):
        model(torch.randn(1, 3, 32, 32))


# ------------------------------------------------------------ launch scripts' headers
LAUNCHERS = ['dist_train.sh', 'dist_test.sh', 'slurm_train.sh', 'slurm_test.sh']
#: what each script's header says of PYTHON, and what ``tools/_launch.sh`` does
PYTHON_DEFAULT = "PYTHON (the repository's .venv/bin/python where it exists, else python)"


def _header(path: str) -> str:
    lines = []
    for line in open(path, encoding='utf-8').read().splitlines()[1:]:
        if not line.startswith('#'):
            break
        lines.append(line.lstrip('#').strip())
    return ' '.join(lines)


def _fake_program(path) -> None:
    """An executable that prints ``ran: <its path>`` and then its arguments, one a line."""
    path.write_text('#!/usr/bin/env bash\necho "ran: $0"\nfor a in "$@"; do echo "$a"; done\n')
    path.chmod(0o755)


@pytest.mark.parametrize('script', LAUNCHERS)
def test_launch_script_header_gives_the_python_it_runs(script, tmp_path):
    assert PYTHON_DEFAULT in _header(osp.join(REPO, 'tools', script))
    assert 'PYTHON (python)' not in _header(osp.join(REPO, 'tools', script))
    # a copy of the repository's launchers, python and srun stand-ins on PATH
    repo = tmp_path / 'repo'
    (repo / 'tools').mkdir(parents=True)
    for name in (script, '_launch.sh'):
        shutil.copy(osp.join(REPO, 'tools', name), repo / 'tools' / name)
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    for name in ('python', 'srun'):
        _fake_program(bin_dir / name)
    env = {k: v for k, v in os.environ.items()
           if k not in ('PYTHON', 'NNODES', 'GPUS', 'GPUS_PER_NODE', 'SRUN_ARGS')}
    env['PATH'] = f'{bin_dir}{os.pathsep}{env["PATH"]}'
    args = {'dist_train.sh': ['cfg.py', '1'], 'dist_test.sh': ['cfg.py', 'ckpt.pth', '1'],
            'slurm_train.sh': ['p', 'job', 'cfg.py', 'wd'],
            'slurm_test.sh': ['p', 'job', 'cfg.py', 'ckpt.pth']}[script]

    def interpreter() -> str:
        """The interpreter the script runs (through srun for the Slurm scripts)."""
        proc = subprocess.run(['bash', str(repo / 'tools' / script)] + args, env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        if script.startswith('dist'):
            return lines[0][len('ran: '):]
        assert lines[0] == f'ran: {bin_dir / "srun"}'
        return lines[lines.index('--kill-on-bad-exit=1') + 1]

    # no .venv beside tools/: python
    assert interpreter() in ('python', str(bin_dir / 'python'))
    # the repository's .venv: its python
    venv_bin = repo / '.venv' / 'bin'
    venv_bin.mkdir(parents=True)
    _fake_program(venv_bin / 'python')
    assert osp.realpath(interpreter()) == osp.realpath(venv_bin / 'python')


# --------------------------------------------------------------------- demo --help
def _help_entries(text: str) -> Dict[str, str]:
    """Option -> its help text (wrapped lines joined) of an argparse --help output."""
    entries: Dict[str, str] = {}
    current = None
    for line in text.splitlines():
        match = re.match(r'^  (-[-\w]+)', line)
        if match:
            current = match.group(1)
            entries[current] = line
        elif current and line.startswith('   '):
            entries[current] += ' ' + line.strip()
        else:
            current = None
    return entries


def test_demo_help_gives_one_default_per_option(capsys):
    demo = load_script('tools/demo.py')
    with pytest.raises(SystemExit) as info:
        demo.parse_args(['--help'])
    assert info.value.code == 0
    entries = _help_entries(capsys.readouterr().out)
    options = {e for e in entries if e != '-h'}
    assert {'--config', '--data-root', '--iters', '--threads', '--expect-map'} <= options
    for option in options:
        help_text = entries[option]
        assert help_text.count('(default:') == 1, help_text
        assert '(default: None)' not in help_text, help_text
    assert "(default: the config's data_root)" in entries['--data-root']
    assert '(default: configs/demo/retinanet_rest_lite_shapes.py)' in entries['--config']
