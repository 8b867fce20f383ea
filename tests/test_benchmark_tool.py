"""tools/analysis/benchmark.py and profile_step.py: options, goal ratios, tables, processes."""
import json
import os.path as osp
import sys

import pytest
import torch
from torch import nn

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(ROOT, 'tools', 'analysis'))
import bench_process as bp  # noqa: E402
import benchmark as bm  # noqa: E402
import profile_step as ps  # noqa: E402
from get_flops import count_complexity  # noqa: E402

sys.path.pop(0)


@pytest.fixture
def restv2(monkeypatch):
    """Make ResTV2's presence in ``mmrest.models`` a parameter of the test."""

    def set_present(present: bool) -> None:
        monkeypatch.setattr(bm, 'has_restv2', lambda: present)

    return set_present


# ------------------------------------------------------------------------ options
def test_quick_and_full_defaults(restv2):
    restv2(False)
    quick = bm.parse_args(['--quick'])
    assert (quick.models, quick.archs, quick.rounds) == (['rest', 'rest-ref'], ['small'], 1)
    assert quick.cases == ['infer_224', 'infer_800', 'train_800', 'train_224']
    assert (quick.threads, quick.matmul_size, quick.device) == (1, 256, 'cpu')
    assert quick.command == 'tools/analysis/benchmark.py --quick'
    full = bm.parse_args([])
    assert full.models == ['rest', 'rest-ref', 'pvt-t', 'pvtv2-b1', 'swin-t']
    assert full.notes == ['ResTV2 not run: mmrest.models has no ResTV2 in this checkout.']
    assert (full.archs, full.rounds, full.threads, full.matmul_size) == (None, 3, 2, 2048)
    restv2(True)
    assert bm.parse_args([]).models == list(bm.MODELS) and bm.parse_args([]).notes == []


def test_default_rows_of_each_case(restv2):
    restv2(True)
    rows = {n: [r.key for r in runs] for n, runs in bm.select_runs(bm.parse_args([])).items()}
    assert rows['train_800'] == ['rest:small', 'rest-ref:small', 'restv2:tiny',
                                 'restv2-ref:tiny', 'swin-t']
    assert rows['train_224'] == ['rest:small', 'rest-ref:small']
    assert rows['infer_800'] == rows['infer_224'] == (
        [f'rest:{a}' for a in bm.REST_ARCHS] + [f'rest-ref:{a}' for a in bm.REST_ARCHS] +
        [f'restv2:{a}' for a in bm.RESTV2_ARCHS] +
        [f'restv2-ref:{a}' for a in bm.RESTV2_ARCHS] + ['pvt-t', 'pvtv2-b1', 'swin-t'])


def test_goal_models_only(restv2):
    restv2(True)
    rows = {n: [r.key for r in runs]
            for n, runs in bm.select_runs(bm.parse_args(['--goal-models'])).items()}
    assert rows == {
        'infer_224': ['rest:small'],
        'infer_800': ['rest:small', 'rest-ref:small', 'restv2:tiny', 'restv2-ref:tiny',
                      'swin-t'],
        'train_800': ['rest:small', 'rest-ref:small', 'restv2:tiny', 'restv2-ref:tiny',
                      'swin-t'],
        'train_224': ['rest:small', 'rest-ref:small']}
    args = bm.parse_args(['--goal-models', '--models', 'rest', 'swin-t', '--cases',
                          'infer_800'])
    assert [r.key for r in bm.select_runs(args)['infer_800']] == ['rest:small', 'swin-t']


def test_explicit_models_run_in_every_case_and_compile_adds_rows(restv2):
    restv2(False)
    args = bm.parse_args(['--models', 'rest', 'swin-t', '--archs', 'small', 'large',
                          '--cases', 'train_800', '--compile'])
    runs = bm.select_runs(args)['train_800']
    assert [r.key for r in runs] == ['rest:small', 'rest:small+compile', 'rest:large',
                                     'rest:large+compile', 'swin-t', 'swin-t+compile']
    assert [r.label for r in runs[:2]] == ['ResT-small', 'ResT-small (torch.compile)']
    # --archs alone keeps the goal models of the training cases
    args = bm.parse_args(['--archs', 'small', '--cases', 'train_800', 'infer_224'])
    rows = {n: [r.key for r in runs] for n, runs in bm.select_runs(args).items()}
    assert rows['train_800'] == ['rest:small', 'rest-ref:small', 'swin-t']
    assert rows['infer_224'] == ['rest:small', 'rest-ref:small', 'pvt-t', 'pvtv2-b1',
                                 'swin-t']


