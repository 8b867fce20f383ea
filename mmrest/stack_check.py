"""The check of the installed stack that ``import mmrest`` runs first: ``pip install .``
installs none of torch, mmcv or mmengine (as mmdet's), so an unsupported one gets one line
naming what was found and what is needed instead of an error from deep inside."""
import importlib
from typing import Dict, Optional, Tuple

#: Import name -> (lowest version, first version not supported, how to get it). The
#: OneDL fork's distributions (onedl-mmengine, onedl-mmcv) keep these import names.
REQUIREMENTS: Dict[str, Tuple[str, str, str]] = {
    'torch': ('2.1.0', '3.0.0', 'https://pytorch.org/get-started/locally/'),
    'mmengine': ('0.10.4', '1.0.0', 'pip install mmengine (or onedl-mmengine)'),
    'mmcv': ('2.1.0', '2.4.0', 'mim install mmcv, or pip install mmcv-lite for the '
             'backbones alone'),
}


def version_tuple(version: str) -> Tuple[int, ...]:
    """(2, 1, 2) for '2.1.2+cu121' or '2.1.2rc1'; pre-releases count as the release."""
    parts = []
    for piece in version.split('+')[0].split('.')[:3]:
        digits = ''
        for char in piece:
            if not char.isdigit():
                break
            digits += char
        parts.append(int(digits or 0))
    return tuple(parts + [0] * (3 - len(parts)))


def stack_problem(name: str, version: Optional[str]) -> Optional[str]:
    """The one-line problem with ``name`` (a key of :data:`REQUIREMENTS`) at ``version``
    (None: not installed), or None where it is supported."""
    low, high, how = REQUIREMENTS[name]
    needed = f'{name}>={low},<{high}'
    if version is None:
        return f'mmrest needs {needed}, which is not installed ({how})'
    if not version_tuple(low) <= version_tuple(version) < version_tuple(high):
        return f'mmrest needs {needed}, found {name} {version} ({how})'
    return None


def check_stack() -> None:
    """Raise ``ImportError`` (one line) unless torch, mmengine and mmcv are installed in
    supported versions."""
    for name in REQUIREMENTS:
        try:
            version: Optional[str] = importlib.import_module(name).__version__
        except ImportError:
            version = None
        problem = stack_problem(name, version)
        if problem is not None:
            raise ImportError(problem)


def resolve_renamed_toolboxes() -> None:
    """Let mmengine find the configs of toolboxes installed under other distribution
    names (``mmseg::`` bases with the OneDL fork's ``onedl-mmsegmentation``): a scope
    whose distribution (``MODULE2PACKAGE``) is missing but whose module imports is mapped
    to the module."""
    from importlib import metadata
    from importlib.util import find_spec

    from mmengine.config import utils as config_utils

    mapping = config_utils.MODULE2PACKAGE
    for module, package in list(mapping.items()):
        if package == module:
            continue
        try:
            metadata.distribution(package)
            continue
        except metadata.PackageNotFoundError:
            pass
        if find_spec(module) is not None:
            mapping[module] = module
