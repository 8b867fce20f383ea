"""tools/train.py and tools/test.py: arguments, scopes, --amp, --no-amp, the process group
(the clear errors for bad data: tests/test_data_errors.py)."""
import copy
import importlib.util
import math
import os.path as osp
import subprocess

import pytest
import torch

from _engine_helpers import PYTHON, REPO, run, scalars, train_cmd
from _tools import load_script

# detectors and segmentors: mmcv with its compiled ops
pytestmark = pytest.mark.ops


train_tool = load_script('tools/train.py')
test_tool = load_script('tools/test.py')


def _cfg(*argv: str):
    return train_tool.build_config(train_tool.parse_args(list(argv)))


# --- arguments -------------------------------------------------------------------------

def test_work_dir_and_cfg_options(demo, tmp_path):
    cfg = _cfg(demo['config'], '--work-dir', str(tmp_path / 'w'), '--cfg-options',
               'train_dataloader.batch_size=3', 'optim_wrapper.optimizer.lr=0.005',
               'model.bbox_head.stacked_convs=1')
    assert cfg.work_dir == str(tmp_path / 'w')
    assert cfg.train_dataloader.batch_size == 3
    assert cfg.optim_wrapper.optimizer.lr == 0.005
    assert cfg.model.bbox_head.stacked_convs == 1
    assert cfg.default_scope == 'mmdet' and cfg.launcher == 'none'
    # reliability hooks installed, the config's checkpoint settings kept
    assert cfg.default_hooks.checkpoint.type == 'mmrest.AtomicCheckpointHook'
    assert cfg.default_hooks.checkpoint.interval == 3
    assert cfg.default_hooks.checkpoint.max_keep_ckpts == 2
    assert dict(type='mmrest.RNGStateHook') in cfg.custom_hooks


def test_default_work_dir_is_named_after_config(demo):
    cfg = _cfg(demo['config'])
    assert cfg.work_dir == osp.join('./work_dirs', 'cfg')


def test_resume_arguments(demo, tmp_path):
    args = train_tool.parse_args([demo['config'], '--resume'])
    assert args.resume == 'auto'
    cfg = _cfg(demo['config'], '--work-dir', str(tmp_path / 'empty'), '--resume')
    assert cfg.resume is False and cfg.load_from is None  # nothing to resume: fresh start
    missing = str(tmp_path / 'nope.pth')
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        _cfg(demo['config'], '--resume', missing)


def test_resume_with_nothing_to_resume_starts_from_load_from(demo, tmp_path):
    """The first run of a job always started with --resume: the config's load_from is
    still loaded (checked, without resuming), not dropped."""
    from mmrest.utils import atomic_torch_save
    ckpt = str(tmp_path / 'pretrained_detector.pth')
    atomic_torch_save(dict(meta=dict(), state_dict={}), ckpt)
    cfg = _cfg(demo['config'], '--work-dir', str(tmp_path / 'empty'), '--resume',
               '--cfg-options', f'load_from={ckpt}')
    assert cfg.resume is False and cfg.load_from == ckpt
    with pytest.raises(FileNotFoundError, match='missing.pth'):
        _cfg(demo['config'], '--work-dir', str(tmp_path / 'empty'), '--resume',
             '--cfg-options', f'load_from={tmp_path / "missing.pth"}')


def test_amp_arguments(demo):
    from mmrest.engine import configure_amp
    cfg = _cfg(demo['config'], '--amp')
    assert cfg.optim_wrapper.type == 'mmrest.CPUAmpOptimWrapper'
    assert cfg.optim_wrapper.dtype == 'bfloat16'
    assert cfg.optim_wrapper.clip_grad == dict(max_norm=10.0, norm_type=2)  # kept
    with pytest.raises(ValueError, match="optim_wrapper.dtype='float16'"):
        _cfg(demo['config'], '--amp', '--cfg-options', 'optim_wrapper.dtype=float16')
    # on CUDA: mmengine's AmpOptimWrapper, dynamic loss scaling, fp16 unless configured
    cfg = _cfg(demo['config'])
    assert configure_amp(cfg, device='cuda') == 'float16'
    assert cfg.optim_wrapper.type == 'AmpOptimWrapper'
    assert cfg.optim_wrapper.loss_scale == 'dynamic'
    cfg = _cfg(demo['config'], '--cfg-options', 'optim_wrapper.dtype=bfloat16')
    assert configure_amp(cfg, device='cuda') == 'bfloat16'


RESTV2_MASK_RCNN = osp.join(REPO, 'configs', 'mask_rcnn_restv2_tiny_3x_coco.py')


