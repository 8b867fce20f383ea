"""What differs between the torch versions mmrest supports (2.1 and newer), in one place:
the newest API where torch has it, its older equivalent otherwise."""
import contextlib
from typing import ContextManager, Optional, Tuple

import torch

from ..stack_check import version_tuple


def _flag(*names: str) -> bool:
    """The first of ``torch`` attributes ``names`` (dotted) that exists, called."""
    for name in names:
        obj = torch
        for part in name.split('.'):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None:
            return bool(obj())
    return False


def is_recording_graph() -> bool:
    """Whether a graph is being recorded: ``torch.export`` (hence dynamo ONNX export),
    TorchScript ONNX export, ``torch.jit.trace`` or ``torch.compile``."""
    return (torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()
            or _flag('compiler.is_exporting')
            or _flag('compiler.is_compiling', '_dynamo.is_compiling'))


def autocast_available(device_type: str) -> bool:
    """Whether ``torch.autocast`` supports ``device_type`` (not e.g. ``meta``)."""
    check = getattr(getattr(torch, 'amp', None), 'is_autocast_available', None)
    if check is not None:  # torch >= 2.4
        return bool(check(device_type))
    return device_type in ('cpu', 'cuda', 'xpu', 'hpu')


def autocast_off(device_type: str) -> ContextManager:
    """``torch.autocast(device_type, enabled=False)``, or nothing where the device has
    no autocast (``torch.autocast`` raises there)."""
    if autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype of ``device_type`` if autocast is on there, else None."""
    if not autocast_available(device_type):
        return None
    if hasattr(torch, 'get_autocast_dtype'):  # torch >= 2.4
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return None
    if device_type == 'cpu':
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
    if device_type == 'cuda':
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
    return None


def torch_version() -> Tuple[int, int]:
    """(major, minor) of the installed torch, e.g. (2, 1) for '2.1.2+cu121'."""
    return version_tuple(torch.__version__)[:2]


def require_torch(version: str, feature: str) -> None:
    """Raise ``RuntimeError`` (one line naming ``feature``) on a torch older than
    ``version`` (e.g. '2.6')."""
    if torch_version() < version_tuple(version)[:2]:
        raise RuntimeError(f'{feature} needs torch >= {version}, found torch '
                           f'{torch.__version__}')
