"""The synthetic shapes generator: determinism, COCO validity, masks vs boxes vs semantic maps.

Masks are decoded with pycocotools and the files are read back with OpenCV.
"""
import hashlib
import json
import os
import os.path as osp
import subprocess
import sys

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mmrest.testing import (DEMO_CLASSES, SHAPES, generate_shapes_dataset,
                            read_generator_settings)

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
SMALL = dict(num_train=12, num_val=8, img_size=(64, 80), max_shapes=3, seed=3)


def _files(root):
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = osp.join(dirpath, name)
            with open(path, 'rb') as f:
                out[osp.relpath(path, root)] = hashlib.sha1(f.read()).hexdigest()
    return out


def _load(root, split):
    with open(osp.join(root, 'annotations', f'instances_{split}.json')) as f:
        return json.load(f)


def _decode(segm):
    """A COCO RLE segmentation as an (H, W) uint8 mask."""
    assert isinstance(segm['counts'], str) and len(segm['size']) == 2, segm
    return mask_utils.decode(dict(segm, counts=segm['counts'].encode('ascii')))


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    """The demo's settings (the defaults), fewer and smaller images."""
    root = str(tmp_path_factory.mktemp('shapes'))
    result = generate_shapes_dataset(root, **SMALL)
    return root, result


@pytest.fixture(scope='module')
def apart(tmp_path_factory):
    """Upright shapes kept apart, one colour per class."""
    root = str(tmp_path_factory.mktemp('apart'))
    generate_shapes_dataset(root, num_train=10, num_val=4, img_size=(96, 96), max_shapes=4,
                            classes=('circle', 'square', 'triangle'), max_overlap=0.0,
                            rotate=False, class_colors=True, seed=7)
    return root


@pytest.fixture(scope='module')
def crowded(tmp_path_factory):
    """Overlapping, rotated shapes of every kind: occlusion paths."""
    root = str(tmp_path_factory.mktemp('crowded'))
    generate_shapes_dataset(root, num_train=10, num_val=4, img_size=(72, 72), min_shapes=3,
                            max_shapes=6, size_range=(0.25, 0.6), classes=SHAPES,
                            max_overlap=0.5, min_visible=0.5, rotate=True,
                            class_colors=False, seed=11)
    return root


def test_deterministic_by_seed(dataset, tmp_path):
    root, _ = dataset
    again = str(tmp_path / 'again')
    generate_shapes_dataset(again, **SMALL)
    first, second = _files(root), _files(again)
    assert len(first) == 2 + 2 * (SMALL['num_train'] + SMALL['num_val'])
    assert first == second
    other = str(tmp_path / 'other')
    generate_shapes_dataset(other, **dict(SMALL, seed=4))
    changed = [k for k in first if k.endswith('.png') and first[k] != _files(other)[k]]
    assert len(changed) == len([k for k in first if k.endswith('.png')])


def test_class_colors_give_each_class_its_hue(apart):
    """With class_colors, the mean colour of a shape is near its class's base colour."""
    from mmrest.testing import CLASS_COLORS
    coco = _load(apart, 'train')
    names = {c['id']: c['name'] for c in coco['categories']}
    files = {im['id']: im['file_name'] for im in coco['images']}
    for ann in coco['annotations']:
        img = cv2.imread(osp.join(apart, 'train', files[ann['image_id']]))[..., ::-1]
        mean = img[_decode(ann['segmentation']).astype(bool)].mean(axis=0)
        base = np.array(CLASS_COLORS[names[ann['category_id']]])
        assert np.abs(mean - base).max() < 25, (names[ann['category_id']], mean, base)


