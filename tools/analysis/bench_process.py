"""One benchmark job in a fresh process, its memory, and the machine it ran on.

Shared by ``benchmark.py`` and ``bench_emsa.py``. A job is a JSON-serialisable dict; the
script that defines it is started as ``python SCRIPT --worker JOB_JSON RESULT_PATH``,
runs the job with :func:`worker_main` and writes the result dict as JSON to
``RESULT_PATH``. Nothing else passes between the processes, so a fresh process measures
each job's peak memory on its own.
"""
import datetime
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import traceback
from typing import Any, Callable, Dict, List, Mapping, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER_FLAG = '--worker'


def rss_bytes() -> int:
    """Current resident set size of this process in bytes."""
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process in bytes (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker_env(threads: int) -> Dict[str, str]:
    """The environment of a worker process: ``threads`` OpenMP/MKL threads and this
    repository first on ``PYTHONPATH``."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env['PYTHONPATH'] = os.pathsep.join(p for p in (ROOT, env.get('PYTHONPATH')) if p)
    return env


def worker_command(script: str, job: Dict[str, Any], result_path: str) -> List[str]:
    """The command line that runs ``job`` in a fresh process of ``script``."""
    return [sys.executable, os.path.abspath(script), WORKER_FLAG, json.dumps(job), result_path]


def _exit_message(returncode: int, stderr: str) -> str:
    """Why a worker ended without writing a result."""
    if returncode < 0:
        hint = ' (out of memory?)' if returncode == -9 else ''
        return f'killed by signal {-returncode}{hint}'
    tail = ' | '.join(stderr.strip().splitlines()[-3:])
    return f'exit status {returncode}: {tail}'


def run_in_subprocess(script: str, job: Dict[str, Any], threads: int,
                      timeout: Optional[float] = None) -> Dict[str, Any]:
    """Run one job in a fresh process of ``script`` and return its result.

    The process gets ``threads`` OpenMP/MKL threads (the job itself should also call
    ``torch.set_num_threads``) and this repository first on ``PYTHONPATH``.

    Args:
        script (str): Path of the script whose ``__main__`` calls :func:`worker_main`.
        job (dict): The job, JSON-serialisable.
        threads (int): ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` of the process.
        timeout (float, optional): Seconds before the process is killed; None waits
            for it. Defaults to None.

    Returns:
        dict: The job's result, or ``{'error': message}`` if it raised, was killed (e.g.
        by the kernel when out of memory) or timed out.
    """
    env = worker_env(threads)
    with tempfile.TemporaryDirectory(prefix='mmrest-bench-') as tmp:
        result_path = os.path.join(tmp, 'result.json')
        # its own session, so that a timeout also ends the processes it started (e.g.
        # torch.compile's workers)
        proc = subprocess.Popen(worker_command(script, job, result_path), env=env, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            _, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return dict(error=f'timed out after {timeout:g} s')
        if os.path.isfile(result_path):
            with open(result_path) as f:
                return json.load(f)
        return dict(error=_exit_message(proc.returncode, stderr))


def worker_main(jobs: Mapping[str, Callable[[Dict[str, Any]], Dict[str, Any]]],
                argv: List[str]) -> int:
    """Entry point of a worker process: ``argv`` is ``[JOB_JSON, RESULT_PATH]``.

    Runs ``jobs[job['job']](job)`` and writes its result, or ``{'error': message}`` if it
    raised (the traceback goes to stderr), to ``RESULT_PATH``.

    Args:
        jobs (Mapping[str, Callable]): Job functions by name.
        argv (list[str]): The arguments after ``--worker``.

    Returns:
        int: Exit status: 0, or 1 if the job raised.
    """
    job, result_path = json.loads(argv[0]), argv[1]
    status = 0
    try:
        result = jobs[job['job']](job)
    except Exception as err:  # noqa: BLE001  (reported to the parent)
        traceback.print_exc()
        result, status = dict(error=f'{type(err).__name__}: {err}'), 1
    with open(result_path, 'w') as f:
        json.dump(result, f)
    return status


def machine_info(threads: int, device: str, command: str) -> Dict[str, Any]:
    """CPU model, logical CPUs, memory, load average, threads, device, versions, date, command.

    The load average (1, 5, 15 minutes, before the run) tells a busy machine: with as many
    threads as cores, other processes slow every parallel region down, by far more than
    their share of the CPU.
    """
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next((line.split(':', 1)[1].strip() for line in f
                        if line.startswith('model name')), cpu)
    except OSError:
        pass
    info = dict(cpu=cpu, logical_cpus=os.cpu_count(),
                memory_bytes=os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES'),
                load_average=list(os.getloadavg()),
                threads=threads, device=device, torch=torch.__version__,
                python=platform.python_version(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec='seconds'),
                command=command)
    if device.startswith('cuda'):
        info['gpu'] = torch.cuda.get_device_name(torch.device(device))
    return info