class _Lines:
    """A logger stand-in that keeps its info lines."""

    def __init__(self) -> None:
        self.lines = []

    def info(self, msg: str) -> None:
        self.lines.append(msg)


def test_disable_amp_gives_a_buildable_fp32_wrapper():
    """The ResT V2 Mask R-CNN config asks for AmpOptimWrapper with loss_scale: --no-amp's
    rewrite builds, through mmengine's constructor and OPTIM_WRAPPERS, into a plain
    float32 OptimWrapper with a real optimizer; only swapping the type does not build."""
    from mmengine.config import Config
    from mmengine.optim import OptimWrapper, build_optim_wrapper

    from mmrest.engine import disable_amp
    cfg = Config.fromfile(RESTV2_MASK_RCNN)
    assert cfg.optim_wrapper.type == 'AmpOptimWrapper'
    assert cfg.optim_wrapper.loss_scale == 'dynamic'
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    swapped = copy.deepcopy(cfg.optim_wrapper)
    swapped.type = 'OptimWrapper'
    with pytest.raises(TypeError, match='loss_scale'):
        build_optim_wrapper(model, swapped)

    logger = _Lines()
    expected = {k: v for k, v in cfg.optim_wrapper.items() if k not in ('type', 'loss_scale')}
    assert disable_amp(cfg, logger=logger) is True
    assert cfg.optim_wrapper == dict(expected, type='OptimWrapper')
    assert len(logger.lines) == 1 and 'float32' in logger.lines[0]
    assert 'AmpOptimWrapper' in logger.lines[0]
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    assert type(wrapper) is OptimWrapper
    assert isinstance(wrapper.optimizer, torch.optim.Optimizer)
    assert type(wrapper.optimizer).__name__ == cfg.optim_wrapper.optimizer.type
    assert wrapper.clip_grad_kwargs == cfg.optim_wrapper.clip_grad
    with wrapper.optim_context(model):
        out = model(torch.randn(2, 3, 8, 8))
    assert out.dtype == torch.float32  # no autocast
    before = model[0].weight.detach().clone()
    wrapper.update_params(out.square().mean())
    assert not torch.equal(before, model[0].weight)


@pytest.mark.parametrize('wrapper, changed', [
    (dict(type='mmrest.CPUAmpOptimWrapper', dtype='bfloat16'), True),
    (dict(type='AmpOptimWrapper', loss_scale=512., dtype='float16', use_fsdp=False), True),
    (dict(type='OptimWrapper'), False),
    (dict(), False),
])
def test_disable_amp_drops_every_amp_only_key(wrapper, changed):
    from mmengine.config import Config

    from mmrest.engine import disable_amp
    optimizer = dict(type='SGD', lr=0.01)
    cfg = Config(dict(optim_wrapper=dict(wrapper, optimizer=optimizer, clip_grad=None)))
    assert disable_amp(cfg) is changed
    kept = dict(optimizer=optimizer, clip_grad=None)
    assert cfg.optim_wrapper == (dict(kept, type='OptimWrapper') if 'type' in wrapper
                                 else kept)


def test_disable_amp_refuses_other_wrappers():
    from mmengine.config import Config

    from mmrest.engine import disable_amp
    cfg = Config(dict(optim_wrapper=dict(type='mmrest.MyLossScaledWrapper', loss_scale=8.)))
    with pytest.raises(ValueError, match="--no-amp: optim_wrapper type 'MyLossScaledWrapper'"):
        disable_amp(cfg)
    assert cfg.optim_wrapper.type == 'mmrest.MyLossScaledWrapper'  # left alone
    with pytest.raises(ValueError, match='--no-amp: the config has no optim_wrapper dict'):
        disable_amp(Config(dict()))


def test_no_amp_arguments(demo, capsys):
    assert train_tool.parse_args([demo['config'], '--no-amp']).no_amp is True
    assert train_tool.parse_args([demo['config']]).no_amp is False
    with pytest.raises(SystemExit) as info:
        train_tool.parse_args([demo['config'], '--amp', '--no-amp'])
    assert info.value.code == 2
    assert 'argument --no-amp: not allowed with argument --amp' in capsys.readouterr().err
    cfg = _cfg(demo['config'], '--no-amp')  # an fp32 config stays as it is
    assert cfg.optim_wrapper.type == 'OptimWrapper'
    with pytest.raises(ValueError, match="--no-amp: optim_wrapper type 'ApexOptimWrapper'"):
        _cfg(demo['config'], '--no-amp', '--cfg-options', 'optim_wrapper.type=ApexOptimWrapper')