@pytest.mark.parametrize('argv, message', [
    (['--threads', '0'], '--threads must be >= 1, got 0'),
    (['--rounds', '0'], '--rounds must be >= 1, got 0'),
    (['--timeout', '0'], '--timeout must be > 0, got 0'),
    (['--device', 'tpu'], "argument --device: invalid choice: 'tpu'"),
    (['--models', 'vit'], "argument --models: invalid choice: 'vit'"),
    (['--archs', 'huge'], "argument --archs: invalid choice: 'huge'"),
    (['--cases', 'train_1333'], "argument --cases: invalid choice: 'train_1333'"),
    (['--models', 'rest', '--archs', 'tiny'],
     '--archs tiny: none of the selected models has it (rest: lite small base large)'),
    (['--models', 'restv2'], '--models restv2: mmrest.models has no ResTV2 in this checkout'),
])
def test_bad_options_name_the_problem(argv, message, restv2, capsys):
    restv2(False)
    with pytest.raises(SystemExit):
        bm.parse_args(argv)
    assert message in capsys.readouterr().err


def test_archs_must_fit_every_explicit_family(restv2, capsys):
    restv2(True)
    with pytest.raises(SystemExit):
        bm.parse_args(['--models', 'rest', 'restv2', '--archs', 'tiny'])
    assert '--archs tiny has no arch of rest (lite small base large)' in capsys.readouterr().err


