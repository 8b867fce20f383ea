"""Checkpoints in mmengine training runs: saving them safely, resuming exactly.

* :class:`AtomicCheckpointHook` -- mmengine's ``CheckpointHook`` whose files are never
  partial and never the only copy.
* :class:`RNGStateHook` -- every rank's random generators in the checkpoint, and back on
  resume, so that a resumed run continues exactly like an uninterrupted one.
* :func:`apply_reliability_hooks` -- puts both into a config.
* :func:`find_resume_checkpoint` / :func:`check_resume_path` -- which checkpoint
  ``--resume`` continues from. ``--resume`` (automatic) takes the checkpoint
  ``last_checkpoint`` names. If that file is missing, truncated, corrupted (a CRC-32 check
  of every record) or not a training checkpoint, it says so and falls back to the newest
  older checkpoint of the same run that passes the checks; if none does, it stops with the
  list of files and reasons. It never starts from scratch when the work dir holds
  checkpoints. A file whose loading could run code is refused outright (no fallback):
  that is tampering, not an accident.

Importing this module registers the atomic file backend ``'mmrest_atomic_local'``
(:class:`mmrest.utils.AtomicLocalBackend`) with mmengine's file backends.
"""
import os
import os.path as osp
import random
import re
from collections import deque
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from mmengine.dist import all_gather_object, is_main_process
from mmengine.fileio import register_backend
from mmengine.hooks import CheckpointHook, Hook
from mmengine.runner import IterBasedTrainLoop

from ..registry import HOOKS
from ..utils.checkpoint import (AtomicLocalBackend, CheckpointError, UnsafeCheckpointError,
                                atomic_write, fetch_checkpoint, remove_stale_temp_files,
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
    """``CheckpointHook`` whose checkpoints are never partial, and never the only copy.

    Differences from mmengine's hook (all arguments are the same):

    * For a local folder (``backend_args`` and ``file_client_args`` unset), every file
      (periodic, last and best checkpoints) goes through the atomic file backend
      :class:`~mmrest.utils.AtomicLocalBackend` (``backend_args`` is set to select it):
      written to ``.<name>.<pid>.tmp`` in the destination folder, flushed to disk
      (``fsync``) and renamed over ``<name>``. A kill, a power loss or a full disk during
      a save leaves the previous files as they were. Other storage backends (e.g. object
      stores, whose uploads are atomic themselves) are used as mmengine does.
    * The order of a periodic save is: the new checkpoint, then ``last_checkpoint``
      (written atomically, so it never names a partial file), then the deletion of
      outdated checkpoints (``max_keep_ckpts``). mmengine deletes first and writes
      ``last_checkpoint`` in place; that is the only reason
      ``_save_checkpoint_with_step`` is overridden.
    * At least :data:`MIN_KEEP_CKPTS` checkpoints are kept, so the previous checkpoint is
      there to fall back on if the newest is damaged later.
    * Temporary files left by killed runs are removed when training starts.
    * A failed save raises :class:`~mmrest.utils.CheckpointError` naming the file and the
      reason; nothing was written under the final name and the bookkeeping (which files
      exist) is left as it was.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._requested_max_keep = self.max_keep_ckpts
        if 0 < self.max_keep_ckpts < MIN_KEEP_CKPTS:
            self.max_keep_ckpts = MIN_KEEP_CKPTS

    def before_train(self, runner) -> None:
        """Select the atomic backend for a local folder, set up as mmengine does, and
        remove stale temporary files.

        Args:
            runner (Runner): The runner.
        """
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


# ---------------------------------------------------------------- random generators

def _rng_state() -> Dict[str, Any]:
    """This process's generators: torch (CPU), numpy, python ``random`` and, once CUDA is
    in use, the current CUDA device's (one device per rank)."""
    state: Dict[str, Any] = dict(
        torch=torch.get_rng_state(),
        numpy=np.random.get_state(),
        python=random.getstate(),
    )
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state()
    return state


def _byte_state(state: Any) -> torch.Tensor:
    """A generator state as the CPU byte tensor the setters take: ``Runner.resume`` loads
    checkpoints onto the run's device, so on a GPU the saved states arrive as CUDA
    tensors."""
    return state.cpu()


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(_byte_state(state['torch']))
    cuda = state.get('cuda')
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # older checkpoints: every device of rank 0
            index = torch.cuda.current_device()
            cuda = cuda[index] if index < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(_byte_state(cuda))
    if 'numpy' in state:
        np.random.set_state(state['numpy'])
    if 'python' in state:
        version, internal, gauss = state['python']
        random.setstate((version, tuple(internal), gauss))


def _per_rank_states(saved: Dict[str, Any]) -> List[Optional[Dict[str, Any]]]:
    """The states of every rank in a checkpoint's ``rng_state`` (older checkpoints hold
    one process's state at the top level)."""
    return list(saved['ranks']) if 'ranks' in saved else [saved]


def _checkpoint_hooks(runner) -> List[CheckpointHook]:
    return [hook for hook in runner.hooks if isinstance(hook, CheckpointHook)]


def _saves_after_iter(hook: CheckpointHook, runner) -> bool:
    """Whether ``hook.after_train_iter`` saves at this iteration (its own predicates)."""
    return not hook.by_epoch and (
        hook.every_n_train_iters(runner, hook.interval, hook.save_begin)
        or (hook.save_last and hook.is_last_train_iter(runner)))


def _saves_after_epoch(hook: CheckpointHook, runner) -> bool:
    """Whether ``hook.after_train_epoch`` saves at this epoch (its own predicates)."""
    return hook.by_epoch and (
        hook.every_n_epochs(runner, hook.interval, hook.save_begin)
        or (hook.save_last and hook.is_last_train_epoch(runner)))


class _RestoreAfter:
    """Iterator proxy that calls ``callback`` right after the ``count``-th item."""

    def __init__(self, inner, count: int, callback) -> None:
        self.inner = inner
        self.remaining = count
        self.callback = callback

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self.inner)
        self.remaining -= 1
        if self.remaining == 0:
            self.callback()
        return item

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