def test_train_tool_no_amp_trains_with_a_plain_optim_wrapper(tmp_path, monkeypatch):
    """tools/train.py --no-amp on the ResT V2 Mask R-CNN config, on any device, up to the
    runner's train(), which here only builds the optimizer wrapper: a float32
    OptimWrapper (without the flag: the CPU's bfloat16 wrapper or AmpOptimWrapper)."""
    from mmengine.optim import OptimWrapper
    from mmengine.runner import Runner
    built = {}

    def build_wrapper_only(runner):
        runner.optim_wrapper = runner.build_optim_wrapper(runner.optim_wrapper)
        built['wrapper'] = runner.optim_wrapper

    monkeypatch.setattr(Runner, 'train', build_wrapper_only)
    train_tool.main([RESTV2_MASK_RCNN, '--no-amp', '--no-data-check', '--work-dir',
                     str(tmp_path / 'w'), '--cfg-options', 'model.backbone.init_cfg=None'])
    wrapper = built['wrapper']
    assert type(wrapper) is OptimWrapper
    assert type(wrapper.optimizer).__name__ == 'AdamW'
    cfg = _cfg(RESTV2_MASK_RCNN, '--work-dir', str(tmp_path / 'w'))
    amp_type = 'AmpOptimWrapper' if torch.cuda.is_available() else 'mmrest.CPUAmpOptimWrapper'
    assert cfg.optim_wrapper.type == amp_type


