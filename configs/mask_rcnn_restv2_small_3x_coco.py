# Mask R-CNN + FPN with a ResTv2-Small backbone, COCO 2017, 3x schedule: the ResTv2-Tiny
# recipe (configs/mask_rcnn_restv2_tiny_3x_coco.py, where the details are) with
# ResTv2-Small and drop path 0.2.
#
# Paper: ResT V2 (Zhang & Yang, NeurIPS 2022, https://arxiv.org/abs/2204.07366).
# Expected (authors): 48.1 box AP, 43.3 mask AP, 60.7M parameters (this config builds
# 60.71M).
# Train on 8 GPUs x 2 images:  bash tools/dist_train.sh configs/mask_rcnn_restv2_small_3x_coco.py 8
# Test: python tools/test.py configs/mask_rcnn_restv2_small_3x_coco.py work_dirs/<...>/epoch_36.pth
_base_ = './mask_rcnn_restv2_tiny_3x_coco.py'

model = dict(backbone=dict(
    arch='small', drop_path_rate=0.2, init_cfg=dict(checkpoint='checkpoints/restv2_small.pth')))
