"""The command line shared by ``tools/train.py`` and ``tools/test.py``."""
import argparse
import gc
import os
import sys
import warnings
from typing import Any, Callable, List, Optional


def add_common_tool_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options both tools take to ``parser``: ``--cfg-options``, ``--launcher``,
    the pre-flight data check's ``--data-check-images`` and ``--no-data-check``, and
    ``--local-rank``."""
    from mmengine.config import DictAction
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override settings of the config, key=value (nested keys with dots, lists '
        'as key="[a,b]" or key=a,b)')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    parser.add_argument(
        '--data-check-images', type=int, default=16,
        help='images decoded per dataset by the pre-flight data check (-1: all, 0: none)')
    parser.add_argument(
        '--no-data-check', action='store_true', help='skip the pre-flight data check')
    # torch.distributed.launch passes --local-rank (newer) or --local_rank (older)
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


def parse_tool_arguments(parser: argparse.ArgumentParser,
                         argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse a tool's command line (``argv``, default ``sys.argv``) with ``parser``; sets
    ``LOCAL_RANK`` from ``--local-rank`` if unset."""
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def run_tool_cli(main: Callable[[], Any], prog: str) -> None:
    """Run a tool's ``main`` (``prog`` names it in messages): data, checkpoint and option
    problems end with one line and exit status 1. When ``main`` returns, its reference
    cycles are collected and the process group destroyed while the interpreter is alive
    (gloo's threads made a rank abort now and then at exit, ``tests/test_dist.py``); not
    after an error, where other ranks may still be in a collective."""
    from ..utils import CheckpointError
    from .config import ToolConfigError
    from .preflight import DatasetCheckError
    try:
        main()
    except (DatasetCheckError, CheckpointError, ToolConfigError, FileNotFoundError) as err:
        print(f'{prog}: error: {type(err).__name__}: {err}', file=sys.stderr)
        sys.exit(1)
    gc.collect()
    destroy_process_group()


def destroy_process_group() -> None:
    """Destroy torch.distributed's default process group if one is initialised (a failure
    is a warning: it must not hide how the tool ended)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as err:  # noqa: BLE001
            warnings.warn(f'could not destroy the process group: {err}')
