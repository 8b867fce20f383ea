"""Whole-backbone speed and memory benchmark: ResT (fused and reference EMSA) vs mmdet peers.

Measures, in one run so that the ratios are fair:

* every ResT arch with the default fused EMSA (``attn_impl='fused'``) and with the
  straightforward reference (``attn_impl='reference'``);
* mmdet's PVT-tiny, PVTv2-b1 and Swin-T backbones, built from mmdet's own RetinaNet /
  Mask R-CNN configs (``mmdet::pvt/retinanet_pvt-t_fpn_1x_coco.py``,
  ``mmdet::pvt/retinanet_pvtv2-b1_fpn_1x_coco.py``,
  ``mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py``);

all as backbones returning their four stages, randomly initialised (no weights are read),
fp32, eager, in three cases:

* ``infer_224``: inference, 224x224, batch 16 (images/s);
* ``infer_800``: inference, 800x1344, batch 1 (s/image);
* ``train_800``: a training step, 800x1344, batch 2: forward in train mode, the loss
  ``sum(out.mean() for out in outputs)``, backward (s/step; no optimizer step).

Method: every (model, case) runs in its own subprocess of this script with a fixed
number of threads (``torch.set_num_threads`` and ``OMP_NUM_THREADS``), which builds the
model and does a few untimed warm-up runs. The models of a case are then timed in
interleaved rounds, one run of each per round (the order rotating), and the median per
model is reported (``torch.inference_mode`` for inference): on a shared machine the speed
drifts by 10% and more within minutes, and timing the models one after another turned
that drift into their ratios. Memory is the subprocess's peak resident set size
(``ru_maxrss``) over its whole life, i.e. imports, model, input and the case's runs; the
RSS just before the first run (the baseline) is reported too. On a GPU (``--device
cuda``) ``torch.cuda.max_memory_allocated`` of the case is reported as well.

Efficiency: the model's multiply-accumulates (MACs) per image are counted with
``tools/analysis/get_flops.py`` (mmengine's FlopAnalyzer on a trace; ResT traced with
``attn_impl='reference'`` so that the attention matmuls are seen; ResT-small at 800x1344:
87.5 G MACs). Achieved GFLOP/s = 2 FLOPs per MAC x MACs / time, for a training step
3 x the forward MACs (backward = 2 x forward). It is compared with the rate of a 2048^3
fp32 matrix product (2 x 2048^3 FLOPs) measured in the same run with the same threads.

Examples::

    python tools/analysis/benchmark.py --out work_dirs/benchmark.json    # everything
    python tools/analysis/benchmark.py --quick                           # smoke run, < 1 min
    python tools/analysis/benchmark.py --models rest rest-ref --archs small \\
        --cases infer_800 --repeats 5
"""
import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import os.path as osp
import platform
import resource
import select
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
ARCHS = ('lite', 'small', 'base', 'large')
#: Model families: ``rest`` (fused EMSA) and ``rest-ref`` (reference EMSA) expand into one
#: model per ``--archs`` entry; the others are mmdet backbones.
MODEL_FAMILIES = ('rest', 'rest-ref', 'pvt-t', 'pvtv2-b1', 'swin-t')
#: mmdet configs whose ``model.backbone`` defines each peer.
PEER_CONFIGS = {
    'pvt-t': 'pvt/retinanet_pvt-t_fpn_1x_coco.py',
    'pvtv2-b1': 'pvt/retinanet_pvtv2-b1_fpn_1x_coco.py',
    'swin-t': 'swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py',
}
PEER_NAMES = {'pvt-t': 'mmdet PVT-tiny', 'pvtv2-b1': 'mmdet PVTv2-b1',
              'swin-t': 'mmdet Swin-T'}
RESULT_TAG = 'BENCHMARK_RESULT '
READY_TAG = 'BENCHMARK_READY'
TIME_TAG = 'BENCHMARK_TIME '
#: Exit status of a worker whose model raised (e.g. out of memory inside PyTorch).
WORKER_ERROR = 3


@dataclass(frozen=True)
class Case:
    """One benchmark case.

    Attributes:
        name (str): Identifier (``--cases``).
        kind (str): ``'infer'`` or ``'train'``.
        batch (int): Batch size.
        shape (tuple[int, int]): Input (H, W).
        quick_batch (int): Batch size with ``--quick``.
        quick_shape (tuple[int, int]): Input (H, W) with ``--quick``.
        repeats (int): Default number of timed runs.
        title (str): Column title in the table.
    """
    name: str
    kind: str
    batch: int
    shape: Tuple[int, int]
    quick_batch: int
    quick_shape: Tuple[int, int]
    repeats: int
    title: str


CASES: Dict[str, Case] = {
    c.name: c
    for c in (
        Case('infer_224', 'infer', 16, (224, 224), 2, (64, 64), 5, 'inference'),
        Case('infer_800', 'infer', 1, (800, 1344), 1, (96, 160), 3, 'inference'),
        Case('train_800', 'train', 2, (800, 1344), 2, (96, 160), 3, 'training step'),
    )
}
#: Models timed in the training case unless ``--train-models`` says otherwise: a training
#: step at 800x1344 takes tens of seconds per repeat (the whole matrix would not fit in
#: 25 minutes on 2 cores), and the reference's keeps every attention map of the batch for
#: backward (about 11 GB for small, more than 24 GB for large).
DEFAULT_TRAIN_MODELS = ('rest-small', 'rest-small-ref', 'swin-t')
QUICK_ARCHS = ('small', )
QUICK_FAMILIES = ('rest', 'rest-ref')
MATMUL_SIZE, QUICK_MATMUL_SIZE = 2048, 256
#: Training step FLOPs as a multiple of the forward FLOPs (backward = 2 x forward).
TRAIN_FLOPS_FACTOR = 3


