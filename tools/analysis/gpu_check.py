"""GPU check of ResT and ResT V2: the default attention against the reference (fp32, fp16,
bf16), speed and memory; markdown tables and JSON.

Agreement: every arch at 224x224 and 800x1344, one state dict of random weights (norms and
biases non-trivial: :func:`randomize_weights`) in both models; the eval outputs (batch 2) and
the parameter gradients of a train step (batch 2, 1 above 512x512) of ``sum((out * r).sum())``.
Errors are max |a - b| relative to the reference's scale: ``max(1, max |ref|)`` of a stage
map, the largest reference gradient of the stage of a parameter. fp32 runs with TF32 off;
under autocast the default model is compared with the float32 reference (:data:`TOLERANCES`),
the reference's own autocast error shown beside it. Speed and memory: median time
(``blocked_autorange``) and ``max_memory_allocated`` of ResT-small and ResTV2-tiny (default
and reference) and mmdet's Swin-T (the models of benchmark.py). Exit status 0 if every check
passes, 1 if any fails, 2 without CUDA (``--device cpu --smoke`` runs the flow on the CPU)::

    python tools/analysis/gpu_check.py --out work_dirs/gpu_check.json
    python tools/analysis/gpu_check.py --device cpu --smoke --archs lite
"""
import argparse
import contextlib
import gc
import importlib.metadata
import json
import math
import os
import os.path as osp
import re
import shlex
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch.utils.benchmark import Timer

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
import benchmark as bm  # noqa: E402  (the models, ratios and tables of the CPU benchmark)

sys.path.pop(0)

#: ``--archs`` name -> (benchmark.py family, arch)
ARCHS = {**{a: ('rest', a) for a in bm.MODELS['rest'].archs},
         **{f'v2-{a}': ('restv2', a) for a in bm.MODELS['restv2'].archs}}
DTYPES = {'fp32': None, 'fp16': torch.float16, 'bf16': torch.bfloat16}
#: Max relative error of the default model against the float32 reference: 2x or more over
#: those measured under autocast, far below a real defect's (a wrong op: order 1).
TOLERANCES = {'outputs': {'fp32': 1e-4, 'fp16': 2e-2, 'bf16': 5e-2},
              'gradients': {'fp32': 1e-4, 'fp16': 1e-1, 'bf16': 2.5e-1}}
#: Gradient checks above this many pixels per image run at batch 1.
GRAD_BATCH1_PIXELS = 512 * 512
SWIN = 'swin-t'


class SpeedCase(NamedTuple):
    kind: str  # 'infer' or 'train'
    size: Tuple[int, int]
    batch: int

    @property
    def name(self) -> str:
        return f'{self.kind} {self.size[0]}x{self.size[1]} b{self.batch}'


SPEED_CASES = (SpeedCase('infer', (224, 224), 64), SpeedCase('infer', (800, 1344), 2),
               SpeedCase('train', (224, 224), 64), SpeedCase('train', (800, 1344), 2))
SMOKE_SPEED_CASES = (SpeedCase('infer', (64, 64), 2), SpeedCase('infer', (64, 96), 1),
                     SpeedCase('train', (64, 64), 2), SpeedCase('train', (64, 96), 1))
DEFAULT_SIZES, SMOKE_SIZES = ((224, 224), (800, 1344)), ((64, 64), (48, 80))


