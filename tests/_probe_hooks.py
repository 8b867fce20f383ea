"""Hooks loaded by the tests' training subprocesses (``custom_imports=['_probe_hooks']``).

* :class:`RecordRandomStreams` writes per rank and iteration the next draws of each random
  generator (from copies) and the losses to ``<work_dir>/probe_rank<k>.jsonl``.
* :class:`StopAtKillPoint` writes a marker and sleeps at ``MMREST_KILL_AT=<iteration>:<stage>``
  (marker: ``MMREST_KILL_MARKER``), so a test can SIGKILL it there at any machine speed.
"""
import json
import os
import os.path as osp
import random
import time

import numpy as np
import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS


def next_draws() -> dict:
    """The next number of torch's, numpy's and python's global generators, not drawn."""
    gen = torch.Generator()
    gen.set_state(torch.get_rng_state())
    state = np.random.RandomState()
    state.set_state(np.random.get_state())
    rnd = random.Random()
    rnd.setstate(random.getstate())
    return dict(torch=torch.rand(1, generator=gen).item(), numpy=float(state.random_sample()),
                python=rnd.random())


@HOOKS.register_module()
class RecordRandomStreams(Hook):
    """Record the random streams and the losses of every iteration, per rank."""

    priority = 'LOWEST'

    def _write(self, runner, record: dict) -> None:
        path = osp.join(runner.work_dir, f'probe_rank{runner.rank}.jsonl')
        with open(path, 'a', encoding='utf-8') as f:
            f.write(json.dumps(record) + '\n')

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        self._write(runner, dict(iter=runner.iter, stage='before_train_iter', **next_draws()))

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        losses = {k: float(torch.as_tensor(v).detach()) for k, v in (outputs or {}).items()
                  if 'loss' in k}
        self._write(runner, dict(iter=runner.iter, stage='after_train_iter', losses=losses,
                                 **next_draws()))


@HOOKS.register_module()
class StopAtKillPoint(Hook):
    """Write the marker and wait to be killed at ``MMREST_KILL_AT`` (iteration:stage)."""

    priority = 'LOWEST'

    def __init__(self) -> None:
        point = os.environ.get('MMREST_KILL_AT')
        self.iteration, self.stage = (None, None)
        if point:
            iteration, self.stage = point.split(':')
            self.iteration = int(iteration)
        self.marker = os.environ.get('MMREST_KILL_MARKER')

    def _maybe_stop(self, runner, stage: str) -> None:
        if self.iteration == runner.iter and self.stage == stage:
            with open(self.marker, 'w', encoding='utf-8') as f:
                f.write(f'{runner.iter}:{stage}')
            time.sleep(3600)  # the test kills the process now

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        self._maybe_stop(runner, 'before_train_iter')

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        self._maybe_stop(runner, 'after_train_iter')

    def before_val(self, runner) -> None:
        self._maybe_stop(runner, 'before_val')
