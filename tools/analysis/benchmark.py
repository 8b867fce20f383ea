"""Speed and memory of ResT and ResT V2 on the CPU beside their reference attention, mmdet's
peers and ONNX Runtime, and the A/B of the CPU shortcuts (GPUs: gpu_check.py).

Peers (the default): every (model, case) in a fresh process with fixed threads, random
weights, fp32, eager, ``Timer.blocked_autorange`` in ``--rounds`` rounds of rotated order;
the median time, the memory the model adds to the process's peak RSS, and ratios to the
reference (``-ref`` rows; for ``-onnx`` rows, eager PyTorch) and to Swin-T. ``-onnx`` rows
run one export of the same weights on ONNX Runtime's CPU provider (inference cases only).
A/B (``--ab``): the same for each model with every CPU shortcut of SWITCHES off ("plain"),
each one on and all on ("all", the code as it is), the ratios taken to plain.
Every run is appended to docs/results/benchmark-cpu.jsonl (``--results``; not ``--quick``).

    python tools/analysis/benchmark.py --models rest rest-ref swin-t --cases infer_800
    python tools/analysis/benchmark.py --models rest rest-onnx --cases infer_224 infer_800
    python tools/analysis/benchmark.py --ab
"""
import argparse
import contextlib
import datetime
import importlib
import json
import os
import os.path as osp
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import nn
from torch.utils.benchmark import Timer

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
RESULTS = osp.join(ROOT, 'docs', 'results', 'benchmark-cpu.jsonl')
sys.path.append(ROOT)  # mmrest from a plain clone, where it is not installed


class ModelSpec(NamedTuple):
    label: str  # '{arch}' is replaced
    source: str  # 'mmrest.<Class>' or 'mmdet::<config>' (its model.backbone)
    impl: str = ''  # attn_impl, or 'onnx': the lean model exported, on ONNX Runtime
    archs: Tuple[str, ...] = ()


MODELS: Dict[str, ModelSpec] = {
    **{family + suffix: ModelSpec(f'{cls}-{{arch}}{note}', f'mmrest.{cls}', impl, archs)
       for family, cls, archs in (('rest', 'ResT', ('lite', 'small', 'base', 'large')),
                                  ('restv2', 'ResTV2', ('tiny', 'small', 'base', 'large')))
       for suffix, note, impl in (('', '', 'lean'), ('-ref', ' reference', 'reference'),
                                  ('-onnx', ' ONNX Runtime', 'onnx'))},
    'pvt-t': ModelSpec('mmdet PVT-tiny', 'mmdet::pvt/retinanet_pvt-t_fpn_1x_coco.py'),
    'pvtv2-b1': ModelSpec('mmdet PVTv2-b1', 'mmdet::pvt/retinanet_pvtv2-b1_fpn_1x_coco.py'),
    'swin-t': ModelSpec('mmdet Swin-T', 'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py'),
}
DEFAULT_MODELS = ['rest', 'rest-ref', 'restv2', 'restv2-ref', 'pvt-t', 'pvtv2-b1', 'swin-t']
PEER = 'swin-t'


class Case(NamedTuple):
    title: str
    train: bool
    batch: int
    shape: Tuple[int, int]
    quick_batch: int
    quick_shape: Tuple[int, int]


CASES: Dict[str, Case] = {
    'infer_224': Case('inference', False, 16, (224, 224), 2, (64, 64)),
    'infer_800': Case('inference', False, 1, (800, 1344), 1, (96, 160)),
    'train_800': Case('training step', True, 2, (800, 1344), 2, (96, 160)),
    'train_224': Case('training step', True, 32, (224, 224), 2, (64, 64)),
}


def setup(case: str, quick: bool) -> Tuple[int, Tuple[int, int]]:
    c = CASES[case]
    return (c.quick_batch, c.quick_shape) if quick else (c.batch, c.shape)


#: The CPU shortcuts that stayed (docs/benchmarks.md, "CPU shortcuts: kept and removed"):
#: name -> (module of mmrest.models.layers, its function, the replacement that turns it off).
SWITCHES = {'norm_mlp': ('block', 'blocked_norm_mlp', lambda *a: False),
            'channels_last': ('dispatch', 'cpu_channels_last', lambda x: False)}


def parse_key(key: str) -> Tuple[str, str, str]:
    """``'rest:small@+norm_mlp'`` -> ``('rest', 'small', '+norm_mlp')``."""
    key, _, variant = key.partition('@')
    family, _, arch = key.partition(':')
    return family, arch, variant


