"""Whole-backbone speed and memory benchmark: ResT (fused and reference EMSA) vs mmdet peers.

Models (:data:`MODELS`; adding one is one entry), all as backbones returning their four
stages, randomly initialised (no weights are read), fp32, eager:

* ResT, every arch, with the default fused EMSA (``rest``) and with the straightforward
  reference (``attn_impl='reference'``, ``rest-ref``);
* ResTV2 (``restv2``, ``restv2-ref``) where ``mmrest.models`` has it;
* mmdet's PVT-tiny, PVTv2-b1 and Swin-T, built from mmdet's own RetinaNet / Mask R-CNN
  configs.

Cases (:data:`CASES`): ``infer_224`` (inference, 224x224, batch 16), ``infer_800``
(800x1344, batch 1), ``train_800`` (a training step at 800x1344, batch 2: forward in train
mode, the loss ``sum(out.mean() for out in outputs)``, backward; no optimizer step) and
``train_224`` (the same at 224x224, batch 32, as in ImageNet pretraining). Training cases
run only the models that their goals (:data:`GOALS`) name unless ``--models`` is given;
``--goal-models`` does that for every case.

Method: each (model, case) is measured in a fresh process (:func:`measure`) with fixed
threads: build, then ``torch.utils.benchmark.Timer.blocked_autorange`` (its first run,
which sizes the blocks, is untimed and is the warm-up; inference under
``torch.inference_mode``). The shared host's speed drifted 10%+ within minutes, and timing
the models one after another turned that drift into their ratios (measured 2026-11-24 with
the earlier version of this tool); so the run is ``--rounds`` rounds, each measuring the
matmul rate and then every (model, case) once, in an order rotated from round to round,
and the median over rounds is reported. Memory: the process's peak resident set size, and
the model memory, that peak minus the RSS after the imports (what the model's weights, its
input and its runs add to the process: the CPU counterpart of
``torch.cuda.max_memory_allocated``, which is reported on CUDA). The memory goals compare
model memory: the libraries every process imports (about 0.8 GiB with mmdet, mmseg and
mmcv) are the same for every model and would only pull the ratios towards 1.

Efficiency: GFLOP/s = 2 x MACs / time (a training step: 3 x the forward MACs), with the MACs
of ``tools/analysis/get_flops.py`` (ResT traced with ``attn_impl='reference'`` so that the
attention matmuls are seen), against the rate of a 2048^3 fp32 matmul measured in the same
run with the same threads.

Examples::

    python tools/analysis/benchmark.py --out work_dirs/benchmark.json   # everything
    python tools/analysis/benchmark.py --quick                          # smoke run
    python tools/analysis/benchmark.py --models rest rest-ref swin-t --archs small \\
        --cases infer_800 train_800
"""
import argparse
import importlib
import importlib.util
import json
import os
import os.path as osp
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from bench_process import (WORKER_FLAG, machine_info, peak_rss_bytes, rss_bytes, run_in_subprocess,
                           worker_main)
from torch import nn
from torch.utils.benchmark import Timer

REST_ARCHS = ('lite', 'small', 'base', 'large')
RESTV2_ARCHS = ('tiny', 'small', 'base', 'large')


@dataclass(frozen=True)
class ModelSpec:
    """A model family.

    Attributes:
        label (str): Row name; ``{arch}`` is replaced by the arch.
        source (str): ``'mmrest.<Class>'``, built as ``Class(arch=arch, **kwargs)``, or
            ``'mmdet::<config>'``, the ``model.backbone`` of that mmdet config.
        kwargs (dict): Keyword arguments of an mmrest class. Defaults to {}.
        archs (tuple[str]): The archs of an mmrest class. Defaults to ().
    """
    label: str
    source: str
    kwargs: Dict[str, Any] = field(default_factory=dict)
    archs: Tuple[str, ...] = ()