# ----------------------------------------------------------------------------- models
@dataclass(frozen=True)
class ModelSpec:
    """A model to benchmark.

    Attributes:
        key (str): Identifier in the results, e.g. ``'rest-small'``, ``'rest-small-ref'``,
            ``'swin-t'``.
        label (str): Name in the table.
        family (str): Entry of :data:`MODEL_FAMILIES`.
        arch (str, optional): ResT arch. Defaults to None.
    """
    key: str
    label: str
    family: str
    arch: Optional[str] = None

    @property
    def flops_key(self) -> str:
        """Models with the same FLOPs share this key (fused and reference ResT)."""
        return f'rest-{self.arch}' if self.family.startswith('rest') else self.key


def model_specs(families: Sequence[str], archs: Sequence[str]) -> List[ModelSpec]:
    """The models of ``families``; ResT families expand into one model per arch.

    Args:
        families (Sequence[str]): Entries of :data:`MODEL_FAMILIES`.
        archs (Sequence[str]): ResT archs.

    Returns:
        list[ModelSpec]: The models, ResT (fused, then reference) first.
    """
    specs = []
    for arch in archs:
        if 'rest' in families:
            specs.append(ModelSpec(f'rest-{arch}', f'ResT-{arch}', 'rest', arch))
    for arch in archs:
        if 'rest-ref' in families:
            specs.append(ModelSpec(f'rest-{arch}-ref', f'ResT-{arch} reference', 'rest-ref',
                                   arch))
    for family in MODEL_FAMILIES[2:]:
        if family in families:
            specs.append(ModelSpec(family, PEER_NAMES[family], family))
    return specs


def peer_backbone_cfg(family: str) -> dict:
    """The backbone dict of a peer's mmdet config, with no pretrained weights.

    All four stages are returned (``out_indices=(0, 1, 2, 3)``) as for ResT.

    Args:
        family (str): ``'pvt-t'``, ``'pvtv2-b1'`` or ``'swin-t'``.

    Returns:
        dict: A JSON-serialisable config of the mmdet backbone.

    Raises:
        FileNotFoundError: If mmdet's config is not installed.
    """
    from mmengine.config import Config
    spec = importlib.util.find_spec('mmdet')
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f'mmdet is not installed; it is needed for {family}')
    path = osp.join(spec.submodule_search_locations[0], '.mim', 'configs',
                    PEER_CONFIGS[family])
    if not osp.isfile(path):
        raise FileNotFoundError(f'mmdet config of {family} not found: {path}')
    backbone = Config.fromfile(path).model.backbone.to_dict()
    backbone['init_cfg'] = None
    backbone['out_indices'] = [0, 1, 2, 3]
    backbone.pop('pretrained', None)
    return json.loads(json.dumps(backbone))


def build_model(spec: Dict[str, Any]) -> Any:
    """Build and initialise a model from a worker spec (ResT or an mmdet backbone).

    Args:
        spec (dict): ``family`` and ``arch`` (ResT) or ``cfg`` (mmdet backbone dict).

    Returns:
        nn.Module: The randomly initialised model.
    """
    import torch
    torch.manual_seed(0)
    if spec['family'] in ('rest', 'rest-ref'):
        from mmrest.models import ResT
        impl = 'fused' if spec['family'] == 'rest' else 'reference'
        model = ResT(arch=spec['arch'], attn_impl=impl)
    else:
        import mmdet.models  # noqa: F401  (registers the backbones)
        from mmdet.registry import MODELS
        model = MODELS.build(spec['cfg'])
    model.init_weights()
    return model


# ----------------------------------------------------------------------------- worker
def _rss_bytes() -> int:
    """Current resident set size of this process in bytes."""
    with open('/proc/self/statm') as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize()


def _peak_rss_bytes() -> int:
    """Peak resident set size of this process in bytes (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _set_threads(threads: int) -> None:
    import torch
    torch.set_num_threads(threads)


def _timed_runs(step: Callable[[], None], warmup: int, repeats: int,
                sync: Callable[[], None]) -> Tuple[List[float], List[float]]:
    """Wall-clock and process CPU seconds of ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        step()
    sync()
    times, cpu_times = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        sync()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    return times, cpu_times


def _prepare_case(spec: Dict[str, Any]) -> Tuple[Callable[[], None], Callable[[], None],
                                                Any, List[List[int]]]:
    """Model, input and the step of one (model, case): returns ``(step, sync, device,
    out_shapes)``; ``out_shapes`` fills in on the first step."""
    import torch
    _set_threads(spec['threads'])
    device = torch.device(spec['device'])
    model = build_model(spec['model']).to(device)
    x = torch.randn(spec['batch'], 3, *spec['shape'], device=device)
    cuda = device.type == 'cuda'
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    out_shapes: List[List[int]] = []

    if spec['kind'] == 'infer':
        model.eval()

        def step() -> None:
            with torch.inference_mode():
                outs = model(x)
            if not out_shapes:
                out_shapes.extend(list(o.shape) for o in outs)
    else:
        model.train()

        def step() -> None:
            model.zero_grad(set_to_none=True)
            outs = model(x)
            loss = sum(o.mean() for o in outs)
            loss.backward()
            if not out_shapes:
                out_shapes.extend(list(o.shape) for o in outs)

    sync()
    return step, sync, device, out_shapes


