"""Reliability and safety for mmengine training runs of mmrest models (``tools/train.py``,
``tools/test.py``); with a runner of your own, call :func:`apply_reliability_hooks` on the
config before building it. Importing it registers mmrest's hooks and optimizer wrapper
(:mod:`mmrest.registry` imports it lazily) and the atomic file backend.
"""
from ..utils.checkpoint import setup_safe_loading
from .amp import CPUAmpOptimWrapper, configure_amp, cpu_amp_config_fix, disable_amp
from .checkpointing import (ATOMIC_BACKEND, AtomicCheckpointHook, apply_reliability_hooks,
                            check_resume_path, checked_load_from, checkpoint_candidates,
                            checkpoint_templates, find_resume_checkpoint, inspect_checkpoint)
from .cli import add_common_tool_arguments, parse_tool_arguments, run_tool_cli
from .compile import PlainParamGroupsHook, prepare_compile
from .config import ToolConfigError, build_runner, default_work_dir, load_tool_config
from .dist import init_cpu_distributed
from .preflight import DatasetCheckError, check_data_config, check_dataset
from .rng_state import RNGStateHook

__all__ = [
    'ATOMIC_BACKEND', 'AtomicCheckpointHook', 'CPUAmpOptimWrapper', 'DatasetCheckError',
    'PlainParamGroupsHook', 'RNGStateHook', 'ToolConfigError', 'add_common_tool_arguments',
    'apply_reliability_hooks', 'build_runner', 'check_data_config', 'check_dataset',
    'check_resume_path', 'checked_load_from', 'checkpoint_candidates', 'checkpoint_templates',
    'configure_amp', 'cpu_amp_config_fix', 'default_work_dir', 'disable_amp',
    'find_resume_checkpoint', 'init_cpu_distributed', 'inspect_checkpoint', 'load_tool_config',
    'parse_tool_arguments', 'prepare_compile', 'run_tool_cli', 'setup_safe_loading'
]
