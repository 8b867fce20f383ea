"""Speed and memory of ResT and ResT V2 on the CPU beside their reference formulation and
mmdet's peers, and the A/B of the CPU shortcuts (GPUs: ``tools/analysis/gpu_check.py``).

Peers (the default): every (model, case) of :data:`MODELS` x :data:`CASES` in a fresh
process with fixed threads, random weights, fp32, eager, timed by ``Timer.blocked_autorange``
in ``--rounds`` rounds of rotated order, the median reported, with the memory the model and
its runs add to the process's peak RSS, and ratios to the reference and to Swin-T.

A/B (``--ab``): each model with every switch of :data:`SWITCHES` off ("plain"), each one on
and all on, alternating for ``--rounds`` rounds: median wall and CPU times and the peak
memory of one step's tensors, as ratios to plain.

Every run is appended as one JSON line to ``docs/results/benchmark-cpu.jsonl``
(``--results``; not with ``--quick``).

Examples::

    python tools/analysis/benchmark.py --models rest rest-ref swin-t --cases infer_800
    python tools/analysis/benchmark.py --ab
"""
import argparse
import contextlib
import datetime
import functools
import importlib
import importlib.util
import itertools
import json
import os
import os.path as osp
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.benchmark import Timer

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
WORKER_FLAG = '--worker'
#: The results file of this device.
RESULTS = osp.join(ROOT, 'docs', 'results', 'benchmark-cpu.jsonl')


@dataclass(frozen=True)
class ModelSpec:
    """``label`` (``{arch}`` replaced); ``source``, ``'mmrest.<Class>'`` (built as
    ``Class(arch=arch, **kwargs)``) or ``'mmdet::<config>'`` (its ``model.backbone``)."""
    label: str
    source: str
    kwargs: Dict[str, Any] = field(default_factory=dict)
    archs: Tuple[str, ...] = ()


MODELS: Dict[str, ModelSpec] = {
    **{family + suffix: ModelSpec(f'{cls}-{{arch}}{note}', f'mmrest.{cls}', dict(attn_impl=impl),
                                  archs)
       for family, cls, archs in (('rest', 'ResT', ('lite', 'small', 'base', 'large')),
                                  ('restv2', 'ResTV2', ('tiny', 'small', 'base', 'large')))
       for suffix, note, impl in (('', '', 'lean'), ('-ref', ' reference', 'reference'))},
    'pvt-t': ModelSpec('mmdet PVT-tiny', 'mmdet::pvt/retinanet_pvt-t_fpn_1x_coco.py'),
    'pvtv2-b1': ModelSpec('mmdet PVTv2-b1', 'mmdet::pvt/retinanet_pvtv2-b1_fpn_1x_coco.py'),
    'swin-t': ModelSpec('mmdet Swin-T', 'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py'),
}
#: The arch of each family that runs unless ``--archs`` is given.
HEADLINE = {'rest': 'small', 'rest-ref': 'small', 'restv2': 'tiny', 'restv2-ref': 'tiny'}
#: The rows each ratio column divides by, when they are in the run.
REFERENCES = {'rest': 'rest-ref', 'restv2': 'restv2-ref'}
PEER = 'swin-t'


@dataclass(frozen=True)
class Case:
    """``title``, ``train`` (a training step), ``batch``, ``shape`` (H, W), and those of
    ``--quick``."""
    title: str
    train: bool
    batch: int
    shape: Tuple[int, int]
    quick_batch: int
    quick_shape: Tuple[int, int]

    def setup(self, quick: bool) -> Tuple[int, Tuple[int, int]]:
        """(batch, (H, W)), those of ``--quick`` if ``quick``."""
        return (self.quick_batch, self.quick_shape) if quick else (self.batch, self.shape)


