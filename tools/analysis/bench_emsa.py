"""Micro-benchmark of the EMSA attention core: ``emsa_reference`` vs ``emsa_fused``.

Times the attention core (scores, head mixing, softmax, instance norm, ``@ v``) alone,
for the four stages of ResT-small at an 800x1344 input, forward only and forward +
backward. Every case runs in a fresh subprocess so that its peak memory can be read
from the process's peak RSS (``ru_maxrss``) minus the RSS after the inputs were made.

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
import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List

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


def _rss_mib() -> float:
    """Current resident set size of this process in MiB."""
    with open('/proc/self/statm') as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_case(stage: int, impl: str, mode: str, batch: int, runs: int, warmup: int,
             threads: int, block_size: int = 0, clock: str = 'wall') -> dict:
    """Run one case in this process and return its timing and memory.

    Args:
        stage (int): ResT stage, 1 to 4.
        impl (str): ``'reference'`` or ``'fused'``.
        mode (str): ``'fwd'`` (no autograd) or ``'fwd+bwd'``.
        batch (int): Batch size.
        runs (int): Timed runs; the median is reported.
        warmup (int): Untimed runs before them.
        threads (int): ``torch.set_num_threads``.
        block_size (int): Query rows per block of the fused kernel; 0 picks the
            default. Defaults to 0.
        clock (str): ``'wall'`` (``time.perf_counter``) or ``'cpu'``
            (``time.process_time``: CPU time of this process, which counts the work
            rather than waits for a busy machine's cores; use it with one thread).
            Defaults to 'wall'.

    Returns:
        dict: ``ms`` (median time), ``ms_all`` and ``peak_mib`` (peak RSS growth).
    """
    import torch

    from mmrest.models.layers.emsa import emsa_reference
    from mmrest.models.layers.emsa_ops import emsa_fused

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    N, M, C, h = STAGES[stage]
    d = C // h
    scale = d**-0.5
    # q, k, v in the layouts the linear layers of EMSA produce them in.
    q_base = torch.randn(batch, N, h, d)
    kv_base = torch.randn(batch, M, 2, h, d)
    weight = torch.randn(h, h, 1, 1) * h**-0.5 if h > 1 else None
    bias = torch.randn(h) * h**-0.5 if h > 1 else None
    grad = torch.randn(batch, h, N, d) if mode == 'fwd+bwd' else None
    train = mode == 'fwd+bwd'
    for t in (q_base, kv_base, weight, bias):
        if t is not None:
            t.requires_grad_(train)

    def attend():
        q = q_base.transpose(1, 2)
        k, v = kv_base.permute(2, 0, 3, 1, 4).unbind(0)
        if impl == 'reference':
            return emsa_reference(q, k, v, scale, weight, bias)
        return emsa_fused(q, k, v, scale, weight, bias,
                          block_size=block_size or None)

    def step():
        if train:
            attend().backward(grad)
            for t in (q_base, kv_base, weight, bias):
                if t is not None:
                    t.grad = None
        else:
            with torch.no_grad():
                attend()

    rss0 = _rss_mib()
    times = _time(step, runs, warmup,
                  time.perf_counter if clock == 'wall' else time.process_time)
    return dict(ms=statistics.median(times), ms_all=times,
                peak_mib=_peak_rss_mib() - rss0)


def _time(fn: Callable[[], None], runs: int, warmup: int,
          clock: Callable[[], float] = time.perf_counter) -> List[float]:
    """Times of ``runs`` calls in ms by ``clock``, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = clock()
        fn()
        times.append((clock() - start) * 1e3)
    return times


def main() -> None:
    """Parse arguments, run every case in a subprocess and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--stages', type=int, nargs='+', default=sorted(STAGES))
    parser.add_argument('--modes', nargs='+', choices=MODES, default=list(MODES))
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--runs', type=int, default=5)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--block-size', type=int, default=0,
                        help='query rows per block of the fused kernel (0: default)')
    parser.add_argument('--clock', choices=('wall', 'cpu'), default='wall',
                        help='wall time, or CPU time of the process (for one thread '
                        'on a busy machine)')
    parser.add_argument('--worker', nargs=3, metavar=('STAGE', 'IMPL', 'MODE'),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        stage, impl, mode = args.worker
        print(json.dumps(run_case(int(stage), impl, mode, args.batch, args.runs,
                                  args.warmup, args.threads, args.block_size,
                                  args.clock)))
        return

    print(f'EMSA attention core, ResT-small at 800x1344, batch {args.batch}, '
          f'{args.threads} threads, median {args.clock} time of {args.runs} runs')
    header = (f'{"stage":>5} {"N":>6} {"M":>5} {"h":>2} {"mode":>8} | '
              f'{"ref ms":>8} {"fused ms":>8} {"speedup":>7} | '
              f'{"ref MiB":>8} {"fused MiB":>9} {"mem x":>6}')
    print(header)
    print('-' * len(header))
    for stage in args.stages:
        N, M, C, h = STAGES[stage]
        for mode in args.modes:
            res = {}
            for impl in IMPLS:
                cmd = [sys.executable, __file__, '--worker', str(stage), impl, mode,
                       '--batch', str(args.batch), '--runs', str(args.runs),
                       '--warmup', str(args.warmup), '--threads', str(args.threads),
                       '--block-size', str(args.block_size), '--clock', args.clock]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True)
                res[impl] = json.loads(out.stdout.strip().splitlines()[-1])
            ref, fused = res['reference'], res['fused']
            print(f'{stage:>5} {N:>6} {M:>5} {h:>2} {mode:>8} | '
                  f'{ref["ms"]:>8.1f} {fused["ms"]:>8.1f} '
                  f'{ref["ms"] / fused["ms"]:>6.2f}x | '
                  f'{ref["peak_mib"]:>8.0f} {fused["peak_mib"]:>9.0f} '
                  f'{fused["peak_mib"] / max(ref["peak_mib"], 1e-9):>6.2f}',
                  flush=True)


if __name__ == '__main__':
    main()
