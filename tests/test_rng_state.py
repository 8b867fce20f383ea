"""The random generator states of a run (mmrest.engine.rng_state, RNGStateHook) in
process, no training: saved per rank when a checkpoint is due, restored onto the CPU, the
seeding kept for another world size, persistent workers and older checkpoints named."""
import pytest
import torch


def test_rng_states_loaded_onto_a_gpu_are_restored():
    """On a GPU the resumed generator states arrive as CUDA tensors, which torch's setters
    refuse: they are restored through the CPU (a stand-in plays the CUDA tensor)."""
    from mmrest.engine.rng_state import _rng_state, _set_rng_state

    class OnTheGpu:
        def __init__(self, state: torch.Tensor) -> None:
            self._state = state

        def cpu(self) -> torch.Tensor:
            return self._state

    saved = _rng_state()
    expected = torch.rand(3)
    torch.rand(5)
    _set_rng_state(dict(saved, torch=OnTheGpu(saved['torch'])))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize('persistent, workers, warns', [
    (True, 2, True), (False, 2, False), (True, 0, False)])
def test_epoch_resume_with_persistent_workers_says_what_is_not_restored(
        persistent, workers, warns):
    """Persistent data loader workers keep their own generators across epochs, which no
    checkpoint holds: resuming an epoch-based run with them says so."""
    from types import SimpleNamespace

    from mmrest.engine import RNGStateHook
    from mmrest.engine.rng_state import _rng_state
    logs = []
    runner = SimpleNamespace(
        world_size=1, rank=0, iter=8, train_loop=object(),
        train_dataloader=SimpleNamespace(persistent_workers=persistent, num_workers=workers),
        logger=SimpleNamespace(info=logs.append, warning=logs.append))
    hook = RNGStateHook()
    hook.after_load_checkpoint(runner, dict(meta=dict(iter=8), rng_state=dict(
        world_size=1, ranks=[_rng_state()])))
    hook.before_train_epoch(runner)
    assert logs[0] == 'restored the random generator state of iteration 8 from the checkpoint'
    assert any('persistent workers' in m for m in logs) == warns


class _Logger:

    def __init__(self) -> None:
        self.warnings, self.infos = [], []

    def warning(self, msg: str) -> None:
        self.warnings.append(msg)

    def info(self, msg: str) -> None:
        self.infos.append(msg)


class _Runner:
    """What RNGStateHook reads of a runner."""

    def __init__(self, rank: int = 0, world_size: int = 1, hooks=(), max_iters: int = 8):
        self.rank, self.world_size = rank, world_size
        self.hooks = list(hooks)
        self.iter, self.epoch, self.max_iters, self.max_epochs = 0, 0, max_iters, 1
        self.logger = _Logger()
        self.train_loop = object()  # not iteration-based: restores in before_train_epoch


def _draw_after(state: dict) -> tuple:
    """What torch, numpy and python draw next from ``state`` (global generators)."""
    import random

    import numpy as np
    torch.set_rng_state(state['torch'])
    np.random.set_state(state['numpy'])
    random.setstate(state['python'])
    return torch.rand(1).item(), np.random.rand(), random.random()


def _states(seeds):
    import random

    import numpy as np

    from mmrest.engine.rng_state import _rng_state
    out = []
    for seed in seeds:
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        out.append(_rng_state())
    return out


@pytest.fixture
def keep_generators():
    """Restore the global generators after a test that sets them."""
    import random

    import numpy as np
    saved = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    yield
    torch.set_rng_state(saved[0])
    np.random.set_state(saved[1])
    random.setstate(saved[2])


def test_rng_hook_gathers_only_when_a_checkpoint_is_due(monkeypatch):
    from mmengine.hooks import CheckpointHook

    import mmrest.engine.rng_state as rng_state
    calls = []
    monkeypatch.setattr(rng_state, 'all_gather_object',
                        lambda obj: calls.append(runner.iter) or [obj])
    ckpt_hook = CheckpointHook(interval=3, by_epoch=False)  # save_last=True
    runner = _Runner(hooks=[ckpt_hook], max_iters=8)
    hook = rng_state.RNGStateHook()
    for it in range(8):
        runner.iter = it
        hook.after_train_iter(runner, it)
    assert calls == [2, 5, 7]  # iterations 3, 6 and the last (8) save
    hook.before_val(runner)
    hook.after_val(runner)
    assert calls == [2, 5, 7]  # no best checkpoint: no gathering for validation
    ckpt_hook.save_best = 'auto'
    hook.before_val(runner)
    assert calls == [2, 5, 7, 7]
    epoch_hook = CheckpointHook(interval=2, by_epoch=True)
    runner = _Runner(hooks=[epoch_hook])
    runner.max_epochs = 5
    for epoch in range(5):
        runner.epoch = epoch
        hook.after_train_epoch(runner)
    assert len(calls) == 4 + 3  # epochs 2, 4 and the last (5)


def test_rng_hook_saves_every_rank_and_restores_its_own(monkeypatch, keep_generators):
    import mmrest.engine.rng_state as rng_state
    state0, state1 = _states([11, 22])
    monkeypatch.setattr(rng_state, 'all_gather_object', lambda obj: [state0, state1])
    saver = rng_state.RNGStateHook()
    rank0 = _Runner(rank=0, world_size=2, hooks=[rng_state.CheckpointHook(interval=1)])
    rank0.iter = 4
    saver.after_train_epoch(rank0)
    checkpoint = dict(meta=dict(iter=5))
    saver.before_save_checkpoint(rank0, checkpoint)
    assert checkpoint['rng_state']['world_size'] == 2
    assert checkpoint['rng_state']['ranks'] == [state0, state1]
    assert rank0.logger.warnings == []

    expected = _draw_after(state1)
    torch.manual_seed(0)  # the re-seeding of a resumed run
    rank1 = _Runner(rank=1, world_size=2)
    rank1.iter = 5
    loader = rng_state.RNGStateHook()
    loader.after_load_checkpoint(rank1, checkpoint)
    loader.before_train_epoch(rank1)
    import random

    import numpy as np
    assert (torch.rand(1).item(), np.random.rand(), random.random()) == expected
    assert expected != _draw_after(state0)


def test_rng_hook_with_another_world_size_warns_and_keeps_the_seeding(keep_generators):
    from mmrest.engine.rng_state import RNGStateHook
    states = _states([1, 2])
    checkpoint = dict(meta=dict(iter=3), rng_state=dict(world_size=2, ranks=states))
    runner = _Runner(rank=0, world_size=1)
    runner.iter = 3
    torch.manual_seed(5)
    before = torch.get_rng_state()
    hook = RNGStateHook()
    hook.after_load_checkpoint(runner, checkpoint)
    hook.before_train_epoch(runner)
    assert torch.equal(torch.get_rng_state(), before)
    assert len(runner.logger.warnings) == 1
    assert 'random generator states of 2 process(es), but this run has 1' in \
        runner.logger.warnings[0]


def test_rng_hook_reads_single_process_checkpoints_of_older_versions(keep_generators):
    from mmrest.engine.rng_state import RNGStateHook
    (state, ) = _states([7])
    expected = _draw_after(state)
    torch.manual_seed(0)
    runner = _Runner()
    runner.iter = 3
    hook = RNGStateHook()
    hook.after_load_checkpoint(runner, dict(meta=dict(iter=3), rng_state=state))
    hook.before_train_epoch(runner)
    import random

    import numpy as np
    assert (torch.rand(1).item(), np.random.rand(), random.random()) == expected
