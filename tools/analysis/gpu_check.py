"""GPU check of the ResT backbones: fused vs reference agreement, speed and memory.

Needs torch, mmengine and mmcv (mmdet only for the Swin-T row of the speed table).

**Agreement.** For every ResT and ResTV2 arch, the fused attention (``attn_impl='fused'``)
against the reference, with one state dict of non-trivial random weights
(:func:`randomize_weights`), at 224x224 and 800x1344: eval-mode outputs (batch 2) and
train-mode parameter gradients (batch 2, 1 above 512x512) of ``sum((out * r).sum())``.
Errors are max |a - b| relative to the reference's scale (per stage map, or per part of
the model for gradients: :func:`gradient_error`). float32 runs with TF32 off and must agree
to < 1e-4; under fp16/bf16 autocast the fused model is compared with the float32 reference
(:data:`TOLERANCES`), the reference's own autocast error shown beside it, not judged.

**Speed and memory.** Median inference and training-step time
(``torch.utils.benchmark.Timer.blocked_autorange``) and ``max_memory_allocated`` of
ResT-small and ResTV2-tiny (fused and reference) and mmdet's Swin-T backbone, at 224x224
batch 64 and 800x1344 batch 2.

Prints markdown tables, writes JSON (``--out``). Exit status 0 if every check passes, 1 if
any fails or raised, 2 without CUDA (``--device cpu --smoke`` runs the flow on the CPU)::

    python tools/analysis/gpu_check.py --out work_dirs/gpu_check.json
    python tools/analysis/gpu_check.py --device cpu --smoke --archs lite
"""
import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import os.path as osp
import platform
import re
import shlex
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from _gpu_measures import (DTYPES, TOLERANCES, SpeedCase, _stage_of,  # noqa: E402,F401
                           agreement_rows, error_text, gradient_error, output_error,
                           randomize_weights, run_pass, strict_fp32, time_case)

sys.path.pop(0)

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
REST_ARCHS = ('lite', 'small', 'base', 'large')
V2_ARCHS = ('tiny', 'small', 'base', 'large')
#: Gradient checks above this many pixels per image run at batch 1.
GRAD_BATCH1_PIXELS = 512 * 512
SWIN_CONFIG = 'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py'
SWIN_LABEL = 'mmdet Swin-T'
V2_SPEED_ARCH = 'tiny'
SPEED_CASES = (SpeedCase('infer', (224, 224), 64), SpeedCase('infer', (800, 1344), 2),
               SpeedCase('train', (224, 224), 64), SpeedCase('train', (800, 1344), 2))
SMOKE_SPEED_CASES = (SpeedCase('infer', (64, 64), 2), SpeedCase('infer', (64, 96), 1),
                     SpeedCase('train', (64, 64), 2), SpeedCase('train', (64, 96), 1))
DEFAULT_SIZES, SMOKE_SIZES = ((224, 224), (800, 1344)), ((64, 64), (48, 80))


@dataclass(frozen=True)
class ModelSpec:
    """A backbone to check or time: ``build(attn_impl, drop_path_rate)`` returns it."""
    name: str
    label: str
    build: Callable[[Optional[str], Optional[float]], torch.nn.Module]
    has_attn_impl: bool


# ----------------------------------------------------------------------------- options
def parse_size(text: str) -> Tuple[int, int]:
    """``'800x1344'`` -> (800, 1344); an argparse type."""
    match = re.fullmatch(r'(\d+)x(\d+)', text)
    if not match or min(int(match[1]), int(match[2])) < 1:
        raise argparse.ArgumentTypeError(
            f'a size is HxW with positive integers, e.g. 800x1344; got {text!r}')
    return int(match[1]), int(match[2])


