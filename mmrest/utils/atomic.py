"""Writing files atomically: a temporary file ``.<name>.<pid>.tmp`` in the destination
folder, flushed to disk and renamed over the destination, which is therefore always the
previous complete file or the new complete file, never a partial one."""
import os
import os.path as osp
import re
from typing import Any, Callable, List

import torch
from mmengine.fileio.backends import LocalBackend

from .checkpoint import PathLike

#: Names of the temporary files of :func:`atomic_write`: ``.<final name>.<pid>.tmp``.
TEMP_FILE_RE = re.compile(r'^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$')


def _fsync(path: str) -> None:
    """Flush a file or a folder's entries to disk, where the platform allows it."""
    try:
        fd = os.open(path or '.', os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def _write_then_commit(path: str, write_temp: Callable[[str], None]) -> None:
    """Write ``path``'s temporary file with ``write_temp``, ``fsync`` it, rename it over
    ``path`` and ``fsync`` the folder; on any error ``path`` is untouched and the temporary
    file removed."""
    folder, name = osp.split(path)
    tmp = osp.join(folder, f'.{name}.{os.getpid()}.tmp')
    try:
        write_temp(tmp)
        with open(tmp, 'rb') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync(folder)
    except BaseException:
        if osp.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write(path: PathLike, write: Callable[[Any], None], mode: str = 'wb') -> None:
    """Write a file so that a crash or a full disk never leaves it partial.

    Args:
        path (str | PathLike): The destination.
        write (Callable): Called with the open temporary file object.
        mode (str): ``'wb'`` or ``'w'``. Defaults to 'wb'.
    """

    def write_temp(tmp: str) -> None:
        with open(tmp, mode) as f:
            write(f)

    _write_then_commit(os.fspath(path), write_temp)


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    atomic_write(path, lambda f: torch.save(obj, f))


def remove_stale_temp_files(folder: PathLike) -> List[str]:
    """Delete the temporary files of :func:`atomic_write` left by processes that died
    (those of running processes are kept), and return their paths."""
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


class AtomicLocalBackend(LocalBackend):
    """mmengine's local file backend whose ``put`` and ``put_text`` write atomically
    (as :func:`atomic_write`). :mod:`mmrest.engine` registers it as
    ``'mmrest_atomic_local'``; ``mmrest.AtomicCheckpointHook`` selects it for local
    folders."""

    def put(self, obj: bytes, filepath: PathLike) -> None:
        write_temp = super().put
        _write_then_commit(os.fspath(filepath), lambda tmp: write_temp(obj, tmp))

    def put_text(self, obj: str, filepath: PathLike, encoding: str = 'utf-8') -> None:
        self.put(obj.encode(encoding), filepath)
