"""Reading checkpoint files safely.

:func:`safe_load_checkpoint` loads with ``torch.load(weights_only=True)`` (before torch 2.6
with :class:`RestrictedUnpickler`): nothing in the file can run code, and a damaged file
(:class:`CheckpointError`) is told from an unsafe one (:class:`UnsafeCheckpointError`).
:func:`setup_safe_loading` (run by ``import mmrest``) adds exactly the types mmengine
writes into training checkpoints to torch's allowlist (:func:`mmengine_safe_globals`) and
makes :func:`safe_load_checkpoint` mmengine's loader of local files.
"""
import _compat_pickle
import builtins
import codecs
import os
import os.path as osp
import pickle
import urllib.parse
import zipfile
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from mmengine.logging.history_buffer import HistoryBuffer
from mmengine.utils import digit_version

try:  # numpy >= 2
    from numpy._core import multiarray as _np_multiarray
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _np_multiarray

PathLike = Union[str, os.PathLike]
SafeGlobal = Union[Callable, type, Tuple[Any, str]]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unsafe, corrupted, or of the wrong model."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint holding objects whose unpickling could run code (never unpickled)."""


# ---------------------------------------------------------------- the allowlist

# The methods HistoryBuffer pickles by reference (HistoryBuffer._set_default_statistics).
_HISTORY_BUFFER_METHODS = ('min', 'max', 'current', 'mean')


class RefusedGlobalError(pickle.UnpicklingError):
    """A checkpoint refers to an object that is not allowed (refused before it is
    used, by :class:`RestrictedUnpickler` or :func:`history_buffer_getattr`)."""


def history_buffer_getattr(obj: Any, name: str) -> Callable:
    """Stand-in for ``getattr`` while unpickling: ``HistoryBuffer.<name>`` for its
    statistics methods; :class:`RefusedGlobalError` for anything else."""
    if obj is HistoryBuffer and name in _HISTORY_BUFFER_METHODS:
        return builtins.getattr(HistoryBuffer, name)
    raise RefusedGlobalError(
        f'refusing getattr({obj!r}, {name!r}) in a checkpoint: only the statistics methods '
        f'{_HISTORY_BUFFER_METHODS} of mmengine HistoryBuffer are allowed')


def mmengine_safe_globals() -> List[SafeGlobal]:
    """The types :func:`setup_safe_loading` allows, in ``add_safe_globals`` form
    (classes, functions, and ``(object, 'module.name')`` pairs): those found in
    checkpoints of mmdet, mmseg and mmpretrain runs (tests/test_resume.py)."""
    entries: List[SafeGlobal] = [
        # message_hub['log_scalars']: a HistoryBuffer (two numpy arrays) per scalar, whose
        # pickle names its statistics methods as getattr(HistoryBuffer, name): only those
        HistoryBuffer,
        (history_buffer_getattr, 'builtins.getattr'),
        # numpy arrays and scalars (HistoryBuffer, metainfo, RNG states, metric values),
        # under numpy 2's and numpy 1's names
        np.ndarray,
        np.dtype,
        (_np_multiarray._reconstruct, 'numpy._core.multiarray._reconstruct'),
        (_np_multiarray._reconstruct, 'numpy.core.multiarray._reconstruct'),
        (_np_multiarray.scalar, 'numpy._core.multiarray.scalar'),
        (_np_multiarray.scalar, 'numpy.core.multiarray.scalar'),
    ]
    if hasattr(np, 'dtypes'):  # numpy >= 1.25 rebuilds dtypes through their classes
        entries.extend(dict.fromkeys(type(np.dtype(code)) for code in np.typecodes['All']
                                     if np.dtype(code).kind in 'biufc'))
    return entries


def torch_allowlist_usable() -> bool:
    """Whether torch's weights-only unpickler can read mmengine checkpoints here: it
    needs ``add_safe_globals`` with ``(object, 'module.name')`` entries (torch >= 2.6)."""
    return digit_version(torch.__version__) >= digit_version('2.6.0')


def setup_safe_loading() -> None:
    """Add :func:`mmengine_safe_globals` to torch's allowlist (torch >= 2.6) and make
    :func:`safe_load_checkpoint` mmengine's loader of local files. Idempotent."""
    if torch_allowlist_usable():
        torch.serialization.add_safe_globals(mmengine_safe_globals())
    # mmengine's own local-file loader unpickles with weights_only=False before torch 2.6,
    # and in the OneDL fork after a refusal: its registry of loaders gets a safe one
    from mmengine.runner.checkpoint import CheckpointLoader
    CheckpointLoader.register_scheme(prefixes='', loader=_safe_local_loader, force=True)


def _safe_local_loader(filename: str, map_location: Any = None) -> Any:
    """mmengine's loader of local checkpoint files, reading them with
    :func:`safe_load_checkpoint` (registered by :func:`setup_safe_loading`)."""
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'{filename} can not be found.')
    return safe_load_checkpoint(filename, map_location=map_location)


# ------------------------------------------------------ the restricted unpickler