MODELS: Dict[str, ModelSpec] = {
    'rest': ModelSpec('ResT-{arch}', 'mmrest.ResT', dict(attn_impl='fused'), REST_ARCHS),
    'rest-ref': ModelSpec('ResT-{arch} reference', 'mmrest.ResT', dict(attn_impl='reference'),
                          REST_ARCHS),
    'restv2': ModelSpec('ResTV2-{arch}', 'mmrest.ResTV2', dict(attn_impl='fused'),
                        RESTV2_ARCHS),
    'restv2-ref': ModelSpec('ResTV2-{arch} reference', 'mmrest.ResTV2',
                            dict(attn_impl='reference'), RESTV2_ARCHS),
    'pvt-t': ModelSpec('mmdet PVT-tiny', 'mmdet::pvt/retinanet_pvt-t_fpn_1x_coco.py'),
    'pvtv2-b1': ModelSpec('mmdet PVTv2-b1', 'mmdet::pvt/retinanet_pvtv2-b1_fpn_1x_coco.py'),
    'swin-t': ModelSpec('mmdet Swin-T', 'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py'),
}


@dataclass(frozen=True)
class Case:
    """A benchmark case.

    Attributes:
        title (str): ``'inference'`` or ``'training step'``.
        train (bool): Whether it is a training step.
        batch (int): Batch size.
        shape (tuple[int, int]): Input (H, W).
        quick_batch (int): Batch size with ``--quick``.
        quick_shape (tuple[int, int]): Input (H, W) with ``--quick``.
        goal_models_only (bool): Without ``--models``, measure only the models that the
            case's goals name (:data:`GOALS`). Defaults to False.
    """
    title: str
    train: bool
    batch: int
    shape: Tuple[int, int]
    quick_batch: int
    quick_shape: Tuple[int, int]
    goal_models_only: bool = False


CASES: Dict[str, Case] = {
    'infer_224': Case('inference', False, 16, (224, 224), 2, (64, 64)),
    'infer_800': Case('inference', False, 1, (800, 1344), 1, (96, 160)),
    # a training step at 800x1344 takes tens of seconds, and the references keep every
    # attention map for backward (about 11 GB for ResT-small): the goals' models only
    'train_800': Case('training step', True, 2, (800, 1344), 2, (96, 160), True),
    'train_224': Case('training step', True, 32, (224, 224), 2, (64, 64), True),
}
MATMUL_SIZE, QUICK_MATMUL_SIZE = 2048, 256
MIN_RUN_TIME, QUICK_MIN_RUN_TIME = 1.0, 0.05
TRAIN_FLOPS_FACTOR = 3  # training step FLOPs / forward FLOPs (backward = 2 x forward)


@dataclass(frozen=True)
class Goal:
    """A goal ratio of one case; without a comparison it is reported only.

    Metrics: ``speedup``, time(other) / time(model); ``memory``, memory(model) /
    memory(other) (``cuda_max_allocated`` where measured, else the model memory: peak RSS
    minus the RSS after the imports); ``efficiency``,
    GFLOP/s of the model / the matmul rate.
    """
    case: str
    metric: str
    model: str
    other: Optional[str] = None
    comparison: Optional[str] = None
    target: Optional[float] = None


GOALS = (
    Goal('infer_800', 'speedup', 'rest:small', 'rest-ref:small', '>=', 2.0),
    Goal('infer_800', 'speedup', 'rest:small', 'swin-t', '>', 1.0),
    Goal('infer_800', 'memory', 'rest:small', 'rest-ref:small', '<=', 0.6),
    Goal('train_800', 'efficiency', 'rest:small', None, '>=', 0.70),
    Goal('train_800', 'speedup', 'rest:small', 'swin-t', '>=', 1.5),
    Goal('train_800', 'memory', 'rest:small', 'swin-t', '<=', 0.6),
    Goal('train_800', 'speedup', 'rest:small', 'rest-ref:small'),
    Goal('infer_224', 'efficiency', 'rest:small', None, '>=', 0.85),
    Goal('train_224', 'speedup', 'rest:small', 'rest-ref:small', '>=', 1.3),
    Goal('train_224', 'memory', 'rest:small', 'rest-ref:small', '<=', 0.7),
    Goal('infer_800', 'speedup', 'restv2:tiny', 'restv2-ref:tiny', '>=', 1.5),
    Goal('infer_800', 'memory', 'restv2:tiny', 'restv2-ref:tiny', '<=', 0.6),
    Goal('train_800', 'speedup', 'restv2:tiny', 'restv2-ref:tiny', '>=', 1.3),
    Goal('infer_800', 'speedup', 'restv2:tiny', 'swin-t'),
    Goal('train_800', 'speedup', 'restv2:tiny', 'swin-t'),
)
GOAL_NAMES = {'speedup': 'speed-up of {model} over {other}',
              'memory': 'peak memory of {model} / {other}',
              'efficiency': 'GFLOP/s of {model} / fp32 matmul rate'}
