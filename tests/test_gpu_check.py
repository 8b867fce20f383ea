"""tools/analysis/gpu_check.py on the CPU: options, refusal without CUDA, error measures,
a whole smoke run (tables, JSON, passing checks) and that a wrong default model fails it."""
import json
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch
from _tools import load_script

import mmrest.models

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOOL = osp.join(ROOT, 'tools', 'analysis', 'gpu_check.py')
tool = load_script('tools/analysis/gpu_check.py')
V2_LABELS = ['ResTV2-tiny', 'ResTV2-tiny reference']


#: The runs here are tiny: on one intra-op thread (see conftest.py).
pytestmark = pytest.mark.usefixtures('one_intra_op_thread')


# ------------------------------------------------------------------------ options
def test_defaults_and_smoke_defaults():
    full = tool.parse_args([])
    assert full.device == 'cuda' and full.archs is None
    assert full.sizes == [(224, 224), (800, 1344)]
    assert full.dtypes == ['fp32', 'fp16', 'bf16'] and full.speed_dtypes == ['fp32']
    assert [c.name for c in full.speed_cases] == [
        'infer 224x224 b64', 'infer 800x1344 b2', 'train 224x224 b64', 'train 800x1344 b2']
    assert (full.min_run_time, full.warmup) == (1.0, 2) and full.checks and full.speed
    assert full.out == osp.join('work_dirs', 'gpu_check.json')
    smoke = tool.parse_args(['--smoke', '--device', 'cpu'])
    assert smoke.sizes == list(tool.SMOKE_SIZES) and smoke.min_run_time == 0.01
    assert max(c.batch for c in smoke.speed_cases) <= 2
    explicit = tool.parse_args(['--smoke', '--sizes', '32x40'])
    assert explicit.sizes == [(32, 40)] and explicit.warmup == 0


