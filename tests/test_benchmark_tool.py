"""tools/analysis/benchmark.py: options, the per-case measurement, ratios, tables, JSON."""
import importlib.util
import json
import math
import os.path as osp

import pytest
import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOOL = osp.join(ROOT, 'tools', 'analysis', 'benchmark.py')


def _load_tool():
    spec = importlib.util.spec_from_file_location('benchmark_tool', TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bm = _load_tool()


# ------------------------------------------------------------------------ options
def test_quick_defaults_and_full_defaults():
    quick = bm.parse_args(['--quick'])
    assert quick.models == ['rest', 'rest-ref'] and quick.archs == ['small']
    assert quick.cases == ['infer_224', 'infer_800', 'train_800']
    assert quick.threads == 2 and quick.warmup == 1 and quick.repeats is None
    full = bm.parse_args([])
    assert full.models == list(bm.MODEL_FAMILIES) and full.archs == list(bm.ARCHS)
    assert full.matmul_size == 2048
    assert full.train_models == ['rest-small', 'rest-small-ref', 'swin-t']
    assert quick.train_models == ['all']


@pytest.mark.parametrize('argv, message', [
    (['--threads', '0'], '--threads must be >= 1, got 0'),
    (['--repeats', '0'], '--repeats must be >= 1, got 0'),
    (['--warmup', '-1'], '--warmup must be >= 0, got -1'),
    (['--device', 'tpu'], "--device must be cpu or cuda[:index], got 'tpu'"),
    (['--models', 'vit'], "invalid choice: 'vit'"),
    (['--archs', 'huge'], "invalid choice: 'huge'"),
    (['--train-models', 'rest-tiny'], "invalid choice: 'rest-tiny'"),
])
def test_bad_options_name_the_value(argv, message, capsys):
    with pytest.raises(SystemExit):
        bm.parse_args(argv)
    assert message in capsys.readouterr().err


def test_model_specs_expand_archs_fused_then_reference_then_peers():
    specs = bm.model_specs(['swin-t', 'rest-ref', 'rest'], ['lite', 'large'])
    assert [s.key for s in specs] == [
        'rest-lite', 'rest-large', 'rest-lite-ref', 'rest-large-ref', 'swin-t']
    # fused and reference ResT share their FLOP count
    assert specs[0].flops_key == specs[2].flops_key == 'rest-lite'


def test_peer_configs_are_mmdets_settings_without_weights():
    swin = bm.peer_backbone_cfg('swin-t')
    assert (swin['type'], swin['embed_dims'], swin['depths'], swin['num_heads'],
            swin['window_size']) == ('SwinTransformer', 96, [2, 2, 6, 2], [3, 6, 12, 24], 7)
    pvt = bm.peer_backbone_cfg('pvt-t')
    assert pvt['type'] == 'PyramidVisionTransformer' and pvt['num_layers'] == [2, 2, 2, 2]
    pvt2 = bm.peer_backbone_cfg('pvtv2-b1')
    assert (pvt2['type'], pvt2['embed_dims'], pvt2['num_layers']) == (
        'PyramidVisionTransformerV2', 64, [2, 2, 2, 2])
    for cfg in (swin, pvt, pvt2):
        assert cfg['init_cfg'] is None and cfg['out_indices'] == [0, 1, 2, 3]
        assert json.loads(json.dumps(cfg)) == cfg


# ------------------------------------------------------------- one case, in-process
@pytest.mark.parametrize('kind', ['infer', 'train'])
def test_interleaved_rounds_time_and_measure_a_tiny_rest(kind):
    job = dict(job='serve', model=dict(family='rest', arch='lite'), kind=kind, batch=2,
               shape=[36, 52], warmup=1, threads=1, device='cpu')
    out = bm.run_interleaved({'lite': job}, repeats=2, threads=1, timeout=300)['lite']
    assert len(out['times']) == len(out['cpu_times']) == 2
    assert all(t > 0 for t in out['times'])
    assert out['median'] == pytest.approx(sum(out['times']) / 2)  # median of two
    assert 0 < out['baseline_rss'] <= out['peak_rss']
    assert out['cuda_max_allocated'] is None
    # the four ResT stages at strides 4..32 (ceil), ResT-lite widths
    assert out['out_shapes'] == [[2, c, math.ceil(36 / s), math.ceil(52 / s)]
                                 for c, s in zip([64, 128, 256, 512], [4, 8, 16, 32])]


def test_training_step_leaves_gradients():
    """The timed training step is a real forward + backward: run it and look."""
    model = bm.build_model(dict(family='rest', arch='lite'))
    model.train()
    x = torch.randn(1, 3, 64, 64)
    sum(o.mean() for o in model(x)).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)