CASES: Dict[str, Case] = {
    'infer_224': Case('inference', False, 16, (224, 224), 2, (64, 64)),
    'infer_800': Case('inference', False, 1, (800, 1344), 1, (96, 160)),
    'train_800': Case('training step', True, 2, (800, 1344), 2, (96, 160)),
    'train_224': Case('training step', True, 32, (224, 224), 2, (64, 64)),
}
MIN_RUN_TIME, QUICK_MIN_RUN_TIME = 1.0, 0.05


@dataclass(frozen=True)
class Switch:
    """A CPU shortcut that ``--ab`` turns off and on: ``apply(on)`` is a context manager
    under which models built and run follow ``on``; ``families`` are the model families
    whose code has it."""
    description: str
    apply: Callable[[bool], contextlib.AbstractContextManager]
    families: Tuple[str, ...] = ('rest', 'restv2')


@contextlib.contextmanager
def _patched(obj: Any, name: str, value: Any, on: bool) -> Iterator[None]:
    """``obj.name`` as it is where ``on``, else ``value``, for the block."""
    original = getattr(obj, name)
    setattr(obj, name, original if on else value)
    try:
        yield
    finally:
        setattr(obj, name, original)


#: The CPU shortcuts that stayed (docs/benchmarks.md, "CPU shortcuts: kept and removed").
SWITCHES: Dict[str, Switch] = {
    'norm_mlp': Switch('LayerNorm + MLP over blocks of tokens (norm_mlp.py)', lambda on: _patched(
        importlib.import_module('mmrest.models.layers.block'), 'blocked_norm_mlp',
        lambda *a: False, on)),
    'channels_last': Switch('channels-last maps (stem, patch embeddings, kv reduction)',
                            lambda on: _patched(importlib.import_module(
                                'mmrest.models.layers.dispatch'), 'cpu_channels_last',
                                lambda x: False, on)),
}