def test_layout_and_categories(dataset):
    root, result = dataset
    assert result['num_images'] == {'train': 12, 'val': 8}
    for split in ('train', 'val'):
        coco = _load(root, split)
        assert [c['id'] for c in coco['categories']] == [1, 2, 3, 4, 5]
        assert [c['name'] for c in coco['categories']] == list(DEMO_CLASSES)
        assert coco['info']['generator']['seed'] == 3
        assert len(coco['images']) == SMALL[f'num_{split}']
        assert len({im['id'] for im in coco['images']}) == len(coco['images'])
        assert sum(1 for a in coco['annotations']) == result['num_instances'][split]
        for im in coco['images']:
            img = cv2.imread(osp.join(root, split, im['file_name']), cv2.IMREAD_UNCHANGED)
            sem = cv2.imread(osp.join(root, 'semantic', split, im['file_name']),
                             cv2.IMREAD_UNCHANGED)
            assert img.shape == (64, 80, 3) and img.dtype == np.uint8
            assert sem.shape == (64, 80) and sem.dtype == np.uint8
            assert (im['height'], im['width']) == (64, 80)


def _check_split(root, split, num_classes, apart):
    coco = _load(root, split)
    by_image = {im['id']: [] for im in coco['images']}
    for ann in coco['annotations']:
        by_image[ann['image_id']].append(ann)
    assert all(by_image.values()), 'every image holds at least one shape'
    for im in coco['images']:
        sem = cv2.imread(osp.join(root, 'semantic', split, im['file_name']),
                         cv2.IMREAD_UNCHANGED)
        assert set(np.unique(sem)) <= set(range(num_classes + 1))
        union = np.zeros(sem.shape, dtype=np.int64)
        boxes = []
        for ann in by_image[im['id']]:
            assert ann['iscrowd'] == 0
            m = _decode(ann['segmentation'])
            assert m.shape == sem.shape and m.sum() == ann['area'] > 0
            ys, xs = np.nonzero(m)
            x, y, w, h = ann['bbox']
            assert [x, y, w, h] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(),
                                    ys.max() + 1 - ys.min()]
            assert 0 <= x and 0 <= y and x + w <= im['width'] and y + h <= im['height']
            # the semantic map holds the category id wherever the instance is visible
            assert (sem[m.astype(bool)] == ann['category_id']).all()
            union += m
            boxes.append([x, y, x + w, y + h])
        assert union.max() == 1, 'visible masks of one image are disjoint'
        np.testing.assert_array_equal(sem > 0, union > 0)
        if apart:  # max_overlap=0: boxes of one image do not intersect
            for i in range(len(boxes)):
                for j in range(i):
                    a, b = boxes[i], boxes[j]
                    assert min(a[2], b[2]) <= max(a[0], b[0]) or \
                        min(a[3], b[3]) <= max(a[1], b[1]), (a, b)


def test_masks_boxes_and_semantic_maps_agree(dataset, apart):
    root, _ = dataset
    for split in ('train', 'val'):
        _check_split(root, split, len(DEMO_CLASSES), apart=False)
        _check_split(apart, split, 3, apart=True)


def test_occlusion_keeps_annotations_consistent(crowded):
    for split in ('train', 'val'):
        _check_split(crowded, split, len(SHAPES), apart=False)
    coco = _load(crowded, 'train')
    assert {a['category_id'] for a in coco['annotations']} >= {1, 2, 3, 4}
    assert len(coco['annotations']) > 3 * 10