def _positive(kind: type) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'not a number: {text!r}') from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f'must be > 0, got {text}')
        return value
    return convert


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Options of the tool (see ``--help``); ``--smoke`` fills unset sizes and times.

    Args:
        argv (Sequence[str], optional): Arguments. Defaults to None (``sys.argv``).

    Returns:
        argparse.Namespace: The options, with ``sizes``, ``speed_cases`` and
        ``min_run_time`` resolved.
    """
    all_archs = list(REST_ARCHS) + [f'v2-{a}' for a in V2_ARCHS]
    parser = argparse.ArgumentParser(
        description='GPU check of ResT: fused vs reference agreement (fp32, fp16, bf16), '
        'speed and memory; markdown tables and JSON.')
    parser.add_argument('--archs', nargs='+', choices=all_archs, default=None,
                        help='models to check (default: every ResT and ResTV2 arch)')
    parser.add_argument('--sizes', nargs='+', type=parse_size, default=None,
                        help='input sizes HxW of the checks (default: 224x224 800x1344)')
    parser.add_argument('--dtypes', nargs='+', choices=list(DTYPES),
                        default=list(DTYPES), help='precisions of the checks')
    parser.add_argument('--speed-dtypes', nargs='+', choices=list(DTYPES),
                        default=['fp32'], help='precisions of the speed rows '
                        '(default: fp32; add bf16 for bf16 autocast rows)')
    parser.add_argument('--speed-arch', choices=REST_ARCHS, default='small',
                        help='ResT arch of the speed table (default: small)')
    parser.add_argument('--no-checks', dest='checks', action='store_false',
                        help='skip the agreement checks')
    parser.add_argument('--no-speed', dest='speed', action='store_false',
                        help='skip the speed and memory table')
    parser.add_argument('--device', default='cuda',
                        help="'cuda' or 'cuda:N' (default); 'cpu' runs the flow on the "
                        'CPU, for testing only')
    parser.add_argument('--smoke', action='store_true',
                        help='tiny sizes and short timing (a CPU run takes seconds)')
    parser.add_argument('--min-run-time', type=_positive(float), default=None,
                        help='seconds of timed runs per speed row (default 1, smoke 0.01)')
    parser.add_argument('--warmup', type=int, default=2,
                        help='untimed runs before timing (default 2)')
    parser.add_argument('--seed', type=int, default=0, help='weights and inputs seed')
    parser.add_argument('--out', default=osp.join('work_dirs', 'gpu_check.json'),
                        help='JSON output (default: work_dirs/gpu_check.json)')
    args = parser.parse_args(argv)
    if not re.fullmatch(r'cpu|cuda(:\d+)?', args.device):
        parser.error(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    if args.warmup < 0:
        parser.error(f'--warmup must be >= 0, got {args.warmup}')
    if not (args.checks or args.speed):
        parser.error('--no-checks and --no-speed together leave nothing to do')
    if args.sizes is None:
        args.sizes = list(SMOKE_SIZES if args.smoke else DEFAULT_SIZES)
    if args.min_run_time is None:
        args.min_run_time = 0.01 if args.smoke else 1.0
    args.speed_cases = list(SMOKE_SPEED_CASES if args.smoke else SPEED_CASES)
    return args


# ----------------------------------------------------------------------------- models
def _rest_spec(cls: type, name: str, label: str, arch: str) -> ModelSpec:

    def build(attn_impl: Optional[str], drop_path_rate: Optional[float]) -> torch.nn.Module:
        kwargs: Dict[str, Any] = dict(arch=arch, out_indices=(0, 1, 2, 3))
        if attn_impl is not None:
            kwargs['attn_impl'] = attn_impl
        if drop_path_rate is not None:
            kwargs['drop_path_rate'] = drop_path_rate
        return cls(**kwargs)

    return ModelSpec(name, label, build, True)


def available_specs() -> Dict[str, ModelSpec]:
    """Every ResT and ResTV2 arch by ``--archs`` name (``'small'``, ``'v2-tiny'``)."""
    import mmrest.models as models
    specs = {a: _rest_spec(models.ResT, a, f'ResT-{a}', a) for a in REST_ARCHS}
    specs.update({f'v2-{a}': _rest_spec(models.ResTV2, f'v2-{a}', f'ResTV2-{a}', a)
                  for a in V2_ARCHS})
    return specs


def swin_backbone_cfg() -> dict:
    """``model.backbone`` of :data:`SWIN_CONFIG`, without weights, four outputs."""
    from mmengine.hub import get_config
    cfg = get_config(SWIN_CONFIG).model.backbone.to_dict()
    cfg.update(init_cfg=None, out_indices=(0, 1, 2, 3))
    cfg.pop('pretrained', None)
    return cfg


def swin_spec() -> ModelSpec:
    """mmdet's Swin-T backbone (:func:`swin_backbone_cfg`), randomly initialised."""
    cfg = swin_backbone_cfg()
    import mmdet.models  # noqa: F401  (registers the backbones)
    from mmdet.registry import MODELS
    return ModelSpec('swin-t', SWIN_LABEL, lambda attn_impl, dpr: MODELS.build(cfg), False)


