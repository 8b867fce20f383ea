"""Every rank's random generators in the checkpoints, and back on resume, so that a
resumed run continues exactly like an uninterrupted one."""
import random
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from mmengine.dist import all_gather_object
from mmengine.hooks import CheckpointHook, Hook
from mmengine.runner import IterBasedTrainLoop

from ..registry import HOOKS


def _rng_state() -> Dict[str, Any]:
    """This process's generators: torch (CPU), numpy, python ``random`` and, once CUDA is
    in use, the current CUDA device's (one device per rank)."""
    state: Dict[str, Any] = dict(torch=torch.get_rng_state(), numpy=np.random.get_state(),
                                 python=random.getstate())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    # ``.cpu()``: Runner.resume loads checkpoints onto the run's device
    torch.set_rng_state(state['torch'].cpu())
    cuda = state.get('cuda')
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # older checkpoints: every device of rank 0
            index = torch.cuda.current_device()
            cuda = cuda[index] if index < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda.cpu())
    if 'numpy' in state:
        np.random.set_state(state['numpy'])
    if 'python' in state:
        version, internal, gauss = state['python']
        random.setstate((version, tuple(internal), gauss))


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
    """Save every rank's random generators in checkpoints and restore them on resume
    (mmengine only re-seeds them), so that a resumed run draws what the uninterrupted one
    would have.

    Checkpoints get ``rng_state = {'world_size': W, 'ranks': [...]}`` (torch CPU, numpy,
    python ``random``, the rank's CUDA generator), gathered only when a
    ``CheckpointHook`` is due to save. Rank k gets rank k's state back right after
    mmengine's data loader replay (iteration-based loops) or at the resumed epoch; another
    world size, or persistent data loader workers, get a warning. Validation runs on its
    own copy of the generators.
    """

    priority = 'VERY_HIGH'

    def __init__(self) -> None:
        self._pending: Optional[Dict[str, Any]] = None
        self._pending_iter: Optional[int] = None
        self._val_state: Optional[Dict[str, Any]] = None
        # (runner.iter, every rank's states) gathered for a save at that iteration
        self._gathered: Optional[Tuple[int, List[Dict[str, Any]]]] = None

    def _gather(self, runner, state: Optional[Dict[str, Any]] = None) -> None:
        states = all_gather_object(state if state is not None else _rng_state())
        self._gathered = (runner.iter, states)

    def after_train_iter(self, runner, batch_idx: int, data_batch: Any = None,
                         outputs: Any = None) -> None:
        if any(_saves_after_iter(hook, runner) for hook in _checkpoint_hooks(runner)):
            self._gather(runner)

    def after_train_epoch(self, runner) -> None:
        if any(_saves_after_epoch(hook, runner) for hook in _checkpoint_hooks(runner)):
            self._gather(runner)

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
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

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        saved = checkpoint.get('rng_state')
        meta = checkpoint.get('meta') or {}
        if not isinstance(saved, dict) or 'iter' not in meta:
            return
        # older checkpoints hold one process's state at the top level
        states = list(saved['ranks']) if 'ranks' in saved else [saved]
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
        """Iteration-based loops: restore right after mmengine's data loader replay."""
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
        """Epoch-based loops: restore at the resumed epoch."""
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
        """Take the replay proxy out of the loop once it has done its job."""
        loop = runner.train_loop
        iterator = getattr(loop, 'dataloader_iterator', None)
        if isinstance(iterator, _RestoreAfter):
            loop.dataloader_iterator = iterator.inner
        self._pending = None

    def before_val(self, runner) -> None:
        """Keep the training generators aside while validating."""
        self._val_state = _rng_state()
        if any(hook.save_best for hook in _checkpoint_hooks(runner)):
            self._gather(runner, self._val_state)

    def after_val(self, runner) -> None:
        if self._val_state is not None:
            _set_rng_state(self._val_state)
        self._val_state = None