# ------------------------------------------------------------------- processes
def worker_env(threads: int) -> Dict[str, str]:
    """A worker's environment: ``threads`` OpenMP/MKL threads, this repository first on
    ``PYTHONPATH`` (also that of ``tools/deployment/bench_onnx.py``)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env['PYTHONPATH'] = os.pathsep.join(p for p in (ROOT, env.get('PYTHONPATH')) if p)
    return env


def run_in_subprocess(script: str, job: Dict[str, Any], threads: int,
                      timeout: Optional[float] = None) -> Dict[str, Any]:
    """``measure(job)`` in a fresh process of ``script`` (its last line of output), or
    ``{'error': message}`` where it raised, was killed or timed out."""
    # its own session, so that a timeout also ends the processes it started
    proc = subprocess.Popen([sys.executable, osp.abspath(script), WORKER_FLAG, json.dumps(job)],
                            env=worker_env(threads), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return dict(error=f'timed out after {timeout:g} s')
    if proc.returncode == 0 and out.strip():
        return json.loads(out.strip().splitlines()[-1])
    if proc.returncode < 0:
        hint = ' (out of memory?)' if proc.returncode == -9 else ''
        return dict(error=f'killed by signal {-proc.returncode}{hint}')
    return dict(error=f'exit status {proc.returncode}: ' +
                ' | '.join(err.strip().splitlines()[-3:]))


def machine_info(threads: int, device: str, command: str) -> Dict[str, Any]:
    """CPU model, logical CPUs, memory, load average (1, 5, 15 min, at the start: a busy
    host slows every parallel region), threads, device, versions, date, command."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open('/proc/cpuinfo') as f:
        cpu = next((ln.split(':', 1)[1].strip() for ln in f if ln.startswith('model name')), cpu)
    return dict(cpu=cpu, logical_cpus=os.cpu_count(),
                memory_bytes=os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES'),
                load_average=list(os.getloadavg()), threads=threads, device=device,
                torch=torch.__version__, python=platform.python_version(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
                command=command)


# ------------------------------------------------------------------------ models
def mmdet_backbone_cfg(source: str) -> Dict[str, Any]:
    """``model.backbone`` of an mmdet config (``'mmdet::<path>'``), four stages, no weights."""
    from mmengine.hub import get_config
    if importlib.util.find_spec('mmdet') is None:
        raise ImportError(f'mmdet is not installed; it is needed for {source}')
    backbone = get_config(source).model.backbone.to_dict()
    backbone.pop('pretrained', None)
    backbone.update(init_cfg=None, out_indices=(0, 1, 2, 3))
    return backbone


def build_model(family: str, arch: Optional[str] = None) -> nn.Module:
    """Build and randomly initialise (seed 0) a model of :data:`MODELS`."""
    spec = MODELS[family]
    torch.manual_seed(0)
    if spec.source.startswith('mmdet::'):
        import mmdet.models  # noqa: F401  (registers the backbones)
        from mmdet.registry import MODELS as MMDET_MODELS
        model = MMDET_MODELS.build(mmdet_backbone_cfg(spec.source))
    else:
        cls = getattr(importlib.import_module('mmrest.models'), spec.source.split('.')[1])
        model = cls(arch=arch, **spec.kwargs)
    model.init_weights()
    return model


def label(key: str) -> str:
    """E.g. ``'ResT-small reference'`` of ``'rest-ref:small'``."""
    family, _, arch = key.partition(':')
    return MODELS[family].label.format(arch=arch)


def make_step(model: nn.Module, x: torch.Tensor, train: bool) -> Callable[[], None]:
    """The measured step: inference under ``torch.inference_mode``, or a training step
    (train mode, ``sum(out.mean())``, backward, no optimizer step)."""
    if train:
        model.train()  # not chained: mmdet's SwinTransformer.train returns None

        def step() -> None:
            model.zero_grad(set_to_none=True)
            sum(out.mean() for out in model(x)).backward()
    else:
        model.eval()

        def step() -> None:
            with torch.inference_mode():
                model(x)

    return step


def step_memory(step: Callable[[], None]) -> int:
    """Peak bytes that the CPU tensors allocated during one ``step()`` take at once: the
    peak of the running sum of the profiler's allocation events."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == '[memory]' and e.device_type() == e.device_type().CPU)
    return max(itertools.accumulate((nbytes for _, nbytes in events), initial=0))


def measure(job: Dict[str, Any]) -> Dict[str, Any]:
    """Measure one (model, case) in this (fresh) process: ``time_s`` (median s per batch),
    ``runs``, ``import_rss`` and ``peak_rss`` (bytes)."""
    threads = job['threads']
    torch.set_num_threads(threads)
    for module in job['imports']:  # every process imports the same, so that RSS compare
        importlib.import_module(module)
    with open('/proc/self/statm') as f:  # the resident set size now
        import_rss = int(f.read().split()[1]) * resource.getpagesize()
    step = make_step(build_model(job['family'], job['arch']),
                     torch.randn(job['batch'], 3, *job['shape']), job['train'])
    m = Timer('step()', globals=dict(step=step),
              num_threads=threads).blocked_autorange(min_run_time=job['min_run_time'])
    return dict(time_s=m.median, runs=len(m.times) * m.number_per_run, import_rss=import_rss,
                peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def summarise(samples: List[Dict[str, Any]], batch: int) -> Dict[str, Any]:
    """One (model, case) entry from its rounds: median time, largest memory."""
    failed = [s['error'] for s in samples if 'error' in s]
    if failed:
        return dict(error=failed[0])
    time_s = statistics.median(s['time_s'] for s in samples)
    return dict(time_s=time_s, times=[s['time_s'] for s in samples], throughput=batch / time_s,
                runs=sum(s['runs'] for s in samples),
                peak_rss=max(s['peak_rss'] for s in samples),
                memory=max(s['peak_rss'] - s['import_rss'] for s in samples))


def ratios(results: Dict[str, Dict[str, Any]], key: str) -> Dict[str, Optional[float]]:
    """Speed-up and memory ratio of ``key`` over its reference and over Swin-T, where both
    rows of the case were measured."""
    family, _, arch = key.partition(':')
    out: Dict[str, Optional[float]] = {}
    for name, other in (('reference', REFERENCES.get(family) and f'{REFERENCES[family]}:{arch}'),
                        ('swin-t', PEER if family != PEER else None)):
        a, b = results.get(key, {}), results.get(other, {}) if other else {}
        ok = 'time_s' in a and 'time_s' in b
        out[f'speedup_vs_{name}'] = b['time_s'] / a['time_s'] if ok else None
        out[f'memory_vs_{name}'] = a['memory'] / b['memory'] if ok else None
    return out


# ----------------------------------------------------------------------- runs
def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse and check the command line; fills in the defaults of ``--quick``."""
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n')[0], formatter_class=argparse.RawTextHelpFormatter,
        epilog='cases: ' + ', '.join(f'{n} ({c.title}, {c.shape[0]}x{c.shape[1]}, batch '
                                     f'{c.batch})' for n, c in CASES.items()))
    add = parser.add_argument
    add('--models', nargs='+', choices=list(MODELS),
        help='model families (default: all; --ab: rest restv2; --quick: rest rest-ref)')
    add('--archs', nargs='+', help='archs of ResT and ResTV2 (default: small, tiny)')
    add('--cases', nargs='+', choices=list(CASES),
        help='cases (default: all; --ab: infer_224 infer_800 train_800)')
    add('--ab', action='store_true', help='A/B of the CPU shortcuts (SWITCHES)')
    add('--threads', type=int, help='intra-op threads (default: 2; --quick: 1)')
    add('--rounds', type=int, help='rounds (default: 3; --ab: 5; --quick: 1)')
    add('--timeout', type=float, default=3600., help='seconds per process (default: 3600)')
    add('--quick', action='store_true', help='smoke run: tiny inputs, one round, one thread')
    add('--out', help='also write the run as JSON here')
    add('--results', help='results file to append to (default: docs/results/'
        'benchmark-cpu.jsonl; none with --quick)')
    args = parser.parse_args(argv)
    for name, value in (('threads', args.threads), ('rounds', args.rounds)):
        if value is not None and value < 1:
            parser.error(f'--{name} must be >= 1, got {value}')
    if args.timeout <= 0:
        parser.error(f'--timeout must be > 0, got {args.timeout:g}')
    if args.models is None:
        args.models = (['rest', 'restv2'] if args.ab else
                       ['rest', 'rest-ref'] if args.quick else list(MODELS))
    families = [f for f in args.models if MODELS[f].archs]
    for arch in args.archs or ():
        if not any(arch in MODELS[f].archs for f in families):
            parser.error(f'--archs {arch}: none of the selected models has it (' + '; '.join(
                f'{f}: {" ".join(MODELS[f].archs)}' for f in families) + ')')
    if args.cases is None:
        args.cases = ['infer_224', 'infer_800', 'train_800'] if args.ab else list(CASES)
    args.rounds = args.rounds or (1 if args.quick else 5 if args.ab else 3)
    args.threads = args.threads or (1 if args.quick else 2)
    args.command = ' '.join(['tools/analysis/benchmark.py'] +
                            list(sys.argv[1:] if argv is None else argv))
    return args