def test_cuda_without_a_gpu_is_refused(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(SystemExit):
        bm.parse_args(['--device', 'cuda'])
    assert 'torch.cuda.is_available() is False' in capsys.readouterr().err


def test_restv2_is_built_with_its_attention_setting(monkeypatch):
    import mmrest.models

    class FakeResTV2(nn.Module):

        def __init__(self, arch, attn_impl):
            super().__init__()
            self.arch, self.attn_impl = arch, attn_impl

        def init_weights(self):
            self.initialised = True

    monkeypatch.setattr(mmrest.models, 'ResTV2', FakeResTV2, raising=False)
    assert bm.has_restv2()
    fused, ref = bm.build_model('restv2', 'tiny'), bm.build_model('restv2-ref', 'base')
    assert (fused.arch, fused.attn_impl, fused.initialised) == ('tiny', 'fused', True)
    assert (ref.arch, ref.attn_impl) == ('base', 'reference')
    # MACs are counted on the reference, for the fused model too
    assert bm.build_model('restv2', 'tiny', reference=True).attn_impl == 'reference'


def test_peers_are_mmdets_backbones_without_weights():
    swin = bm.mmdet_backbone_cfg(bm.MODELS['swin-t'].source)
    assert (swin['type'], swin['embed_dims'], swin['depths'], swin['num_heads'],
            swin['window_size']) == ('SwinTransformer', 96, [2, 2, 6, 2], [3, 6, 12, 24], 7)
    pvt = bm.mmdet_backbone_cfg(bm.MODELS['pvt-t'].source)
    assert pvt['type'] == 'PyramidVisionTransformer' and pvt['num_layers'] == [2, 2, 2, 2]
    pvt2 = bm.mmdet_backbone_cfg(bm.MODELS['pvtv2-b1'].source)
    assert (pvt2['type'], pvt2['embed_dims']) == ('PyramidVisionTransformerV2', 64)
    for cfg in (swin, pvt, pvt2):
        assert cfg['init_cfg'] is None and cfg['out_indices'] == (0, 1, 2, 3)
        assert 'pretrained' not in cfg


# ------------------------------------------------------------- ratios and goals
def _sample(time_s, peak, baseline=100, cuda=None, imported=0):
    return dict(time_s=time_s, runs=2, compile_s=None, import_rss=imported,
                baseline_rss=baseline, peak_rss=peak, cuda_max_allocated=cuda)


def test_summary_is_the_median_time_and_the_largest_peak():
    entry = bm.summarise([_sample(1.0, 500, 90, imported=50), _sample(3.0, 700, 110,
                                                                      imported=80),
                          _sample(2.0, 600, 100, imported=20)], train=True, batch=4,
                         macs=10**9, matmul=120.)
    assert entry['time_s'] == 2.0 and entry['times'] == [1.0, 3.0, 2.0]
    assert entry['throughput'] == 2.0 and entry['runs'] == 6
    assert (entry['peak_rss'], entry['baseline_rss'], entry['cuda_max_allocated']) == (
        700, 100, None)
    # model memory: the largest peak above that process's RSS after the imports
    assert entry['model_memory'] == 620
    # 2 FLOPs per MAC x 3 (training) x 1e9 MACs x 4 images / 2 s
    assert entry['gflops'] == pytest.approx(12.0)
    assert entry['efficiency'] == pytest.approx(0.1)
    assert bm.summarise([_sample(1.0, 5)], False, 1, None, 120.)['gflops'] is None
    failed = bm.summarise([_sample(1.0, 5), dict(error='killed by signal 9')], False, 1,
                          None, 1.)
    assert failed == {'error': 'killed by signal 9'}


def _entry(time_s, peak, batch=1, train=False, macs=None, matmul=None, cuda=None):
    return bm.summarise([_sample(time_s, peak, cuda=cuda)], train, batch, macs, matmul)


def test_goal_ratios_from_known_results():
    matmul = 2.0  # GFLOP/s
    results = {
        'rest:small': {
            'infer_800': _entry(2.0, 600),
            # 2 x 3 x 1e9 x 2 / 10 s = 1.2 GFLOP/s = 0.6 of the matmul rate
            'train_800': _entry(10.0, 3000, batch=2, train=True, macs=10**9, matmul=matmul),
            # 2 x 1e8 x 16 / 2 s = 1.6 GFLOP/s = 0.8 of the matmul rate
            'infer_224': _entry(2.0, 500, batch=16, macs=10**8, matmul=matmul)},
        'rest-ref:small': {'infer_800': _entry(5.0, 1500), 'train_800': _entry(30.0, 9000)},
        'swin-t': {'infer_800': _entry(2.5, 1400), 'train_800': _entry(12.0, 4000)},
        'restv2:tiny': {'infer_800': dict(error='killed by signal 9 (out of memory?)')},
        'restv2-ref:tiny': {'infer_800': _entry(4.0, 1000)},
    }
    cases = {'infer_800': dict(title='inference', batch=1, shape=[800, 1344])}
    goals = bm.evaluate_goals(results, cases)
    assert len(goals) == len(bm.GOALS)
    got = {g['name']: (None if g['measured'] is None else round(g['measured'], 6), g['met'])
           for g in goals}
    i8, t8 = 'inference 800x1344 b1: ', 'training step 800x1344 b2: '
    i2, t2 = 'inference 224x224 b16: ', 'training step 224x224 b32: '
    small, ref, swin = 'ResT-small', 'ResT-small reference', 'mmdet Swin-T'
    v2, v2_ref = 'ResTV2-tiny', 'ResTV2-tiny reference'
    assert got == {
        f'{i8}speed-up of {small} over {ref}': (2.5, True),
        f'{i8}speed-up of {small} over {swin}': (1.25, True),
        f'{i8}peak memory of {small} / {ref}': (0.4, True),
        f'{t8}GFLOP/s of {small} / fp32 matmul rate': (0.6, False),
        f'{t8}speed-up of {small} over {swin}': (1.2, False),
        f'{t8}peak memory of {small} / {swin}': (0.75, False),
        f'{t8}speed-up of {small} over {ref}': (3.0, None),  # reported, no target
        f'{i2}GFLOP/s of {small} / fp32 matmul rate': (0.8, False),
        f'{t2}speed-up of {small} over {ref}': (None, None),  # not run
        f'{t2}peak memory of {small} / {ref}': (None, None),
        # a failed model gives no ratio rather than a wrong one
        f'{i8}speed-up of {v2} over {v2_ref}': (None, None),
        f'{i8}peak memory of {v2} / {v2_ref}': (None, None),
        f'{t8}speed-up of {v2} over {v2_ref}': (None, None),
        f'{i8}speed-up of {v2} over {swin}': (None, None),
        f'{t8}speed-up of {v2} over {swin}': (None, None),
    }


def test_memory_ratios_use_the_cuda_allocation_where_measured():
    results = {'rest:small': {'infer_800': _entry(1.0, 5000, cuda=300)},
               'rest-ref:small': {'infer_800': _entry(1.0, 5000, cuda=1000)}}
    goal = [g for g in bm.evaluate_goals(results, {})
            if g['name'].endswith('peak memory of ResT-small / ResT-small reference')][0]
    assert goal['measured'] == pytest.approx(0.3) and goal['met'] is True


def test_memory_ratios_on_the_cpu_leave_out_the_imported_libraries():
    def entry(peak):
        return bm.summarise([_sample(1.0, peak, imported=800)], False, 1, None, None)

    # peaks of 1100 and 1800 with 800 of libraries: 300 / 1000, not 1100 / 1800
    results = {'rest:small': {'infer_800': entry(1100)},
               'rest-ref:small': {'infer_800': entry(1800)}}
    goal = [g for g in bm.evaluate_goals(results, {})
            if g['name'].endswith('peak memory of ResT-small / ResT-small reference')][0]
    assert goal['measured'] == pytest.approx(0.3) and goal['met'] is True


def _report(results, rows):
    cases = {n: dict(title=bm.CASES[n].title, batch=bm.CASES[n].batch,
                     shape=list(bm.CASES[n].shape)) for n in rows}
    return dict(machine=dict(cpu='Test CPU', logical_cpus=2, threads=2, device='cpu',
                             torch='2.x', date='2026-12-01', command='benchmark.py',
                             load_average=[0.25, 0.5, 1.0]),
                settings=dict(rounds=3, device='cpu'), notes=['ResTV2 not run.'],
                cases=cases, rows=rows,
                models={'rest:small': 'ResT-small', 'rest-ref:small': 'ResT-small reference'},
                matmul=dict(size=2048, gflops=2.0, rounds=[1.9, 2.0, 2.1]), results=results,
                goals=bm.evaluate_goals(results, cases))


def test_tables():
    results = {'rest:small': {'infer_800': _entry(2.0, 0.75 * 2**30, macs=10**9, matmul=2.)},
               'rest-ref:small': {'infer_800': dict(error='killed by signal 9')}}
    text = bm.format_report(_report(results, {'infer_800': ['rest:small', 'rest-ref:small']}))
    lines = text.splitlines()
    assert 'infer_800: inference 800x1344, batch 1' in lines
    header = lines.index('| model | s/batch | img/s | peak RSS (GiB) | model memory (GiB) '
                         '| GFLOP/s | % of matmul |')
    assert lines[header + 2] == '| ResT-small | 2.000 | 0.50 | 0.75 | 0.75 | 1.0 | 50% |'
    assert lines[header + 3] == '| ResT-small reference | failed |  |  |  |  |  |'
    assert ('| inference 800x1344 b1: speed-up of ResT-small over ResT-small reference | '
            'not measured | >= 2 | - |') in lines
    assert ('| training step 800x1344 b2: speed-up of ResT-small over ResT-small reference | '
            'not measured | (report) | - |') in lines
    assert 'fp32 matmul 2048^3: 2.0 GFLOP/s (median of 1.9, 2.0, 2.1)' in text
    assert ('Machine: Test CPU, 2 logical CPUs, load average 0.2 at the start, 2 threads, cpu, '
            'torch 2.x, 2026-12-01. Command: `benchmark.py`.') in lines
    assert 'Note: ResTV2 not run.' in lines
    assert 'Failed: ResT-small reference infer_800: killed by signal 9' in lines
    met = bm.format_report(_report(
        {'rest:small': {'infer_800': _entry(2.0, 600)},
         'rest-ref:small': {'infer_800': _entry(5.0, 2000)}},
        {'infer_800': ['rest:small', 'rest-ref:small']}))
    assert ('| inference 800x1344 b1: speed-up of ResT-small over ResT-small reference | 2.50 | '
            '>= 2 | yes |') in met.splitlines()
    assert ('| inference 800x1344 b1: peak memory of ResT-small / ResT-small reference | 0.30 | '
            '<= 0.6 | yes |') in met.splitlines()


# ------------------------------------------------------------------ processes
@pytest.mark.slow
def test_a_model_that_fails_to_build_is_reported_with_its_error():
    out = bp.run_in_subprocess(bm.__file__, dict(
        job='measure', imports=['mmrest.models'], family='rest', arch='tiny', train=False,
        batch=1, shape=[32, 32], threads=1, device='cpu', compile=False, min_run_time=0.01),
        threads=1)
    assert set(out) == {'error'} and "'tiny'" in out['error']


def _fake_worker(monkeypatch, code: str) -> None:
    monkeypatch.setattr(bp, 'worker_command',
                        lambda script, job, result: [sys.executable, '-c', code])


def test_a_killed_worker_is_reported(monkeypatch):
    _fake_worker(monkeypatch, 'import os, signal; os.kill(os.getpid(), signal.SIGKILL)')
    assert bp.run_in_subprocess(bm.__file__, {}, threads=1) == {
        'error': 'killed by signal 9 (out of memory?)'}


@pytest.mark.slow
def test_a_worker_that_never_finishes_times_out(monkeypatch, tmp_path):
    # waits for a file that nobody creates: it cannot finish, however fast the machine
    never = tmp_path / 'never'
    _fake_worker(monkeypatch, f'import os, time\nwhile not os.path.exists({str(never)!r}): '
                 'time.sleep(0.05)')
    assert bp.run_in_subprocess(bm.__file__, {}, threads=1, timeout=2) == {
        'error': 'timed out after 2 s'}


@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path, capsys, restv2):
    restv2(False)
    out = tmp_path / 'bench.json'
    bm.main(['--quick', '--cases', 'infer_800', 'train_800', '--out', str(out)])
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    machine = data['machine']
    assert machine['threads'] == 1 and machine['cpu'] and machine['logical_cpus'] >= 1
    assert len(machine['load_average']) == 3 and machine['memory_bytes'] > 0
    assert machine['torch'] == torch.__version__ and machine['date'].startswith('20')
    assert machine['command'] == ('tools/analysis/benchmark.py --quick --cases infer_800 '
                                  f'train_800 --out {out}')
    assert data['settings']['quick'] is True and data['settings']['rounds'] == 1
    assert data['cases'] == {
        'infer_800': dict(title='inference', batch=1, shape=[96, 160]),
        'train_800': dict(title='training step', batch=2, shape=[96, 160])}
    assert data['models'] == {'rest:small': 'ResT-small',
                              'rest-ref:small': 'ResT-small reference'}
    assert data['matmul']['size'] == 256 and data['matmul']['gflops'] > 0

    from mmrest.models import ResT
    with torch.no_grad():
        macs = count_complexity(ResT('small', attn_impl='reference').eval(),
                                (torch.zeros(1, 3, 96, 160), )).flops
    res = data['results']
    for key in ('rest:small', 'rest-ref:small'):
        for case, batch, factor in (('infer_800', 1, 1), ('train_800', 2, 3)):
            e = res[key][case]
            assert 'error' not in e, e
            assert e['time_s'] > 0 and e['runs'] >= 1 and e['times'] == [e['time_s']]
            assert e['throughput'] == pytest.approx(batch / e['time_s'])
            assert 0 < e['baseline_rss'] <= e['peak_rss'] and e['cuda_max_allocated'] is None
            assert 0 < e['model_memory'] < e['peak_rss']
            assert e['macs_per_image'] == macs
            assert e['gflops'] == pytest.approx(2 * factor * macs * batch / e['time_s'] / 1e9)
            assert e['efficiency'] == pytest.approx(e['gflops'] / data['matmul']['gflops'])
    goals = {g['name']: g for g in data['goals']}
    speedup = goals['inference 96x160 b1: speed-up of ResT-small over ResT-small reference']
    assert speedup['measured'] == pytest.approx(
        res['rest-ref:small']['infer_800']['time_s'] / res['rest:small']['infer_800']['time_s'])
    assert goals['inference 96x160 b1: speed-up of ResT-small over mmdet Swin-T'][
        'measured'] is None
    assert '| ResT-small reference |' in printed and 'not measured' in printed
    assert 'train_800: training step 96x160, batch 2' in printed


