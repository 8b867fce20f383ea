"""Clear errors for bad data: the data checks of tools/train.py and tools/test.py name
the missing folder or file, the annotation that is not COCO, the classes it lacks, the
image that is missing or does not decode; the tools report them in one line."""
import json
import os
import os.path as osp

import pytest
from _engine_helpers import PYTHON, TEST, demo_config_text, run, train_cmd, write_config
from _tools import load_script

# detectors: mmcv with its compiled ops
pytestmark = pytest.mark.ops

train_tool = load_script('tools/train.py')


@pytest.fixture
def data_copy(demo, tmp_path):
    import shutil
    data = str(tmp_path / 'data')
    shutil.copytree(demo['data'], data)
    config = write_config(str(tmp_path / 'cfg.py'),
                          demo_config_text(data, max_iters=2, with_val=False))
    return data, config


def _check(config: str):
    from mmrest.engine import check_data_config
    cfg = train_tool.build_config(train_tool.parse_args([config]))
    check_data_config(cfg, splits=('train', 'val', 'test'))


def test_missing_data_root(demo, tmp_path):
    from mmrest.engine import DatasetCheckError
    missing = str(tmp_path / 'no_such_data')
    config = write_config(str(tmp_path / 'cfg.py'), demo_config_text(missing))
    with pytest.raises(DatasetCheckError, match='data_root: folder not found') as info:
        _check(config)
    assert missing in str(info.value)


def test_missing_annotation_file(data_copy):
    from mmrest.engine import DatasetCheckError
    data, config = data_copy
    ann = osp.join(data, 'annotations', 'instances_train.json')
    os.remove(ann)
    with pytest.raises(DatasetCheckError, match='ann_file: annotation file not found') as info:
        _check(config)
    assert ann in str(info.value)
    assert 'train_dataloader.dataset.ann_file' in str(info.value)


def test_missing_image_folder(data_copy):
    import shutil

    from mmrest.engine import DatasetCheckError
    data, config = data_copy
    shutil.rmtree(osp.join(data, 'val'))
    with pytest.raises(DatasetCheckError, match='data_prefix.img: folder not found') as info:
        _check(config)
    assert osp.join(data, 'val') in str(info.value)


@pytest.mark.parametrize('content,reason', [
    ('this is not json', 'invalid JSON'),
    ('[1, 2, 3]', 'the top level is a JSON list'),
    ('{"images": [], "categories": []}', "missing 'annotations'"),
    ('{"images": [{"id": 1}], "annotations": [], "categories": []}',
     'images[0] = {\'id\': 1} has no "id" and "file_name"'),
    ('{"images": [], "annotations": [], "categories": [{"id": 1}, {"name": "a"}]}',
     'categories[0] = {\'id\': 1} has no "id" and "name"'),
    ('{"images": [], "categories": [], "annotations": [{"image_id": 1, "bbox": []}]}',
     'annotations[0] = {\'image_id\': 1, \'bbox\': []} has no "image_id" and '
     '"category_id"'),
])
def test_annotation_not_coco(data_copy, content, reason):
    from mmrest.engine import DatasetCheckError
    data, config = data_copy
    ann = osp.join(data, 'annotations', 'instances_train.json')
    with open(ann, 'w') as f:
        f.write(content)
    with pytest.raises(DatasetCheckError) as info:
        _check(config)
    msg = str(info.value)
    assert ann in msg and reason in msg, msg


def test_classes_not_in_annotation(data_copy):
    from mmrest.engine import DatasetCheckError
    data, config = data_copy
    ann = osp.join(data, 'annotations', 'instances_train.json')
    with open(ann) as f:
        coco = json.load(f)
    for cat in coco['categories']:
        cat['name'] = 'x' + cat['name']
    with open(ann, 'w') as f:
        json.dump(coco, f)
    with pytest.raises(DatasetCheckError, match='none of the classes'):
        _check(config)


def test_undecodable_image(data_copy):
    from mmrest.engine import DatasetCheckError
    data, config = data_copy
    bad = osp.join(data, 'train', sorted(os.listdir(osp.join(data, 'train')))[3])
    with open(bad, 'wb') as f:
        f.write(b'\x89PNG\r\n\x1a\n' + b'garbage' * 10)
    with pytest.raises(DatasetCheckError, match='cannot be decoded') as info:
        _check(config)
    assert bad in str(info.value)


def test_missing_image(data_copy):
    from mmrest.engine import DatasetCheckError
    data, config = data_copy
    gone = osp.join(data, 'val', sorted(os.listdir(osp.join(data, 'val')))[0])
    os.remove(gone)
    with pytest.raises(DatasetCheckError, match='not found') as info:
        _check(config)
    assert gone in str(info.value)


@pytest.mark.slow
def test_cli_reports_data_error_in_one_line(data_copy):
    data, config = data_copy
    ann = osp.join(data, 'annotations', 'instances_train.json')
    with open(ann, 'w') as f:
        f.write('[]')
    proc = run(train_cmd(config, osp.join(data, 'w')))
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith('train.py: error: DatasetCheckError: ')
    assert ann in last and 'is not a COCO annotation file' in last
    assert 'Traceback' not in proc.stderr
    proc = run([PYTHON, TEST, config, osp.join(data, 'missing.pth')])
    assert proc.returncode == 1
    assert 'test.py: error: FileNotFoundError: checkpoint file not found' in proc.stderr
