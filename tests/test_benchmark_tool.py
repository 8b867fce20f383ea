"""tools/analysis/benchmark.py: options, ratios, tables, the A/B, ONNX Runtime, processes."""
import json
import os.path as osp
import sys

import pytest
import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(ROOT, 'tools', 'analysis'))
import benchmark as bm  # noqa: E402

sys.path.pop(0)


# ------------------------------------------------------------------------ options
def test_defaults_of_each_mode():
    quick = bm.parse_args(['--quick'])
    assert (quick.models, quick.rounds, quick.threads) == (['rest', 'rest-ref'], 1, 1)
    assert bm.model_keys(quick) == ['rest:small', 'rest-ref:small']
    assert quick.command == 'tools/analysis/benchmark.py --quick'
    full = bm.parse_args([])
    assert (full.rounds, full.threads, full.cases) == (3, 2, list(bm.CASES))
    assert bm.model_keys(full) == ['rest:small', 'rest-ref:small', 'restv2:tiny',
                                   'restv2-ref:tiny', 'pvt-t', 'pvtv2-b1', 'swin-t']
    ab = bm.parse_args(['--ab'])
    assert (ab.rounds, ab.cases) == (5, ['infer_224', 'infer_800', 'train_800'])
    assert bm.model_keys(ab) == [f'{k}@{v}' for k in ('rest:small', 'restv2:tiny') for v in (
        'plain', '+norm_mlp', '+channels_last', 'all')]
    archs = bm.parse_args(['--models', 'rest', 'restv2', '--archs', 'small', 'large'])
    assert bm.model_keys(archs) == ['rest:small', 'rest:large', 'restv2:small', 'restv2:large']


@pytest.mark.parametrize('argv, message', [
    (['--threads', '0'], '--threads must be > 0, got 0'),
    (['--rounds', '0'], '--rounds must be > 0, got 0'),
    (['--timeout', '0'], '--timeout must be > 0, got 0'),
    (['--models', 'vit'], "argument --models: invalid choice: 'vit'"),
    (['--cases', 'train_1333'], "argument --cases: invalid choice: 'train_1333'"),
    (['--models', 'rest', '--archs', 'tiny'],
     '--archs tiny: none of the selected models has it (rest: lite small base large)'),
])
def test_bad_options_name_the_problem(argv, message, capsys):
    with pytest.raises(SystemExit):
        bm.parse_args(argv)
    assert message in capsys.readouterr().err


def test_models_are_built_with_their_attention_setting():
    lean, ref = bm.build_model('rest', 'lite'), bm.build_model('restv2-ref', 'tiny')
    assert {m.attn.attn_impl for m in lean.stage2} == {'lean'}
    assert {m.attn.attn_impl for m in ref.stage2} == {'reference'}
    # the eager model of an ONNX Runtime row: the lean one, the same weights
    onnx = bm.build_model('rest-onnx', 'lite')
    assert {m.attn.attn_impl for m in onnx.stage2} == {'lean'}
    for a, b in zip(onnx.state_dict().values(), lean.state_dict().values()):
        assert torch.equal(a, b)


def test_peers_are_mmdets_backbones_without_weights():
    swin = bm.mmdet_backbone_cfg(bm.MODELS['swin-t'].source)
    assert (swin['type'], swin['embed_dims'], swin['depths'], swin['num_heads'],
            swin['window_size']) == ('SwinTransformer', 96, [2, 2, 6, 2], [3, 6, 12, 24], 7)
    pvt = bm.mmdet_backbone_cfg(bm.MODELS['pvt-t'].source)
    assert pvt['type'] == 'PyramidVisionTransformer' and pvt['num_layers'] == [2, 2, 2, 2]
    for cfg in (swin, pvt):
        assert cfg['init_cfg'] is None and cfg['out_indices'] == (0, 1, 2, 3)
        assert 'pretrained' not in cfg


# ----------------------------------------------------------------- ratios, memory
def _sample(time_s, peak, imported=0):
    return dict(time_s=time_s, runs=2, import_rss=imported, peak_rss=peak)


