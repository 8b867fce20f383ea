"""Shared fixtures and marks of the tests: cached weights and models, thread counts,
mmengine's default scope restored after each test, the slow mark of the large archs."""
import contextlib
import ctypes
import functools
import gc
import logging
import os
import sys
from typing import Callable, Dict, List, Tuple

import pytest
import torch
from _backbone_helpers import backbone_part
from reference_rest import random_authors_state_dict

from mmrest.models import ResT


SLOW_ARCHS = ('base', 'large')


def pytest_collection_modifyitems(config, items):
    """Variants of the two largest archs are marked ``slow``, cases of detector and
    segmentor configs ``ops``.

    A test parametrised by ``arch`` runs, in ``make test-fast``, only on the smaller archs
    (ResT lite and small, ResT V2 tiny and small): base and large go through the same code
    with more blocks and take most of the time. ``make test`` runs them all. The stack
    matrix (tools/stacks.sh) runs the ``stack`` modules without the ``ops`` cases where
    mmcv has no compiled ops.
    """
    for item in items:
        callspec = getattr(item, 'callspec', None)
        if callspec is not None and callspec.params.get('arch') in SLOW_ARCHS:
            item.add_marker(pytest.mark.slow)
        # a case of a detector or segmentor config builds mmdet / mmseg models, whose
        # imports need mmcv's compiled ops (not in mmcv-lite)
        params = callspec.params if callspec is not None else {}
        config = params.get('path') or params.get('name')
        if (isinstance(config, str) and config.endswith('.py')
                and not config.endswith('imagenet.py')):
            item.add_marker(pytest.mark.ops)


def _glibc(function: str, *args: int) -> None:
    """Call ``function`` of glibc with ``args``; nothing where the C library is another."""
    try:
        getattr(ctypes.CDLL('libc.so.6'), function)(*args)
    except (OSError, AttributeError):  # not glibc
        pass


# glibc serves every block of 1 MiB or more by its own mapping, returned to the system
# when freed. By default it raises that threshold to the largest block freed so far (up
# to 32 MiB), after which tensors of a few MiB live in its arenas and their freed space
# stays with the process.
_glibc('mallopt', -3, 1 << 20)  # M_MMAP_THRESHOLD


def _release_memory() -> None:
    """Return freed memory to the system: glibc keeps freed blocks of large tensors in its
    arenas, so without this the process would hold the peak of every earlier module."""
    gc.collect()
    _glibc('malloc_trim', 0)


@pytest.fixture(autouse=True)
def collect_cycles_after_each_test():
    """Models sit in reference cycles (their modules' hooks and parents), which Python's
    collector, counting objects rather than bytes, may leave for many tests: collect
    them after each test, so that a test's models go with it."""
    yield
    gc.collect()


@pytest.fixture(scope='module', autouse=True)
def free_caches_after_each_module():
    """After each test module, the models and weights cached by ``functools.lru_cache``
    in the test modules and helpers are dropped (they are rebuilt where needed), so the
    suite's memory stays that of its largest module rather than the sum of all."""
    yield
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    for module in list(sys.modules.values()):
        path = getattr(module, '__file__', None) or ''
        if not path.startswith(tests_dir) or module.__name__.endswith('_tools'):
            continue
        for value in list(vars(module).values()):
            if callable(getattr(value, 'cache_clear', None)):
                value.cache_clear()
    _release_memory()


@pytest.fixture(autouse=True)
def restore_default_scope():
    """mmengine's default scope (a process-wide global that builds and runners switch to
    mmdet, mmseg or mmpretrain) is, after each test, what it was before it: no test sees
    a scope left by another."""
    from mmengine.registry import DefaultScope
    before = dict(DefaultScope._instance_dict)
    yield
    DefaultScope._instance_dict.clear()
    DefaultScope._instance_dict.update(before)


@pytest.fixture(autouse=True)
def restore_intra_op_threads():
    """The intra-op thread count (which the CPU dispatch of the attention reads) is,
    after each test, what it was before it: a tool's ``main`` run in-process with
    ``--threads`` does not change what later tests check."""
    with _intra_op_threads(torch.get_num_threads()):
        yield