# ----------------------------------------------------------------------------- checks
def build_pair(spec: ModelSpec, seed: int, device: torch.device
               ) -> Tuple[torch.nn.Module, torch.nn.Module, Dict[str, torch.Tensor]]:
    """``(reference, fused, state)`` of ``spec`` (``drop_path_rate=0``) on ``device``,
    ``state`` a copy of the shared weights for :func:`run_pass`."""
    ref = spec.build('reference', 0.)
    randomize_weights(ref, seed)
    fused = spec.build('fused', 0.)
    fused.load_state_dict(ref.state_dict(), strict=True)
    ref, fused = ref.to(device), fused.to(device)
    return ref, fused, {k: v.clone() for k, v in ref.state_dict().items()}


def check_model(spec: ModelSpec, sizes: Sequence[Tuple[int, int]], dtypes: Sequence[str],
                device: torch.device, seed: int,
                log: Callable[[str], None]) -> List[Dict[str, Any]]:
    """Agreement rows of one model, one per (size, dtype, quantity); an exception fails
    the rows it prevents, with its message."""
    rows: List[Dict[str, Any]] = []
    pair = None
    for h, w in sizes:
        batch = 1 if h * w > GRAD_BATCH1_PIXELS else 2
        ref32, results = None, {}
        try:
            pair = pair or build_pair(spec, seed, device)
            ref, fused, state = pair
            gen = torch.Generator().manual_seed(seed + 1)
            x = torch.randn(2, 3, h, w, generator=gen).to(device)
            with strict_fp32():
                ref32 = run_pass(ref, state, x, x[:batch], 'fp32', seed)
                for dtype in dtypes:
                    try:
                        got = run_pass(fused, state, x, x[:batch], dtype, seed)
                    except Exception as err:  # noqa: BLE001  (reported as a failure)
                        results[dtype] = error_text(err), None
                        continue
                    try:
                        own = None if dtype == 'fp32' else \
                            run_pass(ref, state, x, x[:batch], dtype, seed)
                    except Exception as err:  # noqa: BLE001  (shown, not judged)
                        own = error_text(err)
                    results[dtype] = got, own
        except Exception as err:  # noqa: BLE001  (reported as a failure)
            pair = ref = fused = None
            results = {dtype: (error_text(err), None) for dtype in dtypes}
        size_rows = []
        for dtype in dtypes:
            size_rows += agreement_rows(spec.label, f'{h}x{w}', batch, dtype, ref32,
                                        *results[dtype])
        rows += size_rows
        log(f'checked {spec.label} {h}x{w}: ' + ', '.join(
            f'{r["dtype"]} {r["quantity"]} ' +
            ('ERROR' if r['exception'] else f'{r["error"]:.1e}') for r in size_rows))
        del ref32, results
        if device.type == 'cuda':
            torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------- speed