def parse_size(text: str) -> Tuple[int, int]:
    """``'800x1344'`` -> (800, 1344); an argparse type."""
    match = re.fullmatch(r'(\d+)x(\d+)', text)
    if not match or min(int(match[1]), int(match[2])) < 1:
        raise argparse.ArgumentTypeError(
            f'a size is HxW with positive integers, e.g. 800x1344; got {text!r}')
    return int(match[1]), int(match[2])


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The options; ``--smoke`` sets tiny sizes and short timing."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    add = parser.add_argument
    add('--archs', nargs='+', choices=list(ARCHS), help='models to check (default: all)')
    add('--sizes', nargs='+', type=parse_size, help='HxW of the checks (default: 224x224 '
        '800x1344)')
    add('--dtypes', nargs='+', choices=list(DTYPES), default=list(DTYPES),
        help='precisions of the checks')
    add('--speed-dtypes', nargs='+', choices=list(DTYPES), default=['fp32'],
        help='precisions of the speed rows (default: fp32)')
    add('--speed-arch', choices=bm.MODELS['rest'].archs, default='small',
        help='ResT arch of the speed table (default: small)')
    add('--no-checks', dest='checks', action='store_false', help='skip the agreement checks')
    add('--no-speed', dest='speed', action='store_false', help='skip the speed table')
    add('--device', default='cuda', help="cuda or cuda:N; cpu for testing only")
    add('--smoke', action='store_true', help='tiny sizes, short timing (seconds on a CPU)')
    add('--out', default=osp.join('work_dirs', 'gpu_check.json'), help='the JSON file')
    args = parser.parse_args(argv)
    if not re.fullmatch(r'cpu|cuda(:\d+)?', args.device):
        parser.error(f'--device must be cpu, cuda or cuda:N, got {args.device!r}')
    if not (args.checks or args.speed):
        parser.error('--no-checks and --no-speed together leave nothing to do')
    args.sizes = args.sizes or list(SMOKE_SIZES if args.smoke else DEFAULT_SIZES)
    args.min_run_time, args.warmup = (0.01, 0) if args.smoke else (1.0, 2)
    args.speed_cases = list(SMOKE_SPEED_CASES if args.smoke else SPEED_CASES)
    return args


def build(key: str, **kwargs) -> torch.nn.Module:
    """A model of benchmark.py by key (``'rest-ref:small'``, ``'swin-t'``)."""
    family, _, arch = key.partition(':')
    return bm.build_model(family, arch or None, **kwargs)


def error_text(err: Exception) -> str:
    return f'{type(err).__name__}: {err}'


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    if DTYPES[dtype] is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[dtype])


@contextlib.contextmanager
def strict_fp32() -> Iterator[None]:
    """TF32 off for matmuls and cuDNN convolutions (restored afterwards)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


# ----------------------------------------------------------------------------- checks
def randomize_weights(model: torch.nn.Module, seed: int) -> None:
    """1-D tensors from ``seed``: norm scales 1 + N(0, 0.1^2), biases and running means
    N(0, 0.1^2), running variances U(1, 2): no norm the identity, no bias zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if tensor.is_floating_point() and tensor.dim() == 1:
                leaf, noise = name.rpartition('.')[2], torch.randn(tensor.shape, generator=gen)
                tensor.copy_(1 + torch.rand(tensor.shape, generator=gen) if leaf == 'running_var'
                             else 1 + 0.1 * noise if leaf == 'weight' else 0.1 * noise)


def run_pass(model: torch.nn.Module, state: Dict[str, torch.Tensor], x: torch.Tensor,
             x_train: torch.Tensor, dtype: str, seed: int) -> Tuple[List[torch.Tensor], Dict]:
    """float32 eval outputs on ``x`` and the parameter gradients of a train step on
    ``x_train`` (loss ``sum((out * r).sum())``, ``r`` from ``seed``), after loading ``state``."""
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad(), autocast(x.device, dtype):
        outs = [o.float() for o in model(x)]
    model.train()
    model.zero_grad(set_to_none=True)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    with autocast(x.device, dtype):
        loss = sum((o.float() * torch.randn(o.shape, generator=gen, device=o.device)).sum()
                   for o in model(x_train))
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return outs, grads


def _finite(value: float) -> float:
    return value if math.isfinite(value) else math.inf


