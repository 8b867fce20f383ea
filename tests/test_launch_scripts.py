"""tools/dist_{train,test}.sh and tools/slurm_{train,test}.sh build the right torchrun and
srun command lines (with stand-ins for python and srun that print their arguments);
tests/test_dist.py runs dist_train.sh for real."""
import os
import os.path as osp
import stat
import subprocess
from typing import Dict, List, Optional

import pytest

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOOLS = osp.join(REPO, 'tools')


@pytest.fixture
def fake_bin(tmp_path):
    """A folder with ``fakepy`` and ``srun`` that print their arguments, one per line."""
    for name in ('fakepy', 'srun'):
        path = tmp_path / name
        path.write_text('#!/usr/bin/env bash\necho "$(basename "$0")"\n'
                        'for a in "$@"; do echo "$a"; done\n')
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return tmp_path


def run_script(script: str, args: List[str], fake_bin, env: Optional[Dict[str, str]] = None
               ) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PATH=f'{fake_bin}{os.pathsep}{os.environ["PATH"]}',
                    PYTHON=str(fake_bin / 'fakepy'))
    for var in ('NNODES', 'NODE_RANK', 'MASTER_ADDR', 'PORT', 'MASTER_PORT', 'GPUS',
                'GPUS_PER_NODE', 'CPUS_PER_TASK', 'SRUN_ARGS'):
        full_env.pop(var, None)
    full_env.update(env or {})
    return subprocess.run(['bash', osp.join(TOOLS, script)] + args, capture_output=True,
                          text=True, env=full_env, timeout=60)


def test_dist_train_defaults(fake_bin):
    proc = run_script('dist_train.sh', ['cfg.py', '4', '--amp'], fake_bin)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        'fakepy', '-m', 'torch.distributed.run', '--nnodes=1', '--node_rank=0',
        '--master_addr=127.0.0.1', '--master_port=29500', '--nproc_per_node=4',
        osp.join(TOOLS, 'train.py'), 'cfg.py', '--launcher', 'pytorch', '--amp']


def test_dist_test_on_the_second_of_two_nodes(fake_bin):
    proc = run_script('dist_test.sh', ['cfg.py', 'ckpt.pth', '8', '--work-dir', 'out'],
                      fake_bin, dict(NNODES='2', NODE_RANK='1', MASTER_ADDR='10.0.0.1',
                                     PORT='29555'))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        'fakepy', '-m', 'torch.distributed.run', '--nnodes=2', '--node_rank=1',
        '--master_addr=10.0.0.1', '--master_port=29555', '--nproc_per_node=8',
        osp.join(TOOLS, 'test.py'), 'cfg.py', 'ckpt.pth', '--launcher', 'pytorch',
        '--work-dir', 'out']


def test_slurm_train_and_test(fake_bin):
    proc = run_script('slurm_train.sh', ['gpu', 'job', 'cfg.py', 'wd', '--resume'],
                      fake_bin, dict(GPUS='16', SRUN_ARGS='--time=1:00:00 --exclusive'))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        'srun', '-p', 'gpu', '--job-name=job', '--gres=gpu:8', '--ntasks=16',
        '--ntasks-per-node=8', '--cpus-per-task=5', '--kill-on-bad-exit=1',
        '--time=1:00:00', '--exclusive', str(fake_bin / 'fakepy'), '-u',
        osp.join(TOOLS, 'train.py'), 'cfg.py', '--work-dir=wd', '--launcher', 'slurm',
        '--resume']
    proc = run_script('slurm_test.sh', ['gpu', 'job', 'cfg.py', 'ckpt.pth'], fake_bin,
                      dict(GPUS='4', GPUS_PER_NODE='4', CPUS_PER_TASK='2'))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        'srun', '-p', 'gpu', '--job-name=job', '--gres=gpu:4', '--ntasks=4',
        '--ntasks-per-node=4', '--cpus-per-task=2', '--kill-on-bad-exit=1',
        str(fake_bin / 'fakepy'), '-u', osp.join(TOOLS, 'test.py'), 'cfg.py', 'ckpt.pth',
        '--launcher', 'slurm']
    # fewer than 8 GPUs: each node is asked for what the job uses, not for 8
    proc = run_script('slurm_train.sh', ['gpu', 'job', 'cfg.py', 'wd'], fake_bin,
                      dict(GPUS='2'))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[4:7] == ['--gres=gpu:2', '--ntasks=2',
                                             '--ntasks-per-node=2']


def test_several_nodes_need_master_addr(fake_bin):
    proc = run_script('dist_train.sh', ['cfg.py', '8'], fake_bin, dict(NNODES='2'))
    assert proc.returncode == 2 and proc.stdout == ''
    assert 'NNODES=2 needs MASTER_ADDR' in proc.stderr


def test_slurm_port_is_the_rendezvous_port(fake_bin):
    (fake_bin / 'srun').write_text('#!/usr/bin/env bash\necho "MASTER_PORT=${MASTER_PORT:-}"\n')
    proc = run_script('slurm_train.sh', ['gpu', 'job', 'cfg.py', 'wd'], fake_bin,
                      dict(PORT='29611'))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ['MASTER_PORT=29611']
    proc = run_script('slurm_train.sh', ['gpu', 'job', 'cfg.py', 'wd'], fake_bin)
    assert proc.stdout.splitlines() == ['MASTER_PORT=']  # mmengine's default then


@pytest.mark.parametrize('script,args,usage', [
    ('dist_train.sh', ['cfg.py'], 'CONFIG NPROC_PER_NODE'),
    ('dist_test.sh', ['cfg.py', 'ckpt.pth'], 'CONFIG CHECKPOINT NPROC_PER_NODE'),
    ('slurm_train.sh', ['gpu', 'job', 'cfg.py'], 'PARTITION JOB_NAME CONFIG WORK_DIR'),
    ('slurm_test.sh', ['gpu'], 'PARTITION JOB_NAME CONFIG CHECKPOINT'),
])
def test_missing_arguments_print_usage(fake_bin, script, args, usage):
    proc = run_script(script, args, fake_bin)
    assert proc.returncode == 2 and proc.stdout == ''
    assert proc.stderr.startswith('usage: ') and usage in proc.stderr
