"""Checkpoints of mmengine training runs: saved atomically, and the one to resume from
chosen safely (``--resume`` falls back from a missing, damaged or non-training checkpoint
to the newest older good one, and refuses a file whose loading could run code).
Importing it registers the atomic file backend ``'mmrest_atomic_local'``.
"""
import os
import os.path as osp
import re
from collections import deque
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from mmengine.dist import is_main_process
from mmengine.fileio import register_backend
from mmengine.hooks import CheckpointHook

from ..registry import HOOKS
from ..utils.atomic import AtomicLocalBackend, atomic_write, remove_stale_temp_files
from ..utils.checkpoint import (CheckpointError, UnsafeCheckpointError, fetch_checkpoint,
                                safe_load_checkpoint, verify_checkpoint_file)
from .config import add_custom_hook, type_name

#: The name of :class:`~mmrest.utils.AtomicLocalBackend` among mmengine's file backends.
ATOMIC_BACKEND = 'mmrest_atomic_local'
register_backend(ATOMIC_BACKEND, AtomicLocalBackend, force=True)

RELIABLE_CHECKPOINT_HOOK = 'mmrest.AtomicCheckpointHook'
RNG_STATE_HOOK = 'mmrest.RNGStateHook'
MIN_KEEP_CKPTS = 2
DEFAULT_TEMPLATES = ('iter_{}.pth', 'epoch_{}.pth')


# ---------------------------------------------------------------- saving

