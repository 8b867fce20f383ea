"""tools/analysis/results_table.py on metric files in the formats of tools/test.py and
mmengine."""
import json
import os.path as osp
import subprocess
import sys

import pytest
from _tools import load_script

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOOL = osp.join(ROOT, 'tools', 'analysis', 'results_table.py')


rt = load_script('tools/analysis/results_table.py')

# What mmengine 0.10.7's LoggerHook.after_test_epoch dumps for each toolbox (fractions for
# mmdet's COCO AP, percentages for mmseg and mmpretrain), plus the timing keys it adds.
COCO_BOX = {'coco/bbox_mAP': 0.4027, 'coco/bbox_mAP_50': 0.611, 'coco/bbox_mAP_75': 0.431,
            'coco/bbox_mAP_s': 0.244, 'coco/bbox_mAP_m': 0.441, 'coco/bbox_mAP_l': 0.532,
            'data_time': 0.004, 'time': 0.093}
COCO_MASK = dict(COCO_BOX, **{'coco/bbox_mAP': 0.3964, 'coco/segm_mAP': 0.3716,
                              'coco/segm_mAP_50': 0.59})
ADE = {'aAcc': 81.37, 'mIoU': 45.26, 'mAcc': 56.02, 'data_time': 0.01, 'time': 0.2}
IMAGENET = {'accuracy/top1': 79.562, 'accuracy/top5': 94.91, 'data_time': 0.1, 'time': 0.3}


def _write(path, data) -> str:
    with open(path, 'w', encoding='utf-8') as f:
        json.dump(data, f)
    return str(path)


@pytest.mark.parametrize('metrics, expected', [
    (COCO_BOX, '40.3 box AP'),
    (COCO_MASK, '39.6 box / 37.2 mask AP'),
    (ADE, '45.3 mIoU'),
    (IMAGENET, '79.6 top-1'),
])
def test_reproduced_cell_formats_each_toolbox(metrics, expected):
    assert rt.reproduced_cell(metrics) == expected


def test_row_for_known_config_has_paper_and_params(tmp_path):
    path = _write(tmp_path / 'r.json', COCO_MASK)
    row = rt.table_row('configs/mask_rcnn_rest_small_coco.py', rt.load_metrics(path))
    cells = [c.strip() for c in row.strip('|').split('|')]
    assert cells == ['Mask R-CNN 1x', 'ResT-Small',
                     '[mask_rcnn_rest_small_coco](configs/mask_rcnn_rest_small_coco.py)',
                     '33.32M', '39.6 box / 37.2 mask AP', '39.6 box / 37.2 mask AP']


def test_row_for_unknown_config_keeps_the_result(tmp_path):
    path = _write(tmp_path / 'r.json', ADE)
    row = rt.table_row('my/upernet_custom.py', rt.load_metrics(path))
    assert row == '| - | - | [upernet_custom](my/upernet_custom.py) | - | - | 45.3 mIoU |'


def test_work_dir_uses_newest_timestamp_run(tmp_path):
    for ts, ap in [('20260101_120000', 0.30), ('20260102_080000', 0.41)]:
        (tmp_path / ts).mkdir()
        _write(tmp_path / ts / f'{ts}.json', {'coco/bbox_mAP': ap})
    (tmp_path / 'vis_data').mkdir()  # not a timestamp run: ignored
    assert rt.find_result_json(str(tmp_path)).endswith('20260102_080000.json')
    assert rt.reproduced_cell(rt.load_metrics(str(tmp_path))) == '41.0 box AP'


def _test_metrics_json(tmp_path, metrics: dict, metrics_out=None) -> str:
    """Run tools/test.py's ``main`` with a runner whose ``test()`` returns ``metrics``:
    the file it writes is the one results_table.py reads after a real test run."""
    import mmrest.engine
    from mmrest.utils import atomic_torch_save
    test_tool = load_script('tools/test.py')

    class FakeRunner:

        def test(self) -> dict:
            return dict(metrics)

    ckpt = str(tmp_path / 'epoch_36.pth')
    atomic_torch_save(dict(meta=dict(), state_dict={}), ckpt)
    work_dir = tmp_path / 'work_dir'
    argv = [osp.join(ROOT, 'configs', 'mask_rcnn_restv2_tiny_3x_coco.py'), ckpt,
            '--work-dir', str(work_dir), '--no-data-check']
    if metrics_out is not None:
        argv += ['--metrics-out', str(metrics_out)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mmrest.engine, 'build_runner', lambda cfg: FakeRunner())
        test_tool.main(argv)
    return str(metrics_out or work_dir / 'test_metrics.json')