def serve_case(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Serve timed runs of one (model, case) on request, for interleaved rounds.

    After the model, the input and the warm-up runs it prints ``READY``; then every
    ``run`` line on stdin times one run and prints ``TIME`` with its wall-clock and CPU
    seconds as JSON, until a ``done`` line.

    Args:
        spec (dict): ``model`` (a :func:`build_model` spec), ``kind``, ``batch``,
            ``shape``, ``warmup``, ``threads``, ``device``.

    Returns:
        dict: ``baseline_rss`` (bytes, after imports, model and input), ``peak_rss``
        (bytes, the process's peak), ``cuda_max_allocated`` (bytes or None) and
        ``out_shapes``; the times are the parent's (:func:`run_interleaved`).
    """
    import torch
    step, sync, device, out_shapes = _prepare_case(spec)
    baseline = _rss_bytes()
    cuda = device.type == 'cuda'
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    _timed_runs(step, spec['warmup'], 0, sync)
    print(READY_TAG, flush=True)
    for line in sys.stdin:
        if line.strip() != 'run':
            break
        times, cpu_times = _timed_runs(step, 0, 1, sync)
        print(TIME_TAG + json.dumps(dict(time=times[0], cpu_time=cpu_times[0])),
              flush=True)
    return dict(baseline_rss=baseline, peak_rss=_peak_rss_bytes(),
                cuda_max_allocated=torch.cuda.max_memory_allocated(device) if cuda else None,
                out_shapes=out_shapes)


def run_matmul(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Rate of an ``n x n @ n x n`` fp32 matrix product (2 n^3 FLOPs), median of runs.

    Args:
        spec (dict): ``size``, ``warmup``, ``repeats``, ``threads``, ``device``.

    Returns:
        dict: ``size``, ``times``, ``median`` (s) and ``gflops`` (GFLOP/s).
    """
    import torch
    _set_threads(spec['threads'])
    device = torch.device(spec['device'])
    n = spec['size']
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device)
    b = torch.randn(n, n, generator=gen).to(device)
    out = torch.empty(n, n, device=device)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    times, _ = _timed_runs(lambda: torch.matmul(a, b, out=out), max(spec['warmup'], 1),
                           spec['repeats'], sync)
    median = statistics.median(times)
    return dict(size=n, times=times, median=median, gflops=2 * n**3 / median / 1e9)


def _load_get_flops() -> Any:
    path = osp.join(ROOT, 'tools', 'analysis', 'get_flops.py')
    module_spec = importlib.util.spec_from_file_location('mmrest_get_flops', path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def run_flops(spec: Dict[str, Any]) -> Dict[str, Any]:
    """MACs per image of models at input shapes (batch 1), with get_flops.py's convention.

    ResT is counted with ``attn_impl='reference'`` (same function as the fused one).

    Args:
        spec (dict): ``threads`` and ``items``: a list of ``{'key', 'model', 'shape'}``.

    Returns:
        dict: ``macs``: ``{key: {'HxW': MACs}}``, and ``errors`` of items that failed.
    """
    import torch
    _set_threads(spec['threads'])
    count_complexity = _load_get_flops().count_complexity
    macs: Dict[str, Dict[str, int]] = {}
    errors: Dict[str, str] = {}
    for item in spec['items']:
        model_spec = dict(item['model'])
        if model_spec['family'] == 'rest':
            model_spec['family'] = 'rest-ref'
        shape = item['shape']
        tag = f'{shape[0]}x{shape[1]}'
        try:
            model = build_model(model_spec)
            model.eval()  # not chained: mmdet's SwinTransformer.train returns None
            with torch.no_grad():
                c = count_complexity(model, (torch.zeros(1, 3, *shape), ))
            macs.setdefault(item['key'], {})[tag] = int(c.flops)
        except Exception as err:  # noqa: BLE001  (reported, the benchmark goes on)
            errors[f'{item["key"]} {tag}'] = f'{type(err).__name__}: {err}'
    return dict(macs=macs, errors=errors)


def run_aux(spec: Dict[str, Any]) -> Dict[str, Any]:
    """The matmul rate, then the MAC counts, in one subprocess (saves a start-up).

    Args:
        spec (dict): ``matmul``: a :func:`run_matmul` spec; ``flops``: a
            :func:`run_flops` spec or None.

    Returns:
        dict: ``matmul`` and ``flops`` results (``{'error': message}`` where one raised).
    """
    result: Dict[str, Any] = {}
    for name, job in (('matmul', run_matmul), ('flops', run_flops)):
        if spec.get(name) is None:
            continue
        try:
            result[name] = job(spec[name])
        except Exception as err:  # noqa: BLE001  (reported, the benchmark goes on)
            result[name] = dict(error=f'{type(err).__name__}: {err}')
    return result


WORKERS: Dict[str, Callable[[Dict[str, Any]], Dict[str, Any]]] = {
    'serve': serve_case, 'aux': run_aux}


def worker_main(payload: str) -> int:
    """Entry point of a worker subprocess: run one job, print its result as a JSON line.

    Args:
        payload (str): JSON with ``job`` (a key of :data:`WORKERS`) and its spec.

    Returns:
        int: Exit status: 0, or :data:`WORKER_ERROR` if the job raised.
    """
    spec = json.loads(payload)
    try:
        result = WORKERS[spec['job']](spec)
    except Exception as err:  # noqa: BLE001  (reported to the parent)
        import traceback
        traceback.print_exc()
        result = dict(error=f'{type(err).__name__}: {err}', peak_rss=_peak_rss_bytes())
        print(RESULT_TAG + json.dumps(result), flush=True)
        return WORKER_ERROR
    print(RESULT_TAG + json.dumps(result), flush=True)
    return 0


# ----------------------------------------------------------------------------- parent
def _worker_command(spec: Dict[str, Any], threads: int) -> Tuple[List[str], Dict[str, str]]:
    """Command line and environment of a worker subprocess with ``threads`` threads."""
    env = dict(os.environ)
    for var in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'OPENBLAS_NUM_THREADS'):
        env[var] = str(threads)
    env['PYTHONPATH'] = os.pathsep.join(p for p in (ROOT, env.get('PYTHONPATH')) if p)
    return [sys.executable, osp.abspath(__file__), '--worker', json.dumps(spec)], env


def _exit_message(returncode: int, stderr: str) -> str:
    """Why a worker ended without a result."""
    if returncode < 0:
        hint = ' (out of memory?)' if returncode == -9 else ''
        return f'killed by signal {-returncode}{hint}'
    tail = ' | '.join(stderr.strip().splitlines()[-3:])
    return f'exit status {returncode}: {tail}'


def run_worker(spec: Dict[str, Any], threads: int, timeout: float) -> Dict[str, Any]:
    """Run one job in a fresh subprocess of this script and return its result.

    Args:
        spec (dict): The job (see :func:`worker_main`).
        threads (int): Intra-op threads of the subprocess (also ``OMP_NUM_THREADS``).
        timeout (float): Seconds before the subprocess is killed.

    Returns:
        dict: The job's result, or ``{'error': message}`` if it failed, was killed (e.g.
        by the kernel when out of memory) or timed out.
    """
    cmd, env = _worker_command(spec, threads)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=ROOT)
    except subprocess.TimeoutExpired:
        return dict(error=f'timed out after {timeout:g} s')
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    return dict(error=_exit_message(proc.returncode, proc.stderr))