@pytest.mark.parametrize('argv, message', [
    (['--sizes', '800'], "a size is HxW with positive integers, e.g. 800x1344; got '800'"),
    (['--sizes', '0x64'], "got '0x64'"),
    (['--device', 'tpu'], "--device must be cpu, cuda or cuda:N, got 'tpu'"),
    (['--archs', 'huge'], "invalid choice: 'huge'"),
    (['--dtypes', 'fp8'], "invalid choice: 'fp8'"),
    (['--no-checks', '--no-speed'], '--no-checks and --no-speed together leave nothing'),
])
def test_bad_options_name_the_problem(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        tool.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_every_v1_and_v2_arch_is_checked_with_its_attn_impl_switch():
    assert list(tool.ARCHS) == ['lite', 'small', 'base', 'large'] + [
        f'v2-{a}' for a in ('tiny', 'small', 'base', 'large')]
    model = tool.build('restv2-ref:tiny', drop_path_rate=0.)
    assert type(model) is mmrest.models.ResTV2
    assert {m.attn_impl for m in model.modules() if hasattr(m, 'attn_impl')} == {
        'reference'}


def test_unwritable_out_is_refused_before_any_work(tmp_path, capsys):
    blocker = tmp_path / 'file'
    blocker.write_text('')
    assert tool.main(['--device', 'cpu', '--out', str(blocker / 'r.json')]) == 2
    assert f'--out {blocker / "r.json"}: cannot create its folder' in capsys.readouterr().err


@pytest.mark.slow
def test_refuses_without_cuda(tmp_path):
    out = tmp_path / 'gpu_check.json'
    env = dict(os.environ, CUDA_VISIBLE_DEVICES='', PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, TOOL, '--out', str(out)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith('gpu_check: CUDA is not available')
    assert 'this check needs a GPU; --device cpu runs it on the CPU for testing' in lines[-1]
    assert proc.stdout == '' and not out.exists()


# ------------------------------------------------------------------- error measures
def test_output_error_is_max_abs_relative_to_scale():
    ref = [torch.full((1, 2, 3, 3), 4.0), torch.full((1, 2, 2, 2), 0.5)]
    out = [r.clone() for r in ref]
    out[0][0, 1, 2, 2] += 0.02   # 0.02 / 4
    out[1][0, 0, 0, 0] -= 0.003  # 0.003 / max(1, 0.5)
    err, where = tool.output_error(out, ref)
    assert err == pytest.approx(0.005, rel=1e-3) and where == 'stage 1'
    out[1][0, 0, 0, 0] = float('nan')
    assert tool.output_error(out, ref) == (float('inf'), 'stage 2')
    with pytest.raises(ValueError, match='stage 2: shape'):
        tool.output_error([ref[0], ref[1][:, :1]], ref)


def test_gradient_error_is_relative_to_the_scale_of_each_stage():
    assert [tool._stage_of(n) for n in (
        'stem.conv1.weight', 'patch_embed_2.conv.bias', 'stage2.1.attn.q.weight',
        'norm2.weight', 'norm.bias')] == ['stem', 'stage 2', 'stage 2', 'stage 2', 'norm']
    refs = {'stem.conv.weight': torch.tensor([2.0, -4.0]),
            'stem.conv.bias': torch.tensor([1e-7]),  # vanishes analytically: noise
            'patch_embed_2.conv.weight': torch.tensor([1e-3, 0.0]),
            'norm2.weight': torch.tensor([-4e-3])}
    grads = {'stem.conv.weight': torch.tensor([2.0, -4.0 + 4e-4]),
             'stem.conv.bias': torch.tensor([0.0]),
             'patch_embed_2.conv.weight': torch.tensor([1e-3, 0.0]),
             'norm2.weight': torch.tensor([-4e-3])}
    err, where = tool.gradient_error(grads, refs)
    assert err == pytest.approx(1e-4, rel=1e-3) and where == 'stem.conv.weight'
    # stage 2 is judged at its own scale (4e-3), not the stem's
    grads['patch_embed_2.conv.weight'] = torch.tensor([1.1e-3, 0.0])
    err, where = tool.gradient_error(grads, refs)
    assert err == pytest.approx(0.025, rel=1e-3) and where == 'patch_embed_2.conv.weight'
    grads['norm2.weight'] = torch.tensor([float('inf')])
    assert tool.gradient_error(grads, refs) == (float('inf'), 'norm2.weight')
    with pytest.raises(ValueError, match="different parameters: \\['norm2.weight'\\]"):
        tool.gradient_error({k: v for k, v in grads.items() if k != 'norm2.weight'}, refs)


def test_speed_ratios_against_reference_and_swin(monkeypatch):
    """The speed rows carry benchmark.py's ratios, per case and dtype; a failed case or
    model gives error rows and no ratio."""
    times = {'rest:small': (0.01, 100), 'rest-ref:small': (0.02, 400), 'swin-t': (0.008, 50)}

    def build(key):
        if key not in times:
            raise ImportError('No module named mmcv._ext')
        model = torch.nn.Identity()
        model.key = key
        return model

    def time_case(model, case, *args):
        if case.kind == 'train':
            raise RuntimeError('out of memory')
        return times[model.key][0], times[model.key][1] * 2**20, 1

    monkeypatch.setattr(tool, 'build', build)
    monkeypatch.setattr(tool, 'time_case', time_case)
    rows = tool.speed_rows(list(times) + ['pvt-t'], tool.SMOKE_SPEED_CASES[1:3], ['fp32'],
                           torch.device('cpu'), 0, 0.01, lambda message: None)
    small, ref, swin, pvt = (r for r in rows if r['case'] == 'infer 64x96 b1')
    assert (small['speedup_vs_reference'], small['memory_vs_reference']) == pytest.approx(
        (2.0, 0.25))
    assert (small['speedup_vs_swin-t'], ref['speedup_vs_swin-t']) == pytest.approx((0.8, 0.4))
    assert ref['speedup_vs_reference'] is None and swin['speedup_vs_swin-t'] is None
    failed = [r for r in rows if r['case'] == 'train 64x64 b2']
    assert [r['exception'] for r in failed] == ['RuntimeError: out of memory'] * 3 + [
        'ImportError: No module named mmcv._ext']
    assert all(r['speedup_vs_reference'] is None for r in failed)
    assert pvt['ms'] is None and pvt['exception'] == failed[-1]['exception']
    assert '| error: ImportError: No module named mmcv._ext |' in tool.speed_table(rows)


# ------------------------------------------------------------------------ runs
def _tiny_peer(monkeypatch):
    """A cheap stand-in for mmdet's Swin-T (importing and running it takes long here)."""
    build = tool.build
    monkeypatch.setattr(tool, 'build', lambda key, **kw: build(
        'rest:lite' if key == tool.SWIN else key, **kw))


@pytest.mark.slow
def test_cpu_smoke_run_writes_tables_and_json(tmp_path, monkeypatch, capsys):
    _tiny_peer(monkeypatch)
    out = tmp_path / 'sub' / 'gpu_check.json'
    argv = ['--device', 'cpu', '--smoke', '--archs', 'lite', '--dtypes', 'fp32', 'bf16',
            '--speed-arch', 'lite', '--out', str(out)]
    assert tool.main(argv) == 0
    stdout = capsys.readouterr().out
    assert '| model | size | batch | dtype | quantity | max rel. error |' in stdout
    assert '| model | case | dtype | ms per batch | img/s | peak MiB | x reference |' in stdout
    # 12 speed rows for ResT-small fused and reference and Swin-T; ResT V2-tiny fused
    # and reference add 8
    rows = 12 + 4 * len(V2_LABELS)
    assert stdout.strip().splitlines()[-1].startswith(
        f'gpu_check: 8 of 8 checks passed, {rows} of {rows} speed rows measured')
    result = json.loads(out.read_text())
    env = result['environment']
    for key in ('date', 'command', 'torch', 'cuda', 'cudnn', 'gpu', 'mmengine', 'mmcv'):
        assert key in env
    assert env['command'] == 'python tools/analysis/gpu_check.py ' + ' '.join(argv)
    assert result['passed'] is True
    checks = result['checks']
    assert [(r['size'], r['dtype'], r['quantity'], r['batch']) for r in checks] == [
        (size, dtype, quantity, batch)
        for size in ('64x64', '48x80') for dtype in ('fp32', 'bf16')
        for quantity, batch in (('outputs', 2), ('gradients', 2))]
    for row in checks:
        assert row['model'] == 'ResT-lite' and row['passed'] and row['exception'] is None
        assert 0 < row['error'] < row['tolerance'] == tool.TOLERANCES[row['quantity']][
            row['dtype']]
        assert (row['reference_error'] is None) == (row['dtype'] == 'fp32')
        assert f'| {row["error"]:.2e} |' in stdout
    speed = result['speed']
    labels = ['ResT-lite', 'ResT-lite reference'] + V2_LABELS + ['mmdet Swin-T']
    assert [(r['model'], r['case'], r['dtype']) for r in speed] == [
        (m, c.name, 'fp32') for m in labels for c in tool.SMOKE_SPEED_CASES]
    for row in speed:
        assert row['ms'] > 0 and row['runs'] >= 1 and row['peak_mib'] is None
        batch = int(row['case'].rpartition('b')[2])
        assert row['img_per_s'] == pytest.approx(batch / row['ms'] * 1e3)
        lean = row['model'] in ('ResT-lite', 'ResTV2-tiny')
        assert (row['speedup_vs_reference'] is None) == (not lean)
        assert (row['speedup_vs_swin-t'] is None) == (row['model'] == 'mmdet Swin-T')


def test_wrong_default_model_fails_with_status_1(tmp_path, monkeypatch, capsys):
    """A default model whose attention is off by 0.1% fails the float32 check."""
    build = tool.build

    def wrong(key, **kwargs):
        model = build(key, **kwargs)
        if key == 'rest:lite':
            model.stage3[0].attn.register_forward_hook(lambda m, i, out: out * 1.001)
        return model

    monkeypatch.setattr(tool, 'build', wrong)
    out = tmp_path / 'gpu_check.json'
    assert tool.main(['--device', 'cpu', '--smoke', '--archs', 'lite', '--sizes', '64x64',
                      '--dtypes', 'fp32', '--no-speed', '--out', str(out)]) == 1
    stdout = capsys.readouterr().out
    assert stdout.strip().splitlines()[-1].startswith('gpu_check: FAILED: 0 of 2 checks')
    rows = json.loads(out.read_text())['checks']
    assert [r['quantity'] for r in rows] == ['outputs', 'gradients']
    for row in rows:
        assert not row['passed'] and row['error'] > 2 * row['tolerance']
        assert row['worst'] == 'stage 3' if row['quantity'] == 'outputs' else \
            row['worst'].startswith(('stage', 'norm', 'patch_embed', 'stem'))
    assert '| NO |' in stdout


def test_exception_in_a_check_is_a_failure(tmp_path, monkeypatch, capsys):
    build = tool.build

    def failing(key, **kwargs):
        if key == 'rest:lite':
            raise RuntimeError('expected device cuda but got cpu')
        return build(key, **kwargs)

    monkeypatch.setattr(tool, 'build', failing)
    # 32x32 has more pixels than this: its gradient row is at batch 1, as 800x1344's
    monkeypatch.setattr(tool, 'GRAD_BATCH1_PIXELS', 1000)
    out = tmp_path / 'gpu_check.json'
    assert tool.main(['--device', 'cpu', '--archs', 'lite', '--sizes', '32x32', '--dtypes',
                      'fp32', '--no-speed', '--out', str(out)]) == 1
    rows = json.loads(out.read_text())['checks']
    assert [(r['quantity'], r['batch']) for r in rows] == [('outputs', 2), ('gradients', 1)]
    for row in rows:
        assert not row['passed'] and row['error'] is None
        assert row['exception'] == 'RuntimeError: expected device cuda but got cpu'
    assert '| error: RuntimeError: expected device cuda but got cpu |' in \
        capsys.readouterr().out


BLOCKED = ('mmdet', 'mmseg', 'mmpretrain', 'mmcv._ext', 'mmcv.ops')
NO_MMDET_RUN = f'''
import runpy, sys
for name in {BLOCKED!r}:
    sys.modules[name] = None  # import raises: as if not installed / mmcv without C++ ops
sys.argv = [{TOOL!r}] + sys.argv[1:]
runpy.run_path({TOOL!r}, run_name='__main__')
'''


@pytest.mark.slow
def test_runs_with_only_torch_mmengine_and_mmcv_without_ops(tmp_path):
    """A whole run (CPU smoke) with mmdet, mmseg, mmpretrain and mmcv's ops unimportable:
    the checks pass and Swin-T is skipped with a note."""
    out = tmp_path / 'gpu_check.json'
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1')
    proc = subprocess.run(
        [sys.executable, '-c', NO_MMDET_RUN, '--device', 'cpu', '--smoke', '--archs', 'lite',
         '--sizes', '48x80', '--speed-arch', 'lite', '--out', str(out)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert 'Note: mmdet Swin-T skipped: mmdet not importable' in proc.stdout
    result = json.loads(out.read_text())
    assert result['passed'] and len(result['checks']) == 6
    assert {r['model'] for r in result['speed']} == {'ResT-lite', 'ResT-lite reference',
                                                     *V2_LABELS}
