"""Safe loading of mmengine checkpoints on torch >= 2.6.

Since torch 2.6, ``torch.load`` defaults to ``weights_only=True``: only tensors, plain
containers and an allowlist of types may be unpickled. mmengine 0.10.7 passes nothing to
``torch.load``, and its own checkpoints contain a few types that are not on torch's list,
so ``--resume`` and ``load_from`` fail with ``UnpicklingError: Weights only load failed``.

:func:`setup_safe_loading` fixes that without turning safety off: it allows exactly the
types found in checkpoints written by mmengine 0.10.7 runners of mmdet 3.3.0,
mmsegmentation 1.2.2 and mmpretrain 1.2.0 (see :data:`SAFE_GLOBAL_REASONS`), and makes
mmengine's local-file checkpoint loader go through
:func:`mmrest.utils.checkpoint.safe_load_checkpoint`, whose errors name the file.
"""
import builtins
from typing import Any, Callable, Dict, List, Tuple, Union

import numpy as np
import torch
from mmengine.logging.history_buffer import HistoryBuffer

from ..utils.checkpoint import safe_load_checkpoint

try:  # numpy >= 2
    from numpy._core import multiarray as _np_multiarray
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _np_multiarray

SafeGlobal = Union[Callable, type, Tuple[Any, str]]

#: Why each allowed global appears in an mmengine checkpoint (found with
#: ``torch.serialization.get_unsafe_globals_in_checkpoint`` on checkpoints written by
#: mmdet, mmseg and mmpretrain training runs; see tests/test_resume.py).
SAFE_GLOBAL_REASONS: Dict[str, str] = {
    'mmengine.logging.history_buffer.HistoryBuffer':
    "message_hub['log_scalars'] holds one HistoryBuffer per logged scalar (loss, lr, "
    'time, metrics); it is a plain data container of two numpy arrays',
    'builtins.getattr':
    "HistoryBuffer.__getstate__ stores its statistics methods (min, max, mean, current) "
    "as 'getattr(HistoryBuffer, name)'. Only a restricted stand-in is registered under "
    'this name: it returns those methods of HistoryBuffer and refuses everything else',
    'numpy.ndarray':
    "HistoryBuffer's _log_history/_count_history arrays; numpy arrays in dataset "
    'metainfo; the numpy RNG state saved by mmrest.RNGStateHook',
    'numpy._core.multiarray._reconstruct':
    'how numpy pickles an ndarray (creates an empty array, then fills it from bytes); '
    "also registered under numpy 1.x's name numpy.core.multiarray._reconstruct",
    'numpy._core.multiarray.scalar':
    'how numpy pickles a numpy scalar (np.float64 time/eta in runtime_info, np.float64 '
    "or np.int64 metric values); also under numpy 1.x's name numpy.core.multiarray.scalar",
    'numpy.dtype':
    'the dtype of each pickled array or scalar',
    'numpy.dtypes.*DType':
    'numpy >= 1.25 gives each dtype its own class (e.g. Float64DType); unpickling sets '
    "the dtype's state, which torch only allows on allowlisted classes. Only the "
    'boolean, integer, floating and complex dtype classes are allowed',
}

# numpy dtype classes of plain numbers (no object, string or structured dtypes).
_NUMERIC_DTYPE_NAMES = (
    'BoolDType', 'Int8DType', 'UInt8DType', 'Int16DType', 'UInt16DType', 'Int32DType',
    'UInt32DType', 'Int64DType', 'UInt64DType', 'LongLongDType', 'ULongLongDType',
    'Float16DType', 'Float32DType', 'Float64DType', 'LongDoubleDType', 'Complex64DType',
    'Complex128DType', 'CLongDoubleDType', 'ByteDType', 'UByteDType', 'ShortDType',
    'UShortDType', 'IntDType', 'UIntDType', 'LongDType', 'ULongDType')

# The methods HistoryBuffer pickles by reference (HistoryBuffer._set_default_statistics).
_HISTORY_BUFFER_METHODS = ('min', 'max', 'current', 'mean')


def history_buffer_getattr(obj: Any, name: str) -> Callable:
    """Stand-in for ``getattr`` while unpickling: HistoryBuffer statistics methods only.

    Args:
        obj (Any): The object of the pickled ``getattr(obj, name)`` call.
        name (str): The attribute name.

    Returns:
        Callable: ``HistoryBuffer.<name>``.

    Raises:
        pickle.UnpicklingError: For any other object or attribute.
    """
    if obj is HistoryBuffer and name in _HISTORY_BUFFER_METHODS:
        return builtins.getattr(HistoryBuffer, name)
    import pickle
    raise pickle.UnpicklingError(
        f'refusing getattr({obj!r}, {name!r}) in a checkpoint: only the statistics methods '
        f'{_HISTORY_BUFFER_METHODS} of mmengine HistoryBuffer are allowed')


def _numpy_dtype_classes() -> List[type]:
    dtypes = getattr(np, 'dtypes', None)
    if dtypes is None:  # pragma: no cover - numpy < 1.25 has no dtype classes
        return []
    classes = []
    for name in _NUMERIC_DTYPE_NAMES:
        cls = getattr(dtypes, name, None)
        if cls is not None and cls not in classes:
            classes.append(cls)
    return classes


def mmengine_safe_globals() -> List[SafeGlobal]:
    """The types allowed by :func:`setup_safe_loading`, in ``add_safe_globals`` form.

    Returns:
        list: Classes, functions, and ``(object, 'module.name')`` pairs for objects that
        a checkpoint refers to under another name.
    """
    entries: List[SafeGlobal] = [
        HistoryBuffer,
        (history_buffer_getattr, 'builtins.getattr'),
        np.ndarray,
        np.dtype,
        (_np_multiarray._reconstruct, 'numpy._core.multiarray._reconstruct'),
        (_np_multiarray._reconstruct, 'numpy.core.multiarray._reconstruct'),
        (_np_multiarray.scalar, 'numpy._core.multiarray.scalar'),
        (_np_multiarray.scalar, 'numpy.core.multiarray.scalar'),
    ]
    entries.extend(_numpy_dtype_classes())
    return entries


_SETUP_DONE = False


def load_from_local_safe(filename: str, map_location: Any = None) -> Any:
    """mmengine ``CheckpointLoader`` scheme for local files, through safe loading."""
    import os.path as osp
    return safe_load_checkpoint(osp.expanduser(filename), map_location=map_location)


def setup_safe_loading() -> None:
    """Let ``torch.load(weights_only=True)`` read mmengine checkpoints, and only those.

    Registers :func:`mmengine_safe_globals` with ``torch.serialization.add_safe_globals``
    and replaces mmengine's loader for local paths (used by ``Runner.resume``,
    ``load_from``, ``init_cfg=dict(type='Pretrained')`` and
    ``mmengine.runner.load_checkpoint``) by one that never unpickles anything else and
    raises :class:`mmrest.utils.CheckpointError` naming the file. Safe loading is never
    turned off (no ``weights_only=False``). Idempotent; ``tools/train.py`` and
    ``tools/test.py`` call it, users of their own runner call it once before training.
    """
    global _SETUP_DONE
    if _SETUP_DONE:
        return
    torch.serialization.add_safe_globals(mmengine_safe_globals())
    from mmengine.runner.checkpoint import CheckpointLoader
    CheckpointLoader.register_scheme(prefixes='', force=True)(load_from_local_safe)
    _SETUP_DONE = True