def test_summary_is_the_median_time_and_the_largest_memory():
    entry = bm.summarise([_sample(1.0, 500, 50), _sample(3.0, 700, 80), _sample(2.0, 600, 20)],
                         batch=4)
    assert entry['time_s'] == 2.0 and entry['times'] == [1.0, 3.0, 2.0]
    assert entry['throughput'] == 2.0 and entry['runs'] == 6 and entry['peak_rss'] == 700
    # model memory: the largest peak above that process's RSS after the imports
    assert entry['memory'] == 620
    assert bm.summarise([_sample(1.0, 5), dict(error='killed by signal 9')], 1) == {
        'error': 'killed by signal 9'}


def test_ratios_to_the_reference_and_to_swin_t():
    rows = {k: bm.summarise([s], 1) for k, s in (
        ('rest:small', _sample(2.0, 600)), ('rest-ref:small', _sample(5.0, 2000)),
        ('swin-t', _sample(2.5, 1200)), ('restv2:tiny', _sample(1.0, 300)))}
    assert bm.ratios(rows, 'rest:small') == {
        'speedup_vs_reference': 2.5, 'memory_vs_reference': 0.3,
        'speedup_vs_swin-t': 1.25, 'memory_vs_swin-t': 0.5}
    # a row that was not run gives no ratio rather than a wrong one
    v2 = bm.ratios(rows, 'restv2:tiny')
    assert v2['speedup_vs_reference'] is None and v2['memory_vs_swin-t'] == 0.25
    assert set(bm.ratios(rows, 'swin-t').values()) == {None}
    # ONNX Runtime against eager PyTorch; an A/B variant against its plain variant
    rows = {k: bm.summarise([s], 1) for k, s in (
        ('rest:small', _sample(2.0, 600)), ('rest-onnx:small', _sample(1.6, 300)),
        ('rest:small@plain', _sample(3.0, 900)), ('rest:small@+norm_mlp', _sample(2.0, 600)))}
    assert bm.ratios(rows, 'rest-onnx:small')['speedup_vs_reference'] == 1.25
    assert bm.ratios(rows, 'rest:small@+norm_mlp')['speedup_vs_reference'] == 1.5
    assert bm.ratios(rows, 'rest:small@+norm_mlp')['memory_vs_reference'] == 600 / 900


def test_a_worker_turns_off_the_switches_not_in_its_variant(monkeypatch):
    """The worker (a fresh process) replaces each shortcut that is off for good."""
    import importlib
    for module, function, _ in bm.SWITCHES.values():
        mod = importlib.import_module(f'mmrest.models.layers.{module}')
        monkeypatch.setattr(mod, function, getattr(mod, function))  # restored afterwards
    out = bm.measure(dict(imports=[], family='rest', arch='lite', switches=['channels_last'],
                          train=False, batch=1, shape=[64, 64], threads=torch.get_num_threads(),
                          min_run_time=0.01))
    assert out['time_s'] > 0 and out['peak_rss'] > out['import_rss'] > 0
    from mmrest.models.layers import block, dispatch
    assert block.blocked_norm_mlp is bm.SWITCHES['norm_mlp'][2]
    assert dispatch.cpu_channels_last is not bm.SWITCHES['channels_last'][2]


def _report(mode, results):
    return dict(mode=mode, results=results, machine=dict(
        cpu='Test CPU', logical_cpus=2, threads=2, device='cpu', torch='2.x',
        date='2026-12-01', command='benchmark.py', load_average=[0.25, 0.5, 1.0]))