# ------------------------------------------------------------------- processes
def run_in_subprocess(script: str, job: Dict[str, Any], threads: int,
                      timeout: Optional[float] = None) -> Dict[str, Any]:
    """``measure(job)`` in a fresh process of ``script`` (its last line of output), or
    ``{'error': message}`` where it raised, was killed or timed out."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env['PYTHONPATH'] = os.pathsep.join(p for p in (ROOT, env.get('PYTHONPATH')) if p)
    proc = subprocess.Popen([sys.executable, osp.abspath(script), '--worker', json.dumps(job)],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # a timeout ends its children
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


def machine_info(threads: int, command: str) -> Dict[str, Any]:
    """CPU, logical CPUs, memory, load average at the start, threads, versions, date."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open('/proc/cpuinfo') as f:
        cpu = next((ln.split(':', 1)[1].strip() for ln in f if ln.startswith('model name')), cpu)
    return dict(cpu=cpu, logical_cpus=os.cpu_count(),
                memory_bytes=os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES'),
                load_average=list(os.getloadavg()), threads=threads, device='cpu',
                torch=torch.__version__, python=platform.python_version(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
                command=command)


# ------------------------------------------------------------------------ models
def mmdet_backbone_cfg(source: str) -> Dict[str, Any]:
    """``model.backbone`` of an mmdet config (``'mmdet::<path>'``), four stages, no weights."""
    from mmengine.hub import get_config
    backbone = get_config(source).model.backbone.to_dict()
    backbone.pop('pretrained', None)
    backbone.update(init_cfg=None, out_indices=(0, 1, 2, 3))
    return backbone


def build_model(family: str, arch: Optional[str] = None, **kwargs) -> nn.Module:
    """A model of :data:`MODELS` (an ``-onnx`` one: its eager model), random weights of
    seed 0; ``kwargs`` go to a ResT / ResT V2."""
    spec = MODELS[family]
    torch.manual_seed(0)
    if spec.source.startswith('mmdet::'):
        import mmdet.models  # noqa: F401  (registers the backbones)
        from mmdet.registry import MODELS as MMDET_MODELS
        model = MMDET_MODELS.build(mmdet_backbone_cfg(spec.source))
    else:
        cls = getattr(importlib.import_module('mmrest.models'), spec.source.split('.')[1])
        model = cls(arch=arch, attn_impl='lean' if spec.impl == 'onnx' else spec.impl, **kwargs)
    model.init_weights()
    return model


def export_onnx(family: str, arch: str, folder: str) -> str:
    """The ONNX file of ``build_model(family, arch)`` (tools/deployment/export_onnx.py)."""
    sys.path.insert(0, osp.join(ROOT, 'tools', 'deployment'))
    import export_onnx as exporter
    sys.path.pop(0)
    model = build_model(family, arch).eval()
    names = [f'stage{i + 1}' for i in model.out_indices]
    spec = exporter.ExportSpec(exporter.TensorOutputs(model, 'forward'), names, {})
    return exporter.export_onnx(spec, osp.join(folder, f'{family}_{arch}.onnx'))


def label(key: str) -> str:
    """E.g. ``'ResT-small reference'`` of ``'rest-ref:small'``."""
    family, arch, variant = parse_key(key)
    return MODELS[family].label.format(arch=arch) + (f' {variant}' if variant else '')


def make_step(model: nn.Module, x: torch.Tensor, train: bool) -> Callable[[], None]:
    """Inference under ``torch.inference_mode``, or a training step (train mode,
    ``sum(out.mean())``, backward, no optimizer step)."""
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


def measure(job: Dict[str, Any]) -> Dict[str, Any]:
    """One (model, case) in this fresh process: ``time_s`` (median s per batch), ``runs``,
    ``import_rss`` and ``peak_rss`` (bytes); ``max_rel_error`` to eager for ONNX Runtime."""
    threads = job['threads']
    torch.set_num_threads(threads)
    for module in job['imports']:  # every process imports the same, so that RSS compare
        importlib.import_module(module)
    with open('/proc/self/statm') as f:  # the resident set size now
        import_rss = int(f.read().split()[1]) * resource.getpagesize()
    x = torch.randn(job['batch'], 3, *job['shape'])
    for name, (module, function, off) in SWITCHES.items():
        if name not in job['switches']:
            setattr(importlib.import_module(f'mmrest.models.layers.{module}'), function, off)
    if job.get('onnx'):
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        sess = ort.InferenceSession(job['onnx'], options, providers=['CPUExecutionProvider'])

        def step() -> List[Any]:
            return sess.run(None, {'input': x.numpy()})
    else:
        step = make_step(build_model(job['family'], job['arch']), x, job['train'])
    m = Timer('step()', globals=dict(step=step),
              num_threads=threads).blocked_autorange(min_run_time=job['min_run_time'])
    out = dict(time_s=m.median, runs=len(m.times) * m.number_per_run, import_rss=import_rss,
               peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    if job.get('onnx'):
        with torch.no_grad():
            eager = build_model(job['family'], job['arch']).eval()(x)
        out['max_rel_error'] = max(float(abs(o - e.numpy()).max()) / float(e.abs().max())
                                   for o, e in zip(step(), eager))
    return out


def summarise(samples: List[Dict[str, Any]], batch: int) -> Dict[str, Any]:
    """One (model, case) entry from its rounds: median time, largest memory."""
    failed = [s['error'] for s in samples if 'error' in s]
    if failed:
        return dict(error=failed[0])
    time_s = statistics.median(s['time_s'] for s in samples)
    entry = dict(time_s=time_s, times=[s['time_s'] for s in samples], throughput=batch / time_s,
                 runs=sum(s['runs'] for s in samples),
                 peak_rss=max(s['peak_rss'] for s in samples),
                 memory=max(s['peak_rss'] - s['import_rss'] for s in samples))
    if 'max_rel_error' in samples[0]:
        entry['max_rel_error'] = max(s['max_rel_error'] for s in samples)
    return entry


def ratios(results: Dict[str, Dict[str, Any]], key: str) -> Dict[str, Optional[float]]:
    """Speed-up and memory ratio of ``key`` over its reference and over Swin-T, where both
    rows of the case were measured."""
    family, arch, variant = parse_key(key)
    reference = {'lean': f'{family}-ref:{arch}', 'onnx': f'{family[:-5]}:{arch}'}.get(
        MODELS[family].impl)
    out: Dict[str, Optional[float]] = {}
    for name, other in (('reference', f'{family}:{arch}@plain' if variant else reference),
                        ('swin-t', PEER if family != PEER else None)):
        a, b = results.get(key, {}), results.get(other, {}) if other else {}
        ok = 'time_s' in a and 'time_s' in b
        out[f'speedup_vs_{name}'] = b['time_s'] / a['time_s'] if ok else None
        ok = ok and bool(a['memory'] and b['memory'])  # none on a CPU in gpu_check.py
        out[f'memory_vs_{name}'] = a['memory'] / b['memory'] if ok else None
    return out


# ----------------------------------------------------------------------- runs
def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse and check the command line; fills in the defaults of ``--ab`` and ``--quick``."""
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0], epilog='cases: ' + ', '.join(
            f'{n} ({c.title}, {c.shape[0]}x{c.shape[1]}, batch {c.batch})'
            for n, c in CASES.items()))
    add = parser.add_argument
    add('--models', nargs='+', choices=list(MODELS), help='model families (default: all but '
        'the -onnx ones; --ab: rest restv2; --quick: rest rest-ref)')
    add('--archs', nargs='+', help='archs of ResT and ResTV2 (default: small, tiny)')
    add('--cases', nargs='+', choices=list(CASES),
        help='cases (default: all; --ab: infer_224 infer_800 train_800)')
    add('--ab', action='store_true', help='A/B of the CPU shortcuts: ' + ', '.join(SWITCHES))
    add('--threads', type=int, help='intra-op threads (default: 2; --quick: 1)')
    add('--rounds', type=int, help='rounds (default: 3; --ab: 5; --quick: 1)')
    add('--timeout', type=float, default=3600., help='seconds per process (default: 3600)')
    add('--quick', action='store_true', help='smoke run: tiny inputs, one round, one thread')
    add('--out', help='also write the run as JSON here')
    add('--results', help='results file to append to (default: docs/results/'
        'benchmark-cpu.jsonl; none with --quick)')
    args = parser.parse_args(argv)
    for name in ('threads', 'rounds', 'timeout'):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f'--{name} must be > 0, got {getattr(args, name):g}')
    if args.models is None:
        args.models = (['rest', 'restv2'] if args.ab else
                       ['rest', 'rest-ref'] if args.quick else DEFAULT_MODELS)
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
        default = 'tiny' if family.startswith('restv2') else 'small'
        keys += [family] if not archs else [f'{family}:{a}' for a in (
            args.archs or [default]) if a in archs]
    variants = ['plain'] + [f'+{n}' for n in SWITCHES] + ['all']
    return [f'{k}@{v}' for k in keys for v in variants] if args.ab else keys


def run_peers(args: argparse.Namespace, log: Callable[[str], None]) -> Dict[str, Any]:
    """Every (model, case) for ``args.rounds`` rounds, each in a fresh process."""
    keys = model_keys(args)
    pairs = [(c, k) for c in args.cases for k in keys
             if not (CASES[c].train and MODELS[k.partition(':')[0]].impl == 'onnx')]
    imports = ['mmrest.models'] + (['mmdet.models'] if any(
        MODELS[k.partition(':')[0]].source.startswith('mmdet::') for k in keys) else [])
    samples: Dict[Tuple[str, str], List[Dict[str, Any]]] = {p: [] for p in pairs}
    with tempfile.TemporaryDirectory() as tmp:
        onnx = {k: export_onnx(*k.split(':'), tmp) for k in keys
                if MODELS[k.partition(':')[0]].impl == 'onnx'}
        if onnx:
            imports.append('onnxruntime')
        for rnd in range(args.rounds):
            shift = rnd * len(pairs) // args.rounds
            for case, key in pairs[shift:] + pairs[:shift]:
                if any('error' in s for s in samples[(case, key)]):
                    continue  # failed before (e.g. out of memory): not again
                family, arch, variant = parse_key(key)
                batch, shape = setup(case, args.quick)
                on = {'': list(SWITCHES), 'all': list(SWITCHES), 'plain': []}.get(
                    variant, [variant[1:]])
                s = run_in_subprocess(__file__, dict(
                    imports=imports, family=family, arch=arch or None, onnx=onnx.get(key),
                    switches=on, train=CASES[case].train, batch=batch, shape=list(shape),
                    threads=args.threads, min_run_time=0.05 if args.quick else 1.0),
                    args.threads, args.timeout)
                samples[(case, key)].append(s)
                log(f'round {rnd + 1} {case} {label(key)}: ' + (
                    f'FAILED {s["error"]}' if 'error' in s else f'{s["time_s"]:.3g} s'))
    results: Dict[str, Dict[str, Any]] = {}
    for case in args.cases:
        batch, shape = setup(case, args.quick)
        per = {k: summarise(samples[(c, k)], batch) for c, k in pairs if c == case}
        for k in per:
            if 'error' not in per[k]:
                per[k].update(ratios(per, k))
        results[case] = dict(batch=batch, shape=list(shape), rows=per)
    return dict(mode='ab' if args.ab else 'peers', results=results)


# ------------------------------------------------------------------- output
def table(header: List[str], rows: List[List[Any]]) -> str:
    """A markdown table, the first column left-aligned; None cells are empty."""
    return '\n'.join('| ' + ' | '.join('' if c is None else str(c) for c in line) + ' |'
                     for line in [header, ['---'] + ['---:'] * (len(header) - 1)] + rows)


def fmt(value: Optional[float], spec: str) -> str:
    """``value`` formatted by ``spec`` (a format spec, or a %-pattern), '' for None."""
    return '' if value is None else spec % value if '%' in spec else format(value, spec)


def format_report(report: Dict[str, Any]) -> str:
    """Markdown: a table per case, then the machine and command."""
    out = []
    for case, res in report['results'].items():
        title = f'{case}: {CASES[case].title} {res["shape"][0]}x{res["shape"][1]}, batch ' \
            f'{res["batch"]}\n\n'
        rows = [[label(k), 'failed: ' + e['error']] + [''] * 6 if 'error' in e else
                [label(k) + fmt(e.get('max_rel_error'), ' (max error %.1e)'), f'{e["time_s"]:.3f}',
                 f'{e["throughput"]:.2f}', f'{e["memory"] / 2**30:.2f}']
                + [fmt(e[f'{q}_vs_{other}'], '.2f') for other in ('reference', 'swin-t')
                   for q in ('speedup', 'memory')] for k, e in res['rows'].items()]
        out.append(title + table(
            ['model', 's/batch', 'img/s', 'model memory (GiB)', 'x reference',
             'memory / reference', 'x Swin-T', 'memory / Swin-T'], rows))
    m = report['machine']
    out.append(f'Machine: {m["cpu"]}, {m["logical_cpus"]} logical CPUs, load average '
               f'{m["load_average"][0]:.1f} at the start, {m["threads"]} threads, {m["device"]}, '
               f'torch {m["torch"]}, {m["date"]}. Command: `{m["command"]}`.')
    return '\n\n'.join(out)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Run, print the tables, append the run to the results file; returns the run."""
    args = parse_args(argv)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    machine = machine_info(args.threads, args.command)
    start = time.perf_counter()
    report = run_peers(args, log)
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
    if sys.argv[1:2] == ['--worker']:
        print(json.dumps(measure(json.loads(sys.argv[2]))))
    else:
        main()