def test_test_py_metrics_file_and_work_dir(tmp_path):
    """The ``{"config", "checkpoint", "metrics"}`` file of tools/test.py, given as a file
    (``--metrics-out``) and as the work dir it is written to by default."""
    out = _test_metrics_json(tmp_path, COCO_MASK)
    with open(out, encoding='utf-8') as f:
        record = json.load(f)
    assert set(record) == {'config', 'checkpoint', 'metrics'}  # the format read below
    assert record['metrics'] == COCO_MASK
    work_dir = osp.dirname(out)
    assert rt.find_result_json(work_dir) == osp.join(work_dir, 'test_metrics.json')
    for path in (out, work_dir):
        assert rt.load_metrics(path) == COCO_MASK
    row = rt.table_row('configs/mask_rcnn_restv2_tiny_3x_coco.py', rt.load_metrics(work_dir))
    assert row.endswith('| 49.94M | 47.6 box / 43.2 mask AP | 39.6 box / 37.2 mask AP |')
    custom = _test_metrics_json(tmp_path, ADE, metrics_out=tmp_path / 'seg' / 'm.json')
    assert rt.reproduced_cell(rt.load_metrics(custom)) == '45.3 mIoU'


def test_cli_reads_a_test_py_work_dir(tmp_path):
    work_dir = osp.dirname(_test_metrics_json(tmp_path, COCO_BOX))
    out = subprocess.run(
        [sys.executable, TOOL, 'configs/retinanet_rest_small_coco.py', work_dir],
        capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[2].endswith('| 23.40M | 40.3 box AP | 40.3 box AP |')


def test_work_dir_prefers_test_metrics_over_timestamp_runs(tmp_path):
    ts = '20260102_080000'
    (tmp_path / ts).mkdir()
    _write(tmp_path / ts / f'{ts}.json', {'coco/bbox_mAP': 0.30})
    assert rt.find_result_json(str(tmp_path)).endswith(f'{ts}.json')  # fallback
    _write(tmp_path / 'test_metrics.json',
           dict(config='/x/cfg.py', checkpoint='/x/epoch_12.pth',
                metrics={'coco/bbox_mAP': 0.41}))
    assert rt.find_result_json(str(tmp_path)) == str(tmp_path / 'test_metrics.json')
    assert rt.reproduced_cell(rt.load_metrics(str(tmp_path))) == '41.0 box AP'


def test_test_py_file_without_a_metric_names_its_keys(tmp_path):
    path = _write(tmp_path / 'test_metrics.json',
                  dict(config='/x/cfg.py', checkpoint='/x/e.pth', metrics={'loss': 0.5}))
    with pytest.raises(rt.ResultsError, match=r"test_metrics.json: no coco/bbox_mAP.*'loss'"):
        rt.load_metrics(path)


def test_json_lines_log_uses_last_record_with_a_metric(tmp_path):
    lines = [{'lr': 1e-4, 'loss': 1.2, 'step': 50},
             {'coco/bbox_mAP': 0.21, 'step': 1},
             {'lr': 1e-5, 'loss': 0.9, 'step': 100},
             {'coco/bbox_mAP': 0.25, 'step': 2},
             {'lr': 1e-5, 'loss': 0.8, 'step': 150}]
    path = tmp_path / 'scalars.json'
    path.write_text('\n'.join(json.dumps(r) for r in lines) + '\n')
    assert rt.reproduced_cell(rt.load_metrics(str(path))) == '25.0 box AP'


def test_errors_name_the_file_and_the_problem(tmp_path):
    with pytest.raises(rt.ResultsError, match='nothing_here.json: no such file'):
        rt.load_metrics(str(tmp_path / 'nothing_here.json'))
    with pytest.raises(rt.ResultsError,
                       match='no test_metrics.json .* nor <timestamp>/<timestamp>.json'):
        rt.load_metrics(str(tmp_path))
    path = _write(tmp_path / 'loss.json', {'loss': 0.5, 'time': 0.1})
    with pytest.raises(rt.ResultsError, match=r"loss.json: no coco/bbox_mAP.*'loss', 'time'"):
        rt.load_metrics(path)
    bad = tmp_path / 'broken.json'
    bad.write_text('{"mIoU": 40}\n{not json\n')
    with pytest.raises(rt.ResultsError, match='broken.json: line 2 is not JSON'):
        rt.load_metrics(str(bad))


def test_cli_prints_header_and_rows(tmp_path):
    box = _write(tmp_path / 'box.json', COCO_BOX)
    cls = _write(tmp_path / 'cls.json', IMAGENET)
    out = subprocess.run(
        [sys.executable, TOOL, 'configs/retinanet_rest_small_coco.py', box,
         'configs/rest_small_imagenet.py', cls],
        capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[:2] == rt.HEADER.splitlines()
    assert out[2].endswith('| 23.40M | 40.3 box AP | 40.3 box AP |')
    assert out[3].endswith('| 13.68M | 79.6 top-1 | 79.6 top-1 |')


def test_cli_rejects_odd_arguments_and_bad_files(tmp_path):
    res = subprocess.run([sys.executable, TOOL, 'configs/a.py'], capture_output=True,
                         text=True)
    assert res.returncode == 2 and 'expected CONFIG RESULT pairs' in res.stderr
    res = subprocess.run([sys.executable, TOOL, 'configs/a.py', str(tmp_path / 'x.json')],
                         capture_output=True, text=True)
    assert res.returncode == 1 and 'x.json: no such file or directory' in res.stderr


def test_every_config_has_a_table_row():
    import glob
    names = {osp.splitext(osp.basename(p))[0]
             for p in glob.glob(osp.join(ROOT, 'configs', '*.py'))}
    assert names == set(rt.KNOWN_CONFIGS)