def output_error(outs: Sequence[torch.Tensor], refs: Sequence[torch.Tensor]) -> Tuple[float, str]:
    """Largest ``max |out - ref| / max(1, max |ref|)`` over the stage maps, and where."""
    if len(outs) != len(refs):
        raise ValueError(f'{len(outs)} outputs vs {len(refs)} of the reference')
    worst, where = 0.0, ''
    for i, (out, ref) in enumerate(zip(outs, refs)):
        if out.shape != ref.shape:
            raise ValueError(f'stage {i + 1}: shape {tuple(out.shape)} vs reference '
                             f'{tuple(ref.shape)}')
        err = _finite(((out - ref).abs().max() / ref.abs().max().clamp(min=1)).item())
        if err >= worst:
            worst, where = err, f'stage {i + 1}'
    return worst, where


def _stage_of(name: str) -> str:
    """``patch_embed_2.*``, ``stage2.*``, ``norm2.*``: 'stage 2'; else the top module."""
    top = name.partition('.')[0]
    digits = re.sub(r'\D', '', top)
    return f'stage {digits}' if digits else top


def gradient_error(grads: Dict[str, torch.Tensor],
                   refs: Dict[str, torch.Tensor]) -> Tuple[float, str]:
    """Largest ``max |g - g_ref|`` relative to the largest reference gradient of the
    parameter's stage (some vanish analytically: no per-parameter scale), and where."""
    if set(grads) != set(refs):
        raise ValueError(f'gradients of different parameters: {sorted(set(grads) ^ set(refs))[:5]}')
    peak: Dict[str, float] = {}
    for name, ref in refs.items():
        peak[_stage_of(name)] = max(peak.get(_stage_of(name), 0.0), ref.abs().max().item())
    worst, where = 0.0, ''
    for name, ref in refs.items():
        err = _finite((grads[name].float() - ref).abs().max().item() /
                      max(peak[_stage_of(name)], 1e-30))
        if err >= worst:
            worst, where = err, name
    return worst, where


def agreement_rows(model: str, size: str, grad_batch: int, dtype: str, ref32: Any, got: Any,
                   own: Any) -> List[Dict[str, Any]]:
    """The outputs and gradients rows of one (model, size, dtype); ``got`` (default model)
    and ``own`` (reference under autocast) are :func:`run_pass` results or error texts."""
    rows = []
    for i, (quantity, measure) in enumerate((('outputs', output_error),
                                             ('gradients', gradient_error))):
        row = dict(model=model, size=size, batch=2 if i == 0 else grad_batch, dtype=dtype,
                   quantity=quantity, error=None, worst='', tolerance=TOLERANCES[quantity][dtype],
                   passed=False, reference_error=own if isinstance(own, str) else None,
                   exception=got if isinstance(got, str) else None)
        if row['exception'] is None:
            try:
                row['error'], row['worst'] = measure(got[i], ref32[i])
                row['passed'] = row['error'] < row['tolerance']
                if own is not None and not isinstance(own, str):
                    row['reference_error'] = measure(own[i], ref32[i])[0]
            except Exception as err:  # noqa: BLE001  (reported as a failure)
                row['exception'] = error_text(err)
        rows.append(row)
    return rows


