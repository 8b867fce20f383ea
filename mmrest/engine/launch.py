"""Command line and config adjustments shared by ``tools/train.py`` and ``tools/test.py``."""
import argparse
import os
import os.path as osp
import subprocess
import sys
from typing import Any, Callable, List, Optional

import torch

RELIABLE_CHECKPOINT_HOOK = 'mmrest.AtomicCheckpointHook'
RNG_STATE_HOOK = 'mmrest.RNGStateHook'
CPU_AMP_WRAPPER = 'mmrest.CPUAmpOptimWrapper'


def add_common_tool_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options both tools take: ``--cfg-options``, ``--launcher``, the pre-flight
    data check (``--data-check-images``, ``--no-data-check``) and ``--local-rank``.

    Args:
        parser (argparse.ArgumentParser): The tool's parser, extended in place.
    """
    from mmengine.config import DictAction
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override settings of the config, key=value (nested keys with dots, lists '
        'as key="[a,b]" or key=a,b)')
    parser.add_argument(
        '--launcher',
        choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none',
        help='job launcher')
    parser.add_argument(
        '--data-check-images',
        type=int,
        default=16,
        help='images decoded per dataset by the pre-flight data check (-1: all, '
        '0: none)')
    parser.add_argument(
        '--no-data-check', action='store_true', help='skip the pre-flight data check')
    # torch.distributed.launch passes --local-rank (newer) or --local_rank (older)
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


def parse_tool_arguments(parser: argparse.ArgumentParser,
                         argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse a tool's command line; sets ``LOCAL_RANK`` from ``--local-rank`` if unset.

    Args:
        parser (argparse.ArgumentParser): A parser with :func:`add_common_tool_arguments`.
        argv (list[str], optional): Arguments. Defaults to None (``sys.argv``).

    Returns:
        argparse.Namespace: The parsed arguments.
    """
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def build_runner(cfg: Any) -> Any:
    """mmengine's ``Runner`` from a config, or the config's own ``runner_type``.

    Args:
        cfg (Config): The prepared config.

    Returns:
        Runner: The runner.
    """
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner
    if 'runner_type' not in cfg:
        return Runner.from_cfg(cfg)
    return RUNNERS.build(cfg)


def run_tool_cli(main: Callable[[], Any], prog: str) -> None:
    """Run a tool's ``main``; data and checkpoint problems end with a one-line message
    and exit status 1 instead of a traceback.

    Args:
        main (Callable): The tool's entry point (reads ``sys.argv``).
        prog (str): The tool's name in the message.
    """
    from mmrest.utils import CheckpointError

    from .preflight import DatasetCheckError
    try:
        main()
    except (DatasetCheckError, CheckpointError, FileNotFoundError) as err:
        print(f'{prog}: error: {type(err).__name__}: {err}', file=sys.stderr)
        sys.exit(1)


def _type_name(value: Any) -> str:
    return value if isinstance(value, str) else getattr(value, '__name__', str(value))


def apply_reliability_hooks(cfg: Any) -> None:
    """Install the crash-safe checkpoint hook and the RNG state hook in a config.

    ``default_hooks.checkpoint`` of type ``CheckpointHook`` becomes
    ``mmrest.AtomicCheckpointHook`` with the same arguments (mmengine's default, an
    epoch-interval ``CheckpointHook``, if the config has none); a disabled checkpoint hook
    (``None``) and custom checkpoint hooks are left alone. ``mmrest.RNGStateHook`` is
    added to ``custom_hooks`` unless present.

    Args:
        cfg (Config): The config, modified in place.
    """
    default_hooks = cfg.get('default_hooks')
    if default_hooks is None:
        cfg.default_hooks = dict()
        default_hooks = cfg.default_hooks
    if 'checkpoint' not in default_hooks:
        default_hooks['checkpoint'] = dict(type=RELIABLE_CHECKPOINT_HOOK, interval=1)
    else:
        hook = default_hooks['checkpoint']
        if isinstance(hook, dict) and _type_name(hook.get('type')).split('.')[-1] == \
                'CheckpointHook':
            hook['type'] = RELIABLE_CHECKPOINT_HOOK
    custom_hooks = list(cfg.get('custom_hooks') or [])
    if not any(isinstance(h, dict) and _type_name(h.get('type')).split('.')[-1] ==
               'RNGStateHook' for h in custom_hooks):
        custom_hooks.append(dict(type=RNG_STATE_HOOK))
    cfg.custom_hooks = custom_hooks