def model_keys(args: argparse.Namespace) -> List[str]:
    """The rows: e.g. ``'rest:small'``, ``'swin-t'``."""
    keys = []
    for family in args.models:
        archs = MODELS[family].archs
        keys += [family] if not archs else [f'{family}:{a}' for a in (
            args.archs or [HEADLINE[family]]) if a in archs]
    return keys


def run_peers(args: argparse.Namespace, log: Callable[[str], None]) -> Dict[str, Any]:
    """Every (model, case) for ``args.rounds`` rounds, each in a fresh process."""
    min_run_time = QUICK_MIN_RUN_TIME if args.quick else MIN_RUN_TIME
    keys = model_keys(args)
    pairs = [(c, k) for c in args.cases for k in keys]
    imports = ['mmrest.models'] + (['mmdet.models'] if any(
        MODELS[k.partition(':')[0]].source.startswith('mmdet::') for k in keys) else [])
    samples: Dict[Tuple[str, str], List[Dict[str, Any]]] = {p: [] for p in pairs}
    for rnd in range(args.rounds):
        shift = rnd * len(pairs) // args.rounds
        for case, key in pairs[shift:] + pairs[:shift]:
            if any('error' in s for s in samples[(case, key)]):
                continue  # failed before (e.g. out of memory): not again
            family, _, arch = key.partition(':')
            batch, shape = CASES[case].setup(args.quick)
            s = run_in_subprocess(__file__, dict(
                job='measure', imports=imports, family=family, arch=arch or None,
                train=CASES[case].train, batch=batch, shape=list(shape),
                threads=args.threads, min_run_time=min_run_time), args.threads, args.timeout)
            samples[(case, key)].append(s)
            log(f'round {rnd + 1} {case} {label(key)}: ' + (
                f'FAILED {s["error"]}' if 'error' in s else f'{s["time_s"]:.3g} s'))
    results: Dict[str, Dict[str, Any]] = {}
    for case in args.cases:
        batch, shape = CASES[case].setup(args.quick)
        per = {k: summarise(samples[(case, k)], batch) for k in keys}
        for k in keys:
            if 'error' not in per[k]:
                per[k].update(ratios(per, k))
        results[case] = dict(batch=batch, shape=list(shape), rows=per)
    return dict(mode='peers', results=results)


