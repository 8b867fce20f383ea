"""Choosing a checkpoint to resume from, and refusing bad ones loudly.

``--resume`` (automatic) takes the checkpoint ``last_checkpoint`` names. If that file is
missing, truncated, corrupted (a CRC-32 check of every record) or not a training
checkpoint, it says so and falls back to the newest older checkpoint of the same run
that passes the checks; if none does, it stops with the list of files and reasons. It
never starts from scratch when the work dir holds checkpoints. A file whose loading could
run code is refused outright (no fallback): that is tampering, not an accident.
"""
import os
import os.path as osp
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..utils.checkpoint import (CheckpointError, UnsafeCheckpointError,
                                safe_load_checkpoint, verify_checkpoint_file)

DEFAULT_TEMPLATES = ('iter_{}.pth', 'epoch_{}.pth')


def inspect_checkpoint(path: str, for_resume: bool = True) -> Dict[str, Any]:
    """Check a checkpoint file completely, without keeping its tensors in memory.

    Verifies the CRC-32 of every record, unpickles it with safe loading (tensors
    memory-mapped) and, for resuming, checks that it is an mmengine training checkpoint.

    Args:
        path (str): Checkpoint file.
        for_resume (bool): Also require ``meta`` (with ``iter``) and ``state_dict``.
            Defaults to True.

    Returns:
        dict: ``meta`` of the checkpoint (empty for plain state dicts).

    Raises:
        FileNotFoundError: If the file does not exist.
        UnsafeCheckpointError: If loading it could run code.
        CheckpointError: If it is truncated, corrupted or not a training checkpoint.
    """
    verify_checkpoint_file(path)
    ckpt = safe_load_checkpoint(path, map_location='cpu', mmap=True)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f'{path} is not a checkpoint: it holds a '
                              f'{type(ckpt).__name__}, not a dict')
    meta = ckpt.get('meta')
    if for_resume:
        if not isinstance(meta, dict) or 'iter' not in meta or 'state_dict' not in ckpt:
            raise CheckpointError(
                f'{path} cannot be resumed from: it is not an mmengine training checkpoint '
                f'(needs "meta" with "iter", and "state_dict"; has {sorted(ckpt)})')
    return dict(meta) if isinstance(meta, dict) else {}


def _template_regex(template: str) -> 're.Pattern':
    head, _, tail = template.partition('{}')
    return re.compile('^' + re.escape(head) + r'(\d+)' + re.escape(tail) + '$')


def _read_last_checkpoint(work_dir: str) -> Optional[str]:
    save_file = osp.join(work_dir, 'last_checkpoint')
    if not osp.isfile(save_file):
        return None
    with open(save_file, encoding='utf-8') as f:
        recorded = f.read().strip()
    if not recorded:
        return None
    if osp.isfile(recorded) or osp.isabs(recorded):
        return recorded
    # a relative path written from another working directory
    candidate = osp.join(work_dir, osp.basename(recorded))
    return candidate if osp.isfile(candidate) else recorded


def checkpoint_candidates(work_dir: str,
                          templates: Sequence[str] = DEFAULT_TEMPLATES) -> List[str]:
    """Checkpoints of a work dir in the order they should be tried.

    The file ``last_checkpoint`` names comes first, then the periodic checkpoints
    (``templates``) of its folder that are older than it, newest first. Without
    ``last_checkpoint``, all periodic checkpoints, newest first.

    Args:
        work_dir (str): The work dir of the run.
        templates (Sequence[str]): File name templates of periodic checkpoints
            (``CheckpointHook.filename_tmpl``). Defaults to ('iter_{}.pth', 'epoch_{}.pth').

    Returns:
        list[str]: Paths (the first may not exist if ``last_checkpoint`` is stale).
    """
    latest = _read_last_checkpoint(work_dir)
    folders = [work_dir] if latest is None else [osp.dirname(latest) or '.', work_dir]
    regexes = [_template_regex(t) for t in templates]
    latest_step: Optional[int] = None
    if latest is not None:
        for regex in regexes:
            match = regex.match(osp.basename(latest))
            if match:
                latest_step = int(match.group(1))
    found: List[Tuple[int, str]] = []
    seen = set()
    for folder in folders:
        if not osp.isdir(folder):
            continue
        for name in os.listdir(folder):
            for regex in regexes:
                match = regex.match(name)
                if not match:
                    continue
                path = osp.join(folder, name)
                key = osp.realpath(path)
                if key in seen:
                    continue
                seen.add(key)
                step = int(match.group(1))
                if latest_step is None or step < latest_step:
                    found.append((step, path))
    found.sort(key=lambda item: item[0], reverse=True)
    ordered = [] if latest is None else [latest]
    ordered += [path for _, path in found
                if latest is None or osp.realpath(path) != osp.realpath(latest)]
    return ordered


