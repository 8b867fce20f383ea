"""Loading a config for ``tools/train.py`` and ``tools/test.py``, and building its runner."""
import os.path as osp
from typing import Any, Optional


class ToolConfigError(ValueError):
    """A tool's options or config that cannot work together (e.g. ``--amp`` with a custom
    optimizer wrapper, a config without ``default_scope``): the user's to fix, so the
    tools end with its message, not a traceback (:func:`mmrest.engine.run_tool_cli`)."""


def type_name(value: Any) -> str:
    """The class name a config's ``type`` entry (a string or a class) names, without its
    scope: ``'CPUAmpOptimWrapper'`` for ``'mmrest.CPUAmpOptimWrapper'``."""
    name = value if isinstance(value, str) else getattr(value, '__name__', str(value))
    return name.split('.')[-1]


def add_custom_hook(cfg: Any, hook_type: str) -> None:
    """Append ``dict(type=hook_type)`` to ``cfg.custom_hooks`` (in place) unless a hook of
    that class (with or without a scope prefix) is already there."""
    hooks = list(cfg.get('custom_hooks') or [])
    if not any(isinstance(h, dict) and type_name(h.get('type')) == type_name(hook_type)
               for h in hooks):
        hooks.append(dict(type=hook_type))
    cfg.custom_hooks = hooks


def default_work_dir(config_path: str) -> str:
    """``./work_dirs/<config name>``, mmdet's default work dir."""
    return osp.join('./work_dirs', osp.splitext(osp.basename(config_path))[0])


def load_tool_config(config_path: str,
                     cfg_options: Optional[dict] = None,
                     launcher: str = 'none',
                     work_dir: Optional[str] = None) -> Any:
    """Load a config for ``tools/train.py`` and ``tools/test.py``: apply ``--cfg-options``,
    enter its default scope and set the work dir (``work_dir``, the config's, or
    :func:`default_work_dir`).

    Args:
        config_path (str): The config file.
        cfg_options (dict, optional): Overrides (``--cfg-options``). Defaults to None.
        launcher (str): The job launcher. Defaults to 'none'.
        work_dir (str, optional): Overrides the work dir. Defaults to None.

    Returns:
        Config: The config.

    Raises:
        FileNotFoundError: If the config file does not exist.
        ToolConfigError: If the config sets no ``default_scope``.
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
        raise ToolConfigError(f'{config_path} sets no default_scope (mmdet, mmseg or '
                              'mmpretrain): inherit a stock base config or set default_scope')
    init_default_scope(scope)
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = default_work_dir(config_path)
    return cfg


def build_runner(cfg: Any) -> Any:
    """mmengine's ``Runner`` from a prepared config, or the config's own ``runner_type``."""
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner
    if 'runner_type' not in cfg:
        return Runner.from_cfg(cfg)
    return RUNNERS.build(cfg)
