"""Shared fixtures and marks: cached weights and models, thread counts, mmengine's scope."""
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
    """Cases of an ``arch`` base or large are ``slow`` (the same code as the smaller archs,
    with more blocks); cases of detector and segmentor configs ``ops`` (mmcv's ops)."""
    for item in items:
        callspec = getattr(item, 'callspec', None)
        if callspec is not None and callspec.params.get('arch') in SLOW_ARCHS:
            item.add_marker(pytest.mark.slow)
        params = callspec.params if callspec is not None else {}
        config = params.get('path') or params.get('name')
        if (isinstance(config, str) and config.endswith('.py')
                and not config.endswith('imagenet.py')):
            item.add_marker(pytest.mark.ops)


def pytest_addoption(parser):
    parser.addoption(
        '--each-value-once', action='store_true',
        help='of each parametrized test, run only the cases that bring a parameter value '
        'not run yet (every value, not every combination: the stack matrix)')


def pytest_configure(config):
    if config.getoption('each_value_once'):
        config.pluginmanager.register(_EachValueOnce(), 'each-value-once')


class _EachValueOnce:
    """``--each-value-once``: after the other selections, keep a case of a parametrized
    test only if one of its parameter values has not run in an earlier case of it."""

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config, items):
        tried: Dict[str, set] = {}
        kept, dropped = [], []
        for item in items:
            callspec = getattr(item, 'callspec', None)
            values = {(k, repr(v)) for k, v in callspec.params.items()} if callspec else set()
            seen = tried.setdefault(item.nodeid.split('[')[0], set())
            if callspec is None or values - seen:
                seen |= values
                kept.append(item)
            else:
                dropped.append(item)
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = kept


def _glibc(function: str, *args: int) -> None:
    """Call ``function`` of glibc with ``args``; nothing where the C library is another."""
    try:
        getattr(ctypes.CDLL('libc.so.6'), function)(*args)
    except (OSError, AttributeError):  # not glibc
        pass


# blocks of 1 MiB or more in their own mappings, returned when freed (glibc would raise
# the threshold to the largest block freed, up to 32 MiB, and keep freed tensors)
_glibc('mallopt', -3, 1 << 20)  # M_MMAP_THRESHOLD


def _release_memory() -> None:
    """Return freed memory to the system (glibc keeps freed blocks in its arenas)."""
    gc.collect()
    _glibc('malloc_trim', 0)


@pytest.fixture(autouse=True)
def collect_cycles_after_each_test():
    """Models sit in reference cycles: collect them after each test (a collection scans
    only what the test module made: see ``free_caches_after_each_module``)."""
    yield
    gc.collect()


@pytest.fixture(scope='module', autouse=True)
def free_caches_after_each_module():
    """Drop the ``lru_cache``s of the test modules and helpers after each module, so the
    suite's memory is that of its largest module. While a module runs, what was alive
    before it is frozen (``gc.freeze``): with mmdet, mmseg and mmpretrain imported a
    full collection scans ~0.5 million objects (0.3 s), each test's scans what is new."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()
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
    """mmengine's default scope (process-wide) is, after each test, what it was before."""
    from mmengine.registry import DefaultScope
    before = dict(DefaultScope._instance_dict)
    yield
    DefaultScope._instance_dict.clear()
    DefaultScope._instance_dict.update(before)


@pytest.fixture(autouse=True)
def restore_intra_op_threads():
    """The intra-op thread count (read by the attention's CPU dispatch) is, after each
    test, what it was before (a tool's ``main`` with ``--threads`` changes it)."""
    with _intra_op_threads(torch.get_num_threads()):
        yield


@pytest.fixture(scope='module')
def demo(tmp_path_factory) -> Dict[str, object]:
    """A tiny shapes data set and a 2-iteration RetinaNet config without validation, once
    per module: ``dict(root=, data=, config=)``."""
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
    """``authors_weights(arch, seed=0, out_norms=(), num_classes=1000)``: cached random
    weights in the authors' layout, as a shallow copy (do not modify its tensors)."""

    def make(arch: str, seed: int = 0, out_norms: Tuple[int, ...] = (),
             num_classes: int = 1000) -> Dict[str, torch.Tensor]:
        return dict(_authors_state_dict(arch, seed, tuple(out_norms), num_classes))

    return make


@pytest.fixture(scope='session')
def rest_with_authors_weights(
        authors_weights) -> Callable[..., Tuple[ResT, Dict[str, torch.Tensor]]]:
    """``rest_with_authors_weights(arch, seed=0, **kwargs)``: ``(model, sd)``, a ResT in
    eval mode holding random authors'-layout weights ``sd`` (head and the selected output
    norms included), loaded with ``strict=True`` (so the key names are the authors')."""

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
    """One shared ResT per arch (authors' init, eval mode), for shapes only: do not modify."""
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
    """One intra-op thread for a module of small cases (OpenMP fork/joins would dominate
    them)."""
    with _intra_op_threads(1):
        yield
