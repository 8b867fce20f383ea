# Mask R-CNN + FPN with a ResTv2-Tiny backbone, COCO 2017, 3x schedule (36 epochs).
#
# Paper: ResT V2: Simpler, Faster and Stronger (Qing-Long Zhang, Yu-Bin Yang, NeurIPS 2022,
# https://arxiv.org/abs/2204.07366), Mask R-CNN 3x on COCO val2017.
# Reproduces the authors' detectron2 recipe (github.com/wofmanaf/ResT, object_detection:
# Base-RCNN-FPN and mask_rcnn_restv2_tiny_FPN_3x): FPN on all four stages, AdamW lr 1e-4,
# weight decay 0.05 (none on normalisation layers, chosen by module type as detectron2's
# WEIGHT_DECAY_NORM=0 does: mmengine's norm_decay_mult, which also catches the BatchNorms
# of the v2 stem, stem.proj.1 and stem.proj.4; biases decay, as in detectron2's defaults),
# total batch 16, 270k iterations ~ 36 epochs with steps at 210k and 250k (epochs 28 and
# 33), 1000 warm-up iterations, the full-model gradient L2 norm clipped to 0.01 (as in
# configs/mask_rcnn_rest_small_coco.py), a random crop of 0.9 x 0.9 of the image, then the
# shorter side one of (480, 512, 534, 576, 640, 672, 704, 736, 768, 800) (the authors' list,
# 534 included) with the longer side <= 1333, test at 1333x800, mixed precision on GPUs
# (AmpOptimWrapper; tools/train.py uses the CPU's bfloat16 wrapper without CUDA), drop path
# 0.1. Nothing is frozen (frozen_stages=-1): the authors' v2 config sets FREEZE_AT=2, but
# their v2 backbone never reads it, so nothing was frozen in the runs behind their numbers.
# Expected (authors): 47.6 box AP, 43.2 mask AP, 49.9M parameters (this config builds
# 49.94M).
#
# Pretrained weights: put the authors' ImageNet-1k ResTv2-T file (any of their layouts) at
# the path below or pass --cfg-options model.backbone.init_cfg.checkpoint=PATH
# (model.backbone.init_cfg=None trains from scratch).
# Train on 8 GPUs x 2 images:  bash tools/dist_train.sh configs/mask_rcnn_restv2_tiny_3x_coco.py 8
# Other total batches: add --cfg-options auto_scale_lr.enable=True (linear rule, base 16).
# Test: python tools/test.py configs/mask_rcnn_restv2_tiny_3x_coco.py work_dirs/<...>/epoch_36.pth
_base_ = ['./mask_rcnn_rest_small_coco.py', './_base_/restv2_detection_3x.py']
# the 3x schedule of configs/_base_/restv2_detection_3x.py
optim_wrapper = {{_base_.restv2_3x_optim_wrapper}}
train_cfg = {{_base_.restv2_3x_train_cfg}}
param_scheduler = {{_base_.restv2_3x_param_scheduler}}

model = dict(
    backbone=dict(type='mmrest.ResTV2', arch='tiny', drop_path_rate=0.1, frozen_stages=-1,
                  init_cfg=dict(checkpoint='checkpoints/restv2_tiny.pth')),
    neck=dict(in_channels=[96, 192, 384, 768]))

train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomCrop', crop_type='relative', crop_size=(0.9, 0.9),
         allow_negative_crop=True, recompute_bbox=True),
    dict(type='RandomChoiceResize', keep_ratio=True,
         scales=[(1333, s) for s in (480, 512, 534, 576, 640, 672, 704, 736, 768, 800)]),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