class CaseWorker:
    """A :func:`serve_case` subprocess: times one run of its (model, case) on request.

    Args:
        spec (dict): The ``serve`` job.
        threads (int): Intra-op threads of the subprocess.
        timeout (float): Seconds allowed for start-up and warm-up, and for each run.
    """

    def __init__(self, spec: Dict[str, Any], threads: int, timeout: float) -> None:
        cmd, env = _worker_command(spec, threads)
        self.timeout = timeout
        self.error: Optional[str] = None
        self._buffer = b''
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._stderr, env=env, cwd=ROOT)

    def _fail(self, message: str) -> None:
        if self.error is None:
            self.error = message
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def _readline(self) -> Optional[str]:
        """The worker's next stdout line, or None (and ``error`` set) on EOF/timeout."""
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + self.timeout
        while b'\n' not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                self._fail(f'timed out after {self.timeout:g} s')
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                self.proc.wait()
                self._stderr.seek(0)
                stderr = self._stderr.read().decode(errors='replace')
                self._fail(_exit_message(self.proc.returncode, stderr))
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b'\n', 1)
        return line.decode(errors='replace')

    def _expect(self, tag: str) -> Optional[str]:
        """The payload of the next line starting with ``tag`` (other output is skipped);
        a result line with an error (the worker raised) fails the worker."""
        while self.error is None:
            line = self._readline()
            if line is None:
                return None
            if line.startswith(tag):
                return line[len(tag):]
            if line.startswith(RESULT_TAG):
                self._fail(json.loads(line[len(RESULT_TAG):]).get(
                    'error', 'unexpected result'))
        return None

    def _send(self, command: str) -> bool:
        try:
            self.proc.stdin.write(command.encode() + b'\n')
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self._expect(READY_TAG)  # collects the exit message
            self._fail('worker exited')
            return False
        return True

    def wait_ready(self) -> bool:
        """Wait for the model, the input and the warm-up runs."""
        return self._expect(READY_TAG) is not None

    def run(self) -> Optional[Tuple[float, float]]:
        """One timed run: (wall-clock s, process CPU s), or None if the worker failed."""
        if self.error is not None or not self._send('run'):
            return None
        payload = self._expect(TIME_TAG)
        if payload is None:
            return None
        timing = json.loads(payload)
        return timing['time'], timing['cpu_time']

    def finish(self) -> Dict[str, Any]:
        """Stop the worker; its memory figures, or ``{'error': message}``."""
        if self.error is None and self._send('done'):
            payload = self._expect(RESULT_TAG)
            if payload is not None:
                self.proc.wait()
                return json.loads(payload)
        return dict(error=self.error)