def _restricted_globals() -> Dict[Tuple[str, str], Any]:
    """``(module, name) -> object`` for every global :class:`RestrictedUnpickler` allows:
    what ``torch.save`` writes for tensors, parameters and plain containers, and
    :func:`mmengine_safe_globals`."""
    import collections
    import torch._utils as tu
    allowed: Dict[Tuple[str, str], Any] = {
        ('collections', 'OrderedDict'): collections.OrderedDict,
        ('torch', 'Size'): torch.Size,
        ('torch', 'Tensor'): torch.Tensor,
        ('torch', 'device'): torch.device,
        ('torch.nn.parameter', 'Parameter'): torch.nn.Parameter,
        ('torch._tensor', '_rebuild_from_type_v2'): torch._tensor._rebuild_from_type_v2,
        ('_codecs', 'encode'): codecs.encode,  # bytes, in pickle protocol 2
        ('builtins', 'set'): set,
        ('builtins', 'frozenset'): frozenset,
        ('builtins', 'slice'): slice,
        ('builtins', 'complex'): complex,
    }
    for name in ('_rebuild_tensor', '_rebuild_tensor_v2', '_rebuild_parameter',
                 '_rebuild_parameter_with_state'):
        if hasattr(tu, name):
            allowed[('torch._utils', name)] = getattr(tu, name)
    for value in vars(torch).values():
        if isinstance(value, torch.dtype):
            allowed[('torch', str(value).split('.')[-1])] = value
    for entry in mmengine_safe_globals():
        obj, qualified = entry if isinstance(entry, tuple) else (
            entry, f'{entry.__module__}.{entry.__qualname__}')
        module, _, name = qualified.rpartition('.')
        allowed[(module, name)] = obj
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds only tensors, plain containers and the types of
    :func:`mmengine_safe_globals`; any other global is refused before it is looked up.
    :func:`safe_load_checkpoint` uses it on torch < 2.6."""

    _allowed: Optional[Dict[Tuple[str, str], Any]] = None

    def find_class(self, module: str, name: str) -> Any:
        cls = type(self)
        if cls._allowed is None:
            cls._allowed = _restricted_globals()
        # the Python 2 names that pickle protocol 2 writes (``__builtin__``), mapped as
        # pickle's own find_class does
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        try:
            return cls._allowed[(module, name)]
        except KeyError:
            # named as torch's weights-only unpickler names it (builtins bare)
            qualified = name if module == 'builtins' else f'{module}.{name}'
            raise RefusedGlobalError(
                f'Unsupported global: GLOBAL {qualified} is not an allowed type '
                '(tensors, plain containers and the types mmengine writes)') from None


class _RestrictedPickleModule:
    """The ``pickle_module`` that makes ``torch.load`` use :class:`RestrictedUnpickler`."""
    Unpickler = RestrictedUnpickler
    UnpicklingError = pickle.UnpicklingError

    @staticmethod
    def load(file: Any, **kwargs: Any) -> Any:
        return RestrictedUnpickler(file, **kwargs).load()


def restricted_torch_load(path: PathLike, map_location: Any = 'cpu') -> Any:
    """``torch.load`` with :class:`RestrictedUnpickler` (any torch version); raises
    :class:`RefusedGlobalError` for a global that is not allowed."""
    return torch.load(os.fspath(path), map_location=map_location,
                      pickle_module=_RestrictedPickleModule, weights_only=False)


# ---------------------------------------------------------------- safe reading

# Refusals of torch's weights-only unpickler that mean "this is not a pickle torch
# wrote" rather than "this pickle asks for something that is not allowed".
_MALFORMED_PICKLE = ('Unsupported operand', 'String is too long', 'negative argument')


def _unpickling_reason(err: BaseException) -> str:
    """The informative line of torch's ``Weights only load failed`` message, without
    torch's advice to allowlist what was refused."""
    text = str(err)
    _, found, rest = text.partition('WeightsUnpickler error:')
    lines = [line.strip() for line in (rest if found else text).splitlines() if line.strip()]
    if not lines:
        return repr(err)
    return lines[0].split(' Please use `torch.serialization')[0].rstrip('.')


def _not_a_checkpoint(path: str, detail: str) -> CheckpointError:
    return CheckpointError(f'cannot read checkpoint {path}: it is not a torch checkpoint, '
                           f'or it is truncated or corrupted ({detail})')


def _check_container(path: str) -> bool:
    """Refuse missing files and files that are neither a zip archive nor a pickle
    (torch's two formats); return whether the file is a zip archive."""
    if not osp.isfile(path):
        raise FileNotFoundError(f'checkpoint file not found: {path}')
    if osp.getsize(path) == 0:
        raise _not_a_checkpoint(path, 'the file is empty')
    with open(path, 'rb') as f:
        magic = f.read(4)
    if magic != b'PK\x03\x04' and magic[:1] != b'\x80':
        raise _not_a_checkpoint(path, f'it starts with {magic!r}, neither a zip archive '
                                'nor a pickle')
    return magic == b'PK\x03\x04'