@HOOKS.register_module()
class RNGStateHook(Hook):
    """Save every rank's random generators in checkpoints and restore them on resume.

    mmengine resumes weights, optimizer, schedulers and the iteration, and re-seeds the
    generators with the configured seed, but it does not restore their state: after a
    resume, dropout, drop path, batch augmentations and random transforms draw different
    numbers than the uninterrupted run would have. This hook stores ``rng_state`` in every
    checkpoint: ``{'world_size': W, 'ranks': [state of rank 0, ..., state of rank W-1]}``,
    each the torch CPU, numpy, python ``random`` and (once CUDA is in use) the rank's own
    CUDA device generator. Rank k of the resumed run gets rank k's state back, so with
    ``randomness=dict(diff_rank_seed=True)`` every rank continues its own stream.

    ``Runner.save_checkpoint`` runs on rank 0 only, so the states are gathered from all
    ranks (``mmengine.dist.all_gather_object``) just before a checkpoint is saved: in
    ``after_train_iter`` / ``after_train_epoch`` when a ``CheckpointHook`` of the runner
    is due to save (by its own ``every_n_*`` / ``is_last_*`` predicates), and in
    ``before_val`` when a checkpoint hook saves best checkpoints. Never otherwise: no
    collective in ordinary iterations.

    The generators are put back at the moment that corresponds to the save:

    * iteration-based loops: mmengine first replays the data loader up to the resumed
      iteration (which draws random numbers for the skipped batches); the generators are
      restored right after that replay, before the first new batch is fetched;
    * epoch-based loops: at the start of the resumed epoch, before its data loader
      iterator is created. Data loader workers seed their own generators when they
      start (mmengine's ``worker_init_fn``); with ``persistent_workers=True`` an
      uninterrupted run carries their streams across epochs, which a resumed run, whose
      workers start afresh, cannot: a warning says so (iteration-based runs replay the
      skipped batches in their workers and are not affected).

    A checkpoint from a run with another number of processes is not restored (a warning
    says so; the generators keep the seeding of ``randomness``). Checkpoints of older
    mmrest versions (one process's state) restore in single-process runs.

    Validation runs with its own copy of the generators (saved before, restored after),
    so how often validation runs does not change the training's random stream; a
    checkpoint saved during validation (best checkpoint) stores the training state.
    """

    priority = 'VERY_HIGH'

    def __init__(self) -> None:
        self._pending: Optional[Dict[str, Any]] = None
        self._pending_iter: Optional[int] = None
        self._val_state: Optional[Dict[str, Any]] = None
        # (runner.iter, every rank's states) gathered for a save at that iteration
        self._gathered: Optional[Tuple[int, List[Dict[str, Any]]]] = None

    # -- saving
    def _gather(self, runner, state: Optional[Dict[str, Any]] = None) -> None:
        states = all_gather_object(state if state is not None else _rng_state())
        self._gathered = (runner.iter, states)

    def after_train_iter(self, runner, batch_idx: int, data_batch: Any = None,
                         outputs: Any = None) -> None:
        """Gather every rank's generators if a checkpoint is saved after this iteration.

        Args:
            runner (Runner): The runner.
            batch_idx (int): Index of the batch.
            data_batch (Any): The batch. Defaults to None.
            outputs (Any): The outputs of the iteration. Defaults to None.
        """
        if any(_saves_after_iter(hook, runner) for hook in _checkpoint_hooks(runner)):
            self._gather(runner)

    def after_train_epoch(self, runner) -> None:
        """Gather every rank's generators if a checkpoint is saved after this epoch.

        Args:
            runner (Runner): The runner.
        """
        if any(_saves_after_epoch(hook, runner) for hook in _checkpoint_hooks(runner)):
            self._gather(runner)

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        """Store every rank's training generators (also during validation).

        Args:
            runner (Runner): The runner.
            checkpoint (dict): The checkpoint being saved.
        """
        if self._gathered is not None and self._gathered[0] == runner.iter:
            states: List[Optional[Dict[str, Any]]] = list(self._gathered[1])
        else:
            own = self._val_state if self._val_state is not None else _rng_state()
            states = [own] + [None] * (runner.world_size - 1)
            if runner.world_size > 1:
                runner.logger.warning(
                    'RNGStateHook: a checkpoint is saved at a moment no CheckpointHook '
                    "announced, so only rank 0's random generators are in it; on resume "
                    'the other ranks keep the seeding of randomness')
        checkpoint['rng_state'] = dict(world_size=len(states), ranks=states)

    # -- restoring
    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        """Take this rank's saved generators, to restore them when training continues.

        Args:
            runner (Runner): The runner.
            checkpoint (dict): The loaded checkpoint.
        """
        saved = checkpoint.get('rng_state')
        meta = checkpoint.get('meta') or {}
        if not isinstance(saved, dict) or 'iter' not in meta:
            return
        states = _per_rank_states(saved)
        if len(states) != runner.world_size:
            runner.logger.warning(
                f'the checkpoint holds the random generator states of {len(states)} '
                f'process(es), but this run has {runner.world_size}: they are not restored, '
                f'the generators keep the seeding of randomness, and the random stream '
                f'differs from that of an uninterrupted run')
            return
        state = states[runner.rank]
        if state is None:
            runner.logger.warning(
                f'the checkpoint holds no random generator state of rank {runner.rank}; '
                f'its generators keep the seeding of randomness')
            return
        self._pending = state
        self._pending_iter = int(meta['iter'])

    def _restore(self, runner) -> None:
        if self._pending is not None:
            _set_rng_state(self._pending)
            runner.logger.info(f'restored the random generator state of iteration '
                               f'{self._pending_iter} from the checkpoint')
        self._pending = None

    def before_train(self, runner) -> None:
        """Iteration-based loops: restore right after mmengine's data loader replay.

        Args:
            runner (Runner): The runner.
        """
        loop = runner.train_loop
        if (self._pending is None or not isinstance(loop, IterBasedTrainLoop)
                or runner.iter != self._pending_iter):
            return
        if runner.iter == 0:
            self._restore(runner)
            return
        loop.dataloader_iterator = _RestoreAfter(loop.dataloader_iterator, runner.iter,
                                                 lambda: self._restore(runner))

    def before_train_epoch(self, runner) -> None:
        """Epoch-based loops: restore at the resumed epoch.

        Args:
            runner (Runner): The runner.
        """
        if isinstance(runner.train_loop, IterBasedTrainLoop):
            return
        if self._pending is not None and runner.iter == self._pending_iter:
            self._restore(runner)
            loader = getattr(runner, 'train_dataloader', None)
            if (getattr(loader, 'persistent_workers', False)
                    and getattr(loader, 'num_workers', 0) > 0):
                runner.logger.warning(
                    'the data loader has persistent workers: their generators (random '
                    'transforms) start again from their seeds, where the uninterrupted '
                    'run would have continued them; for a bit-exact resume of an '
                    'epoch-based run set train_dataloader.persistent_workers=False or '
                    'num_workers=0')
        self._pending = None

    def before_train_iter(self, runner, batch_idx: int, data_batch: Any = None) -> None:
        """Take the replay proxy out of the loop once it has done its job.

        Args:
            runner (Runner): The runner.
            batch_idx (int): Index of the batch.
            data_batch (Any): The batch. Defaults to None.
        """
        loop = runner.train_loop
        iterator = getattr(loop, 'dataloader_iterator', None)
        if isinstance(iterator, _RestoreAfter):
            loop.dataloader_iterator = iterator.inner
        self._pending = None

    # -- validation
    def before_val(self, runner) -> None:
        """Keep the training generators aside while validating (and gather them from all
        ranks if a best checkpoint may be saved during validation).

        Args:
            runner (Runner): The runner.
        """
        self._val_state = _rng_state()
        if any(hook.save_best for hook in _checkpoint_hooks(runner)):
            self._gather(runner, self._val_state)

    def after_val(self, runner) -> None:
        """Give the training generators back after validation.

        Args:
            runner (Runner): The runner.
        """
        if self._val_state is not None:
            _set_rng_state(self._val_state)
        self._val_state = None


