"""Safe checkpoint loading: tensors and plain containers only, never arbitrary code.

Also the building blocks of crash-safe saving: a checkpoint is written to a temporary file
in the destination folder, flushed to disk (``fsync``) and renamed over the destination
(``os.replace``, atomic on POSIX), so the destination is always either the previous
complete file or the new complete file, never a partial one.
"""
import os
import os.path as osp
import pickle
import re
import zipfile
from typing import Any, Callable, List, Union

import torch

PathLike = Union[str, os.PathLike]

#: Names of the temporary files of :func:`atomic_write`: ``.<final name>.<pid>.tmp``.
TEMP_FILE_RE = re.compile(r'^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$')


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unsafe, corrupted, or of the wrong model."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint holding objects whose unpickling could run code (never unpickled)."""


def _unpickling_reason(err: BaseException) -> str:
    """The informative line of torch's ``Weights only load failed`` message."""
    boilerplate = ('Weights only load failed', 'Please file an issue', 'Check the documentation',
                   'In PyTorch 2.6')
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(boilerplate)]
    return useful[0] if useful else (lines[-1] if lines else repr(err))


def safe_load_checkpoint(path: PathLike,
                         map_location: Any = 'cpu',
                         mmap: bool = False) -> Any:
    """Load a checkpoint file with ``torch.load(weights_only=True)``.

    Only tensors, plain containers and the types registered with
    ``torch.serialization.add_safe_globals`` (see :func:`mmrest.engine.setup_safe_loading`)
    are unpickled; nothing in the file can run code.

    Args:
        path (str | PathLike): Local checkpoint file.
        map_location (str | torch.device | callable): Where to put the tensors, as in
            ``torch.load``. Defaults to 'cpu'.
        mmap (bool): Memory-map the tensor data instead of reading it (zip-format
            checkpoints only). Defaults to False.

    Returns:
        Any: The loaded object (tensors in plain containers).

    Raises:
        FileNotFoundError: If the file does not exist.
        UnsafeCheckpointError: If the file holds anything but tensors, plain containers
            and allowed types (its code is never run).
        CheckpointError: If the file is truncated or corrupted.
    """
    path = os.fspath(path)
    if not osp.isfile(path):
        raise FileNotFoundError(f'checkpoint file not found: {path}')
    kwargs = dict(map_location=map_location, weights_only=True)
    if mmap and zipfile.is_zipfile(path):
        kwargs['mmap'] = True
    try:
        return torch.load(path, **kwargs)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f'refusing to load {path}: it contains objects other than tensors and plain '
            f'containers, and loading it could run code ({_unpickling_reason(err)})') from err
    except (EOFError, zipfile.BadZipFile, RuntimeError, ValueError, OSError) as err:
        if os.path.getsize(path) == 0:
            detail = 'the file is empty'
        else:
            detail = f'{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ""}'
        raise CheckpointError(
            f'cannot read checkpoint {path}: the file is truncated or corrupted '
            f'({detail})') from err


def verify_checkpoint_file(path: PathLike) -> None:
    """Check that a checkpoint file is complete and undamaged, without unpickling it.

    A zip-format checkpoint (``torch.save`` since torch 1.6) stores a CRC-32 of every
    record; all of them are recomputed, which catches truncation and flipped bytes that
    ``torch.load`` itself does not notice. Legacy (non-zip) files only get the
    empty-file check.

    Args:
        path (str | PathLike): Local checkpoint file.

    Raises:
        FileNotFoundError: If the file does not exist.
        CheckpointError: If the file is empty, truncated or corrupted.
    """
    path = os.fspath(path)
    if not osp.isfile(path):
        raise FileNotFoundError(f'checkpoint file not found: {path}')
    if os.path.getsize(path) == 0:
        raise CheckpointError(f'checkpoint {path} is corrupted: the file is empty')
    with open(path, 'rb') as f:
        magic = f.read(4)
    if magic != b'PK\x03\x04':
        if magic[:1] == b'\x80':  # a legacy pickle-format checkpoint: nothing to verify
            return
        raise CheckpointError(
            f'checkpoint {path} is corrupted: it is neither a zip-format nor a legacy '
            f'torch checkpoint (starts with {magic!r})')
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise CheckpointError(
            f'checkpoint {path} is truncated or corrupted ({type(err).__name__}: {err})'
        ) from err
    if bad is not None:
        raise CheckpointError(
            f'checkpoint {path} is corrupted: record {bad!r} fails its CRC-32 check')


def temp_path_for(path: PathLike) -> str:
    """The temporary file :func:`atomic_write` uses for ``path`` (same folder).

    Args:
        path (str | PathLike): The final file.

    Returns:
        str: ``<folder>/.<name>.<pid>.tmp``.
    """
    path = os.fspath(path)
    folder, name = osp.split(path)
    return osp.join(folder, f'.{name}.{os.getpid()}.tmp')


def fsync_file(path: PathLike) -> None:
    """Flush a file's data to disk.

    Args:
        path (str | PathLike): The file.
    """
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: PathLike) -> None:
    """Flush a folder's entries (e.g. a rename) to disk, where the platform allows it.

    Args:
        path (str | PathLike): The folder.
    """
    try:
        fd = os.open(os.fspath(path) or '.', os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def commit_file(tmp_path: PathLike, final_path: PathLike) -> None:
    """Make a fully written temporary file the final file, atomically and durably.

    ``fsync`` of the data, ``os.replace`` (atomic within one file system), ``fsync`` of
    the folder.

    Args:
        tmp_path (str | PathLike): The complete temporary file (same folder).
        final_path (str | PathLike): The destination; replaced if it exists.
    """
    fsync_file(tmp_path)
    os.replace(tmp_path, final_path)
    fsync_dir(osp.dirname(os.fspath(final_path)))


def atomic_write(path: PathLike, write: Callable[[Any], None], mode: str = 'wb') -> None:
    """Write a file so that a crash or a full disk never leaves it partial.

    Args:
        path (str | PathLike): The destination.
        write (Callable): Called with the open temporary file object.
        mode (str): ``'wb'`` or ``'w'``. Defaults to 'wb'.

    Raises:
        OSError: If writing fails; the destination is untouched and the temporary file
            is removed.
    """
    path = os.fspath(path)
    tmp = temp_path_for(path)
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(osp.dirname(path))
    except BaseException:
        if osp.exists(tmp):
            os.remove(tmp)
        raise


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """``torch.save`` through :func:`atomic_write`.

    Args:
        obj (Any): What to save.
        path (str | PathLike): The destination file.
    """
    atomic_write(path, lambda f: torch.save(obj, f))


def remove_stale_temp_files(folder: PathLike) -> List[str]:
    """Delete temporary files of :func:`atomic_write` left by processes that died.

    Files of processes that are still running are kept.

    Args:
        folder (str | PathLike): The folder to clean.

    Returns:
        list[str]: The removed files.
    """
    folder = os.fspath(folder)
    removed: List[str] = []
    if not osp.isdir(folder):
        return removed
    for name in os.listdir(folder):
        match = TEMP_FILE_RE.match(name)
        if match is None:
            continue
        pid = int(match.group('pid'))
        if pid != os.getpid():
            try:
                os.kill(pid, 0)
                continue  # that process is alive: maybe it is writing right now
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
        try:
            os.remove(osp.join(folder, name))
            removed.append(osp.join(folder, name))
        except FileNotFoundError:
            pass
    return removed