def run_interleaved(jobs: Dict[str, Dict[str, Any]], repeats: int, threads: int,
                    timeout: float) -> Dict[str, Dict[str, Any]]:
    """Time several (model, case) jobs in interleaved rounds.

    Each job gets its own process; they start and warm up one after another, then every
    round times one run of each (the order rotating by one per round), so that a drift
    in the machine's speed (other tenants, thermal limits) affects all of them alike and
    their ratios stay fair. Idle workers wait on a pipe and use no CPU.

    Args:
        jobs (dict): ``serve`` jobs by model key.
        repeats (int): Rounds, i.e. timed runs per job.
        threads (int): Intra-op threads of every worker.
        timeout (float): Seconds allowed for a worker's start-up and warm-up, and for
            each run.

    Returns:
        dict: Per model key, ``times`` (s per run), ``cpu_times`` (process CPU s per
        run, all threads), ``median`` and the memory figures of :func:`serve_case`, or
        ``{'error': message}``.
    """
    workers: Dict[str, CaseWorker] = {}
    try:
        for key, job in jobs.items():
            workers[key] = CaseWorker(job, threads, timeout)
            workers[key].wait_ready()
        keys = list(jobs)
        timings: Dict[str, List[Tuple[float, float]]] = {key: [] for key in keys}
        for r in range(repeats):
            for key in keys[r % len(keys):] + keys[:r % len(keys)]:
                timing = workers[key].run()
                if timing is not None:
                    timings[key].append(timing)
        results = {}
        for key in keys:
            result = workers[key].finish()
            if 'error' not in result:
                times = [t for t, _ in timings[key]]
                result.update(times=times, cpu_times=[c for _, c in timings[key]],
                              median=statistics.median(times))
            results[key] = result
        return results
    finally:
        for worker in workers.values():
            if worker.proc.poll() is None:
                worker.proc.kill()
                worker.proc.wait()


def machine_info(threads: int, device: str) -> Dict[str, Any]:
    """CPU model, core count, threads, library versions, date and git revision."""
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    cpu = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {}
    for package in ('torch', 'mmengine', 'mmcv', 'mmdet'):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    try:
        revision = subprocess.run(['git', 'describe', '--always', '--dirty'], cwd=ROOT,
                                  capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        revision = ''
    total_mem = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    return dict(cpu=cpu, logical_cpus=os.cpu_count(), memory_bytes=total_mem,
                threads=threads, device=device, python=platform.python_version(),
                versions=versions, git=revision or None,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec='seconds'))


def _case_setup(case: Case, quick: bool) -> Tuple[int, Tuple[int, int]]:
    return (case.quick_batch, case.quick_shape) if quick else (case.batch, case.shape)


def _repeats(case: Case, args: argparse.Namespace) -> int:
    return args.repeats or (1 if args.quick else case.repeats)


def _shape_tag(shape: Sequence[int]) -> str:
    return f'{shape[0]}x{shape[1]}'


def _result_value(case: Case, median: float, batch: int) -> Dict[str, Any]:
    """Throughput in the case's unit: img/s (224), s/img (800 inference), s/step."""
    if case.name == 'infer_224':
        return dict(value=batch / median, unit='img/s')
    if case.kind == 'infer':
        return dict(value=median / batch, unit='s/img')
    return dict(value=median, unit='s/step')


GOALS = (
    # what, case, measure, numerator key, denominator key, comparison, target
    ('speed-up of ResT-small over the reference', 'infer_800', 'time', 'rest-small-ref',
     'rest-small', '>=', 2.0),
    ('speed of ResT-small relative to Swin-T', 'infer_800', 'time', 'swin-t', 'rest-small',
     '>', 1.0),
    ('peak memory of ResT-small / reference', 'infer_800', 'memory', 'rest-small',
     'rest-small-ref', '<=', 0.6),
    ('speed-up of ResT-small over the reference', 'train_800', 'time', 'rest-small-ref',
     'rest-small', '>=', 1.5),
    ('peak memory of ResT-small / reference', 'train_800', 'memory', 'rest-small',
     'rest-small-ref', '<=', 0.6),
    ('speed-up of ResT-small over the reference', 'infer_224', 'time', 'rest-small-ref',
     'rest-small', '>=', 1.1),
)
#: The efficiency aim: ResT-small's achieved rate at 800x1344 / the fp32 matmul rate.
MATMUL_FRACTION_AIM = 0.5


def _memory_of(entry: Dict[str, Any]) -> Optional[float]:
    if entry.get('cuda_max_allocated') is not None:
        return entry['cuda_max_allocated']
    return entry.get('peak_rss')


def _case_label(name: str, cases: Optional[Dict[str, Dict[str, Any]]]) -> str:
    """E.g. ``'inference 800x1344 b1'`` (the shapes actually run if ``cases`` is given)."""
    case = CASES[name]
    batch, shape = case.batch, case.shape
    if cases and name in cases:
        batch, shape = cases[name]['batch'], cases[name]['shape']
    return f'{case.title} {shape[0]}x{shape[1]} b{batch}'