def register_in_scope(scope: str) -> List[str]:
    """Make mmrest's models buildable without the ``mmrest.`` prefix in a scope.

    ``type='mmrest.ResT'`` works in any scope; this also lets ``type='ResT'`` build in
    the config's default scope (``mmdet``, ``mmseg``, ``mmpretrain``) by registering each
    mmrest model there under its own name, unless that scope already has one.

    Args:
        scope (str): The default scope of the config.

    Returns:
        list[str]: The names registered.
    """
    import importlib

    from ..registry import MODELS as MMREST_MODELS
    try:
        target = importlib.import_module(f'{scope}.registry').MODELS
    except (ImportError, AttributeError):
        return []
    added = []
    for name, module in MMREST_MODELS.module_dict.items():
        if name not in target.module_dict:
            target.register_module(name=name, module=module)
            added.append(name)
    return added


def checkpoint_templates(cfg: Any) -> tuple:
    """File name templates of the periodic checkpoints a config writes.

    Args:
        cfg (Config): The config.

    Returns:
        tuple[str]: ``filename_tmpl`` of the checkpoint hook if set, plus mmengine's
        defaults.
    """
    templates = ['iter_{}.pth', 'epoch_{}.pth']
    hook = (cfg.get('default_hooks') or {}).get('checkpoint')
    if isinstance(hook, dict) and hook.get('filename_tmpl'):
        templates.insert(0, hook['filename_tmpl'])
    return tuple(templates)


def configure_amp(cfg: Any, device: Optional[str] = None, logger=None) -> str:
    """Turn on automatic mixed precision in ``cfg.optim_wrapper``.

    On CUDA: mmengine's ``AmpOptimWrapper`` with dynamic loss scaling and the config's
    ``dtype`` (float16 unless the config says otherwise). On the CPU:
    ``mmrest.CPUAmpOptimWrapper`` (bfloat16 autocast; the CPU has no float16 autocast in
    mmengine); a config asking for another dtype on the CPU is an error.

    Args:
        cfg (Config): The config, modified in place.
        device (str, optional): ``'cuda'`` or ``'cpu'``. Defaults to None (CUDA if
            available).
        logger (optional): Gets an info line. Defaults to None.

    Returns:
        str: The autocast dtype in use (``'float16'``, ``'bfloat16'``...).

    Raises:
        ValueError: If the config has no ``optim_wrapper`` or asks for a dtype the CPU
            cannot autocast to.
    """
    if device is None:
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    wrapper = cfg.get('optim_wrapper')
    if not isinstance(wrapper, dict):
        raise ValueError('--amp: the config has no optim_wrapper dict to enable AMP in')
    wrapper_type = _type_name(wrapper.get('type', 'OptimWrapper')).split('.')[-1]
    if wrapper_type not in ('OptimWrapper', 'AmpOptimWrapper', 'CPUAmpOptimWrapper'):
        raise ValueError(f'--amp: optim_wrapper type {wrapper_type!r} is not an '
                         f'OptimWrapper/AmpOptimWrapper; enable mixed precision in the config')
    dtype = wrapper.get('dtype')
    dtype_name = _type_name(dtype).replace('torch.', '') if dtype is not None else None
    if device == 'cpu':
        if dtype_name not in (None, 'bfloat16'):
            raise ValueError(
                f'--amp on the CPU: autocast supports bfloat16 only, but the config sets '
                f'optim_wrapper.dtype={dtype_name!r}')
        wrapper['type'] = CPU_AMP_WRAPPER
        wrapper['dtype'] = 'bfloat16'
        wrapper.pop('loss_scale', None)
        used = 'bfloat16'
    else:
        if wrapper_type != 'AmpOptimWrapper':
            wrapper['type'] = 'AmpOptimWrapper'
        wrapper.setdefault('loss_scale', 'dynamic')
        used = dtype_name or 'float16'
    if logger is not None:
        logger.info(f'mixed precision: {used} autocast on {device}')
    return used


def cpu_amp_config_fix(cfg: Any) -> bool:
    """A config with ``AmpOptimWrapper`` run on a machine without CUDA: use the CPU one.

    Args:
        cfg (Config): The config, modified in place.

    Returns:
        bool: Whether the config was changed.
    """
    wrapper = cfg.get('optim_wrapper')
    if torch.cuda.is_available() or not isinstance(wrapper, dict):
        return False
    if _type_name(wrapper.get('type', '')).split('.')[-1] != 'AmpOptimWrapper':
        return False
    configure_amp(cfg, device='cpu')
    return True