COMPARE: Dict[str, Callable[[float, float], bool]] = {
    '>=': lambda a, b: a >= b, '>': lambda a, b: a > b, '<=': lambda a, b: a <= b}


@dataclass(frozen=True)
class Run:
    """One row of the tables: a model family, its arch and whether it is compiled."""
    family: str
    arch: Optional[str] = None
    compiled: bool = False

    @property
    def key(self) -> str:
        """E.g. ``'rest:small'``, ``'swin-t'``, ``'rest-ref:small+compile'``."""
        key = self.family if self.arch is None else f'{self.family}:{self.arch}'
        return key + ('+compile' if self.compiled else '')

    @classmethod
    def from_key(cls, key: str) -> 'Run':
        """The run of a (not compiled) :attr:`key`."""
        family, _, arch = key.partition(':')
        return cls(family, arch or None)

    @property
    def label(self) -> str:
        """E.g. ``'ResT-small reference'``, ``'mmdet Swin-T (torch.compile)'``."""
        label = MODELS[self.family].label.format(arch=self.arch)
        return label + (' (torch.compile)' if self.compiled else '')


# ------------------------------------------------------------------------ models
def has_restv2() -> bool:
    """Whether this checkout's ``mmrest.models`` has ``ResTV2``."""
    return hasattr(importlib.import_module('mmrest.models'), 'ResTV2')


def mmdet_backbone_cfg(source: str) -> Dict[str, Any]:
    """``model.backbone`` of an mmdet config (``'mmdet::<path>'``), four stages, no weights."""
    from mmengine.config import Config
    from mmengine.utils import get_installed_path
    if importlib.util.find_spec('mmdet') is None:
        raise ImportError(f'mmdet is not installed; it is needed for {source}')
    cfg = Config.fromfile(osp.join(get_installed_path('mmdet'), '.mim', 'configs',
                                   source.split('::', 1)[1]))
    backbone = cfg.model.backbone.to_dict()
    backbone.pop('pretrained', None)
    backbone.update(init_cfg=None, out_indices=(0, 1, 2, 3))
    return backbone


def build_model(family: str, arch: Optional[str] = None, reference: bool = False) -> nn.Module:
    """Build and randomly initialise a model of :data:`MODELS` (seed 0).

    Args:
        family (str): Key of :data:`MODELS`.
        arch (str, optional): Arch of an mmrest family. Defaults to None.
        reference (bool): Build an mmrest model with ``attn_impl='reference'`` (for
            counting MACs). Defaults to False.

    Returns:
        nn.Module: The model.
    """
    spec = MODELS[family]
    torch.manual_seed(0)
    if spec.source.startswith('mmdet::'):
        import mmdet.models  # noqa: F401  (registers the backbones)
        from mmdet.registry import MODELS as MMDET_MODELS
        model = MMDET_MODELS.build(mmdet_backbone_cfg(spec.source))
    else:
        cls = getattr(importlib.import_module('mmrest.models'), spec.source.split('.')[1])
        kwargs = dict(spec.kwargs, attn_impl='reference') if reference else spec.kwargs
        model = cls(arch=arch, **kwargs)
    model.init_weights()
    return model


# ------------------------------------------------------------------- worker jobs
def make_step(model: nn.Module, x: torch.Tensor, train: bool,
              compile: bool = False) -> Callable[[], None]:
    """The timed step: inference under ``torch.inference_mode`` or a training step.

    A training step is the forward in train mode, the loss ``sum(out.mean())`` over the
    outputs and the backward pass (no optimizer step).

    Args:
        model (nn.Module): The backbone; put in train or eval mode here.
        x (Tensor): The input batch.
        train (bool): Whether to make a training step.
        compile (bool): Run ``torch.compile(model)`` instead of the model (the first
            call compiles). Defaults to False.

    Returns:
        Callable[[], None]: The step.
    """
    net = torch.compile(model) if compile else model
    if train:
        model.train()  # not chained: mmdet's SwinTransformer.train returns None

        def step() -> None:
            model.zero_grad(set_to_none=True)
            sum(out.mean() for out in net(x)).backward()
    else:
        model.eval()

        def step() -> None:
            with torch.inference_mode():
                net(x)

    return step


