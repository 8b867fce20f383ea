"""Profile of a backbone's training step and inference, aggregated by op family.

Runs the benchmark's cases (``tools/analysis/benchmark.py``; by default ResT-small's
training step at 800x1344, batch 2, and its inference at 224x224, batch 16) once untimed,
then once under ``torch.profiler``, and prints the self CPU time of each op family, the
forward and the backward pass separately, and the ops that took the most time.

How ops are grouped: forward hooks open a ``record_function`` range around every module
of a known family (``nn.Linear``, ``nn.LayerNorm``, depthwise and other ``nn.Conv2d``,
BatchNorm, ``nn.GELU``, the pixel attention ``PixelAttention`` and attention modules such
as ``EMSA``); an op counts in the family of the innermost such module. The ops run
directly by an attention module's forward, i.e. not by its q/kv/proj layers or its
key/value reduction conv and norm, are the attention core. Ops outside these modules are
grouped by name (matmuls, LayerNorm, GELU, softmax, copies, additions, ...). A backward op
counts in the family of the forward op whose autograd node runs it (the profiler's
sequence numbers link the two). The self time of a module range itself, the Python code
of the module between its ops (e.g. the block loop of the fused attention), counts in the
module's family too; the table of the most expensive ops shows it as ``module::<family>``.

Examples::

    python tools/analysis/profile_step.py                     # train_800 and infer_224
    python tools/analysis/profile_step.py --cases train_800 --model rest-ref
    python tools/analysis/profile_step.py --cases train_224 --shape 224 224 --batch 8
"""
import argparse
import re
import time
from collections import defaultdict
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from benchmark import CASES, MODELS, build_model, has_restv2, make_step
from torch import nn
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

LINEAR = 'linear layers (addmm, mm, bmm)'
LAYER_NORM = 'LayerNorm'
ATTENTION = 'attention core'
DW_CONV = 'depthwise conv'
CONV = 'other conv'
BATCH_NORM = 'BatchNorm'
PA = 'PA (sigmoid, mul)'
GELU = 'GELU'
COPIES = 'copies (copy_, clone, contiguous)'
SOFTMAX = 'softmax'
ADDS = 'elementwise adds'
OTHER = 'other'
FAMILIES = (LINEAR, LAYER_NORM, ATTENTION, DW_CONV, CONV, BATCH_NORM, PA, GELU, COPIES,
            SOFTMAX, ADDS, OTHER)
MODULE_RANGE = 'module::'
BACKWARD_NODE = 'autograd::engine::evaluate_function: '
#: Module class names of the pixel attention (checked before the attention modules).
PA_MODULES = ('PixelAttention', )


def module_family(module: nn.Module) -> Optional[str]:
    """The family of a module's own ops, or None for modules that only contain others."""
    name = type(module).__name__
    if name in PA_MODULES:
        return PA
    if 'MSA' in name or 'Attention' in name:  # EMSA, mmdet's WindowMSA, ...
        return ATTENTION
    if isinstance(module, nn.Linear):
        return LINEAR
    if isinstance(module, nn.LayerNorm):
        return LAYER_NORM
    if isinstance(module, nn.Conv2d):
        return DW_CONV if module.groups == module.in_channels > 1 else CONV
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return BATCH_NORM
    if isinstance(module, nn.GELU):
        return GELU
    return None


def op_family(name: str) -> str:
    """The family of an op outside the known modules, by its name.

    Takes aten names (``'aten::native_layer_norm'``) and autograd node names
    (``'NativeLayerNormBackward0'``).
    """
    op = re.sub(r'backward\d*$', '', name.split('::')[-1].replace('_', '').lower())
    if op in ('addmm', 'mm', 'bmm', 'baddbmm', 'matmul', 'linear'):
        return LINEAR
    for key, family in (('layernorm', LAYER_NORM), ('batchnorm', BATCH_NORM),
                        ('conv', CONV), ('gelu', GELU), ('softmax', SOFTMAX),
                        ('emsa', ATTENTION), ('attention', ATTENTION)):
        if key in op:
            return family
    if op in ('copy', 'clone', 'contiguous', 'tocopy', 'to'):
        return COPIES
    return ADDS if op == 'add' else OTHER


def add_module_ranges(model: nn.Module) -> List[torch.utils.hooks.RemovableHandle]:
    """Open a ``record_function('module::<family>')`` range around every family module."""
    handles, stack = [], []

    def enter(name: str) -> Callable:
        def hook(module: nn.Module, args: Tuple) -> None:
            stack.append(record_function(name))
            stack[-1].__enter__()
        # mmrest's inference shortcuts that bypass modules with hooks (folded norms,
        # the in-place PA) are still taken: what is profiled is what runs
        hook.observes_only = True
        return hook

    def leave(module: nn.Module, args: Tuple, output: object) -> None:
        stack.pop().__exit__(None, None, None)

    leave.observes_only = True

    for module in model.modules():
        family = module_family(module)
        if family is not None:
            handles += [module.register_forward_pre_hook(enter(MODULE_RANGE + family)),
                        module.register_forward_hook(leave)]
    return handles


def _ancestor(event, prefix: str):
    parent = event.cpu_parent
    while parent is not None and not parent.name.startswith(prefix):
        parent = parent.cpu_parent
    return parent


