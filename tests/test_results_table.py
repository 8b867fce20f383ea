"""tools/analysis/results_table.py on hand-made metric files in mmengine's formats."""
import importlib.util
import json
import os.path as osp
import subprocess
import sys

import pytest

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOOL = osp.join(ROOT, 'tools', 'analysis', 'results_table.py')


def _load_tool():
    spec = importlib.util.spec_from_file_location('results_table', TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rt = _load_tool()

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
    with pytest.raises(rt.ResultsError, match='no <timestamp>/<timestamp>.json'):
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