def measure(job: Dict[str, Any]) -> Dict[str, Any]:
    """Measure one (model, case) in this process (run it in a fresh one).

    Args:
        job (dict): ``imports`` (modules imported first), ``family``, ``arch``, ``train``,
            ``batch``, ``shape``, ``threads``, ``device``, ``compile`` and
            ``min_run_time`` (s, of ``blocked_autorange``).

    Returns:
        dict: ``time_s`` (median s per batch), ``runs`` (timed runs), ``compile_s`` (the
        first, compiling call; None in eager), ``import_rss`` (after the imports, before
        the model is built), ``baseline_rss`` (before the runs), ``peak_rss`` (bytes) and
        ``cuda_max_allocated`` (bytes; None on the CPU).
    """
    threads, device = job['threads'], torch.device(job['device'])
    torch.set_num_threads(threads)
    # the processes of a run import the same libraries, so that their RSS compare
    for module in job['imports']:
        importlib.import_module(module)
    import_rss = rss_bytes()
    model = build_model(job['family'], job['arch']).to(device)
    x = torch.randn(job['batch'], 3, *job['shape'], device=device)
    step = make_step(model, x, job['train'], compile=job['compile'])
    baseline_rss = rss_bytes()
    cuda = device.type == 'cuda'
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    compile_s = None
    if job['compile']:
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        compile_s = time.perf_counter() - start
    m = Timer('step()', globals=dict(step=step), num_threads=threads).blocked_autorange(
        min_run_time=job['min_run_time'])
    return dict(time_s=m.median, runs=len(m.times) * m.number_per_run, compile_s=compile_s,
                import_rss=import_rss, baseline_rss=baseline_rss, peak_rss=peak_rss_bytes(),
                cuda_max_allocated=torch.cuda.max_memory_allocated(device) if cuda else None)


def count_macs(job: Dict[str, Any]) -> Dict[str, Any]:
    """MACs per image of ``job['items']`` (``family``, ``arch``, ``shape``), batch 1.

    Counted by ``tools/analysis/get_flops.py`` on mmrest models built with
    ``attn_impl='reference'``. Returns ``{'items': [item + macs or error]}``.
    """
    from get_flops import count_complexity
    torch.set_num_threads(job['threads'])
    items = []
    for item in job['items']:
        try:
            model = build_model(item['family'], item['arch'], reference=True)
            model.eval()
            with torch.no_grad():
                c = count_complexity(model, (torch.zeros(1, 3, *item['shape']), ))
            items.append(dict(item, macs=int(c.flops)))
        except Exception as err:  # noqa: BLE001  (reported, the benchmark goes on)
            items.append(dict(item, error=f'{type(err).__name__}: {err}'))
    return dict(items=items)


JOBS = {'measure': measure, 'macs': count_macs}


def matmul_gflops(size: int, threads: int, device: str, min_run_time: float) -> float:
    """GFLOP/s of a ``size``^3 fp32 matrix product (2 size^3 FLOPs), median of its runs."""
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=gen).to(device) for _ in range(2))
    out = torch.empty_like(a)
    m = Timer('torch.matmul(a, b, out=out)', globals=dict(torch=torch, a=a, b=b, out=out),
              num_threads=threads).blocked_autorange(min_run_time=min_run_time)
    return 2 * size**3 / m.median / 1e9


# ------------------------------------------------------------------- the run
def select_runs(args: argparse.Namespace) -> Dict[str, List[Run]]:
    """The rows of every selected case (see the module docstring for the defaults)."""
    runs = []
    for family in args.models:
        spec = MODELS[family]
        if not spec.archs:
            runs.append(Run(family))
        runs += [Run(family, a) for a in (args.archs or spec.archs) if a in spec.archs]
    by_case = {}
    for name in args.cases:
        if args.goal_models or (CASES[name].goal_models_only and not args.models_given):
            named = {k for g in GOALS if g.case == name for k in (g.model, g.other)}
            rows = [r for r in runs if r.key in named]
        else:
            rows = list(runs)
        if args.compile:
            rows = [v for r in rows for v in (r, Run(r.family, r.arch, compiled=True))]
        by_case[name] = rows
    return by_case