@HOOKS.register_module()
class AtomicCheckpointHook(CheckpointHook):
    """``CheckpointHook`` (same arguments) whose checkpoints are never partial, and never
    the only copy: local files are written through :class:`~mmrest.utils.AtomicLocalBackend`;
    a save writes the checkpoint, then ``last_checkpoint``, then deletes outdated ones
    (mmengine deletes first); at least :data:`MIN_KEEP_CKPTS` are kept; temporary files of
    killed runs are removed when training starts; a failed save raises
    :class:`~mmrest.utils.CheckpointError` and leaves the bookkeeping as it was.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._requested_max_keep = self.max_keep_ckpts
        if 0 < self.max_keep_ckpts < MIN_KEEP_CKPTS:
            self.max_keep_ckpts = MIN_KEEP_CKPTS

    def before_train(self, runner) -> None:
        """Select the atomic backend for a local folder; remove stale temporary files."""
        out_dir = self.out_dir if self.out_dir is not None else runner.work_dir
        if (self.backend_args is None and self.file_client_args is None
                and '://' not in str(out_dir)):
            self.backend_args = dict(backend=ATOMIC_BACKEND)
        super().before_train(runner)
        if self._requested_max_keep != self.max_keep_ckpts:
            runner.logger.info(
                f'max_keep_ckpts={self._requested_max_keep} raised to '
                f'{self.max_keep_ckpts}: the previous checkpoint is kept as a fallback')
        if isinstance(self.file_backend, AtomicLocalBackend) and is_main_process():
            for path in remove_stale_temp_files(self.out_dir):
                runner.logger.warning(
                    f'removed {path}: an incomplete checkpoint of an interrupted run')

    def _save_checkpoint_with_step(self, runner, step, meta) -> None:
        old_keep = list(getattr(self, 'keep_ckpt_ids', []))
        outdated: List[int] = []
        if self.max_keep_ckpts > 0 and not (old_keep and old_keep[-1] == step):
            ids = old_keep + [step]
            outdated, kept = ids[:-self.max_keep_ckpts], ids[-self.max_keep_ckpts:]
            self.keep_ckpt_ids = deque(kept, self.max_keep_ckpts)
            runner.message_hub.update_info('keep_ckpt_ids', kept)
        # after a resume the hook starts empty; the message hub has the resumed one
        previous = self.last_ckpt or runner.message_hub.get_info('last_ckpt')
        ckpt_filename = self.filename_tmpl.format(step)
        self.last_ckpt = self.file_backend.join_path(self.out_dir, ckpt_filename)
        runner.message_hub.update_info('last_ckpt', self.last_ckpt)
        try:
            runner.save_checkpoint(
                self.out_dir,
                ckpt_filename,
                self.file_client_args,
                save_optimizer=self.save_optimizer,
                save_param_scheduler=self.save_param_scheduler,
                meta=meta,
                by_epoch=self.by_epoch,
                backend_args=self.backend_args,
                **self.args)
        except BaseException as err:
            final, self.last_ckpt = self.last_ckpt, previous
            if self.max_keep_ckpts > 0:
                self.keep_ckpt_ids = deque(old_keep, self.max_keep_ckpts)
                runner.message_hub.update_info('keep_ckpt_ids', old_keep)
            if previous is not None:
                runner.message_hub.update_info('last_ckpt', previous)
            if isinstance(err, OSError):
                raise CheckpointError(
                    f'saving checkpoint {final} failed ({type(err).__name__}: {err}); '
                    f'nothing was written there and {self._describe(previous)}') from err
            raise

        if not is_main_process():
            return
        atomic_write(osp.join(runner.work_dir, 'last_checkpoint'),
                     lambda f: f.write(self.last_ckpt), mode='w')
        for old_step in outdated:
            path = self.file_backend.join_path(self.out_dir, self.filename_tmpl.format(old_step))
            if self.file_backend.isfile(path):
                self.file_backend.remove(path)
            elif self.file_backend.isdir(path):  # deepspeed checkpoints are folders
                self.file_backend.rmtree(path)

    def _describe(self, previous: Optional[str]) -> str:
        if not previous:
            return 'no earlier checkpoint exists'
        here = osp.join(self.out_dir, osp.basename(previous))  # the run may have moved
        return f'the previous checkpoint {here if osp.isfile(here) else previous} is intact'


# ---------------------------------------------------------------- configs

def apply_reliability_hooks(cfg: Any) -> None:
    """Make a config's ``CheckpointHook`` (or none) ``mmrest.AtomicCheckpointHook`` (same
    arguments; ``None`` and custom hooks are left alone) and add ``mmrest.RNGStateHook``
    to its ``custom_hooks`` unless present. ``cfg`` is modified in place."""
    default_hooks = cfg.get('default_hooks')
    if default_hooks is None:
        cfg.default_hooks = dict()
        default_hooks = cfg.default_hooks
    if 'checkpoint' not in default_hooks:
        default_hooks['checkpoint'] = dict(type=RELIABLE_CHECKPOINT_HOOK, interval=1)
    else:
        hook = default_hooks['checkpoint']
        if isinstance(hook, dict) and type_name(hook.get('type')) == 'CheckpointHook':
            hook['type'] = RELIABLE_CHECKPOINT_HOOK
    add_custom_hook(cfg, RNG_STATE_HOOK)


def checkpoint_templates(cfg: Any) -> tuple:
    """File name templates of a config's periodic checkpoints: the checkpoint hook's
    ``filename_tmpl`` if set, and mmengine's defaults."""
    templates = list(DEFAULT_TEMPLATES)
    hook = (cfg.get('default_hooks') or {}).get('checkpoint')
    if isinstance(hook, dict) and hook.get('filename_tmpl'):
        templates.insert(0, hook['filename_tmpl'])
    return tuple(templates)


# ---------------------------------------------------------------- resuming

def inspect_checkpoint(path: str, for_resume: bool = True) -> Dict[str, Any]:
    """Check a checkpoint file completely (CRC-32 of every record, safe loading with
    memory-mapped tensors).

    Args:
        path (str): Checkpoint file.
        for_resume (bool): Also require an mmengine training checkpoint (``meta`` with
            ``iter``, and ``state_dict``). Defaults to True.

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


def checked_load_from(path: str) -> str:
    """The path to give mmengine for a checkpoint to load weights from (``load_from``,
    ``tools/test.py``): an ``http(s)://`` address downloaded, a local file checked with
    :func:`inspect_checkpoint` (whose errors it raises)."""
    path = fetch_checkpoint(path)
    if '://' not in path:
        inspect_checkpoint(path, for_resume=False)
    return path


def _checkpoint_step(name: str, templates: Sequence[str]) -> Optional[int]:
    """The step in a periodic checkpoint's file name (first matching template), or None."""
    for template in templates:
        head, _, tail = template.partition('{}')
        match = re.fullmatch(re.escape(head) + r'(\d+)' + re.escape(tail), name)
        if match:
            return int(match.group(1))
    return None


