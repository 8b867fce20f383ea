"""Micro-benchmark of the EMSA attention core: ``emsa_reference`` vs ``emsa_fused``.

Times the attention core (scores, head mixing, softmax, instance norm, ``@ v``) alone,
for the four stages of ResT-small at an 800x1344 input, forward only and forward +
backward, with ``torch.utils.benchmark.Timer.blocked_autorange`` (its first, untimed run
is the warm-up). Every case runs in a fresh process, so that its peak memory is the
process's peak RSS minus the RSS after the inputs were made.

Example::

    python tools/analysis/bench_emsa.py                   # batch 1, all stages
    python tools/analysis/bench_emsa.py --batch 2 --modes fwd+bwd
    python tools/analysis/bench_emsa.py --threads 1 --clock cpu   # on a busy machine

On a machine whose cores are shared with other jobs, every OpenMP fork/join can wait
for a descheduled thread (measured here: a 1M-element ``add_`` on two threads, median
0.1 ms, mean 7 ms at load 5), which penalises the many smaller ops of the blocked
kernels far more than the few large ones of the reference; ``--threads 1 --clock cpu``
then gives a fair comparison of the work done.
"""
import argparse
import sys
import time
import timeit
from typing import Any, Dict, List, Optional

from bench_process import WORKER_FLAG, peak_rss_bytes, rss_bytes, run_in_subprocess, worker_main

#: (N, M, C, heads) of the EMSA layers of ResT-small at 800x1344 (strides 4..32,
#: keys and values reduced to 25x42 tokens by sr_ratio 8, 4, 2, 1).
STAGES: Dict[int, tuple] = {
    1: (200 * 336, 25 * 42, 64, 1),
    2: (100 * 168, 25 * 42, 128, 2),
    3: (50 * 84, 25 * 42, 256, 4),
    4: (25 * 42, 25 * 42, 512, 8),
}
IMPLS = ('reference', 'fused')
MODES = ('fwd', 'fwd+bwd')


def run_case(job: Dict[str, Any]) -> Dict[str, Any]:
    """Time one (stage, impl, mode) in this process (run it in a fresh one).

    Args:
        job (dict): ``stage``, ``impl`` (``'reference'`` or ``'fused'``), ``mode``
            (``'fwd'``, without autograd, or ``'fwd+bwd'``), ``batch``, ``threads``,
            ``block_size`` (query rows per block of the fused kernel; 0 picks the
            default), ``clock`` (``'wall'``, or ``'cpu'``: the CPU time of this process,
            which counts the work rather than the waits for a busy machine's cores; use
            it with one thread) and ``min_time`` (s, of ``blocked_autorange``).

    Returns:
        dict: ``ms`` (median), ``iqr_ms``, ``runs`` and ``peak_mib`` (peak RSS growth).
    """
    import torch
    from torch.utils.benchmark import Timer

    from mmrest.models.layers.emsa import emsa_reference
    from mmrest.models.layers.emsa_ops import emsa_fused

    torch.set_num_threads(job['threads'])
    torch.manual_seed(0)
    N, M, C, h = STAGES[job['stage']]
    batch, d, train = job['batch'], C // h, job['mode'] == 'fwd+bwd'
    # q, k, v in the layouts the linear layers of EMSA produce them in.
    q_base = torch.randn(batch, N, h, d)
    kv_base = torch.randn(batch, M, 2, h, d)
    weight = torch.randn(h, h, 1, 1) * h**-0.5 if h > 1 else None
    bias = torch.randn(h) * h**-0.5 if h > 1 else None
    grad = torch.randn(batch, h, N, d) if train else None
    leaves = [t.requires_grad_(train) for t in (q_base, kv_base, weight, bias)
              if t is not None]

    def attend() -> torch.Tensor:
        q = q_base.transpose(1, 2)
        k, v = kv_base.permute(2, 0, 3, 1, 4).unbind(0)
        if job['impl'] == 'reference':
            return emsa_reference(q, k, v, d**-0.5, weight, bias)
        return emsa_fused(q, k, v, d**-0.5, weight, bias, block_size=job['block_size'] or None)

    def step() -> None:
        if train:
            attend().backward(grad)
            for t in leaves:
                t.grad = None
        else:
            with torch.no_grad():
                attend()

    rss0 = rss_bytes()
    clock = time.process_time if job['clock'] == 'cpu' else timeit.default_timer
    m = Timer('step()', globals=dict(step=step), num_threads=job['threads'],
              timer=clock).blocked_autorange(min_run_time=job['min_time'])
    return dict(ms=m.median * 1e3, iqr_ms=m.iqr * 1e3, runs=len(m.times) * m.number_per_run,
                peak_mib=(peak_rss_bytes() - rss0) / 2**20)


def main(argv: Optional[List[str]] = None) -> None:
    """Parse arguments, run every case in a fresh process and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--stages', type=int, nargs='+', choices=sorted(STAGES),
                        default=sorted(STAGES))
    parser.add_argument('--modes', nargs='+', choices=MODES, default=list(MODES))
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--min-time', type=float, default=1.0,
                        help='seconds of timed runs per case (blocked_autorange)')
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--block-size', type=int, default=0,
                        help='query rows per block of the fused kernel (0: default)')
    parser.add_argument('--clock', choices=('wall', 'cpu'), default='wall',
                        help='wall time, or CPU time of the process (for one thread '
                        'on a busy machine)')
    args = parser.parse_args(argv)
    for name in ('batch', 'threads'):
        if getattr(args, name) < 1:
            parser.error(f'--{name} must be >= 1, got {getattr(args, name)}')
    if args.block_size < 0 or args.min_time <= 0:
        parser.error('--block-size must be >= 0 and --min-time > 0')

    print(f'EMSA attention core, ResT-small at 800x1344, batch {args.batch}, '
          f'{args.threads} threads, median {args.clock} time\n')
    print('| stage | N | M | heads | mode | reference ms | fused ms | speed-up | '
          'reference MiB | fused MiB | memory ratio |')
    print('|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|')
    for stage in args.stages:
        N, M, _, h = STAGES[stage]
        for mode in args.modes:
            res = {impl: run_in_subprocess(__file__, dict(
                job='case', stage=stage, impl=impl, mode=mode, batch=args.batch,
                threads=args.threads, block_size=args.block_size, clock=args.clock,
                min_time=args.min_time), args.threads) for impl in IMPLS}
            failed = [f'{impl}: {r["error"]}' for impl, r in res.items() if 'error' in r]
            if failed:
                print(f'| {stage} | {N} | {M} | {h} | {mode} | failed: {"; ".join(failed)} |')
                continue
            ref, fused = res['reference'], res['fused']
            print(f'| {stage} | {N} | {M} | {h} | {mode} | {ref["ms"]:.1f} | '
                  f'{fused["ms"]:.1f} | {ref["ms"] / fused["ms"]:.2f}x | '
                  f'{ref["peak_mib"]:.0f} | {fused["peak_mib"]:.0f} | '
                  f'{fused["peak_mib"] / max(ref["peak_mib"], 1e-9):.2f} |', flush=True)


if __name__ == '__main__':
    if sys.argv[1:2] == [WORKER_FLAG]:
        sys.exit(worker_main({'case': run_case}, sys.argv[2:]))
    main()
