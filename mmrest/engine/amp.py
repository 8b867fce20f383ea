"""Mixed precision: ``--amp`` / ``--no-amp`` rewriting of a config, and bfloat16 autocast
on the CPU.

:func:`configure_amp` turns on mixed precision in a config's ``optim_wrapper`` (mmengine's
``AmpOptimWrapper`` on CUDA, :class:`CPUAmpOptimWrapper` on the CPU);
:func:`disable_amp` turns it off (mmengine's float32 ``OptimWrapper`` on any device);
:func:`cpu_amp_config_fix` moves a config that asks for ``AmpOptimWrapper`` to the CPU
wrapper on a machine without CUDA.

mmengine 0.10.7's ``AmpOptimWrapper`` refuses to run without a GPU (an assertion in its
constructor), although its ``autocast`` helper supports the CPU with bfloat16.
:class:`CPUAmpOptimWrapper` is the CPU counterpart: the forward pass (``train_step`` runs
it inside ``optim_context``) is autocast to bfloat16, the backward pass follows the
autocast graph, parameters, gradients and optimizer state stay float32. No loss scaling:
bfloat16 has float32's exponent range.
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
        """Gradient-accumulation context of ``OptimWrapper`` plus bfloat16 autocast.

        Args:
            model (nn.Module): The model being trained.
        """
        with super().optim_context(model), torch.autocast(
                device_type='cpu', dtype=self.cast_dtype):
            yield


def _known_wrapper(cfg: Any, flag: str, action: str) -> Tuple[dict, str]:
    """``cfg.optim_wrapper`` and its type, if ``flag`` can rewrite it.

    Raises:
        ToolConfigError: If there is no ``optim_wrapper`` dict, or its type is not one of
            ``OptimWrapper``, ``AmpOptimWrapper`` and ``CPUAmpOptimWrapper``.
    """
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
    """Turn off automatic mixed precision in ``cfg.optim_wrapper``, on any device.

    An ``AmpOptimWrapper`` or ``mmrest.CPUAmpOptimWrapper`` becomes mmengine's float32
    ``OptimWrapper``, and the arguments only the AMP wrappers take (``loss_scale``,
    ``dtype``, ``use_fsdp``) are dropped; the optimizer, ``clip_grad``,
    ``accumulative_counts`` and the constructor's settings are kept. A config that is
    already float32 is left as it is.

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
    """A config with ``AmpOptimWrapper`` run on a machine without CUDA: use the CPU one.

    Args:
        cfg (Config): The config, modified in place.

    Returns:
        bool: Whether the config was changed.
    """
    wrapper = cfg.get('optim_wrapper')
    if torch.cuda.is_available() or not isinstance(wrapper, dict):
        return False
    if type_name(wrapper.get('type', '')) != 'AmpOptimWrapper':
        return False
    configure_amp(cfg, device='cpu')
    return True