# ---------------------------------------------------------------- configs

def apply_reliability_hooks(cfg: Any) -> None:
    """Install the crash-safe checkpoint hook and the RNG state hook in a config.

    ``default_hooks.checkpoint`` of type ``CheckpointHook`` becomes
    ``mmrest.AtomicCheckpointHook`` with the same arguments (mmengine's default, an
    epoch-interval ``CheckpointHook``, if the config has none); a disabled checkpoint hook
    (``None``) and custom checkpoint hooks are left alone. ``mmrest.RNGStateHook`` is
    added to ``custom_hooks`` unless present.

    Args:
        cfg (Config): The config, modified in place.
    """
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
    """File name templates of the periodic checkpoints a config writes.

    Args:
        cfg (Config): The config.

    Returns:
        tuple[str]: ``filename_tmpl`` of the checkpoint hook if set, plus mmengine's
        defaults.
    """
    templates = list(DEFAULT_TEMPLATES)
    hook = (cfg.get('default_hooks') or {}).get('checkpoint')
    if isinstance(hook, dict) and hook.get('filename_tmpl'):
        templates.insert(0, hook['filename_tmpl'])
    return tuple(templates)


# ---------------------------------------------------------------- resuming

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


def checked_load_from(path: str) -> str:
    """A checkpoint to load weights from (``load_from``, ``tools/test.py``), as mmengine
    should read it: an ``http(s)://`` address downloaded (:func:`fetch_checkpoint`), a
    local file checked with :func:`inspect_checkpoint`; other storage schemes as they are.

    Args:
        path (str): A local path or an address.

    Returns:
        str: The path to give mmengine.

    Raises:
        FileNotFoundError: If a local file does not exist.
        UnsafeCheckpointError: If loading it could run code.
        CheckpointError: If it is truncated or corrupted, or cannot be fetched.
    """
    path = fetch_checkpoint(path)
    if '://' not in path:
        inspect_checkpoint(path, for_resume=False)
    return path


def _template_regex(template: str) -> 're.Pattern':
    head, _, tail = template.partition('{}')
    return re.compile('^' + re.escape(head) + r'(\d+)' + re.escape(tail) + '$')


def _checkpoint_step(name: str, templates: Sequence[str]) -> Optional[int]:
    """The step in a periodic checkpoint's file name (first matching template), or None."""
    for template in templates:
        match = _template_regex(template).match(name)
        if match:
            return int(match.group(1))
    return None


def _periodic_checkpoints(folders: Sequence[str], templates: Sequence[str],
                          before: Optional[int] = None) -> List[str]:
    """Periodic checkpoints of ``folders`` (each file once), newest first.

    Args:
        folders (Sequence[str]): Folders to list; missing ones are skipped.
        templates (Sequence[str]): File name templates of periodic checkpoints.
        before (int, optional): Keep only steps below this one. Defaults to None (all).

    Returns:
        list[str]: Paths, by step, newest first.
    """
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