def compute_ratios(results: Dict[str, Dict[str, Dict[str, Any]]],
                   matmul_gflops: Optional[float],
                   cases: Optional[Dict[str, Dict[str, Any]]] = None) -> List[Dict[str, Any]]:
    """The ratios of the issue's goals, from one run's results.

    Speed ratios are time(numerator) / time(denominator) per image or step; memory ratios
    peak(numerator) / peak(denominator) (``cuda_max_allocated`` on a GPU, else peak RSS).

    Args:
        results (dict): ``results[model_key][case_name]`` entries of :func:`run_benchmark`.
        matmul_gflops (float, optional): The measured matrix-product rate.
        cases (dict, optional): The report's ``cases`` (batch and shape actually run),
            used in the names. Defaults to None (the standard cases).

    Returns:
        list[dict]: ``name``, ``case``, ``numerator``, ``denominator``, ``value`` (None if
        an entry is missing or failed), ``comparison``, ``target`` and ``met`` (bool or
        None).
    """
    ratios = []
    for what, case, measure, num, den, comparison, target in GOALS:
        a, b = results.get(num, {}).get(case, {}), results.get(den, {}).get(case, {})
        value = None
        if 'error' not in a and 'error' not in b and a and b:
            if measure == 'time':
                value = a['median'] / a['batch'] / (b['median'] / b['batch'])
            else:
                value = _memory_of(a) / _memory_of(b)
        met = None if value is None else {
            '>=': value >= target, '>': value > target, '<=': value <= target}[comparison]
        ratios.append(dict(name=f'{_case_label(case, cases)}: {what}', case=case,
                           numerator=num, denominator=den, value=value,
                           comparison=comparison, target=target, met=met))
    entry = results.get('rest-small', {}).get('infer_800', {})
    value = None
    if matmul_gflops and entry.get('gflops'):
        value = entry['gflops'] / matmul_gflops
    ratios.append(dict(
        name=f'{_case_label("infer_800", cases)}: GFLOP/s of ResT-small / fp32 matmul rate',
        case='infer_800', numerator='rest-small', denominator='matmul', value=value,
        comparison='>=', target=MATMUL_FRACTION_AIM,
        met=None if value is None else value >= MATMUL_FRACTION_AIM, aim=True))
    return ratios


def _fmt_gib(n: Optional[float]) -> str:
    return '' if n is None else f'{n / 2**30:.2f}'


def _fmt_value(entry: Optional[Dict[str, Any]]) -> str:
    if not entry:
        return ''
    if 'error' in entry:
        return 'failed'
    value = entry['value']
    return f'{value:.1f}' if entry['unit'] == 'img/s' else f'{value:.2f}'


def format_tables(report: Dict[str, Any]) -> str:
    """Markdown tables of a :func:`run_benchmark` report: results, then goal ratios."""
    info, cases = report['machine'], report['cases']
    gpu = info['device'] != 'cpu'
    mem = 'peak CUDA alloc. (GiB)' if gpu else 'peak RSS (GiB)'
    header, rule = ['model'], ['---']
    for name, case in cases.items():
        tag = f'{case["shape"][0]}x{case["shape"][1]} b{case["batch"]}'
        unit = {'infer_224': 'img/s'}.get(name, 's/img' if case['kind'] == 'infer'
                                          else 's/step')
        header += [f'{CASES[name].title} {tag} ({unit})', mem, 'GFLOP/s (% of matmul)']
        rule += ['---:'] * 3
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join(rule) + '|']
    matmul = report.get('matmul', {}).get('gflops')
    for key, label in report['models'].items():
        row = [label]
        for name in cases:
            entry = report['results'].get(key, {}).get(name)
            row.append(_fmt_value(entry))
            if entry and 'error' not in entry:
                row.append(_fmt_gib(_memory_of(entry)))
                gf = entry.get('gflops')
                row.append('' if gf is None else
                           f'{gf:.1f}' + (f' ({100 * gf / matmul:.0f}%)' if matmul else ''))
            else:
                row += ['', '']
        lines.append('| ' + ' | '.join(row) + ' |')
    out = ['\n'.join(lines)]
    goal_lines = ['| goal | measured | target | met |', '|---|---:|---:|---|']
    for r in report['ratios']:
        value = 'n/a' if r['value'] is None else f'{r["value"]:.2f}'
        met = {True: 'yes', False: 'no', None: 'n/a'}[r['met']]
        if r.get('aim'):
            met += ' (aim)'
        goal_lines.append(f'| {r["name"]} | {value} | {r["comparison"]} {r["target"]:g} | '
                          f'{met} |')
    out.append('\n'.join(goal_lines))
    if matmul:
        m = report['matmul']
        out.append(f'fp32 matmul {m["size"]}^3: {matmul:.1f} GFLOP/s. GFLOP/s = 2 FLOPs per '
                   'multiply-accumulate x MACs / time (training step: 3 x forward MACs).')
    machine = (f'Machine: {info["cpu"]}, {info["logical_cpus"]} logical CPUs, '
               f'{info["threads"]} threads, {info["device"]}, torch {info["versions"]["torch"]}'
               f', {info["date"]}.')
    out.append(machine)
    out.append(f'Command: `{report["settings"]["command"]}`; warm-up runs, then the median of '
               + ', '.join(f'{c["repeats"]} ({n})' for n, c in cases.items())
               + ' timed runs, each (model, case) in its own process, the models of a '
               'case in interleaved rounds (one run of each per round); peak RSS = the '
               'process\'s peak resident set size.')
    skipped = [f'{label} {name}' for key, label in report['models'].items()
               for name in cases if name not in report['results'].get(key, {})]
    if skipped:
        out.append('Not run (see --train-models): ' + ', '.join(skipped) + '.')
    failures = [(k, n, e['error']) for k, per in report['results'].items()
                for n, e in per.items() if 'error' in e]
    if failures:
        out.append('Failed: ' + '; '.join(f'{k} {n}: {e}' for k, n, e in failures))
    return '\n\n'.join(out)


