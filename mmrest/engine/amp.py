"""Mixed precision: ``--amp`` / ``--no-amp`` rewriting of a config's ``optim_wrapper``, and
bfloat16 autocast on the CPU, where mmengine's ``AmpOptimWrapper`` refuses to run
(:class:`CPUAmpOptimWrapper`: the forward pass autocast to bfloat16, parameters, gradients
and optimizer state float32, no loss scaling).
"""
from contextlib import contextmanager
from typing import Any, Optional, Tuple, Union

import torch
from mmengine.optim import OptimWrapper
from torch import nn

from ..registry import OPTIM_WRAPPERS
from .config import ToolConfigError, type_name

CPU_AMP_WRAPPER = 'mmrest.CPUAmpOptimWrapper'
#: The wrapper types ``--amp`` and ``--no-amp`` know how to rewrite.
_KNOWN_WRAPPERS = ('OptimWrapper', 'AmpOptimWrapper', 'CPUAmpOptimWrapper')
#: Arguments of mmengine 0.10.7's ``AmpOptimWrapper`` (and of :class:`CPUAmpOptimWrapper`)
#: that its base class ``OptimWrapper`` does not take.
AMP_ONLY_KEYS = ('loss_scale', 'dtype', 'use_fsdp')


@OPTIM_WRAPPERS.register_module()
class CPUAmpOptimWrapper(OptimWrapper):
    """``OptimWrapper`` that autocasts the forward pass on the CPU.

    Args:
        dtype (str | torch.dtype): Autocast dtype; the CPU supports ``'bfloat16'``.
            Defaults to 'bfloat16'.
        **kwargs: Arguments of :class:`mmengine.optim.OptimWrapper`.
    """

    def __init__(self, dtype: Union[str, torch.dtype] = 'bfloat16', **kwargs) -> None:
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype, None)
        if dtype is not torch.bfloat16:
            raise ValueError(
                f'CPUAmpOptimWrapper: CPU autocast here supports dtype=bfloat16 only, got '
                f'{dtype!r}')
        super().__init__(**kwargs)
        self.cast_dtype = dtype

    @contextmanager
    def optim_context(self, model: nn.Module):
        """Gradient-accumulation context of ``OptimWrapper`` plus bfloat16 autocast."""
        with super().optim_context(model), torch.autocast(
                device_type='cpu', dtype=self.cast_dtype):
            yield


def _known_wrapper(cfg: Any, flag: str, action: str) -> Tuple[dict, str]:
    """``cfg.optim_wrapper`` and its type; ``ToolConfigError`` unless ``flag`` can
    rewrite it (a dict of one of :data:`_KNOWN_WRAPPERS`)."""
    wrapper = cfg.get('optim_wrapper')
    if not isinstance(wrapper, dict):
        raise ToolConfigError(f'{flag}: the config has no optim_wrapper dict to {action} '
                              'mixed precision in')
    wrapper_type = type_name(wrapper.get('type', 'OptimWrapper'))
    if wrapper_type not in _KNOWN_WRAPPERS:
        raise ToolConfigError(f'{flag}: optim_wrapper type {wrapper_type!r} is not an '
                              f'{"/".join(_KNOWN_WRAPPERS)}; {action} mixed precision in '
                              'the config')
    return wrapper, wrapper_type


def configure_amp(cfg: Any, device: Optional[str] = None, logger=None) -> str:
    """Turn on mixed precision in ``cfg.optim_wrapper``: mmengine's ``AmpOptimWrapper``
    (dynamic loss scaling, the config's ``dtype`` or float16) on CUDA,
    ``mmrest.CPUAmpOptimWrapper`` (bfloat16 only) on the CPU.

    Args:
        cfg (Config): The config, modified in place.
        device (str, optional): ``'cuda'`` or ``'cpu'``. Defaults to None (CUDA if
            available).
        logger (optional): Gets an info line. Defaults to None.

    Returns:
        str: The autocast dtype in use (``'float16'``, ``'bfloat16'``...).

    Raises:
        ToolConfigError: If the config has no ``optim_wrapper`` or asks for a dtype the CPU
            cannot autocast to.
    """
    if device is None:
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    wrapper, wrapper_type = _known_wrapper(cfg, '--amp', 'enable')
    dtype = wrapper.get('dtype')
    dtype_name = type_name(dtype) if dtype is not None else None
    if device == 'cpu':
        if dtype_name not in (None, 'bfloat16'):
            raise ToolConfigError(
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


def disable_amp(cfg: Any, logger=None) -> bool:
    """Turn off mixed precision in ``cfg.optim_wrapper``: an AMP wrapper becomes
    mmengine's float32 ``OptimWrapper`` without the arguments only AMP wrappers take
    (:data:`AMP_ONLY_KEYS`); everything else is kept.

    Args:
        cfg (Config): The config, modified in place.
        logger (optional): Gets an info line. Defaults to None.

    Returns:
        bool: Whether the config was changed.

    Raises:
        ToolConfigError: If the config has no ``optim_wrapper`` dict or its type is not
            ``OptimWrapper``, ``AmpOptimWrapper`` or ``CPUAmpOptimWrapper``.
    """
    wrapper, wrapper_type = _known_wrapper(cfg, '--no-amp', 'turn off')
    dropped = [key for key in AMP_ONLY_KEYS if key in wrapper]
    for key in dropped:
        wrapper.pop(key)
    changed = bool(dropped)
    if wrapper_type != 'OptimWrapper':
        wrapper['type'] = 'OptimWrapper'
        changed = True
    if logger is not None:
        if changed:
            dropped_text = f', dropped {", ".join(dropped)}' if dropped else ''
            logger.info(f'mixed precision off: float32 OptimWrapper instead of '
                        f'{wrapper_type}{dropped_text}')
        else:
            logger.info('mixed precision off: the config already uses the float32 '
                        'OptimWrapper')
    return changed


def cpu_amp_config_fix(cfg: Any) -> bool:
    """Make a config's ``AmpOptimWrapper`` the CPU one on a machine without CUDA (in
    place); returns whether the config was changed."""
    wrapper = cfg.get('optim_wrapper')
    if torch.cuda.is_available() or not isinstance(wrapper, dict):
        return False
    if type_name(wrapper.get('type', '')) != 'AmpOptimWrapper':
        return False
    configure_amp(cfg, device='cpu')
    return True
