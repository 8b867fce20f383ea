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
    spec = importlib.util.spec_from_file_location(f'mmrest_tool_{name}', path)
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


def tiny_retinanet_text(scale=(320, 256)) -> str:
    """``configs/retinanet_rest_small_coco.py`` with the tiny backbone and a small test
    resize (COCO classes)."""
    return f"""_base_ = {osp.join(CONFIGS, 'retinanet_rest_small_coco.py')!r}
model = dict(
    backbone=dict(arch={TINY_ARCH}, drop_path_rate=0.0, init_cfg=None),
    neck=dict(in_channels=[32, 64, 128], out_channels=32),
    bbox_head=dict(in_channels=32, feat_channels=32, stacked_convs=1))
""" + _det_test_pipeline(scale)


def tiny_mask_rcnn_text(scale=(320, 256)) -> str:
    """``configs/mask_rcnn_rest_small_coco.py`` with the tiny backbone and 32-channel
    heads (COCO classes)."""
    return f"""_base_ = {osp.join(CONFIGS, 'mask_rcnn_rest_small_coco.py')!r}
model = dict(
    backbone=dict(arch={TINY_ARCH}, drop_path_rate=0.0, init_cfg=None),
    neck=dict(in_channels=[16, 32, 64, 128], out_channels=32),
    rpn_head=dict(in_channels=32, feat_channels=32),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=32),
        bbox_head=dict(in_channels=32, fc_out_channels=64),
        mask_roi_extractor=dict(out_channels=32),
        mask_head=dict(in_channels=32, conv_out_channels=32)))
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