def speed_rows(specs: Sequence[Tuple[ModelSpec, Optional[str]]],
               cases: Sequence[SpeedCase], dtypes: Sequence[str], device: torch.device,
               warmup: int, min_run_time: float,
               log: Callable[[str], None]) -> List[Dict[str, Any]]:
    """Speed rows of every (model with its ``attn_impl``, case, dtype), one model on the
    device at a time."""
    rows = []
    for spec, impl in specs:
        label = spec.label + (' reference' if impl == 'reference' else '')
        try:
            torch.manual_seed(0)
            model = spec.build(impl, None).to(device)
        except Exception as err:  # noqa: BLE001  (reported, the run goes on)
            model, failure = None, error_text(err)
        for case in cases:
            for dtype in dtypes:
                row = dict(model=label, case=case.name, dtype=dtype, ms=None, img_per_s=None,
                           peak_mib=None, runs=0, exception=None)
                if model is None:
                    rows.append(dict(row, exception=failure))
                    continue
                try:
                    seconds, peak, runs = time_case(model, case, dtype, device, warmup,
                                                    min_run_time)
                    row.update(ms=seconds * 1e3, img_per_s=case.batch / seconds, runs=runs,
                               peak_mib=None if peak is None else peak / 2**20)
                    log(f'timed {label} {case.name} {dtype}: {seconds * 1e3:.1f} ms')
                except Exception as err:  # noqa: BLE001  (reported, the run goes on)
                    row['exception'] = error_text(err)
                    log(f'timed {label} {case.name} {dtype}: {row["exception"]}')
                rows.append(row)
        del model
        if device.type == 'cuda':
            torch.cuda.empty_cache()
    add_ratios(rows)
    return rows


def add_ratios(rows: List[Dict[str, Any]]) -> None:
    """Add ``ms_vs_reference``, ``peak_vs_reference`` (a model against its ``reference``
    row) and ``ms_vs_swin`` (against mmdet Swin-T) to the rows of the same case and dtype."""
    index = {(r['model'], r['case'], r['dtype']): r for r in rows}

    def ratio(row: Dict[str, Any], other: Optional[Dict[str, Any]], key: str) -> Any:
        if other is None or other is row or not row[key] or not other[key]:
            return None
        return row[key] / other[key]

    for row in rows:
        ref = index.get((row['model'] + ' reference', row['case'], row['dtype']))
        swin = index.get((SWIN_LABEL, row['case'], row['dtype']))
        row['ms_vs_reference'] = ratio(row, ref, 'ms')
        row['peak_vs_reference'] = ratio(row, ref, 'peak_mib')
        row['ms_vs_swin'] = ratio(row, swin, 'ms')