def run_ab(args: argparse.Namespace, log: Callable[[str], None],
           switches: Optional[Dict[str, Switch]] = None) -> Dict[str, Any]:
    """The A/B of :data:`SWITCHES` (or ``switches``), in this process (see the module
    docstring)."""
    switches = SWITCHES if switches is None else switches
    torch.set_num_threads(args.threads)
    results: Dict[str, Any] = {}
    for case in args.cases:
        batch, shape = CASES[case].setup(args.quick)
        for key in model_keys(args):
            family, _, arch = key.partition(':')
            mine = [n for n, s in switches.items() if family in s.families]
            if not mine:
                continue
            variants = {'plain': set(), **{f'+{n}': {n} for n in mine}, 'all': set(mine)}

            @contextlib.contextmanager
            def variant(on: set) -> Iterator[None]:
                with contextlib.ExitStack() as stack:
                    for n in mine:
                        stack.enter_context(switches[n].apply(n in on))
                    yield

            x = torch.randn(batch, 3, *shape)
            steps, memory = {}, {}
            for name, on in variants.items():
                with variant(on):  # models follow the switches they are built under
                    steps[name] = make_step(build_model(family, arch or None), x,
                                            CASES[case].train)
                    steps[name]()  # warm-up
                    memory[name] = step_memory(steps[name])
            names = list(variants)
            times: Dict[str, List[Tuple[float, float]]] = {name: [] for name in names}
            for rnd in range(args.rounds):
                shift = rnd % len(names)
                for name in names[shift:] + names[:shift]:
                    with variant(variants[name]):
                        wall, cpu = time.perf_counter(), time.process_time()
                        steps[name]()
                        times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
            plain = [statistics.median(t[i] for t in times['plain']) for i in (0, 1)]
            rows = {}
            for name in names:
                t, cpu = (statistics.median(x[i] for x in times[name]) for i in (0, 1))
                rows[name] = dict(time_s=t, times=[x[0] for x in times[name]],
                                  speedup=plain[0] / t, cpu_s=cpu, cpu_speedup=plain[1] / cpu,
                                  memory=memory[name],
                                  memory_ratio=memory[name] / max(1, memory['plain']))
                log(f'{case} {label(key)} {name}: {t:.3g} s ({plain[0] / t:.3f}x), CPU '
                    f'{cpu:.3g} s ({plain[1] / cpu:.3f}x), {memory[name] / 2**20:.0f} MiB')
            del steps
            results.setdefault(case, dict(batch=batch, shape=list(shape), rows={}))
            results[case]['rows'][key] = rows
    return dict(mode='ab', switches={n: s.description for n, s in switches.items()},
                results=results)