def test_worker_timeout_is_reported_not_raised():
    out = bm.run_worker(dict(job='aux'), threads=1, timeout=0.05)
    assert out == {'error': 'timed out after 0.05 s'}


def _serve_job(arch: str) -> dict:
    return dict(job='serve', model=dict(family='rest', arch=arch), kind='infer', batch=1,
                shape=[32, 48], warmup=1, threads=1, device='cpu')


def test_interleaved_rounds_time_every_model_and_name_failures():
    """Two workers alive at once, timed round by round; a model that fails to build is
    reported with its error and does not stop the others."""
    out = bm.run_interleaved({'lite': _serve_job('lite'), 'bad': _serve_job('tiny')},
                             repeats=3, threads=1, timeout=300)
    lite = out['lite']
    assert len(lite['times']) == len(lite['cpu_times']) == 3
    assert lite['median'] == sorted(lite['times'])[1] and all(t > 0 for t in lite['times'])
    assert 0 < lite['baseline_rss'] <= lite['peak_rss']
    assert lite['out_shapes'][0] == [1, 64, 8, 12]
    assert set(out['bad']) == {'error'} and "'tiny'" in out['bad']['error']


def test_interleaved_worker_timeout_is_reported_not_raised():
    out = bm.run_interleaved({'lite': _serve_job('lite')}, repeats=1, threads=1,
                             timeout=0.05)
    assert out == {'lite': {'error': 'timed out after 0.05 s'}}


# ------------------------------------------------------------------ ratios, tables
def _entry(median, batch, peak, rss_base=100):
    return dict(median=median, batch=batch, peak_rss=peak, baseline_rss=rss_base,
                cuda_max_allocated=None)


def test_ratios_from_results():
    results = {
        'rest-small': {'infer_800': dict(_entry(2.0, 1, 600), gflops=40.0),
                       'train_800': _entry(10.0, 2, 3000),
                       'infer_224': _entry(0.5, 16, 500)},
        'rest-small-ref': {'infer_800': _entry(5.0, 1, 1500),
                           'train_800': _entry(12.0, 2, 4000),
                           'infer_224': _entry(0.6, 16, 500)},
        'swin-t': {'infer_800': {'error': 'killed by signal 9 (out of memory?)', 'batch': 1}},
    }
    ratios = {r['name']: r for r in bm.compute_ratios(results, matmul_gflops=160.0)}
    by_key = {(r['case'], r['numerator'], r['denominator']): r for r in ratios.values()}
    speed = by_key[('infer_800', 'rest-small-ref', 'rest-small')]
    assert speed['value'] == pytest.approx(2.5) and speed['met'] is True
    mem = by_key[('infer_800', 'rest-small', 'rest-small-ref')]
    assert mem['value'] == pytest.approx(0.4) and mem['met'] is True
    train = by_key[('train_800', 'rest-small-ref', 'rest-small')]
    assert train['value'] == pytest.approx(1.2) and train['met'] is False
    train_mem = by_key[('train_800', 'rest-small', 'rest-small-ref')]
    assert train_mem['value'] == pytest.approx(0.75) and train_mem['met'] is False
    small = by_key[('infer_224', 'rest-small-ref', 'rest-small')]
    assert small['value'] == pytest.approx(1.2) and small['met'] is True
    # a failed peer gives no ratio instead of a wrong one
    swin = by_key[('infer_800', 'swin-t', 'rest-small')]
    assert swin['value'] is None and swin['met'] is None
    frac = by_key[('infer_800', 'rest-small', 'matmul')]
    assert frac['value'] == pytest.approx(0.25) and frac['met'] is False