def case_setup(name: str, quick: bool) -> Tuple[int, Tuple[int, int]]:
    """(batch, (H, W)) of a case."""
    case = CASES[name]
    return (case.quick_batch, case.quick_shape) if quick else (case.batch, case.shape)


def summarise(samples: List[Dict[str, Any]], train: bool, batch: int,
              macs: Optional[int], matmul: Optional[float]) -> Dict[str, Any]:
    """One (model, case) entry from its rounds: median time, max memory, efficiency."""
    failed = [s['error'] for s in samples if 'error' in s]
    if failed:
        return dict(error=failed[0])
    time_s = statistics.median(s['time_s'] for s in samples)
    cuda = [s['cuda_max_allocated'] for s in samples if s['cuda_max_allocated'] is not None]
    entry = dict(time_s=time_s, times=[s['time_s'] for s in samples],
                 throughput=batch / time_s, runs=sum(s['runs'] for s in samples),
                 peak_rss=max(s['peak_rss'] for s in samples),
                 baseline_rss=statistics.median(s['baseline_rss'] for s in samples),
                 model_memory=max(s['peak_rss'] - s['import_rss'] for s in samples),
                 cuda_max_allocated=max(cuda) if cuda else None,
                 compile_s=samples[0]['compile_s'], macs_per_image=macs,
                 gflops=None, efficiency=None)
    if macs:
        entry['gflops'] = (2 * (TRAIN_FLOPS_FACTOR if train else 1) * macs * batch / time_s /
                           1e9)
        if matmul:
            entry['efficiency'] = entry['gflops'] / matmul
    return entry


def _memory(entry: Dict[str, Any]) -> float:
    return (entry['cuda_max_allocated'] if entry.get('cuda_max_allocated') is not None
            else entry['model_memory'])


