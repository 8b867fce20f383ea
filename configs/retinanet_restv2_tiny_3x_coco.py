# RetinaNet + FPN with a ResTv2-Tiny backbone, COCO 2017, 3x schedule (36 epochs).
#
# Paper: ResT V2: Simpler, Faster and Stronger (Qing-Long Zhang, Yu-Bin Yang, NeurIPS 2022,
# https://arxiv.org/abs/2204.07366). The authors report no RetinaNet number for ResT V2, and
# their own file for it (github.com/wofmanaf/ResT, object_detection/configs/ResTv2/
# retinanet_restv2_tiny_FPN_3x.yaml) is broken: it asks for a Swin-T backbone builder
# (build_retinanet_swint_fpn_backbone, SWINT.OUT_FEATURES) that their code does not have,
# so it cannot have produced a result. This config builds what the file means, keeping what
# it sets: RetinaNet with FPN on stages 2-4 and P6/P7 from the stage-4 map (as in
# configs/retinanet_rest_small_coco.py), AdamW lr 1e-4, weight decay 0.05 (none on
# normalisation layers, by module type, as in configs/mask_rcnn_restv2_tiny_3x_coco.py),
# total batch 16, 270k iterations ~ 36 epochs with steps at 210k and 250k (epochs 28 and
# 33), 1000 warm-up iterations, shorter side one of (384, 512, 640, 768, 896, 1024) (the
# file's list) with the longer side <= 1333, test at 1333x800, mixed precision on GPUs
# (AmpOptimWrapper), drop path 0.1, nothing frozen (frozen_stages=-1, see the Mask R-CNN
# config for why).
# Expected: no published number. Parameters: this config builds 40.61M.
#
# Pretrained weights: put the authors' ImageNet-1k ResTv2-T file at the path below or pass
#   --cfg-options model.backbone.init_cfg.checkpoint=PATH
# Train on 8 GPUs x 2 images:  bash tools/dist_train.sh configs/retinanet_restv2_tiny_3x_coco.py 8
# Test: python tools/test.py configs/retinanet_restv2_tiny_3x_coco.py work_dirs/<...>/epoch_36.pth
_base_ = ['./retinanet_rest_small_coco.py', './_base_/restv2_detection_3x.py']
# the 3x schedule of configs/_base_/restv2_detection_3x.py
optim_wrapper = {{_base_.restv2_3x_optim_wrapper}}
train_cfg = {{_base_.restv2_3x_train_cfg}}
param_scheduler = {{_base_.restv2_3x_param_scheduler}}

model = dict(
    backbone=dict(type='mmrest.ResTV2', arch='tiny', drop_path_rate=0.1, frozen_stages=-1,
                  init_cfg=dict(checkpoint='checkpoints/restv2_tiny.pth')),
    neck=dict(in_channels=[192, 384, 768]))

train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='RandomChoiceResize', keep_ratio=True,
         scales=[(1333, s) for s in (384, 512, 640, 768, 896, 1024)]),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
