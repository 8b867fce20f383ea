# Mask R-CNN + FPN with a ResTv2-Base backbone, COCO 2017, 3x schedule: the ResTv2-Tiny
# recipe (configs/mask_rcnn_restv2_tiny_3x_coco.py, where the details are) with ResTv2-Base
# and drop path 0.3.
#
# Paper: ResT V2 (Zhang & Yang, NeurIPS 2022, https://arxiv.org/abs/2204.07366).
# Expected (authors): 48.7 box AP, 43.9 mask AP, 75.5M parameters (this config builds
# 75.47M).
# Train on 8 GPUs x 2 images:  bash tools/dist_train.sh configs/mask_rcnn_restv2_base_3x_coco.py 8
# Test: python tools/test.py configs/mask_rcnn_restv2_base_3x_coco.py work_dirs/<...>/epoch_36.pth
_base_ = './mask_rcnn_restv2_tiny_3x_coco.py'

model = dict(backbone=dict(
    arch='base', drop_path_rate=0.3, init_cfg=dict(checkpoint='checkpoints/restv2_base.pth')))