def test_pycocotools_reads_it_and_perfect_predictions_score_one(dataset):
    root, _ = dataset
    gt = COCO(osp.join(root, 'annotations', 'instances_val.json'))
    dets = [dict(image_id=a['image_id'], category_id=a['category_id'], bbox=a['bbox'],
                 score=1.0, segmentation=a['segmentation'])
            for a in gt.dataset['annotations']]
    for iou_type in ('bbox', 'segm'):
        res = gt.loadRes([dict(d) for d in dets])
        ev = COCOeval(gt, res, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        assert ev.stats[0] == pytest.approx(1.0)
    # shifting every box by half its size drops AP@[.5:.95] to zero
    shifted = [dict(d, bbox=[d['bbox'][0] + d['bbox'][2] / 2, d['bbox'][1], d['bbox'][2],
                             d['bbox'][3]]) for d in dets]
    ev = COCOeval(gt, gt.loadRes(shifted), 'bbox')
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ev.stats[0] < 0.05


def test_train_and_val_are_disjoint(dataset):
    root, _ = dataset
    hashes = {}
    for split in ('train', 'val'):
        for im in _load(root, split)['images']:
            img = cv2.imread(osp.join(root, split, im['file_name']))
            hashes.setdefault(hashlib.sha1(img.tobytes()).hexdigest(), []).append(split)
    assert all(len(v) == 1 for v in hashes.values())
    assert len(hashes) == SMALL['num_train'] + SMALL['num_val']


def test_val_split_does_not_depend_on_train_size(tmp_path):
    a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
    generate_shapes_dataset(a, **SMALL)
    generate_shapes_dataset(b, **dict(SMALL, num_train=2))
    assert {k: v for k, v in _files(a).items() if k.startswith('val')} == \
        {k: v for k, v in _files(b).items() if k.startswith('val')}


@pytest.mark.parametrize('kwargs, exc, match', [
    (dict(classes=('circle', 'blob')), KeyError, "'blob'"),
    (dict(size_range=(0.0, 0.5)), ValueError, r'size_range .*\(0.0, 0.5\)'),
    (dict(size_range=(0.5, 0.95)), ValueError, r'size_range .*\(0.5, 0.95\)'),
    (dict(min_shapes=3, max_shapes=2), ValueError, 'min_shapes=3, max_shapes=2'),
    (dict(img_size=(8, 64)), ValueError, r'\(8, 64\)'),
    (dict(classes=('star', 'star')), ValueError, 'unique'),
    (dict(max_overlap=1.0), ValueError, 'max_overlap .* 1.0'),
    (dict(num_val=-1), ValueError, '-1'),
])
def test_bad_arguments_name_the_value(tmp_path, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        generate_shapes_dataset(str(tmp_path), **dict(dict(num_train=1, num_val=1), **kwargs))
    assert not osp.exists(osp.join(tmp_path, 'annotations'))


def test_read_generator_settings(dataset, tmp_path):
    root, result = dataset
    assert read_generator_settings(root) == result['settings']
    assert read_generator_settings(str(tmp_path / 'missing')) is None
    copy = str(tmp_path / 'copy')
    generate_shapes_dataset(copy, **SMALL)
    os.remove(osp.join(copy, 'val', '000003.png'))
    assert read_generator_settings(copy) is None


@pytest.mark.slow
def test_import_mmrest_does_not_import_the_generator_or_mmdet():
    code = ('import sys, mmrest; assert "mmrest.testing" not in sys.modules, '
            'sorted(m for m in sys.modules if m.startswith("mmrest")); '
            'assert "mmdet" not in sys.modules')
    subprocess.run([sys.executable, '-c', code], check=True, cwd=REPO)


@pytest.mark.slow
def test_cli_writes_dataset_and_reports_errors(tmp_path):
    tool = osp.join(REPO, 'tools', 'dataset_converters', 'make_synthetic_shapes.py')
    out = str(tmp_path / 'cli')
    proc = subprocess.run(
        [sys.executable, tool, '--out-dir', out, '--num-train', '3', '--num-val', '2',
         '--img-size', '48', '56', '--classes', 'star', 'cross', '--seed', '5'],
        capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert 'wrote 3 train images' in proc.stdout
    settings = read_generator_settings(out)
    assert settings['classes'] == ['star', 'cross'] and settings['img_size'] == [48, 56]
    assert settings['seed'] == 5
    bad = subprocess.run([sys.executable, tool, '--out-dir', out, '--size-range', '0.6',
                          '0.3'], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and '(0.6, 0.3)' in bad.stderr