def classify(events: Iterable) -> List[Tuple[str, str, str, float]]:
    """``(phase, family, op name, self CPU us)`` of every profiler event.

    Args:
        events (Iterable[FunctionEvent]): ``prof.events()``.

    Returns:
        list[tuple]: Phase ``'forward'`` or ``'backward'`` and the family of each event.
    """
    events = sorted(events, key=lambda e: (e.time_range.start, -e.time_range.end))
    by_sequence: Dict[int, str] = {}
    rows = []
    for e in events:
        if e.name.startswith(BACKWARD_NODE):
            continue
        node = _ancestor(e, BACKWARD_NODE)
        if node is not None:
            continue
        scope = e if e.name.startswith(MODULE_RANGE) else _ancestor(e, MODULE_RANGE)
        family = scope.name[len(MODULE_RANGE):] if scope is not None else op_family(e.name)
        if e.sequence_nr >= 0:
            by_sequence.setdefault(e.sequence_nr, family)
        rows.append(('forward', family, e.name, e.self_cpu_time_total))
    for e in events:
        node = e if e.name.startswith(BACKWARD_NODE) else _ancestor(e, BACKWARD_NODE)
        if node is None:
            continue
        family = by_sequence.get(node.sequence_nr) or op_family(node.name[len(BACKWARD_NODE):])
        rows.append(('backward', family, e.name, e.self_cpu_time_total))
    return rows


def profile_case(model: nn.Module, x: torch.Tensor, train: bool) -> Tuple[list, float]:
    """One untimed step, then one under the profiler (the step of the benchmark).

    Returns:
        tuple: The :func:`classify` rows and the wall-clock seconds of the profiled step.
    """
    step = make_step(model, x, train)
    step()
    handles = add_module_ranges(model)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            step()
            wall = time.perf_counter() - start
    finally:
        for handle in handles:
            handle.remove()
    return classify(prof.events()), wall


def format_families(rows: Sequence[Tuple[str, str, str, float]]) -> str:
    """Markdown table: self CPU ms and share of the total per family and phase."""
    total = sum(r[3] for r in rows) or 1.
    phases = [p for p in ('forward', 'backward') if any(r[0] == p for r in rows)]
    sums: Dict[Tuple[str, str], float] = defaultdict(float)
    for phase, family, _, us in rows:
        sums[(phase, family)] += us
    header = ['family'] + [f'{p} {u}' for p in phases for u in ('ms', '%')]
    if len(phases) > 1:
        header += ['total ms', 'total %']
    lines = ['| ' + ' | '.join(header) + ' |', '|---' + '|---:' * (len(header) - 1) + '|']
    for family in FAMILIES + ('all', ):
        values = [sum(v for (p, f), v in sums.items() if p == phase and
                      (f == family or family == 'all')) for phase in phases]
        if len(phases) > 1:
            values.append(sum(values))
        if not any(values):
            continue
        cells = [f'{v / 1e3:.1f} | {100 * v / total:.1f}' for v in values]
        lines.append(f'| {family} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def format_top_ops(rows: Sequence[Tuple[str, str, str, float]], top: int) -> str:
    """Markdown table of the ``top`` (phase, family, op) entries by self CPU time."""
    total = sum(r[3] for r in rows) or 1.
    sums: Dict[Tuple[str, str, str], List[float]] = defaultdict(lambda: [0., 0])
    for phase, family, name, us in rows:
        sums[(phase, family, name)][0] += us
        sums[(phase, family, name)][1] += 1
    lines = ['| op | phase | family | self ms | % | calls |', '|---|---|---|---:|---:|---:|']
    for (phase, family, name), (us, calls) in sorted(sums.items(),
                                                     key=lambda kv: -kv[1][0])[:top]:
        lines.append(f'| {name} | {phase} | {family} | {us / 1e3:.1f} | '
                     f'{100 * us / total:.1f} | {calls} |')
    return '\n'.join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', choices=list(MODELS), default='rest',
                        help='model family of tools/analysis/benchmark.py (default: rest)')
    parser.add_argument('--arch', default='small', help='arch (default: small)')
    parser.add_argument('--cases', nargs='+', choices=list(CASES),
                        default=['train_800', 'infer_224'],
                        help='benchmark cases (default: train_800 infer_224)')
    parser.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'), default=None,
                        help="input size instead of the cases' own")
    parser.add_argument('--batch', type=int, default=None,
                        help="batch size instead of the cases' own")
    parser.add_argument('--threads', type=int, default=2,
                        help='intra-op threads (default: 2)')
    parser.add_argument('--top', type=int, default=15,
                        help='rows of the table of the most expensive ops (default: 15)')
    args = parser.parse_args(argv)
    if MODELS[args.model].source == 'mmrest.ResTV2' and not has_restv2():
        parser.error(f'--model {args.model}: mmrest.models has no ResTV2 in this checkout')
    archs = MODELS[args.model].archs
    if archs and args.arch not in archs:
        parser.error(f'--arch {args.arch}: {args.model} has {", ".join(archs)}')
    for name in ('batch', 'threads'):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f'--{name} must be >= 1, got {getattr(args, name)}')
    if args.shape is not None and min(args.shape) < 1:
        parser.error(f'--shape must be positive, got {args.shape}')

    torch.set_num_threads(args.threads)
    model = build_model(args.model, args.arch if archs else None)
    label = MODELS[args.model].label.format(arch=args.arch)
    for name in args.cases:
        case = CASES[name]
        batch, shape = args.batch or case.batch, tuple(args.shape or case.shape)
        x = torch.randn(batch, 3, *shape)
        rows, wall = profile_case(model, x, case.train)
        print(f'{name}: {label}, {case.title} {shape[0]}x{shape[1]}, batch {batch}, '
              f'{args.threads} threads: profiled step {wall:.2f} s wall clock, '
              f'{sum(r[3] for r in rows) / 1e6:.2f} s self CPU time of its ops\n')
        print(format_families(rows) + '\n')
        print(format_top_ops(rows, args.top) + '\n')


if __name__ == '__main__':
    main()