def _slurm_env() -> None:
    """Fill torch.distributed's env:// variables from Slurm's, as mmengine does."""
    proc_id = int(os.environ['SLURM_PROCID'])
    ntasks = int(os.environ['SLURM_NTASKS'])
    node_list = os.environ['SLURM_NODELIST']
    addr = subprocess.getoutput(f'scontrol show hostname {node_list} | head -n1').strip()
    os.environ.setdefault('MASTER_PORT', '29500')
    os.environ.setdefault('MASTER_ADDR', addr or '127.0.0.1')
    os.environ['WORLD_SIZE'] = str(ntasks)
    os.environ['LOCAL_RANK'] = os.environ.get('SLURM_LOCALID', '0')
    os.environ['RANK'] = str(proc_id)


def init_cpu_distributed(cfg: Any, launcher: str) -> bool:
    """Start CPU (gloo) distributed training where mmengine 0.10.7 would fail.

    mmengine's ``init_dist`` calls ``torch.cuda.set_device`` and its DDP wrapper passes
    ``device_ids=[LOCAL_RANK]``; both fail without a GPU. On a machine without CUDA this
    initialises the process group with gloo from the launcher's environment (torchrun:
    ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``; Slurm: ``SLURM_*``) and sets
    ``model_wrapper_cfg.device_ids=None``. The runner then finds the group initialised.

    Args:
        cfg (Config): The config, modified in place.
        launcher (str): ``'none'``, ``'pytorch'``, ``'slurm'`` or ``'mpi'``.

    Returns:
        bool: Whether a CPU process group was started.
    """
    import torch.distributed as dist
    if launcher == 'none' or torch.cuda.is_available():
        return False
    if launcher == 'slurm':
        _slurm_env()
    elif launcher == 'mpi':
        os.environ.setdefault('RANK', os.environ['OMPI_COMM_WORLD_RANK'])
        os.environ.setdefault('WORLD_SIZE', os.environ['OMPI_COMM_WORLD_SIZE'])
        os.environ.setdefault('LOCAL_RANK', os.environ['OMPI_COMM_WORLD_LOCAL_RANK'])
        os.environ.setdefault('MASTER_ADDR', '127.0.0.1')
        os.environ.setdefault('MASTER_PORT', '29500')
    env_cfg = cfg.get('env_cfg') or {}
    dist_cfg = dict(env_cfg.get('dist_cfg') or {})
    dist_cfg['backend'] = 'gloo'
    env_cfg['dist_cfg'] = dist_cfg
    cfg.env_cfg = env_cfg
    wrapper = cfg.get('model_wrapper_cfg')
    if wrapper is None:
        wrapper = dict(type='MMDistributedDataParallel', broadcast_buffers=False,
                       find_unused_parameters=cfg.get('find_unused_parameters', False))
    wrapper['device_ids'] = None
    cfg.model_wrapper_cfg = wrapper
    if not dist.is_initialized():
        kwargs = {}
        if 'timeout' in dist_cfg:
            import datetime
            kwargs['timeout'] = datetime.timedelta(seconds=dist_cfg['timeout'])
        dist.init_process_group(backend='gloo', **kwargs)
    return True


def default_work_dir(config_path: str) -> str:
    """``./work_dirs/<config name>``, mmdet's default.

    Args:
        config_path (str): The config file.

    Returns:
        str: The work dir.
    """
    return osp.join('./work_dirs', osp.splitext(osp.basename(config_path))[0])


def load_tool_config(config_path: str,
                     cfg_options: Optional[dict] = None,
                     launcher: str = 'none',
                     work_dir: Optional[str] = None) -> Any:
    """Load a config the way ``tools/train.py`` and ``tools/test.py`` both need it.

    Reads the file, applies ``--cfg-options``, enters the config's default scope (mmdet,
    mmseg or mmpretrain), makes ``type='ResT'`` resolve in it, and sets the work dir
    (``work_dir``, else the config's, else ``./work_dirs/<config name>``).

    Args:
        config_path (str): The config file.
        cfg_options (dict, optional): Overrides (``--cfg-options``). Defaults to None.
        launcher (str): The job launcher. Defaults to 'none'.
        work_dir (str, optional): Overrides the work dir. Defaults to None.

    Returns:
        Config: The config.

    Raises:
        FileNotFoundError: If the config file does not exist.
        ValueError: If the config sets no ``default_scope``.
    """
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    if not osp.isfile(config_path):
        raise FileNotFoundError(f'config file not found: {config_path}')
    cfg = Config.fromfile(config_path)
    cfg.launcher = launcher
    if cfg_options is not None:
        cfg.merge_from_dict(cfg_options)
    scope = cfg.get('default_scope')
    if not scope:
        raise ValueError(f'{config_path} sets no default_scope (mmdet, mmseg or mmpretrain): '
                         f'inherit a stock base config or set default_scope')
    init_default_scope(scope)
    register_in_scope(scope)
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = default_work_dir(config_path)
    return cfg