def run_benchmark(args: argparse.Namespace,
                  log: Callable[[str], None] = lambda s: None) -> Dict[str, Any]:
    """Run every requested (model, case), the matmul rate and the FLOP counts.

    Args:
        args (argparse.Namespace): Parsed command line (see :func:`parse_args`).
        log (Callable[[str], None]): Progress messages. Defaults to discarding them.

    Returns:
        dict: The report: ``machine``, ``settings``, ``cases``, ``models``,
        ``matmul``, ``macs``, ``results`` and ``ratios``.
    """
    t_start = time.perf_counter()
    specs = model_specs(args.models, args.archs)
    cases = [CASES[name] for name in args.cases]
    cfgs: Dict[str, Dict[str, Any]] = {}
    for spec in specs:
        if spec.family in ('rest', 'rest-ref'):
            cfgs[spec.key] = dict(family=spec.family, arch=spec.arch)
        else:
            cfgs[spec.key] = dict(family=spec.family, cfg=peer_backbone_cfg(spec.family))

    report: Dict[str, Any] = dict(
        machine=machine_info(args.threads, args.device),
        settings=dict(command=' '.join([osp.relpath(osp.abspath(__file__), ROOT)] +
                                       sys.argv[1:]) if args.command is None else args.command,
                      quick=args.quick, warmup=args.warmup, repeats=args.repeats,
                      threads=args.threads, device=args.device,
                      train_models=list(args.train_models)),
        cases={}, models={s.key: s.label for s in specs}, results={})
    for case in cases:
        batch, shape = _case_setup(case, args.quick)
        report['cases'][case.name] = dict(kind=case.kind, batch=batch, shape=list(shape),
                                          warmup=args.warmup,
                                          repeats=_repeats(case, args))

    flops_job = None
    if not args.no_flops:
        items, seen = [], set()
        for case in cases:
            shape = list(_case_setup(case, args.quick)[1])
            for spec in specs:
                if (spec.flops_key, tuple(shape)) not in seen:
                    seen.add((spec.flops_key, tuple(shape)))
                    items.append(dict(key=spec.flops_key, model=cfgs[spec.key], shape=shape))
        flops_job = dict(items=items, threads=args.threads)
    log(f'fp32 matmul {args.matmul_size}^3 rate' +
        ('' if flops_job is None else
         f', MACs of {len(flops_job["items"])} (model, input shape) pairs') + ' ...')
    aux = run_worker(dict(job='aux', flops=flops_job, matmul=dict(
        size=args.matmul_size, warmup=args.warmup, repeats=max(args.repeats or 5, 3),
        threads=args.threads, device=args.device)), args.threads, args.timeout)
    matmul = aux.get('matmul', aux if 'error' in aux else {})
    counted = aux.get('flops', aux if 'error' in aux else None)
    report['matmul'] = matmul
    if 'error' in matmul:
        log(f'  matmul failed: {matmul["error"]}')
    else:
        log(f'  matmul: {matmul["gflops"]:.1f} GFLOP/s')
    macs: Dict[str, Dict[str, int]] = {}
    if counted is not None and 'error' in counted:
        log(f'  MAC counting failed: {counted["error"]}')
        report['macs_errors'] = {'all': counted['error']}
    elif counted is not None:
        macs = counted['macs']
        if counted['errors']:
            report['macs_errors'] = counted['errors']
            log(f'  MAC counting failed for: {counted["errors"]}')
    report['macs'] = macs

    for case in cases:
        batch, shape = _case_setup(case, args.quick)
        selected = [spec for spec in specs
                    if case.kind != 'train' or 'all' in args.train_models
                    or spec.key in args.train_models]
        jobs = {spec.key: dict(job='serve', model=cfgs[spec.key], kind=case.kind,
                               batch=batch, shape=list(shape), warmup=args.warmup,
                               threads=args.threads, device=args.device)
                for spec in selected}
        t0 = time.perf_counter()
        log(f'{case.name}: {len(jobs)} models, {_repeats(case, args)} interleaved rounds ...')
        entries = run_interleaved(jobs, _repeats(case, args), args.threads, args.timeout)
        for spec in selected:
            entry = entries[spec.key]
            entry['batch'] = batch
            if 'error' not in entry:
                entry.update(_result_value(case, entry['median'], batch))
                mac = macs.get(spec.flops_key, {}).get(_shape_tag(shape))
                if mac:
                    factor = TRAIN_FLOPS_FACTOR if case.kind == 'train' else 1
                    entry['macs_per_image'] = mac
                    entry['gflops'] = 2 * factor * mac * batch / entry['median'] / 1e9
                log(f'{case.name} {spec.label}: {entry["value"]:.3g} {entry["unit"]}, '
                    f'peak RSS {_fmt_gib(entry["peak_rss"])} GiB')
            else:
                log(f'{case.name} {spec.label}: FAILED {entry["error"]}')
            report['results'].setdefault(spec.key, {})[case.name] = entry
        log(f'{case.name}: {time.perf_counter() - t0:.0f} s')

    report['ratios'] = compute_ratios(report['results'], matmul.get('gflops'),
                                      report['cases'])
    report['elapsed_s'] = time.perf_counter() - t_start
    return report


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse and check the command line.

    Args:
        argv (list[str], optional): Arguments; ``sys.argv[1:]`` if None. Defaults to None.

    Returns:
        argparse.Namespace: The options, with ``--quick`` defaults filled in.
    """
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n')[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog='Cases: ' + ', '.join(
            f'{c.name} ({c.kind}, {c.shape[0]}x{c.shape[1]}, batch {c.batch})'
            for c in CASES.values()))
    parser.add_argument('--models', nargs='+', choices=MODEL_FAMILIES, default=None,
                        help='model families (default: all; with --quick: '
                        f'{" ".join(QUICK_FAMILIES)}). rest = fused EMSA, rest-ref = '
                        'the reference EMSA')
    parser.add_argument('--archs', nargs='+', choices=ARCHS, default=None,
                        help='ResT archs of rest and rest-ref (default: all; with --quick: '
                        f'{" ".join(QUICK_ARCHS)})')
    parser.add_argument('--train-models', nargs='+', default=None, metavar='MODEL',
                        choices=['all'] + [s.key for s in model_specs(MODEL_FAMILIES, ARCHS)],
                        help='of the selected models, those timed in train_800: all, or keys '
                        'such as rest-large, rest-small-ref, pvt-t (default: '
                        f'{" ".join(DEFAULT_TRAIN_MODELS)}; all with --quick)')
    parser.add_argument('--cases', nargs='+', choices=list(CASES), default=list(CASES),
                        help='cases to run (default: all)')
    parser.add_argument('--repeats', type=int, default=None,
                        help='timed runs per case, the median is reported (default: '
                        + ', '.join(f'{c.name} {c.repeats}' for c in CASES.values())
                        + '; 1 with --quick)')
    parser.add_argument('--warmup', type=int, default=None,
                        help='untimed runs before timing. Defaults to 1')
    parser.add_argument('--threads', type=int, default=2,
                        help='intra-op threads (torch.set_num_threads). Defaults to 2')
    parser.add_argument('--device', default='cpu', help='cpu or cuda[:i]. Defaults to cpu')
    parser.add_argument('--matmul-size', type=int, default=None,
                        help=f'size n of the n^3 fp32 matmul rate measurement (default: '
                        f'{MATMUL_SIZE}; {QUICK_MATMUL_SIZE} with --quick)')
    parser.add_argument('--no-flops', action='store_true',
                        help='skip counting MACs (no GFLOP/s)')
    parser.add_argument('--timeout', type=float, default=1800.,
                        help='seconds before one (model, case) subprocess is killed. '
                        'Defaults to 1800')
    parser.add_argument('--quick', action='store_true',
                        help='smoke run: tiny inputs, ResT-small (fused and reference), '
                        'one timed run (< 1 min)')
    parser.add_argument('--out', default=None, help='write the JSON report to this path')
    parser.add_argument('--command', default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.models is None:
        args.models = list(QUICK_FAMILIES if args.quick else MODEL_FAMILIES)
    if args.archs is None:
        args.archs = list(QUICK_ARCHS if args.quick else ARCHS)
    if args.train_models is None:
        args.train_models = ['all'] if args.quick else list(DEFAULT_TRAIN_MODELS)
    if args.warmup is None:
        args.warmup = 1
    if args.matmul_size is None:
        args.matmul_size = QUICK_MATMUL_SIZE if args.quick else MATMUL_SIZE
    for name in ('threads', 'matmul_size'):
        if getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")} must be >= 1, got {getattr(args, name)}')
    if args.repeats is not None and args.repeats < 1:
        parser.error(f'--repeats must be >= 1, got {args.repeats}')
    if args.warmup < 0:
        parser.error(f'--warmup must be >= 0, got {args.warmup}')
    if args.timeout <= 0:
        parser.error(f'--timeout must be > 0, got {args.timeout:g}')
    if not (args.device == 'cpu' or args.device.startswith('cuda')):
        parser.error(f'--device must be cpu or cuda[:index], got {args.device!r}')
    return args


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Command line entry point: run, print the tables, write the JSON.

    Args:
        argv (list[str], optional): Arguments; ``sys.argv[1:]`` if None. Defaults to None.

    Returns:
        dict: The report (see :func:`run_benchmark`).
    """
    args = parse_args(argv)
    if args.command is None and argv is not None:
        args.command = ' '.join(['tools/analysis/benchmark.py'] + list(argv))

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    report = run_benchmark(args, log)
    print(format_tables(report))
    if args.out:
        out_dir = osp.dirname(osp.abspath(args.out))
        os.makedirs(out_dir, exist_ok=True)
        with open(args.out, 'w') as f:
            json.dump(report, f, indent=2)
        log(f'wrote {args.out}')
    log(f'total {report["elapsed_s"]:.0f} s')
    return report


if __name__ == '__main__':
    if len(sys.argv) == 3 and sys.argv[1] == '--worker':
        sys.exit(worker_main(sys.argv[2]))
    main()