# ------------------------------------------------------------------ profiler
@pytest.mark.parametrize('name, family', [
    ('aten::addmm', ps.LINEAR), ('MmBackward0', ps.LINEAR), ('aten::bmm', ps.LINEAR),
    ('aten::native_layer_norm', ps.LAYER_NORM), ('NativeLayerNormBackward0', ps.LAYER_NORM),
    ('aten::native_batch_norm', ps.BATCH_NORM), ('aten::gelu_', ps.GELU),
    ('aten::_softmax', ps.SOFTMAX), ('aten::copy_', ps.COPIES), ('CloneBackward0', ps.COPIES),
    ('aten::add_', ps.ADDS), ('AddBackward0', ps.ADDS), ('aten::mkldnn_convolution', ps.CONV),
    ('EMSATransformFunctionBackward', ps.ATTENTION), ('aten::sigmoid', ps.OTHER)])
def test_ops_outside_known_modules_are_grouped_by_name(name, family):
    assert ps.op_family(name) == family


def test_backward_ops_count_in_the_family_of_their_forward_module():

    class Net(nn.Module):

        def __init__(self):
            super().__init__()
            self.fc, self.norm = nn.Linear(8, 8), nn.LayerNorm(8)
            self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)

        def forward(self, x):
            y = self.dw(x).flatten(1)
            return self.norm(self.fc(y) + y)

    torch.manual_seed(0)
    net = Net()
    x = torch.randn(3, 4, 1, 2, requires_grad=True)
    handles = ps.add_module_ranges(net)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        net(x).sum().backward()
    for h in handles:
        h.remove()
    rows = ps.classify(prof.events())
    families = {(phase, name): family for phase, family, name, _ in rows
                if name.startswith('aten::') and family != ps.OTHER}
    assert families[('forward', 'aten::addmm')] == ps.LINEAR
    assert families[('forward', 'aten::native_layer_norm')] == ps.LAYER_NORM
    assert families[('forward', 'aten::add')] == ps.ADDS
    assert families[('backward', 'aten::mm')] == ps.LINEAR
    assert families[('backward', 'aten::native_layer_norm_backward')] == ps.LAYER_NORM
    assert families[('backward', 'aten::convolution_backward')] == ps.DW_CONV
    assert {family for phase, family, name, _ in rows
            if phase == 'forward' and 'conv' in name} == {ps.DW_CONV}