# ----------------------------------------------------------------------------- output
def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; None cells are empty."""
    lines = ['| ' + ' | '.join(headers) + ' |', '|' + '---|' * len(headers)]
    for row in rows:
        lines.append('| ' + ' | '.join('' if c is None else str(c) for c in row) + ' |')
    return '\n'.join(lines)


def _fmt(value: Optional[float], spec: str) -> Optional[str]:
    return None if value is None else format(value, spec)


def checks_table(rows: Sequence[Dict[str, Any]]) -> str:
    """The agreement rows as a markdown table."""
    return markdown_table(
        ['model', 'size', 'batch', 'dtype', 'quantity', 'max rel. error', 'worst at',
         'tolerance', 'pass', 'reference under autocast'],
        [[r['model'], r['size'], r['batch'], r['dtype'], r['quantity'],
          _fmt(r['error'], '.2e') if r['exception'] is None else f'error: {r["exception"]}',
          r['worst'], _fmt(r['tolerance'], 'g'), 'yes' if r['passed'] else 'NO',
          f'error: {r["reference_error"]}' if isinstance(r['reference_error'], str)
          else _fmt(r['reference_error'], '.2e')] for r in rows])


def speed_table(rows: Sequence[Dict[str, Any]]) -> str:
    """The speed rows as a markdown table."""
    return markdown_table(
        ['model', 'case', 'dtype', 'ms per batch', 'img/s', 'peak MiB', 'ms / reference',
         'peak / reference', 'ms / Swin-T'],
        [[r['model'], r['case'], r['dtype'],
          _fmt(r['ms'], '.1f') if r['exception'] is None else f'error: {r["exception"]}',
          _fmt(r['img_per_s'], '.1f'), _fmt(r['peak_mib'], '.0f'),
          _fmt(r['ms_vs_reference'], '.2f'), _fmt(r['peak_vs_reference'], '.2f'),
          _fmt(r['ms_vs_swin'], '.2f')] for r in rows])


def environment(device: torch.device, command: str) -> Dict[str, Any]:
    """Versions, device, date and command of this run."""

    def version(name: str) -> Optional[str]:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    env = dict(date=datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
               command=command, python=platform.python_version(), torch=torch.__version__,
               cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
               mmengine=version('mmengine'), mmcv=version('mmcv') or version('mmcv-lite'),
               mmdet=version('mmdet'), device=str(device), threads=torch.get_num_threads(),
               speed_tf32=dict(matmul=torch.backends.cuda.matmul.allow_tf32,
                               cudnn=torch.backends.cudnn.allow_tf32),
               cudnn_benchmark=torch.backends.cudnn.benchmark)
    if device.type == 'cuda':
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   capability=f'{props.major}.{props.minor}')
    else:
        env.update(gpu=None, cpu=platform.processor() or platform.machine())
    return env


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


# ----------------------------------------------------------------------------- main
def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the checks and the speed table; the exit status of the module docstring."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.device != 'cpu' and not torch.cuda.is_available():
        print(f'gpu_check: CUDA is not available (torch {torch.__version__}, CUDA build '
              f'{torch.version.cuda}): this check needs a GPU; --device cpu runs it on the '
              'CPU for testing only', file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == 'cuda':
        if (device.index or 0) >= torch.cuda.device_count():
            print(f'gpu_check: --device {args.device}: there are only '
                  f'{torch.cuda.device_count()} CUDA devices', file=sys.stderr)
            return 2
        torch.cuda.set_device(device)  # the Timer synchronises the current device
    out_dir = osp.dirname(args.out)
    try:
        os.makedirs(out_dir or '.', exist_ok=True)
    except OSError as err:
        print(f'gpu_check: --out {args.out}: cannot create its folder ({err})',
              file=sys.stderr)
        return 2
    if importlib.util.find_spec('mmrest') is None:
        sys.path.insert(0, ROOT)  # a plain clone, not installed
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f'[{time.perf_counter() - start:7.1f} s] {message}', file=sys.stderr, flush=True)

    available = available_specs()
    notes: List[str] = []
    specs = [available[name] for name in args.archs or available]
    log(f'{device} ({torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"})'
        + (f', checks of {len(specs)} models' if args.checks else '')
        + (f', speed of ResT-{args.speed_arch} and peers' if args.speed else ''))

    checks: List[Dict[str, Any]] = []
    if args.checks:
        for spec in specs:
            checks += check_model(spec, args.sizes, args.dtypes, device, args.seed, log)

    speed: List[Dict[str, Any]] = []
    if args.speed:
        timed = [(available[args.speed_arch], 'fused'), (available[args.speed_arch],
                                                         'reference')]
        v2 = available[f'v2-{V2_SPEED_ARCH}']
        timed += [(v2, 'fused'), (v2, 'reference')]
        try:
            timed.append((swin_spec(), None))
        except Exception as err:  # noqa: BLE001  (mmdet absent or broken: a note)
            notes.append(f'{SWIN_LABEL} skipped: mmdet not importable '
                         f'({type(err).__name__}: {err})')
        speed = speed_rows(timed, args.speed_cases, args.speed_dtypes, device, args.warmup,
                           args.min_run_time, log)

    failed = [r for r in checks if not r['passed']]
    raised = [r for r in speed if r['exception']]
    command = 'python tools/analysis/gpu_check.py' + (' ' + shlex.join(argv) if argv else '')
    result = dict(environment=environment(device, command), passed=not failed and not raised,
                  tolerances=TOLERANCES, checks=checks,
                  speed=speed, notes=notes, elapsed_s=round(time.perf_counter() - start, 1))
    if checks:
        print('## Agreement: fused vs reference\n\n' + checks_table(checks) + '\n')
    if speed:
        print('## Speed and memory\n\n' + speed_table(speed) + '\n')
    for note in notes:
        print(f'Note: {note}')
    with open(args.out, 'w') as f:
        json.dump(_json_safe(result), f, indent=1)
    summary = (f'{len(checks) - len(failed)} of {len(checks)} checks passed, '
               f'{len(speed) - len(raised)} of {len(speed)} speed rows measured '
               f'in {result["elapsed_s"]} s; JSON: {args.out}')
    print(('gpu_check: ' if result['passed'] else 'gpu_check: FAILED: ') + summary)
    return 0 if result['passed'] else 1


if __name__ == '__main__':
    sys.exit(main())