def find_resume_checkpoint(work_dir: str,
                           templates: Sequence[str] = DEFAULT_TEMPLATES,
                           log: Optional[Callable[[str], None]] = None) -> Optional[str]:
    """The checkpoint ``--resume`` (automatic) should continue from.

    Args:
        work_dir (str): The work dir of the run.
        templates (Sequence[str]): Periodic checkpoint name templates.
            Defaults to ('iter_{}.pth', 'epoch_{}.pth').
        log (Callable[[str], None], optional): Receives a warning per rejected file.
            Defaults to None.

    Returns:
        str | None: The newest usable checkpoint, or None if the work dir has no
        checkpoint at all (training starts from scratch; the caller says so).

    Raises:
        UnsafeCheckpointError: If a candidate could run code when loaded.
        CheckpointError: If there are checkpoints but none is usable (each file and
            the reason are listed).
    """
    candidates = checkpoint_candidates(work_dir, templates)
    if not candidates:
        return None
    rejected: List[Tuple[str, str]] = []
    for path in candidates:
        try:
            if not osp.isfile(path):
                raise FileNotFoundError(f'{path} does not exist (named by '
                                        f'{osp.join(work_dir, "last_checkpoint")})')
            inspect_checkpoint(path, for_resume=True)
        except UnsafeCheckpointError:
            raise
        except (CheckpointError, FileNotFoundError) as err:
            rejected.append((path, str(err)))
            if log is not None:
                log(f'cannot resume from {path}: {err}')
            continue
        if rejected and log is not None:
            log(f'falling back to the previous good checkpoint {path}')
        return path
    listing = '\n'.join(f'  - {path}: {reason}' for path, reason in rejected)
    raise CheckpointError(
        f'--resume: no usable checkpoint in {work_dir}; every candidate is damaged or '
        f'missing:\n{listing}\nRestore a good checkpoint, or remove these files and '
        f'{osp.join(work_dir, "last_checkpoint")} to start from scratch.')


def check_resume_path(path: str, templates: Sequence[str] = DEFAULT_TEMPLATES) -> str:
    """Check a checkpoint given explicitly with ``--resume PATH``.

    Args:
        path (str): The checkpoint.
        templates (Sequence[str]): Periodic checkpoint name templates, to point at the
            previous good checkpoint of the same folder in the error message.
            Defaults to ('iter_{}.pth', 'epoch_{}.pth').

    Returns:
        str: ``path``, if usable.

    Raises:
        FileNotFoundError: If the file does not exist.
        UnsafeCheckpointError: If loading it could run code.
        CheckpointError: If it is damaged; the message names the previous good
            checkpoint of its folder when there is one.
    """
    try:
        inspect_checkpoint(path, for_resume=True)
        return path
    except UnsafeCheckpointError:
        raise
    except CheckpointError as err:
        folder = osp.dirname(path) or '.'
        regexes = [_template_regex(t) for t in templates]
        step = None
        for regex in regexes:
            match = regex.match(osp.basename(path))
            if match:
                step = int(match.group(1))
        older = []
        for name in os.listdir(folder):
            for regex in regexes:
                match = regex.match(name)
                if match and (step is None or int(match.group(1)) < step):
                    older.append((int(match.group(1)), osp.join(folder, name)))
        hint = ''
        for _, other in sorted(older, reverse=True):
            try:
                inspect_checkpoint(other, for_resume=True)
            except (CheckpointError, FileNotFoundError):
                continue
            hint = (f'\nThe previous good checkpoint is {other}: resume from it with '
                    f'--resume {other}')
            break
        raise CheckpointError(f'--resume {path}: {err}{hint}') from err