def test_profile_of_a_tiny_rest_prints_every_family(capsys):
    ps.main(['--arch', 'lite', '--cases', 'train_800', 'infer_224', '--shape', '64', '64',
             '--batch', '1', '--threads', '1', '--top', '5'])
    text = capsys.readouterr().out
    train, infer = text.split('infer_224: ')
    assert train.startswith('train_800: ResT-lite, training step 64x64, batch 1')
    assert '| family | forward ms | forward % | backward ms | backward % | total ms | ' \
           'total % |' in train
    assert '| family | forward ms | forward % |\n' in infer
    for family in (ps.LINEAR, ps.LAYER_NORM, ps.ATTENTION, ps.DW_CONV, ps.CONV,
                   ps.BATCH_NORM, ps.PA, ps.GELU):
        assert f'| {family} |' in train
        # in CPU inference the BatchNorms are folded into the convolutions
        assert (f'| {family} |' in infer) == (family != ps.BATCH_NORM)
    total = [ln for ln in train.splitlines() if ln.startswith('| all |')][0]
    assert total.endswith('| 100.0 |')
    assert train.count('| op | phase | family | self ms | % | calls |') == 1


def test_profile_options_are_checked(capsys):
    with pytest.raises(SystemExit):
        ps.main(['--arch', 'tiny'])
    assert '--arch tiny: rest has lite, small, base, large' in capsys.readouterr().err