def test_memory_ratio_uses_cuda_allocation_when_present():
    a = dict(_entry(1.0, 1, 5000), cuda_max_allocated=300)
    b = dict(_entry(1.0, 1, 5000), cuda_max_allocated=1000)
    ratios = bm.compute_ratios({'rest-small': {'infer_800': a},
                                'rest-small-ref': {'infer_800': b}}, None)
    mem = [r for r in ratios if r['case'] == 'infer_800' and r['numerator'] == 'rest-small'
           and r['denominator'] == 'rest-small-ref'][0]
    assert mem['value'] == pytest.approx(0.3)


# ---------------------------------------------------------------- whole tool, quick
@pytest.mark.slow
def test_quick_run_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / 'bench.json'
    report = bm.main(['--quick', '--cases', 'infer_800', 'train_800', '--out', str(out)])
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data['ratios'] == json.loads(json.dumps(report['ratios']))

    machine = data['machine']
    assert machine['threads'] == 2 and machine['cpu'] and machine['versions']['torch']
    assert data['settings']['quick'] is True
    assert data['settings']['command'].startswith('tools/analysis/benchmark.py --quick')
    assert data['cases'] == {
        'infer_800': {'kind': 'infer', 'batch': 1, 'shape': [96, 160], 'warmup': 1,
                      'repeats': 1},
        'train_800': {'kind': 'train', 'batch': 2, 'shape': [96, 160], 'warmup': 1,
                      'repeats': 1}}
    assert data['models'] == {'rest-small': 'ResT-small',
                              'rest-small-ref': 'ResT-small reference'}
    assert data['matmul']['size'] == 256 and data['matmul']['gflops'] > 0

    # MACs: the count of get_flops.py on the reference model, shared by both impls
    gf = bm._load_get_flops()
    from mmrest.models import ResT
    model = ResT('small', attn_impl='reference').eval()
    with torch.no_grad():
        expected = gf.count_complexity(model, (torch.zeros(1, 3, 96, 160), )).flops
    assert data['macs'] == {'rest-small': {'96x160': expected}}

    for key in ('rest-small', 'rest-small-ref'):
        for case, unit, batch in (('infer_800', 's/img', 1), ('train_800', 's/step', 2)):
            e = data['results'][key][case]
            assert 'error' not in e, e
            assert e['unit'] == unit and len(e['times']) == 1
            value = e['median'] / batch if unit == 's/img' else e['median']
            assert e['value'] == pytest.approx(value)
            assert 0 < e['baseline_rss'] <= e['peak_rss']
            factor = 3 if case == 'train_800' else 1
            assert e['gflops'] == pytest.approx(2 * factor * expected * batch / e['median'] /
                                                1e9)
    ratios = {(r['case'], r['numerator'], r['denominator']): r['value']
              for r in data['ratios']}
    res = data['results']
    assert ratios[('infer_800', 'rest-small-ref', 'rest-small')] == pytest.approx(
        res['rest-small-ref']['infer_800']['median'] / res['rest-small']['infer_800']['median'])
    assert ratios[('train_800', 'rest-small', 'rest-small-ref')] == pytest.approx(
        res['rest-small']['train_800']['peak_rss'] / res['rest-small-ref']['train_800']
        ['peak_rss'])
    # Swin-T and the 224 case were not run: their ratios are absent, not invented
    assert ratios[('infer_800', 'swin-t', 'rest-small')] is None
    assert ratios[('infer_224', 'rest-small-ref', 'rest-small')] is None

    lines = printed.splitlines()
    header = [ln for ln in lines if ln.startswith('| model |')][0]
    assert 'inference 96x160 b1 (s/img)' in header
    assert 'training step 96x160 b2 (s/step)' in header
    rows = {ln.split(' | ')[0][2:]: ln for ln in lines if ln.startswith('| ResT')}
    assert set(rows) == {'ResT-small', 'ResT-small reference'}
    assert all(r.count('|') == header.count('|') for r in rows.values())
    assert any(ln.startswith('| goal |') for ln in lines)
    assert 'Machine: ' in printed and 'fp32 matmul 256^3' in printed
