# Mask R-CNN + FPN with a ResT-Small backbone, COCO 2017, 1x schedule (12 epochs).
#
# Paper: ResT: An Efficient Transformer for Visual Recognition (Qing-Long Zhang, Yu-Bin Yang,
# NeurIPS 2021, https://arxiv.org/abs/2105.13677), Mask R-CNN 1x on COCO val2017.
# Reproduces the authors' detectron2 recipe (github.com/wofmanaf/ResT, Base-RCNN-FPN and
# mask_rcnn_rest_*_FPN_1x): FPN on all four stages, AdamW lr 1e-4, weight decay 0.05 (none on
# norm layers), total batch 16, 90k iterations ~ 12 epochs with steps at epochs 8 and 11,
# 1000 warm-up iterations, the full-model gradient L2 norm clipped to 0.01 (detectron2
# CLIP_TYPE 'full_model': one torch.nn.utils.clip_grad_norm_ over all parameters, which is
# what mmengine's clip_grad does), a random crop of 0.9 x 0.9 of the image (detectron2
# 'relative' crop, applied before the resize) and a shorter side in (640, 672, ..., 800)
# with the longer side <= 1333, test at 1333x800, drop path 0.1, stem and stage 1 frozen.
# Expected (paper): 39.6 box AP, 37.2 mask AP, 33.3M parameters (this config builds 33.32M).
#
# Pretrained weights: put the authors' ImageNet-1k ResT-Small file at the path below or pass
#   --cfg-options model.backbone.init_cfg.checkpoint=PATH
# (model.backbone.init_cfg=None trains from scratch).
# Train on 8 GPUs x 2 images:  bash tools/dist_train.sh configs/mask_rcnn_rest_small_coco.py 8
# Other total batches: add --cfg-options auto_scale_lr.enable=True (linear rule, base 16).
# Test: python tools/test.py configs/mask_rcnn_rest_small_coco.py work_dirs/<...>/epoch_12.pth
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    './_base_/rest_detection_1x.py',
    'mmdet::_base_/default_runtime.py',
    './_base_/mmrest.py',
]

pretrained_ckpt = 'checkpoints/rest_small.pth'

model = dict(
    backbone=dict(
        _delete_=True, type='mmrest.ResT', arch='small', out_indices=(0, 1, 2, 3),
        drop_path_rate=0.1, frozen_stages=1,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained_ckpt)),
    neck=dict(in_channels=[64, 128, 256, 512]))

train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(
        type='RandomCrop',
        crop_type='relative',
        crop_size=(0.9, 0.9),
        allow_negative_crop=True,
        recompute_bbox=True),
    dict(
        type='RandomChoiceResize',
        scales=[(1333, s) for s in range(640, 801, 32)],
        keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
train_dataloader = dict(batch_size=2, num_workers=2, dataset=dict(pipeline=train_pipeline))

optim_wrapper = dict(clip_grad=dict(max_norm=0.01, norm_type=2))