@pytest.fixture(scope='module')
def demo(tmp_path_factory) -> Dict[str, object]:
    """The tool tests' run, once per module: a tiny shapes data set and a RetinaNet config
    of two iterations on it without validation, as ``dict(root=, data=, config=)``."""
    from _engine_helpers import demo_config_text, make_shapes_data, write_config
    root = tmp_path_factory.mktemp('tools')
    data = make_shapes_data(str(root / 'data'), num_train=8, num_val=4)
    config = write_config(str(root / 'cfg.py'),
                          demo_config_text(data, max_iters=2, with_val=False))
    return dict(root=root, data=data, config=config)


class _ListHandler(logging.Handler):

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: List[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def log_records() -> List[logging.LogRecord]:
    """The records the current MMLogger receives during the test."""
    from mmengine.logging import MMLogger
    logger = MMLogger.get_current_instance()
    handler = _ListHandler()
    logger.addHandler(handler)
    yield handler.records
    logger.removeHandler(handler)


@functools.lru_cache(maxsize=2)  # a few archs at a time: large weighs ~0.35 GB
def _authors_state_dict(arch: str, seed: int, out_norms: Tuple[int, ...],
                        num_classes: int) -> Dict[str, torch.Tensor]:
    return random_authors_state_dict(arch, num_classes=num_classes, seed=seed,
                                     out_norms=out_norms)


@pytest.fixture(scope='session')
def authors_weights() -> Callable[..., Dict[str, torch.Tensor]]:
    """Factory of random weights in the authors' key layout, cached per arguments.

    Call as ``authors_weights(arch, seed=0, out_norms=(), num_classes=1000)``. The
    returned dict is a fresh shallow copy; do not modify its tensors in place.
    """

    def make(arch: str, seed: int = 0, out_norms: Tuple[int, ...] = (),
             num_classes: int = 1000) -> Dict[str, torch.Tensor]:
        return dict(_authors_state_dict(arch, seed, tuple(out_norms), num_classes))

    return make


@pytest.fixture(scope='session')
def rest_with_authors_weights(
        authors_weights) -> Callable[..., Tuple[ResT, Dict[str, torch.Tensor]]]:
    """Factory: a ResT in eval mode holding random authors'-layout weights.

    Call as ``rest_with_authors_weights(arch, seed=0, **resT_kwargs)``; returns
    ``(model, state_dict)`` where ``state_dict`` is the authors'-layout dict (with
    ``head.*`` and the output norms of the selected stages). The weights are loaded with
    ``strict=True``, so the backbone's key names are checked against the authors'.
    """

    def make(arch: str, seed: int = 0, **kwargs) -> Tuple[ResT, Dict[str, torch.Tensor]]:
        kwargs.setdefault('drop_path_rate', 0.)
        model = ResT(arch=arch, **kwargs)
        out_norms = tuple(i for i in model.out_indices if i < 3)
        sd = authors_weights(arch, seed=seed, out_norms=out_norms)
        model.load_state_dict(backbone_part(sd), strict=True)
        return model.eval(), sd

    return make


@functools.lru_cache(maxsize=2)  # a few archs at a time: large weighs ~0.35 GB
def _eval_rest(arch: str) -> ResT:
    torch.manual_seed(0)
    model = ResT(arch=arch, drop_path_rate=0.)
    model.init_weights()
    return model.eval()


@pytest.fixture(scope='session')
def eval_rest() -> Callable[[str], ResT]:
    """Factory of one shared ResT per arch (authors' initialisation, eval mode).

    For shape and finiteness checks only: do not train or modify the returned model.
    """
    return _eval_rest


@contextlib.contextmanager
def _intra_op_threads(threads: int):
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@pytest.fixture(scope='module')
def one_intra_op_thread():
    """One intra-op thread for a test module of small cases (``pytestmark``).

    Their ops take microseconds, so OpenMP fork/joins would dominate them (and make the
    file slow on a busy machine). One thread selects the CPU paths for many (batch, head)
    pairs; the paths taken with fewer pairs than threads have tests of their own under
    ``two_threads`` and ``many_threads`` (e.g. ``test_plain_attention_blocked_backward*``
    in tests/test_emsa_ops.py).
    """
    with _intra_op_threads(1):
        yield


@pytest.fixture
def two_threads():
    """Two intra-op threads, so that batch 1 x 1 head takes the blocked backward."""
    with _intra_op_threads(2):
        yield


@pytest.fixture
def many_threads():
    """32 intra-op threads, as on a GPU node (the CPU-tuned dispatch rules would fire
    for small batches if they were not limited to CPU tensors)."""
    with _intra_op_threads(32):
        yield