def test_cpu_amp_wrapper_autocasts_forward_only():
    from mmrest.engine import CPUAmpOptimWrapper
    model = torch.nn.Linear(4, 3)
    wrapper = CPUAmpOptimWrapper(optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with wrapper.optim_context(model):
        out = model(torch.randn(2, 4))
    assert out.dtype == torch.bfloat16
    wrapper.update_params(out.float().square().mean())
    assert model.weight.dtype == torch.float32
    with pytest.raises(ValueError, match='bfloat16 only'):
        CPUAmpOptimWrapper(dtype='float16',
                           optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


def test_scopes_of_segmentation_and_classification_configs(tmp_path):
    """The scope comes from the config: mmseg and mmpretrain configs build their models."""
    from mmengine.registry import DefaultScope
    from mmengine.runner import Runner
    for name, scope, model_type in [('upernet_rest_small_ade20k.py', 'mmseg', 'EncoderDecoder'),
                                    ('rest_lite_imagenet.py', 'mmpretrain', 'ImageClassifier')]:
        cfg = _cfg(osp.join(REPO, 'configs', name), '--work-dir', str(tmp_path / scope),
                   '--cfg-options', 'model.backbone.init_cfg=None')
        assert cfg.default_scope == scope
        assert DefaultScope.get_current_instance().scope_name == scope
        runner = Runner.from_cfg(cfg)
        model = runner.model
        assert type(model).__name__ == model_type
        assert type(model.backbone).__name__ == 'ResT'
        # after the tool's set-up, the unprefixed name builds in the config's scope too
        registry = importlib.import_module(f'{scope}.registry').MODELS
        assert type(registry.build(dict(type='ResT', arch='lite'))).__name__ == 'ResT'


def test_test_tool_arguments(demo, tmp_path):
    from mmrest.utils import atomic_torch_save
    ckpt = str(tmp_path / 'w.pth')
    atomic_torch_save(dict(meta=dict(), state_dict={}), ckpt)
    args = test_tool.parse_args([demo['config'], ckpt, '--show-dir', 'vis',
                                 '--work-dir', str(tmp_path / 'tw')])
    cfg = test_tool.build_config(args)
    assert cfg.load_from == ckpt and cfg.resume is False
    assert cfg.default_hooks.visualization.draw is True
    assert cfg.default_hooks.visualization.test_out_dir == 'vis'

@pytest.mark.parametrize('extra, message', [
    (['--no-amp', '--cfg-options', 'optim_wrapper.type=MyWrapper'],
     "ToolConfigError: --no-amp: optim_wrapper type 'MyWrapper' is not an"),
    (['--auto-scale-lr', '--cfg-options', 'auto_scale_lr=None'],
     'ToolConfigError: --auto-scale-lr: the config has no auto_scale_lr.base_batch_size'),
])
def test_cli_reports_option_errors_in_one_line(demo, tmp_path, capsys, extra, message):
    """Options that cannot work with the config end like data errors: one line, exit 1."""
    from mmrest.engine import run_tool_cli
    argv = [demo['config'], '--work-dir', str(tmp_path / 'w'), *extra]
    with pytest.raises(SystemExit) as info:
        run_tool_cli(lambda: train_tool.main(argv), 'train.py')
    assert info.value.code == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith('train.py: error: ' + message), last


def test_test_tool_out_suffix_is_checked_with_the_arguments(capsys):
    """Before the config or the checkpoint is read: an argparse error."""
    with pytest.raises(SystemExit) as info:
        test_tool.parse_args(['no_such_config.py', 'no_such.pth', '--out', 'results.json'])
    assert info.value.code == 2
    assert '--out results.json: the dump file must be a .pkl or .pickle file' in \
        capsys.readouterr().err


# --- a real run: --amp on the CPU ------------------------------------------------------

@pytest.mark.slow
def test_amp_cpu_bf16_trains_with_finite_losses(demo, tmp_path):
    """Two iterations in bfloat16 autocast and two in float32 from the same seed: the
    bf16 losses are finite and within 2% of the fp32 ones at iteration 1 (same weights;
    measured: 0.3% for the total, 0.6% for loss_bbox)."""
    losses = {}
    for name, extra in [('fp32', []), ('bf16', ['--amp'])]:
        work_dir = str(tmp_path / name)
        proc = run(train_cmd(demo['config'], work_dir, *extra))
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-4000:]
        logged = [s for s in scalars(work_dir) if 'loss' in s]
        assert [s['iter'] for s in logged] == [1, 2]
        losses[name] = logged
        if name == 'bf16':
            assert 'mixed precision: bfloat16 autocast on cpu' in out
    for entry in losses['bf16']:
        for key in ('loss', 'loss_cls', 'loss_bbox'):
            assert math.isfinite(entry[key]), entry
    first32, first16 = losses['fp32'][0], losses['bf16'][0]
    assert first16['loss'] != first32['loss']  # autocast really changed the arithmetic
    for key in ('loss_cls', 'loss_bbox'):
        assert abs(first16[key] - first32[key]) <= 0.02 * abs(first32[key]), (key, first16,
                                                                              first32)


@pytest.mark.slow
def test_engine_parts_build_from_a_config_that_imports_only_mmrest():
    """``custom_imports=['mmrest']`` is enough to name the hooks and the optimizer
    wrapper: their registries import mmrest.engine on first use."""
    code = '''
import sys
import torch
from mmengine.config import Config
from mmengine.registry import HOOKS, OPTIM_WRAPPERS
cfg = Config(dict(custom_imports=dict(imports=['mmrest'], allow_failed_imports=False)))
from mmengine.utils import import_modules_from_strings
import_modules_from_strings(**cfg.custom_imports)
assert 'mmrest.engine' not in sys.modules
hook = HOOKS.build(dict(type='mmrest.AtomicCheckpointHook', interval=1))
rng = HOOKS.build(dict(type='mmrest.RNGStateHook'))
opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
wrapper = OPTIM_WRAPPERS.build(dict(type='mmrest.CPUAmpOptimWrapper', optimizer=opt))
print(type(hook).__module__, type(rng).__name__, type(wrapper).__name__)
'''
    proc = subprocess.run([PYTHON, '-c', code], capture_output=True, text=True, cwd=REPO,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ['mmrest.engine.checkpointing', 'RNGStateHook',
                                   'CPUAmpOptimWrapper']


@pytest.mark.parametrize('outcome', ['returns', 'data error', 'crash'])
def test_tools_destroy_the_process_group_when_they_succeed(outcome, tmp_path):
    """train.py and test.py destroy the default process group after success (a gloo rank
    left to the exit sometimes aborted) and leave it alone after an error."""
    import gc
    import weakref

    import torch.distributed as dist

    from mmrest.engine import run_tool_cli
    from mmrest.engine.preflight import DatasetCheckError
    dist.init_process_group(
        'gloo', init_method=f'file://{tmp_path / "store"}', rank=0, world_size=1)
    held = []

    def main():
        holder = dict(pg=dist.group.WORLD)
        holder['self'] = holder  # a reference cycle, as a runner and its hooks make
        held.append(weakref.ref(pg_holder := _Holder(holder)))
        pg_holder.cycle = pg_holder
        if outcome == 'data error':
            raise DatasetCheckError('no images')
        if outcome == 'crash':
            raise RuntimeError('boom')

    gc.disable()  # only run_tool_cli's own collection may free the cycle
    try:
        if outcome == 'returns':
            run_tool_cli(main, 'train.py')
            assert not dist.is_initialized() and held[0]() is None
        else:
            with pytest.raises(SystemExit if outcome == 'data error' else RuntimeError):
                run_tool_cli(main, 'train.py')
            assert dist.is_initialized()
    finally:
        gc.enable()
        if dist.is_initialized():
            dist.destroy_process_group()


class _Holder:

    def __init__(self, value) -> None:
        self.value = value
