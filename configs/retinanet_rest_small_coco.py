# RetinaNet + FPN with a ResT-Small backbone, COCO 2017, 1x schedule (12 epochs).
#
# Paper: ResT: An Efficient Transformer for Visual Recognition (Qing-Long Zhang, Yu-Bin Yang,
# NeurIPS 2021, https://arxiv.org/abs/2105.13677), RetinaNet 1x on COCO val2017.
# Reproduces the authors' detectron2 recipe (github.com/wofmanaf/ResT, RetinaNet ResT 1x):
# FPN on stages 2-4, P6/P7 from the stage-4 map, AdamW lr 1e-4, weight decay 0.05 (none on
# norm layers, detectron2's WEIGHT_DECAY_NORM=0), total batch 16, 90k iterations ~ 12
# epochs with steps at epochs 8 and 11, 1000 warm-up iterations, shorter side in
# (640, 672, ..., 800) with the longer side <= 1333, test at 1333x800, drop path 0.1, stem
# and stage 1 frozen (detectron2's FREEZE_AT=2 in the authors' code).
# Expected (paper): 40.3 box AP, 23.4M parameters (this config builds 23.40M).
#
# Pretrained weights: put the authors' ImageNet-1k ResT-Small file at the path below (any of
# their layouts loads; see README) or pass
#   --cfg-options model.backbone.init_cfg.checkpoint=PATH
# and --cfg-options model.backbone.init_cfg=None trains from scratch.
# Train on 8 GPUs x 2 images:  bash tools/dist_train.sh configs/retinanet_rest_small_coco.py 8
# Other total batches: add --cfg-options auto_scale_lr.enable=True (linear rule, base 16).
# Test: python tools/test.py configs/retinanet_rest_small_coco.py work_dirs/<...>/epoch_12.pth
_base_ = [
    'mmdet::_base_/models/retinanet_r50_fpn.py',
    'mmdet::_base_/datasets/coco_detection.py',
    './_base_/rest_detection_1x.py',
    'mmdet::_base_/default_runtime.py',
    './_base_/mmrest.py',
]

pretrained_ckpt = 'checkpoints/rest_small.pth'

model = dict(
    backbone=dict(
        _delete_=True, type='mmrest.ResT', arch='small', out_indices=(1, 2, 3),
        drop_path_rate=0.1, frozen_stages=1,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained_ckpt)),
    neck=dict(
        in_channels=[128, 256, 512],
        start_level=0,
        add_extra_convs='on_input',
        num_outs=5))

train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(
        type='RandomChoiceResize',
        scales=[(1333, s) for s in range(640, 801, 32)],
        keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
train_dataloader = dict(batch_size=2, num_workers=2, dataset=dict(pipeline=train_pipeline))