def check_model(name: str, sizes: Sequence[Tuple[int, int]], dtypes: Sequence[str],
                device: torch.device, seed: int, log: Callable[[str], None]) -> List[Dict]:
    """Agreement rows of one arch; an exception fails the rows it prevents."""
    family, arch = ARCHS[name]
    rows: List[Dict[str, Any]] = []
    pair = None
    for h, w in sizes:
        batch = 1 if h * w > GRAD_BATCH1_PIXELS else 2
        ref32, results = None, {}
        try:
            if pair is None:
                ref = build(f'{family}-ref:{arch}', drop_path_rate=0.)
                randomize_weights(ref, seed)
                lean = build(f'{family}:{arch}', drop_path_rate=0.)
                lean.load_state_dict(ref.state_dict())
                pair = ref.to(device), lean.to(device), {
                    k: v.clone() for k, v in ref.state_dict().items()}
            ref, lean, state = pair
            x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(seed + 1))
            x = x.to(device)
            with strict_fp32():
                ref32 = run_pass(ref, state, x, x[:batch], 'fp32', seed)
                for dtype in dtypes:
                    try:
                        got = run_pass(lean, state, x, x[:batch], dtype, seed)
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
            pair = None
            results = {dtype: (error_text(err), None) for dtype in dtypes}
        size_rows = [r for dtype in dtypes for r in agreement_rows(
            bm.label(f'{family}:{arch}'), f'{h}x{w}', batch, dtype, ref32, *results[dtype])]
        rows += size_rows
        log(f'checked {size_rows[0]["model"]} {h}x{w}: ' + ', '.join(
            f'{r["dtype"]} {r["quantity"]} ' +
            ('ERROR' if r['exception'] else f'{r["error"]:.1e}') for r in size_rows))
        del ref32, results
        if device.type == 'cuda':
            torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------- speed
def time_case(model: torch.nn.Module, case: SpeedCase, dtype: str, device: torch.device,
              warmup: int, min_run_time: float) -> Tuple[float, Optional[int], int]:
    """Median seconds of one run, peak CUDA memory (None on the CPU), timed runs."""
    x = torch.randn(case.batch, 3, *case.size, generator=torch.Generator().manual_seed(0))
    x = x.to(device)
    if case.kind == 'infer':
        model.eval()

        def step() -> None:
            with torch.inference_mode(), autocast(device, dtype):
                model(x)
    else:
        model.train()

        def step() -> None:
            model.zero_grad(set_to_none=True)
            with autocast(device, dtype):
                loss = sum(o.float().mean() for o in model(x))
            loss.backward()

    cuda = device.type == 'cuda'
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        step()
    m = Timer('step()', globals=dict(step=step), num_threads=torch.get_num_threads())
    m = m.blocked_autorange(min_run_time=min_run_time)
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    model.zero_grad(set_to_none=True)
    return m.median, peak, len(m.times)


def speed_rows(keys: Sequence[str], cases: Sequence[SpeedCase], dtypes: Sequence[str],
               device: torch.device, warmup: int, min_run_time: float,
               log: Callable[[str], None]) -> List[Dict[str, Any]]:
    """A row per (model, case, dtype), one model on the device at a time, with the ratios
    of benchmark.py (to the reference, to Swin-T)."""
    rows = []
    for key in keys:
        model, failure = None, None
        try:
            model = build(key).to(device)
        except Exception as err:  # noqa: BLE001  (reported, the run goes on)
            failure = error_text(err)
        for case in cases:
            for dtype in dtypes:
                row = dict(model=bm.label(key), key=key, case=case.name, dtype=dtype, ms=None,
                           img_per_s=None, peak_mib=None, runs=0, exception=failure)
                if model is not None:
                    try:
                        seconds, peak, runs = time_case(model, case, dtype, device, warmup,
                                                        min_run_time)
                        row.update(ms=seconds * 1e3, img_per_s=case.batch / seconds, runs=runs,
                                   peak_mib=None if peak is None else peak / 2**20)
                    except Exception as err:  # noqa: BLE001  (reported, the run goes on)
                        row['exception'] = error_text(err)
                log(f'timed {row["model"]} {case.name} {dtype}: ' + (
                    row['exception'] or f'{row["ms"]:.1f} ms'))
                rows.append(row)
        del model
        if device.type == 'cuda':
            torch.cuda.empty_cache()
    for row in rows:
        same = {r['key']: dict(time_s=r['ms'], memory=r['peak_mib']) for r in rows
                if (r['case'], r['dtype']) == (row['case'], row['dtype']) and r['ms']}
        row.update(bm.ratios(same, row['key']))
    return rows