# ------------------------------------------------------------------- output
def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    align = ['---'] + ['---:'] * (len(header) - 1)
    return '\n'.join('| ' + ' | '.join(line) + ' |'
                     for line in [list(header), align] + [list(r) for r in rows])


def _f(value: Optional[float], spec: str) -> str:
    return '' if value is None else format(value, spec)


def format_report(report: Dict[str, Any]) -> str:
    """Markdown: a table per case, then the machine and command."""
    out = []
    for case, res in report['results'].items():
        c = CASES[case]
        title = f'{case}: {c.title} {res["shape"][0]}x{res["shape"][1]}, batch {res["batch"]}'
        if report['mode'] == 'ab':
            rows = [[label(k), name] + [f'{v:.3f}' for v in (e['time_s'], e['speedup'],
                    e['cpu_speedup'], e['memory'] / 2**30, e['memory_ratio'])]
                    for k, per in res['rows'].items() for name, e in per.items()]
            out.append(title + '\n\n' + _table(
                ['model', 'variant', 's/step', 'speed-up', 'CPU-time speed-up',
                 'step memory (GiB)', 'memory / plain'], rows))
            continue
        rows = [[label(k), 'failed: ' + e['error']] + [''] * 6 if 'error' in e else
                [label(k), f'{e["time_s"]:.3f}', f'{e["throughput"]:.2f}',
                 f'{e["memory"] / 2**30:.2f}'] + [_f(e[f'{q}_vs_{other}'], '.2f') for other in
                                                  ('reference', 'swin-t')
                                                  for q in ('speedup', 'memory')]
                for k, e in res['rows'].items()]
        out.append(title + '\n\n' + _table(
            ['model', 's/batch', 'img/s', 'model memory (GiB)', 'x reference',
             'memory / reference', 'x Swin-T', 'memory / Swin-T'], rows))
    m = report['machine']
    out.append(f'Machine: {m["cpu"]}, {m["logical_cpus"]} logical CPUs, load average '
               f'{m["load_average"][0]:.1f} at the start, {m["threads"]} threads, {m["device"]}, '
               f'torch {m["torch"]}, {m["date"]}. Command: `{m["command"]}`.')
    return '\n\n'.join(out)


def main(argv: Optional[List[str]] = None,
         switches: Optional[Dict[str, Switch]] = None) -> Dict[str, Any]:
    """Run, print the tables, append the run to the results file; returns the run."""
    args = parse_args(argv)
    log = functools.partial(print, file=sys.stderr, flush=True)
    machine = machine_info(args.threads, 'cpu', args.command)
    start = time.perf_counter()
    report = run_ab(args, log, switches) if args.ab else run_peers(args, log)
    report = dict(machine=machine, settings=dict(quick=args.quick, rounds=args.rounds),
                  elapsed_s=time.perf_counter() - start, **report)
    print(format_report(report))
    paths = [args.out] if args.out else []
    if args.results or not args.quick:
        paths.append(args.results or RESULTS)
    for i, path in enumerate(paths):
        os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
        with open(path, 'w' if i == 0 and args.out else 'a') as f:
            f.write(json.dumps(report, indent=2 if i == 0 and args.out else None) + '\n')
        log(f'wrote {path}')
    return report


if __name__ == '__main__':
    if sys.argv[1:2] == [WORKER_FLAG]:
        print(json.dumps(measure(json.loads(sys.argv[2]))))
    else:
        main()
