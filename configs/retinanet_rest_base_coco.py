# RetinaNet + FPN with a ResT-Base backbone, COCO 2017, 1x schedule: the ResT-Small recipe
# (configs/retinanet_rest_small_coco.py, where the details are) with ResT-Base and drop path
# 0.2.
#
# Paper: ResT (Zhang & Yang, NeurIPS 2021, https://arxiv.org/abs/2105.13677).
# Expected (paper): 42.0 box AP, 40.5M parameters (this config builds 40.50M).
# Train on 8 GPUs x 2 images:  bash tools/dist_train.sh configs/retinanet_rest_base_coco.py 8
# Test: python tools/test.py configs/retinanet_rest_base_coco.py work_dirs/<...>/epoch_12.pth
_base_ = './retinanet_rest_small_coco.py'

pretrained_ckpt = 'checkpoints/rest_base.pth'

model = dict(
    backbone=dict(arch='base', drop_path_rate=0.2, init_cfg=dict(checkpoint=pretrained_ckpt)),
    neck=dict(in_channels=[192, 384, 768]))
