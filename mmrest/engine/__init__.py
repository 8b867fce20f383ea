"""Reliability and safety for mmengine training runs of mmrest models.

Used by ``tools/train.py`` and ``tools/test.py``; with a runner of your own::

    from mmrest.engine import apply_reliability_hooks, setup_safe_loading
    setup_safe_loading()            # resume/load_from work on torch >= 2.6, safely
    apply_reliability_hooks(cfg)    # atomic checkpoints + RNG state (before building)
    runner = Runner.from_cfg(cfg)

Importing this module registers ``mmrest.AtomicCheckpointHook``,
``mmrest.RNGStateHook`` and ``mmrest.CPUAmpOptimWrapper`` in the registries of
:mod:`mmrest.registry`, which import it lazily: a config that names them needs only
``custom_imports=dict(imports=['mmrest'])``. It changes nothing else until
:func:`setup_safe_loading` is called.
"""
from .hooks import AtomicCheckpointHook, RNGStateHook
from .launch import (add_common_tool_arguments, apply_reliability_hooks, build_runner,
                     checkpoint_templates, configure_amp, cpu_amp_config_fix,
                     default_work_dir, init_cpu_distributed, load_tool_config,
                     parse_tool_arguments, register_in_scope, run_tool_cli)
from .optim import CPUAmpOptimWrapper
from .preflight import DatasetCheckError, check_data_config, check_dataset
from ..registry import HOOKS, OPTIM_WRAPPERS
from .resume import (check_resume_path, checkpoint_candidates, find_resume_checkpoint,
                     inspect_checkpoint)
from .safe_globals import (SAFE_GLOBAL_REASONS, mmengine_safe_globals,
                           setup_safe_loading)

__all__ = [
    'AtomicCheckpointHook', 'RNGStateHook', 'CPUAmpOptimWrapper', 'HOOKS', 'OPTIM_WRAPPERS',
    'DatasetCheckError', 'SAFE_GLOBAL_REASONS', 'add_common_tool_arguments',
    'apply_reliability_hooks', 'build_runner', 'check_data_config', 'check_dataset',
    'check_resume_path', 'checkpoint_candidates', 'checkpoint_templates', 'configure_amp', 'cpu_amp_config_fix',
    'default_work_dir', 'find_resume_checkpoint', 'init_cpu_distributed',
    'inspect_checkpoint', 'load_tool_config', 'mmengine_safe_globals',
    'parse_tool_arguments', 'register_in_scope', 'run_tool_cli', 'setup_safe_loading'
]
