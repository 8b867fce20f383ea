"""Shared helpers of the deployment and inference tests: real photos, tiny configs
derived from the repository's configs, the deployment tools as modules."""
import importlib.util
import os
import os.path as osp
import sys
from typing import Dict

import cv2
import numpy as np

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEPLOY = osp.join(REPO, 'tools', 'deployment')
CONFIGS = osp.join(REPO, 'configs')

#: A ResT of the published shape (heads 1-2-4-8, reductions 8-4-2-1) at a quarter of
#: ResT-Lite's widths and one block per stage: every attention path, little time.
TINY_ARCH = ('dict(_delete_=True, embed_dims=[16, 32, 64, 128], depths=[1, 1, 1, 1], '
             'num_heads=[1, 2, 4, 8], mlp_ratios=[4, 4, 4, 4], sr_ratios=[8, 4, 2, 1])')

#: scikit-image's bundled photographs (no download): name -> (height, width).
PHOTOS = {'astronaut': (512, 512), 'coffee': (400, 600), 'chelsea': (300, 451)}


def load_tool(name: str):
    """A script of ``tools/deployment`` (or ``tools``) as a module."""
    path = osp.join(DEPLOY, name + '.py')
    if not osp.isfile(path):
        path = osp.join(REPO, 'tools', name + '.py')
    if DEPLOY not in sys.path:
        sys.path.insert(0, DEPLOY)
    spec = importlib.util.spec_from_file_location('mmrest_tool_' + name.replace('/', '_'), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def photo(name: str) -> np.ndarray:
    """A scikit-image photo as OpenCV reads images: BGR uint8 (H, W, 3)."""
    import skimage.data
    rgb = getattr(skimage.data, name)()
    assert rgb.shape[:2] == PHOTOS[name], (name, rgb.shape)
    return np.ascontiguousarray(rgb[..., ::-1])


def write_photos(folder: str) -> Dict[str, str]:
    """The photos as PNG files in ``folder``: name -> path."""
    os.makedirs(folder, exist_ok=True)
    paths = {}
    for name in PHOTOS:
        paths[name] = osp.join(folder, name + '.png')
        assert cv2.imwrite(paths[name], photo(name))
    return paths


def write_text(path: str, text: str) -> str:
    os.makedirs(osp.dirname(path), exist_ok=True)
    with open(path, 'w', encoding='utf-8') as f:
        f.write(text)
    return path


def _det_test_pipeline(scale, with_mask: bool = False) -> str:
    return f"""test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale={tuple(scale)!r}, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask={with_mask}),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
test_dataloader = dict(dataset=dict(pipeline=test_pipeline))
"""


def tiny_retinanet_text(scale=(320, 256), num_classes: int = 80, test_cfg: str = '') -> str:
    """``configs/retinanet_rest_small_coco.py`` with the tiny backbone and a small test
    resize (COCO classes by default)."""
    return f"""_base_ = {osp.join(CONFIGS, 'retinanet_rest_small_coco.py')!r}
model = dict(
    backbone=dict(arch={TINY_ARCH}, drop_path_rate=0.0, init_cfg=None),
    neck=dict(in_channels=[32, 64, 128], out_channels=32),
    bbox_head=dict(in_channels=32, feat_channels=32, stacked_convs=1,
                   num_classes={num_classes}){test_cfg})
""" + _det_test_pipeline(scale)


def tiny_mask_rcnn_text(scale=(320, 256), num_classes: int = 80, test_cfg: str = '') -> str:
    """``configs/mask_rcnn_rest_small_coco.py`` with the tiny backbone and 32-channel
    heads (COCO classes by default)."""
    return f"""_base_ = {osp.join(CONFIGS, 'mask_rcnn_rest_small_coco.py')!r}
model = dict(
    backbone=dict(arch={TINY_ARCH}, drop_path_rate=0.0, init_cfg=None),
    neck=dict(in_channels=[16, 32, 64, 128], out_channels=32),
    rpn_head=dict(in_channels=32, feat_channels=32),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=32),
        bbox_head=dict(in_channels=32, fc_out_channels=64, num_classes={num_classes}),
        mask_roi_extractor=dict(out_channels=32),
        mask_head=dict(in_channels=32, conv_out_channels=32, num_classes={num_classes})){test_cfg})
""" + _det_test_pipeline(scale, with_mask=True)


def tiny_upernet_text(scale=(256, 128)) -> str:
    """``configs/upernet_rest_small_ade20k.py`` with the tiny backbone, 32-channel heads
    and a small test resize (ADE20K classes)."""
    return f"""_base_ = {osp.join(CONFIGS, 'upernet_rest_small_ade20k.py')!r}
model = dict(
    backbone=dict(arch={TINY_ARCH}, drop_path_rate=0.0, init_cfg=None),
    decode_head=dict(in_channels=[16, 32, 64, 128], channels=32),
    auxiliary_head=dict(in_channels=64, channels=32))
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale={tuple(scale)!r}, keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
test_dataloader = dict(dataset=dict(pipeline=test_pipeline))
"""


def shapes_classes(data_root: str) -> tuple:
    """Class names of a synthetic shapes dataset (its COCO categories, by id)."""
    import json
    with open(osp.join(data_root, 'annotations', 'instances_train.json')) as f:
        categories = sorted(json.load(f)['categories'], key=lambda c: c['id'])
    return tuple(c['name'] for c in categories)


def _coco_shapes_text(data_root: str, with_mask: bool) -> str:
    """Data settings of a detection config on the synthetic shapes (tests/_engine_helpers'
    ``make_shapes_data``): 64x64 images, one training iteration, no validation."""
    classes = shapes_classes(data_root)
    palette = [(50 * i % 256, 120 * i % 256, 200 * i % 256) for i in range(len(classes))]
    root = data_root.rstrip('/') + '/'
    return f"""data_root = {root!r}
metainfo = dict(classes={classes!r}, palette={palette!r})
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask={with_mask}),
    dict(type='Resize', scale=(64, 64), keep_ratio=True),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(64, 64), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask={with_mask}),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo,
                 ann_file='annotations/instances_train.json', data_prefix=dict(img='train/'),
                 pipeline=train_pipeline))
test_dataloader = dict(
    batch_size=1, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo,
                 ann_file='annotations/instances_val.json', data_prefix=dict(img='val/'),
                 pipeline=test_pipeline))
test_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
val_dataloader = None
val_cfg = None
val_evaluator = None
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=1)
param_scheduler = []
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(by_epoch=False, interval=1))
log_processor = dict(by_epoch=False)
"""


def shapes_retinanet_text(data_root: str) -> str:
    """Tiny RetinaNet from ``configs/retinanet_rest_small_coco.py`` on the shapes; every
    score is kept (``score_thr=0``) so that a barely trained model predicts boxes."""
    return tiny_retinanet_text(num_classes=len(shapes_classes(data_root)),
                               test_cfg=',\n    test_cfg=dict(score_thr=0.0)') + \
        _coco_shapes_text(data_root, False)


def shapes_mask_rcnn_text(data_root: str) -> str:
    """Tiny Mask R-CNN from ``configs/mask_rcnn_rest_small_coco.py`` on the shapes (boxes
    and instance masks); every score is kept."""
    return tiny_mask_rcnn_text(num_classes=len(shapes_classes(data_root)),
                               test_cfg=',\n    test_cfg=dict(rcnn=dict(score_thr=0.0))') + \
        _coco_shapes_text(data_root, True)


class _OpensFile:
    """Unpickling this calls ``open(path, 'w')``, i.e. runs code that creates a file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, 'w'))


def write_code_running_checkpoint(path: str, marker: str) -> str:
    """An mmengine-looking checkpoint whose loading would create ``marker``."""
    import torch
    torch.save(dict(meta=dict(dataset_meta=dict(classes=('a', 'b')), note=_OpensFile(marker)),
                    state_dict={'backbone.stem.conv1.weight': torch.zeros(1)}), path)
    return path