def evaluate_goals(results: Dict[str, Dict[str, Dict[str, Any]]],
                   cases: Dict[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The goal ratios of :data:`GOALS` from one run's results.

    Args:
        results (dict): ``results[run_key][case]`` entries (:func:`summarise`).
        cases (dict): The report's cases (``title``, ``batch``, ``shape``), for the names.

    Returns:
        list[dict]: ``name``, ``case``, ``measured`` (None: not measured), ``comparison``
        and ``target`` (None: reported only) and ``met`` (bool; None if not measured or
        reported only).
    """
    goals = []
    for g in GOALS:
        a = results.get(g.model, {}).get(g.case, {})
        b = results.get(g.other, {}).get(g.case, {}) if g.other else {}
        value = None
        if g.metric == 'efficiency':
            value = a.get('efficiency')
        elif a.get('time_s') and b.get('time_s'):
            value = (b['time_s'] / a['time_s'] if g.metric == 'speedup' else
                     _memory(a) / _memory(b))
        default = CASES[g.case]
        c = cases.get(g.case, dict(title=default.title, batch=default.batch,
                                   shape=default.shape))
        what = GOAL_NAMES[g.metric].format(model=Run.from_key(g.model).label,
                                           other=g.other and Run.from_key(g.other).label)
        name = f'{c["title"]} {c["shape"][0]}x{c["shape"][1]} b{c["batch"]}: {what}'
        met = (None if value is None or g.comparison is None else
               COMPARE[g.comparison](value, g.target))
        goals.append(dict(name=name, case=g.case, measured=value, comparison=g.comparison,
                          target=g.target, met=met))
    return goals


def _macs_key(run: Run, shape: Sequence[int]) -> Tuple[str, Optional[str], Tuple[int, ...]]:
    """Models with the same MACs share this key (fused, reference and compiled ResT)."""
    return MODELS[run.family].source, run.arch, tuple(shape)


def run_benchmark(args: argparse.Namespace,
                  log: Callable[[str], None] = lambda s: None) -> Dict[str, Any]:
    """Run every selected (model, case) for ``args.rounds`` rounds.

    Args:
        args (argparse.Namespace): Options of :func:`parse_args`.
        log (Callable[[str], None]): Progress messages. Defaults to discarding them.

    Returns:
        dict: The report: ``machine`` (:func:`machine_info`), ``settings``, ``notes``,
        ``cases``, ``models`` (labels), ``rows`` (run keys per case), ``matmul``,
        ``results`` and ``goals``.
    """
    start = time.perf_counter()
    script = osp.abspath(__file__)
    min_run_time = QUICK_MIN_RUN_TIME if args.quick else MIN_RUN_TIME
    by_case = select_runs(args)
    cases = {}
    for name in by_case:
        batch, shape = case_setup(name, args.quick)
        cases[name] = dict(title=CASES[name].title, batch=batch, shape=list(shape))
    pairs = [(name, r) for name, rows in by_case.items() for r in rows]

    # MACs once per (model, shape), in a process of their own (tracing takes memory)
    items = {_macs_key(r, cases[n]['shape']): dict(family=r.family, arch=r.arch,
                                                   shape=cases[n]['shape'])
             for n, r in pairs}
    log(f'counting MACs of {len(items)} (model, input shape) pairs ...')
    counted = run_in_subprocess(script, dict(job='macs', items=list(items.values()),
                                             threads=args.threads), args.threads, args.timeout)
    notes = list(args.notes)
    if 'error' in counted:
        notes.append(f'MAC counting failed: {counted["error"]}')
    macs = {}
    for item in counted.get('items', []):
        key = _macs_key(Run(item['family'], item['arch']), item['shape'])
        macs[key] = item.get('macs')
        if 'error' in item:
            notes.append(f'MACs of {Run(item["family"], item["arch"]).label} at '
                         f'{item["shape"]}: {item["error"]}')

    imports = ['mmrest.models'] + (['mmdet.models'] if any(
        MODELS[r.family].source.startswith('mmdet::') for _, r in pairs) else [])
    samples: Dict[Tuple[str, str], List[Dict[str, Any]]] = {
        (name, r.key): [] for name, r in pairs}
    matmul_rates = []
    # Rounds: the shared host's speed drifted 10%+ within minutes, and sequential timing
    # turned that into the ratios (measured 2026-11-24 with the earlier version of this
    # tool). Each round measures every (model, case) once, in an order rotated by
    # len(pairs) / rounds per round, so that a drift hits the models of a case alike.
    for rnd in range(args.rounds):
        matmul_rates.append(matmul_gflops(args.matmul_size, args.threads, args.device,
                                          min_run_time))
        log(f'round {rnd + 1}/{args.rounds}: fp32 matmul {matmul_rates[-1]:.1f} GFLOP/s')
        shift = rnd * len(pairs) // args.rounds
        for name, r in pairs[shift:] + pairs[:shift]:
            done = samples[(name, r.key)]
            if any('error' in s for s in done):
                continue  # failed in an earlier round (e.g. out of memory): not again
            job = dict(job='measure', imports=imports, family=r.family, arch=r.arch,
                       train=CASES[name].train,
                       batch=cases[name]['batch'], shape=cases[name]['shape'],
                       threads=args.threads, device=args.device, compile=r.compiled,
                       min_run_time=min_run_time)
            t0 = time.perf_counter()
            s = run_in_subprocess(script, job, args.threads, args.timeout)
            done.append(s)
            log(f'  {name} {r.label}: ' + (f'FAILED {s["error"]}' if 'error' in s else
                f'{s["time_s"]:.3g} s, peak RSS {s["peak_rss"] / 2**30:.2f} GiB') +
                f' ({time.perf_counter() - t0:.0f} s with start-up)')

    matmul = statistics.median(matmul_rates)
    results: Dict[str, Dict[str, Any]] = {}
    for name, r in pairs:
        results.setdefault(r.key, {})[name] = summarise(
            samples[(name, r.key)], CASES[name].train, cases[name]['batch'],
            macs.get(_macs_key(r, cases[name]['shape'])), matmul)
    return dict(
        machine=machine_info(args.threads, args.device, args.command),
        settings=dict(quick=args.quick, rounds=args.rounds, min_run_time=min_run_time,
                      threads=args.threads, device=args.device, compile=args.compile),
        notes=notes, cases=cases, models={r.key: r.label for _, r in pairs},
        rows={name: [r.key for r in rows] for name, rows in by_case.items()},
        matmul=dict(size=args.matmul_size, gflops=matmul, rounds=matmul_rates),
        results=results, goals=evaluate_goals(results, cases),
        elapsed_s=time.perf_counter() - start)


# ------------------------------------------------------------------- output
def _gib(n: Optional[float]) -> str:
    return '' if n is None else f'{n / 2**30:.2f}'


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    align = ['---'] + ['---:'] * (len(header) - 1)
    return '\n'.join('| ' + ' | '.join(line) + ' |' for line in
                     [header, align] + [list(r) for r in rows])


def format_report(report: Dict[str, Any]) -> str:
    """Markdown: one results table per case, the goals table, then the run's facts."""
    out = []
    cuda = report['settings']['device'] != 'cpu'
    for name, keys in report['rows'].items():
        c = report['cases'][name]
        entries = [(report['models'][k], report['results'][k][name]) for k in keys]
        compiled = any(e.get('compile_s') is not None for _, e in entries)
        header = ['model', 's/batch', 'img/s', 'peak RSS (GiB)', 'model memory (GiB)'] + (
            ['peak CUDA alloc. (GiB)'] if cuda else []) + ['GFLOP/s', '% of matmul'] + (
            ['compile (s, round 1)'] if compiled else [])
        rows = []
        for label, e in entries:
            if 'error' in e:
                rows.append([label, 'failed'] + [''] * (len(header) - 2))
                continue
            row = [label, f'{e["time_s"]:.3f}', f'{e["throughput"]:.2f}', _gib(e['peak_rss']),
                   _gib(e['model_memory'])] + ([_gib(e['cuda_max_allocated'])] if cuda else [])
            row += ['' if e['gflops'] is None else f'{e["gflops"]:.1f}',
                    '' if e['efficiency'] is None else f'{100 * e["efficiency"]:.0f}%']
            if compiled:
                row.append('' if e['compile_s'] is None else f'{e["compile_s"]:.0f}')
            rows.append(row)
        out.append(f'{name}: {c["title"]} {c["shape"][0]}x{c["shape"][1]}, batch '
                   f'{c["batch"]}\n\n' + _table(header, rows))
    goal_rows = []
    for g in report['goals']:
        target = '(report)' if g['comparison'] is None else f'{g["comparison"]} {g["target"]:g}'
        if g['measured'] is None:
            goal_rows.append([g['name'], 'not measured', target, '-'])
        else:
            met = '-' if g['met'] is None else ('yes' if g['met'] else 'no')
            goal_rows.append([g['name'], f'{g["measured"]:.2f}', target, met])
    out.append(_table(['goal', 'measured', 'target', 'met'], goal_rows))
    m, info = report['matmul'], report['machine']
    out.append(f'fp32 matmul {m["size"]}^3: {m["gflops"]:.1f} GFLOP/s (median of '
               + ', '.join(f'{g:.1f}' for g in m['rounds']) + '). GFLOP/s = 2 x MACs / time '
               '(training step: 3 x the forward MACs). Times: median over '
               f'{report["settings"]["rounds"]} round(s), each (model, case) in a fresh '
               'process per round; peak RSS: the largest of its processes\' peaks; model '
               'memory: the largest of their peaks above the RSS after the imports (the '
               'memory goals compare it).')
    out.append(f'Machine: {info["cpu"]}, {info["logical_cpus"]} logical CPUs, load average '
               f'{info["load_average"][0]:.1f} at the start, {info["threads"]} threads, '
               f'{info["device"]}, torch {info["torch"]}, {info["date"]}. Command: '
               f'`{info["command"]}`.')
    failed = [f'{report["models"][k]} {n}: {e["error"]}'
              for k, per in report['results'].items() for n, e in per.items() if 'error' in e]
    out += [f'Note: {n}' for n in report['notes']] + [f'Failed: {f}' for f in failed]
    return '\n\n'.join(out)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse and check the command line; fills in the defaults of ``--quick``.

    Args:
        argv (list[str], optional): Arguments; ``sys.argv[1:]`` if None. Defaults to None.

    Returns:
        argparse.Namespace: The options, with ``models_given``, ``notes`` (e.g. ResTV2 not
        in this checkout), ``matmul_size`` and ``command`` added.
    """
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n')[0], formatter_class=argparse.RawTextHelpFormatter,
        epilog='cases: ' + ', '.join(f'{n} ({c.title}, {c.shape[0]}x{c.shape[1]}, batch '
                                     f'{c.batch})' for n, c in CASES.items()))
    all_archs = sorted({a for s in MODELS.values() for a in s.archs})
    parser.add_argument('--models', nargs='+', choices=list(MODELS), default=None,
                        help='model families (default: all; --quick: rest rest-ref)')
    parser.add_argument('--archs', nargs='+', choices=all_archs, default=None,
                        help='archs of the ResT and ResTV2 families (default: all; '
                        '--quick: small)')
    parser.add_argument('--cases', nargs='+', choices=list(CASES), default=list(CASES),
                        help='cases (default: all)')
    parser.add_argument('--threads', type=int, default=None,
                        help='intra-op threads of every measurement (default: 2; --quick: 1)')
    parser.add_argument('--rounds', type=int, default=None,
                        help='rounds; the median over rounds is reported (default: 3; '
                        '--quick: 1)')
    parser.add_argument('--device', choices=('cpu', 'cuda'), default='cpu',
                        help='device (default: cpu)')
    parser.add_argument('--goal-models', action='store_true',
                        help='measure only the models that the goals of each case name')
    parser.add_argument('--compile', action='store_true',
                        help='add a torch.compile row for every model; no goals use them '
                        '(compiling takes 1.5-4 minutes per model and case on 2 CPU cores)')
    parser.add_argument('--timeout', type=float, default=3600.,
                        help='seconds before a measurement process is killed (default: '
                        '3600)')
    parser.add_argument('--quick', action='store_true',
                        help='smoke run: tiny inputs, one round, one thread, a 256^3 matmul')
    parser.add_argument('--out', default=None, help='write the JSON report to this path')
    args = parser.parse_args(argv)

    for name in ('threads', 'rounds'):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f'--{name} must be >= 1, got {value}')
    if args.timeout <= 0:
        parser.error(f'--timeout must be > 0, got {args.timeout:g}')
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: torch.cuda.is_available() is False on this machine')
    args.models_given = args.models is not None
    args.notes = []
    if args.models is None:
        args.models = ['rest', 'rest-ref'] if args.quick else list(MODELS)
    if not has_restv2():
        wanted = [f for f in args.models if MODELS[f].source == 'mmrest.ResTV2']
        if wanted and args.models_given:
            parser.error(f'--models {" ".join(wanted)}: mmrest.models has no ResTV2 in '
                         'this checkout')
        if wanted:
            args.notes.append('ResTV2 not run: mmrest.models has no ResTV2 in this checkout.')
        args.models = [f for f in args.models if f not in wanted]
    families = [f for f in args.models if MODELS[f].archs]
    for arch in args.archs or ():
        if not any(arch in MODELS[f].archs for f in families):
            parser.error(f'--archs {arch}: none of the selected models has it ('
                         + '; '.join(f'{f}: {" ".join(MODELS[f].archs)}' for f in families)
                         + ')')
    for family in families if args.models_given and args.archs else ():
        if not set(args.archs) & set(MODELS[family].archs):
            parser.error(f'--archs {" ".join(args.archs)} has no arch of {family} '
                         f'({" ".join(MODELS[family].archs)})')
    if args.archs is None and args.quick:
        args.archs = ['small']
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.threads is None:
        args.threads = 1 if args.quick else 2
    args.matmul_size = QUICK_MATMUL_SIZE if args.quick else MATMUL_SIZE
    args.command = ' '.join(['tools/analysis/benchmark.py'] +
                            list(sys.argv[1:] if argv is None else argv))
    return args


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Command line entry point: run, print the tables, write the JSON; the report."""
    args = parse_args(argv)
    report = run_benchmark(args, lambda s: print(s, file=sys.stderr, flush=True))
    print(format_report(report))
    if args.out:
        os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
        with open(args.out, 'w') as f:
            json.dump(report, f, indent=2)
        print(f'wrote {args.out}', file=sys.stderr)
    return report


if __name__ == '__main__':
    if sys.argv[1:2] == [WORKER_FLAG]:
        sys.exit(worker_main(JOBS, sys.argv[2:]))
    main()