def safe_load_checkpoint(path: PathLike,
                         map_location: Any = 'cpu',
                         mmap: bool = False) -> Any:
    """Load a checkpoint file with ``torch.load(weights_only=True)`` (on torch < 2.6
    with :class:`RestrictedUnpickler`): nothing in the file can run code.

    Args:
        path (str | PathLike): Local checkpoint file.
        map_location (str | torch.device | callable): As in ``torch.load``.
            Defaults to 'cpu'.
        mmap (bool): Memory-map the tensors (zip files on torch >= 2.6). Defaults to False.

    Returns:
        Any: The loaded object (tensors in plain containers).

    Raises:
        FileNotFoundError: If the file does not exist.
        UnsafeCheckpointError: If it holds anything but tensors, plain containers and
            allowed types (never unpickled).
        CheckpointError: If it is not a torch checkpoint, or truncated or corrupted.
    """
    path = os.fspath(path)
    is_zip = _check_container(path)
    own = not torch_allowlist_usable()
    try:
        if own:
            return restricted_torch_load(path, map_location)
        # registered again: torch's ``safe_globals`` context removes, on exit, what it
        # added even where it was registered before (onedl-mmengine loads in one)
        setup_safe_loading()
        kwargs = dict(map_location=map_location, weights_only=True)
        if mmap and is_zip:
            kwargs['mmap'] = True
        return torch.load(path, **kwargs)
    except pickle.UnpicklingError as err:
        reason = _unpickling_reason(err)
        if ((own and not isinstance(err, RefusedGlobalError))
                or any(marker in reason for marker in _MALFORMED_PICKLE)):
            raise _not_a_checkpoint(path, reason) from err
        raise UnsafeCheckpointError(
            f'refusing to load {path}: it contains objects other than tensors and plain '
            f'containers, and loading it could run code ({reason})') from err
    except (EOFError, zipfile.BadZipFile, RuntimeError, ValueError, OSError) as err:
        first_line = str(err).splitlines()[0] if str(err) else ''
        raise _not_a_checkpoint(path, f'{type(err).__name__}: {first_line}') from err


# mmengine's schemes that end in ``torch.hub.load_state_dict_from_url``, which unpickles
# with ``weights_only=False``: nothing of ours reads them
_HUB_SCHEMES = ('modelzoo://', 'torchvision://', 'open-mmlab://', 'openmmlab://', 'mmcls://')


def fetch_checkpoint(path: str, model_dir: Optional[str] = None) -> str:
    """The local file to read a checkpoint from: an ``http(s)://`` address is downloaded
    (once, not unpickled as mmengine would) into torch hub's ``checkpoints`` folder; local
    paths and other storage schemes are returned as they are.

    Args:
        path (str): A local path or an address.
        model_dir (str, optional): Folder of downloads. Defaults to None:
            ``<torch.hub.get_dir()>/checkpoints``.

    Returns:
        str: The local path, or ``path`` itself.

    Raises:
        CheckpointError: For mmengine's torch.hub names (``open-mmlab://`` ...), an
            address that names no file, or a failed download.
    """
    path = os.fspath(path)
    if path.startswith(_HUB_SCHEMES):
        raise CheckpointError(
            f'{path}: mmengine loads {path.split("://")[0]}:// checkpoints with '
            f'torch.hub, which unpickles them with weights_only=False (the file could run '
            f'code); download the file and pass its path or its https:// address')
    if not path.startswith(('http://', 'https://')):
        return path
    name = osp.basename(urllib.parse.urlparse(path).path)
    if not name:
        raise CheckpointError(f'{path}: the address names no file')
    folder = model_dir or osp.join(torch.hub.get_dir(), 'checkpoints')
    local = osp.join(folder, name)
    if not osp.isfile(local):
        os.makedirs(folder, exist_ok=True)
        try:  # written to a temporary file and renamed when complete
            torch.hub.download_url_to_file(path, local, progress=False)
        except (OSError, ValueError) as err:
            raise CheckpointError(f'{path}: download failed ({err})') from err
    return local


def verify_checkpoint_file(path: PathLike) -> None:
    """Check that a checkpoint file is complete and undamaged without unpickling it: the
    CRC-32 of every record of a zip file (of a legacy pickle file, its first bytes).

    Raises:
        FileNotFoundError: If the file does not exist.
        CheckpointError: If it is empty, not a torch checkpoint, truncated or corrupted.
    """
    path = os.fspath(path)
    if not _check_container(path):  # a legacy pickle-format checkpoint: nothing to verify
        return
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise CheckpointError(
            f'checkpoint {path} is truncated or corrupted ({type(err).__name__}: {err})'
        ) from err
    if not any(name.endswith('data.pkl') for name in names):
        raise CheckpointError(f'{path} is not a torch checkpoint: the zip archive has no '
                              f'data.pkl record')
    if bad is not None:
        raise CheckpointError(
            f'checkpoint {path} is corrupted: record {bad!r} fails its CRC-32 check')
