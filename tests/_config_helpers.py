"""Shared helpers of the config tests: the configs, parsed once, and their models built
once for the static checks."""
import copy
import functools
import glob
import os.path as osp

from mmengine.config import Config
from mmengine.registry import MODELS, init_default_scope

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
MAIN_CONFIGS = sorted(glob.glob(osp.join(ROOT, 'configs', '*.py')))
DEMO_CONFIGS = sorted(glob.glob(osp.join(ROOT, 'configs', 'demo', '*.py')))
ALL_CONFIGS = MAIN_CONFIGS + DEMO_CONFIGS


def config_name(path: str) -> str:
    return osp.relpath(path, osp.join(ROOT, 'configs'))


@functools.lru_cache(maxsize=None)
def _parsed(path: str) -> Config:
    # mmengine re-reads every model-index of a package for each ``pkg::`` base: parse once.
    return Config.fromfile(path)


def fromfile(path: str) -> Config:
    """``Config.fromfile(path)`` (a private copy of a cached parse)."""
    return copy.deepcopy(_parsed(path))


def load_cfg(path: str) -> Config:
    cfg = fromfile(path)
    init_default_scope(cfg.get('default_scope', 'mmengine'))
    return cfg


def model_cfg(cfg: Config, small_seg_size=None) -> dict:
    """The model config as the Runner builds it, with the backbone's weights switched off."""
    model = copy.deepcopy(cfg.model)
    if cfg.get('data_preprocessor') is not None:  # what mmengine's Runner does
        model.setdefault('data_preprocessor', copy.deepcopy(cfg.data_preprocessor))
    model.backbone.init_cfg = None
    if small_seg_size is not None and model.get('data_preprocessor', {}).get('size'):
        model.data_preprocessor.size = small_seg_size
    return model


def build(path: str, small_seg_size=None, init: bool = True):
    cfg = load_cfg(path)
    model = MODELS.build(model_cfg(cfg, small_seg_size))
    if init:
        model.init_weights()
    return cfg, model


@functools.lru_cache(maxsize=None)
def _built_once(path: str):
    return build(path, init=False)


def built(path: str):
    """A model per config, built once (not initialised) for the static checks."""
    cfg, model = _built_once(path)
    init_default_scope(scope_of(cfg))
    return cfg, model


def scope_of(cfg: Config) -> str:
    return cfg.get('default_scope', 'mmengine')


def is_v2(path: str) -> bool:
    return 'restv2' in osp.basename(path)


def optim_wrapper_cfg(cfg: Config, cpu_amp: bool = True) -> dict:
    """A copy of ``cfg.optim_wrapper`` as ``tools/train.py`` uses it on this machine: a
    GPU config's ``AmpOptimWrapper`` becomes the CPU's bfloat16 wrapper without CUDA
    (with ``cpu_amp=False``, the float32 ``OptimWrapper`` of ``--no-amp``)."""
    from mmrest.engine import cpu_amp_config_fix, disable_amp
    copied = Config(dict(optim_wrapper=copy.deepcopy(cfg.optim_wrapper)))
    if cpu_amp:
        cpu_amp_config_fix(copied)
    else:
        disable_amp(copied)
    return copied.optim_wrapper