def test_tables():
    rows = {'rest:small': bm.summarise([_sample(2.0, 0.75 * 2**30)], 1),
            'rest-ref:small': dict(error='killed by signal 9')}
    rows['rest:small'].update(bm.ratios(rows, 'rest:small'))
    text = bm.format_report(_report('peers', {'infer_800': dict(batch=1, shape=[800, 1344],
                                                                rows=rows)}))
    lines = text.splitlines()
    assert 'infer_800: inference 800x1344, batch 1' in lines
    assert ('| model | s/batch | img/s | model memory (GiB) | x reference | memory / reference'
            ' | x Swin-T | memory / Swin-T |') in lines
    assert '| ResT-small | 2.000 | 0.50 | 0.75 |  |  |  |  |' in lines
    assert '| ResT-small reference | failed: killed by signal 9 |  |  |  |  |  |  |' in lines
    assert ('Machine: Test CPU, 2 logical CPUs, load average 0.2 at the start, 2 threads, cpu, '
            'torch 2.x, 2026-12-01. Command: `benchmark.py`.') in lines


# ------------------------------------------------------------------ runs
@pytest.mark.slow
def test_quick_ab_run_and_onnx_runtime_rows(tmp_path, capsys):
    """The A/B variants and ONNX Runtime against eager PyTorch (no timing is asserted)."""
    results = tmp_path / 'results.jsonl'
    report = bm.main(['--ab', '--quick', '--models', 'rest', '--archs', 'lite', '--cases',
                      'infer_224', '--results', str(results)])
    rows = report['results']['infer_224']['rows']
    variants = ('plain', '+norm_mlp', '+channels_last', 'all')
    assert list(rows) == [f'rest:lite@{v}' for v in variants]
    assert rows['rest:lite@plain']['speedup_vs_reference'] == 1.0
    assert json.loads(results.read_text())['mode'] == 'ab'
    assert '| ResT-lite +norm_mlp |' in capsys.readouterr().out
    report = bm.main(['--quick', '--models', 'rest', 'rest-onnx', '--archs', 'lite',
                      '--cases', 'infer_224', 'train_224', '--results', str(results)])
    assert list(report['results']['train_224']['rows']) == ['rest:lite']  # no ONNX training
    rows = report['results']['infer_224']['rows']
    eager, ort = rows['rest:lite'], rows['rest-onnx:lite']
    assert ort['max_rel_error'] < 1e-4 and 'max_rel_error' not in eager
    assert ort['speedup_vs_reference'] == pytest.approx(eager['time_s'] / ort['time_s'])
    assert '| ResT-lite ONNX Runtime (max error ' in capsys.readouterr().out


def test_a_killed_or_failing_worker_is_reported(tmp_path):
    killed, failing = tmp_path / 'killed.py', tmp_path / 'failing.py'
    killed.write_text('import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n')
    failing.write_text('raise KeyError("tiny")\n')
    assert bm.run_in_subprocess(str(killed), {}, threads=1) == {
        'error': 'killed by signal 9 (out of memory?)'}
    assert bm.run_in_subprocess(str(failing), {}, threads=1)['error'].startswith(
        'exit status 1: ')


@pytest.mark.slow
def test_quick_peer_run_end_to_end(tmp_path, capsys):
    out, results = tmp_path / 'bench.json', tmp_path / 'results.jsonl'
    bm.main(['--quick', '--cases', 'infer_800', 'train_800', '--out', str(out),
             '--results', str(results)])
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert json.loads(results.read_text().splitlines()[-1]) == data
    machine = data['machine']
    assert machine['threads'] == 1 and machine['cpu'] and len(machine['load_average']) == 3
    assert machine['torch'] == torch.__version__ and machine['date'].startswith('20')
    assert data['mode'] == 'peers' and data['settings'] == dict(quick=True, rounds=1)
    for case, batch in (('infer_800', 1), ('train_800', 2)):
        res = data['results'][case]
        assert (res['batch'], res['shape']) == (batch, [96, 160])
        lean, ref = res['rows']['rest:small'], res['rows']['rest-ref:small']
        for e in (lean, ref):
            assert 'error' not in e, e
            assert e['time_s'] > 0 and e['runs'] >= 1 and 0 < e['memory'] < e['peak_rss']
        assert lean['speedup_vs_reference'] == pytest.approx(ref['time_s'] / lean['time_s'])
        assert lean['speedup_vs_swin-t'] is None
    assert 'train_800: training step 96x160, batch 2' in printed
