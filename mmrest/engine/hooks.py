"""Hooks that make training survive being killed.

* :class:`AtomicCheckpointHook` -- mmengine's ``CheckpointHook`` with crash-safe saving.
* :class:`RNGStateHook` -- saves and restores the random number generators, so that a
  resumed run continues exactly like an uninterrupted one.

``tools/train.py`` installs both (see :func:`mmrest.engine.apply_reliability_hooks`).
"""
import os
import os.path as osp
import random
from collections import deque
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from mmengine.dist import is_main_process
from mmengine.fileio.backends import LocalBackend
from mmengine.hooks import CheckpointHook, Hook
from mmengine.runner import IterBasedTrainLoop

from ..utils.checkpoint import (CheckpointError, atomic_write, commit_file,
                                remove_stale_temp_files)
from ..registry import HOOKS

MIN_KEEP_CKPTS = 2


@HOOKS.register_module()
class AtomicCheckpointHook(CheckpointHook):
    """``CheckpointHook`` whose checkpoints are never partial, and never the only copy.

    Differences from mmengine's hook (all arguments are the same):

    * Every checkpoint (periodic, last and best) is written by ``Runner.save_checkpoint``
      to a temporary file ``.<name>.<pid>.tmp`` in the destination folder, flushed to disk
      (``fsync``) and renamed over ``<name>`` (``os.replace``). A kill, a power loss or a
      full disk during a save leaves the previous files as they were.
    * ``last_checkpoint`` is written the same way, after the checkpoint it names is
      complete, so it never points at a partial file.
    * Outdated checkpoints (``max_keep_ckpts``) are deleted only after the new one is on
      disk (mmengine deletes first), and at least :data:`MIN_KEEP_CKPTS` are kept, so the
      previous checkpoint is there to fall back on if the newest is damaged later.
    * Temporary files left by killed runs are removed when training starts.
    * A failed save raises :class:`~mmrest.utils.CheckpointError` naming the file and
      the reason; the temporary file is removed.

    Only local folders get the atomic treatment; other storage backends (e.g. object
    stores, whose uploads are atomic themselves) are handled as mmengine does.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._requested_max_keep = self.max_keep_ckpts
        if 0 < self.max_keep_ckpts < MIN_KEEP_CKPTS:
            self.max_keep_ckpts = MIN_KEEP_CKPTS

    def before_train(self, runner) -> None:
        """Set up the folder, as mmengine does, and remove stale temporary files.

        Args:
            runner (Runner): The runner.
        """
        super().before_train(runner)
        if self._requested_max_keep != self.max_keep_ckpts:
            runner.logger.info(
                f'max_keep_ckpts={self._requested_max_keep} raised to '
                f'{self.max_keep_ckpts}: the previous checkpoint is kept as a fallback')
        if self._is_local() and is_main_process():
            for path in remove_stale_temp_files(self.out_dir):
                runner.logger.warning(
                    f'removed {path}: an incomplete checkpoint of an interrupted run')

    def _is_local(self) -> bool:
        return isinstance(getattr(self, 'file_backend', None), LocalBackend)

    def _save_atomically(self, runner, out_dir: str, filename: str, *args, **kwargs) -> None:
        """``Runner.save_checkpoint`` into a temporary file, then commit it."""
        save = type(runner).save_checkpoint.__get__(runner)
        if not self._is_local():
            save(out_dir, filename, *args, **kwargs)
            return
        final = osp.join(out_dir, filename)
        tmp_name = f'.{filename}.{os.getpid()}.tmp'
        tmp = osp.join(out_dir, tmp_name)
        try:
            save(out_dir, tmp_name, *args, **kwargs)
            if is_main_process():
                commit_file(tmp, final)
        except BaseException as err:
            if is_main_process() and osp.exists(tmp):
                os.remove(tmp)
            if isinstance(err, OSError):
                previous = self._previous_ckpt
                if previous:  # the copy in this folder (the run may have been moved)
                    here = osp.join(out_dir, osp.basename(previous))
                    previous = here if osp.isfile(here) else previous
                kept = (f'the previous checkpoint {previous} is intact'
                        if previous else 'no earlier checkpoint exists')
                raise CheckpointError(
                    f'saving checkpoint {final} failed ({type(err).__name__}: {err}); '
                    f'nothing was written there and {kept}') from err
            raise

    def _save_checkpoint_with_step(self, runner, step, meta) -> None:
        to_remove: List[Any] = []
        old_keep = list(getattr(self, 'keep_ckpt_ids', []))
        if self.max_keep_ckpts > 0 and not (old_keep and old_keep[-1] == step):
            ids = old_keep + [step]
            while len(ids) > self.max_keep_ckpts:
                to_remove.append(ids.pop(0))
            self.keep_ckpt_ids = deque(ids, self.max_keep_ckpts)
            runner.message_hub.update_info('keep_ckpt_ids', list(ids))

        # after a resume the hook starts empty; the message hub has the resumed one
        self._previous_ckpt = self.last_ckpt or runner.message_hub.get_info('last_ckpt')
        ckpt_filename = self.filename_tmpl.format(step)
        self.last_ckpt = self.file_backend.join_path(self.out_dir, ckpt_filename)
        runner.message_hub.update_info('last_ckpt', self.last_ckpt)
        try:
            self._save_atomically(
                runner,
                self.out_dir,
                ckpt_filename,
                self.file_client_args,
                save_optimizer=self.save_optimizer,
                save_param_scheduler=self.save_param_scheduler,
                meta=meta,
                by_epoch=self.by_epoch,
                backend_args=self.backend_args,
                **self.args)
        except BaseException:
            # Nothing was saved: keep the bookkeeping of what is on disk.
            self.last_ckpt = self._previous_ckpt
            if self.max_keep_ckpts > 0:
                self.keep_ckpt_ids = deque(old_keep, self.max_keep_ckpts)
                runner.message_hub.update_info('keep_ckpt_ids', old_keep)
            if self.last_ckpt is not None:
                runner.message_hub.update_info('last_ckpt', self.last_ckpt)
            raise

        if not is_main_process():
            return
        save_file = osp.join(runner.work_dir, 'last_checkpoint')
        atomic_write(save_file, lambda f: f.write(self.last_ckpt), mode='w')
        for old_step in to_remove:
            path = self.file_backend.join_path(self.out_dir, self.filename_tmpl.format(old_step))
            if self.file_backend.isfile(path):
                self.file_backend.remove(path)
            elif self.file_backend.isdir(path):  # deepspeed checkpoints are folders
                self.file_backend.rmtree(path)

    def _save_best_checkpoint(self, runner, metrics) -> None:
        # mmengine's implementation calls runner.save_checkpoint for the best checkpoint:
        # route that call through the atomic save for its duration.
        def save(out_dir, filename, *args, **kwargs):
            self._save_atomically(runner, out_dir, filename, *args, **kwargs)

        runner.save_checkpoint = save
        try:
            super()._save_best_checkpoint(runner, metrics)
        finally:
            del runner.save_checkpoint

    _previous_ckpt: Optional[str] = None


def _rng_state() -> Dict[str, Any]:
    state: Dict[str, Any] = dict(
        torch=torch.get_rng_state(),
        numpy=np.random.get_state(),
        python=random.getstate(),
    )
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        states = state['cuda']
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    if 'numpy' in state:
        np.random.set_state(state['numpy'])
    if 'python' in state:
        version, internal, gauss = state['python']
        random.setstate((version, tuple(internal), gauss))


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
    """Save the random generators in checkpoints and restore them on resume.

    mmengine resumes weights, optimizer, schedulers and the iteration, and re-seeds the
    generators with the configured seed, but it does not restore their state: after a
    resume, dropout, drop path, batch augmentations and random transforms draw different
    numbers than the uninterrupted run would have. This hook stores ``rng_state`` (torch
    CPU and CUDA, numpy, python ``random``) in every checkpoint and puts it back at the
    moment that corresponds to the save:

    * iteration-based loops: mmengine first replays the data loader up to the resumed
      iteration (which draws random numbers for the skipped batches); the generators are
      restored right after that replay, before the first new batch is fetched;
    * epoch-based loops: at the start of the resumed epoch, before its data loader
      iterator is created.

    Validation runs with its own copy of the generators (saved before, restored after),
    so how often validation runs does not change the training's random stream; a
    checkpoint saved during validation (best checkpoint) stores the training state.

    With ``randomness=dict(diff_rank_seed=True)`` every rank has its own stream but only
    rank 0's is saved, so nothing is restored in that case (a warning says so).
    """

    priority = 'VERY_HIGH'

    def __init__(self) -> None:
        self._pending: Optional[Dict[str, Any]] = None
        self._pending_iter: Optional[int] = None
        self._val_state: Optional[Dict[str, Any]] = None

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        """Store the generators (the training ones, also during validation).

        Args:
            runner (Runner): The runner.
            checkpoint (dict): The checkpoint being saved.
        """
        checkpoint['rng_state'] = (self._val_state
                                   if self._val_state is not None else _rng_state())

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        """Remember the saved generators until training continues.

        Args:
            runner (Runner): The runner.
            checkpoint (dict): The loaded checkpoint.
        """
        state = checkpoint.get('rng_state')
        meta = checkpoint.get('meta') or {}
        if state is None or 'iter' not in meta:
            return
        cfg = getattr(runner, '_randomness_cfg', None) or {}
        if cfg.get('diff_rank_seed', False) and runner.world_size > 1:
            runner.logger.warning(
                'randomness.diff_rank_seed=True: the per-rank random generators cannot be '
                'restored from the checkpoint (only rank 0 saves it); they are re-seeded')
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

    def before_val(self, runner) -> None:
        """Keep the training generators aside while validating.

        Args:
            runner (Runner): The runner.
        """
        self._val_state = _rng_state()

    def after_val(self, runner) -> None:
        """Give the training generators back after validation.

        Args:
            runner (Runner): The runner.
        """
        if self._val_state is not None:
            _set_rng_state(self._val_state)
        self._val_state = None
