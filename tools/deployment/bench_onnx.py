"""Latency of a ResT backbone: ONNX Runtime (CPU execution provider) vs PyTorch eager.

ResT: An Efficient Transformer for Visual Recognition (Zhang & Yang, NeurIPS 2021,
https://arxiv.org/abs/2105.13677); authors' code: https://github.com/wofmanaf/ResT.

One run: the backbone is exported once with dynamic shapes (``export_onnx.py``; or
``--onnx`` names an export of the same weights), then each engine runs in a worker
process of its own, with the same number of intra-op threads and its default threading
(two thread pools in one process would spin against each other: measured here, eager
PyTorch at 800x1344 ran 4x slower next to an ONNX Runtime session). Per case (batch x
height x width) each worker runs once (the outputs of the two are compared), then the
workers are timed in interleaved rounds, one ``torch.utils.benchmark``
``blocked_autorange`` of each per round, so that the machine's drifting speed hits them
alike; the median of the rounds is reported. PyTorch runs the default fused attention;
ONNX Runtime runs the exported graph, whose attention is the dense, shape-generic form.

Example (the README "Deployment: ONNX" table)::

    python tools/deployment/bench_onnx.py --arch small --out work_dirs/bench_onnx.json
"""
import argparse
import json
import os
import os.path as osp
import statistics
import subprocess
import sys
import tempfile
from typing import List, Optional, Sequence, Tuple

HERE = osp.dirname(osp.abspath(__file__))
REPO = osp.dirname(osp.dirname(HERE))
for path in (REPO, HERE, osp.join(REPO, 'tools', 'analysis')):
    if path not in sys.path:
        sys.path.insert(0, path)

DEFAULT_CASES = ('1x224x224', '16x224x224', '1x800x1344')
ENGINES = ('eager', 'onnxruntime')


def parse_case(text: str) -> Tuple[int, int, int]:
    """``'BxHxW'`` -> (B, H, W)."""
    try:
        b, h, w = (int(v) for v in text.lower().split('x'))
    except ValueError:
        raise argparse.ArgumentTypeError(f'a case is BxHxW, e.g. 1x224x224; got {text!r}')
    if min(b, h, w) < 1:
        raise argparse.ArgumentTypeError(f'a case needs positive sizes, got {text!r}')
    return b, h, w


# ---------------------------------------------------------------------------- worker
def _engine(kind: str, arch: str, weights: str, onnx_path: str, threads: int):
    """``fn(x) -> list of numpy outputs`` of one engine."""
    import torch
    torch.set_num_threads(threads)
    if kind == 'eager':
        import export_onnx
        model = export_onnx.backbone_spec(arch, None).module
        model.model.load_state_dict(torch.load(weights, weights_only=True))

        def run(x):
            with torch.no_grad():
                return [o.numpy() for o in model(x)]
        return run
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    sess = ort.InferenceSession(onnx_path, options, providers=['CPUExecutionProvider'])
    return lambda x: sess.run(None, {'input': x.numpy()})


def worker(kind: str, arch: str, weights: str, onnx_path: str, threads: int) -> None:
    """Serve JSON commands on stdin: ``{"case": [B, H, W], "save": PATH}`` runs once and
    saves the outputs; ``{"case": ..., "min_run_time": S}`` answers the median seconds."""
    import numpy as np
    import torch
    from torch.utils.benchmark import Timer
    run = _engine(kind, arch, weights, onnx_path, threads)
    for line in sys.stdin:
        cmd = json.loads(line)
        b, h, w = cmd['case']
        x = torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(0))
        if 'save' in cmd:
            np.savez(cmd['save'], *run(x))
            reply = dict(ok=True)
        else:
            timer = Timer('run(x)', globals=dict(run=run, x=x), num_threads=threads)
            reply = dict(median=timer.blocked_autorange(min_run_time=cmd['min_run_time']).median)
        print(json.dumps(reply), flush=True)


class Worker:
    """A worker process of one engine (this script with ``--worker``)."""

    def __init__(self, kind: str, arch: str, weights: str, onnx_path: str,
                 threads: int) -> None:
        from benchmark import worker_env
        self.proc = subprocess.Popen(
            [sys.executable, osp.abspath(__file__), '--worker', kind, arch, weights,
             onnx_path, str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env=worker_env(threads), text=True)

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + '\n')
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f'the benchmark worker {self.proc.args[3]} died (exit '
                               f'status {self.proc.wait()})')
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