def _periodic_checkpoints(folders: Sequence[str], templates: Sequence[str],
                          before: Optional[int] = None) -> List[str]:
    """Periodic checkpoints (file names of ``templates``) of the existing ``folders``,
    each file once, newest first; only steps below ``before`` if given."""
    found: List[Tuple[int, str]] = []
    seen = set()
    for folder in folders:
        if not osp.isdir(folder):
            continue
        for name in os.listdir(folder):
            step = _checkpoint_step(name, templates)
            if step is None or (before is not None and step >= before):
                continue
            path = osp.join(folder, name)
            key = osp.realpath(path)
            if key not in seen:
                seen.add(key)
                found.append((step, path))
    found.sort(key=lambda item: item[0], reverse=True)
    return [path for _, path in found]


def _read_last_checkpoint(work_dir: str) -> Optional[str]:
    save_file = osp.join(work_dir, 'last_checkpoint')
    if not osp.isfile(save_file):
        return None
    with open(save_file, encoding='utf-8') as f:
        recorded = f.read().strip()
    if not recorded:
        return None
    if osp.isfile(recorded):
        return recorded
    # written from another working directory (relative), or before the work dir moved
    candidate = osp.join(work_dir, osp.basename(recorded))
    return candidate if osp.isfile(candidate) else recorded


def checkpoint_candidates(work_dir: str,
                          templates: Sequence[str] = DEFAULT_TEMPLATES) -> List[str]:
    """Checkpoints of a work dir in the order they should be tried: the file
    ``last_checkpoint`` names (which may not exist), then the older periodic checkpoints
    (file names of ``templates``), newest first."""
    latest = _read_last_checkpoint(work_dir)
    if latest is None:
        return _periodic_checkpoints([work_dir], templates)
    older = _periodic_checkpoints([osp.dirname(latest) or '.', work_dir], templates,
                                  before=_checkpoint_step(osp.basename(latest), templates))
    return [latest] + [path for path in older
                       if osp.realpath(path) != osp.realpath(latest)]


def find_resume_checkpoint(work_dir: str,
                           templates: Sequence[str] = DEFAULT_TEMPLATES,
                           log: Optional[Callable[[str], None]] = None) -> Optional[str]:
    """The checkpoint ``--resume`` (automatic) should continue from.

    Args:
        work_dir (str): The work dir of the run.
        templates (Sequence[str]): File name templates of periodic checkpoints.
            Defaults to :data:`DEFAULT_TEMPLATES`.
        log (Callable[[str], None], optional): Gets a warning per rejected file.
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
    """``path`` given with ``--resume PATH``, if usable; raises as
    :func:`inspect_checkpoint`, the message of a damaged file naming the previous good
    checkpoint of its folder (periodic ones, of ``templates``) where there is one."""
    try:
        inspect_checkpoint(path, for_resume=True)
        return path
    except UnsafeCheckpointError:
        raise
    except CheckpointError as err:
        older = _periodic_checkpoints([osp.dirname(path) or '.'], templates,
                                      before=_checkpoint_step(osp.basename(path), templates))
        hint = ''
        for other in older:
            try:
                inspect_checkpoint(other, for_resume=True)
            except (CheckpointError, FileNotFoundError):
                continue
            hint = (f'\nThe previous good checkpoint is {other}: resume from it with '
                    f'--resume {other}')
            break
        raise CheckpointError(f'--resume {path}: {err}{hint}') from err