# ----------------------------------------------------------------------------- output
def checks_table(rows: Sequence[Dict[str, Any]]) -> str:
    return bm.table(
        ['model', 'size', 'batch', 'dtype', 'quantity', 'max rel. error', 'worst at',
         'tolerance', 'pass', 'reference under autocast'],
        [[r['model'], r['size'], r['batch'], r['dtype'], r['quantity'],
          bm.fmt(r['error'], '.2e') if r['exception'] is None else f'error: {r["exception"]}',
          r['worst'], bm.fmt(r['tolerance'], 'g'), 'yes' if r['passed'] else 'NO',
          f'error: {r["reference_error"]}' if isinstance(r['reference_error'], str)
          else bm.fmt(r['reference_error'], '.2e')] for r in rows])


def speed_table(rows: Sequence[Dict[str, Any]]) -> str:
    return bm.table(
        ['model', 'case', 'dtype', 'ms per batch', 'img/s', 'peak MiB', 'x reference',
         'peak / reference', 'x Swin-T', 'peak / Swin-T'],
        [[r['model'], r['case'], r['dtype'],
          bm.fmt(r['ms'], '.1f') if r['exception'] is None else f'error: {r["exception"]}',
          bm.fmt(r['img_per_s'], '.1f'), bm.fmt(r['peak_mib'], '.0f')] +
         [bm.fmt(r.get(k), '.2f') for k in ('speedup_vs_reference', 'memory_vs_reference',
                                            'speedup_vs_swin-t', 'memory_vs_swin-t')]
         for r in rows])


def environment(device: torch.device, command: str) -> Dict[str, Any]:
    """Versions, device, date and command of this run."""

    def version(name: str) -> Optional[str]:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(name)
        return None

    env = dict(bm.machine_info(torch.get_num_threads(), command), device=str(device),
               cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
               mmengine=version('mmengine'), mmcv=version('mmcv') or version('mmcv-lite'),
               mmdet=version('mmdet'), gpu=None,
               speed_tf32=dict(matmul=torch.backends.cuda.matmul.allow_tf32,
                               cudnn=torch.backends.cudnn.allow_tf32))
    if device.type == 'cuda':
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   capability=f'{props.major}.{props.minor}')
    return env


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return [_json_safe(v) for v in value] if isinstance(value, (list, tuple)) else value


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
    try:
        os.makedirs(osp.dirname(args.out) or '.', exist_ok=True)
    except OSError as err:
        print(f'gpu_check: --out {args.out}: cannot create its folder ({err})', file=sys.stderr)
        return 2
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f'[{time.perf_counter() - start:7.1f} s] {message}', file=sys.stderr, flush=True)

    log(f'{device} ({torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"})')
    checks = [row for name in (args.archs or ARCHS) if args.checks
              for row in check_model(name, args.sizes, args.dtypes, device, 0, log)]
    speed, notes = [], []
    if args.speed:
        keys = [f'{f}:{a}' for f, a in (('rest', args.speed_arch), ('rest-ref', args.speed_arch),
                                        ('restv2', 'tiny'), ('restv2-ref', 'tiny'))]
        try:
            import mmdet.models  # noqa: F401  (Swin-T)
            keys.append(SWIN)
        except Exception as err:  # noqa: BLE001  (mmdet absent or broken: a note)
            notes.append(f'{bm.label(SWIN)} skipped: mmdet not importable ({error_text(err)})')
        speed = speed_rows(keys, args.speed_cases, args.speed_dtypes, device, args.warmup,
                           args.min_run_time, log)
    failed = [r for r in checks if not r['passed']]
    raised = [r for r in speed if r['exception']]
    command = 'python tools/analysis/gpu_check.py' + (' ' + shlex.join(argv) if argv else '')
    result = dict(environment=environment(device, command), passed=not failed and not raised,
                  tolerances=TOLERANCES, checks=checks, speed=speed, notes=notes,
                  elapsed_s=round(time.perf_counter() - start, 1))
    if checks:
        print('## Agreement: default vs reference attention\n\n' + checks_table(checks) + '\n')
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