# ---------------------------------------------------------------------------- parent
def run(arch: str, cases: Sequence[Tuple[int, int, int]], threads: int, rounds: int,
        checkpoint: Optional[str] = None, onnx_path: Optional[str] = None,
        min_run_time: float = 0.5) -> dict:
    """Measure every case; returns the report (machine, cases with times and errors)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    import export_onnx
    from benchmark import machine_info

    info = machine_info(threads, 'cpu', ' '.join(sys.argv))
    info.update(onnxruntime=ort.__version__)
    torch.manual_seed(0)
    spec = export_onnx.backbone_spec(arch, checkpoint)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        weights = osp.join(tmp, 'weights.pth')
        torch.save(spec.module.model.state_dict(), weights)
        if onnx_path is None:
            onnx_path = export_onnx.export_onnx(spec, osp.join(tmp, 'backbone.onnx'))
        workers = {k: Worker(k, arch, weights, onnx_path, threads) for k in ENGINES}
        try:
            for case in cases:
                outs = {}
                for kind, w in workers.items():
                    w.ask(case=case, save=osp.join(tmp, f'{kind}.npz'))
                    with np.load(osp.join(tmp, f'{kind}.npz')) as f:
                        outs[kind] = [f[k] for k in sorted(f.files, key=lambda s: int(s[4:]))]
                err = max(float(np.abs(o - e).max() / np.abs(e).max())
                          for o, e in zip(outs['onnxruntime'], outs['eager']))
                times = {k: [] for k in ENGINES}
                for _ in range(rounds):
                    for kind, w in workers.items():
                        times[kind].append(w.ask(case=case, min_run_time=min_run_time)['median'])
                medians = {k: statistics.median(v) for k, v in times.items()}
                b, h, w_ = case
                results.append(dict(batch=b, height=h, width=w_, times=times, median=medians,
                                    speedup=medians['eager'] / medians['onnxruntime'],
                                    max_rel_error=err))
        finally:
            for w in workers.values():
                w.close()
    info['load_average_after'] = list(os.getloadavg())
    return dict(arch=arch, machine=info, rounds=rounds, cases=results)


def format_report(report: dict) -> str:
    """A markdown table of the report."""
    m = report['machine']
    lines = [
        f"ResT-{report['arch']} backbone, fp32, {m['threads']} threads each, {m['cpu']} "
        f"({m['logical_cpus']} logical CPUs), torch {m['torch']}, onnxruntime "
        f"{m['onnxruntime']}, {m['date']}, load average {m['load_average'][0]:.2f} before, "
        f"{m['load_average_after'][0]:.2f} after; median of {report['rounds']} "
        'interleaved rounds', '',
        '| input | PyTorch eager, ms (min-max) | ONNX Runtime CPU, ms (min-max) | eager / ORT '
        '| max error / output scale |', '|---|---:|---:|---:|---:|'
    ]
    def ms(case: dict, kind: str) -> str:
        t = case['times'][kind]
        return (f"{1e3 * case['median'][kind]:.1f} ({1e3 * min(t):.1f}-{1e3 * max(t):.1f})")

    for c in report['cases']:
        lines.append(f"| {c['batch']}x3x{c['height']}x{c['width']} | {ms(c, 'eager')} | "
                     f"{ms(c, 'onnxruntime')} | {c['speedup']:.2f} | "
                     f"{c['max_rel_error']:.1e} |")
    return '\n'.join(lines)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description='ONNX Runtime vs PyTorch eager latency of a ResT backbone')
    parser.add_argument('--arch', default='small', help='backbone arch (export_onnx.py)')
    parser.add_argument('--checkpoint', help='weights (default: random; latency does not '
                        'depend on them)')
    parser.add_argument('--onnx', help='an existing export of the same weights (default: '
                        'export here, dynamic shapes)')
    parser.add_argument('--cases', nargs='+', type=parse_case,
                        default=[parse_case(c) for c in DEFAULT_CASES],
                        help='inputs as BxHxW; default: ' + ' '.join(DEFAULT_CASES))
    parser.add_argument('--threads', type=int, default=os.cpu_count(),
                        help='intra-op threads of each engine (default: all CPUs)')
    parser.add_argument('--rounds', type=int, default=5, help='timed rounds per case')
    parser.add_argument('--min-run-time', type=float, default=0.5,
                        help='seconds of blocked_autorange per engine and round')
    parser.add_argument('--out', help='also write the report as JSON here')
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.threads < 1:
        parser.error('--rounds and --threads must be >= 1')
    return args


def main(argv: Optional[List[str]] = None) -> dict:
    """Run the measurement, print the table, write the JSON; returns the report."""
    args = parse_args(argv)
    report = run(args.arch, args.cases, args.threads, args.rounds, args.checkpoint,
                 args.onnx, args.min_run_time)
    print(format_report(report))
    if args.out:
        os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
        with open(args.out, 'w', encoding='utf-8') as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == '__main__':
    if len(sys.argv) == 7 and sys.argv[1] == '--worker':
        worker(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6]))
    else:
        main()
