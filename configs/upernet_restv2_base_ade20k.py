# UperNet with a ResTv2-Base backbone, ADE20K, 512x512, 160k iterations: the ResTv2-Small
# recipe (configs/upernet_restv2_small_ade20k.py: stage-wise lr decay 0.9, AdamW 1.5e-4,
# weight decay 0.05) with ResTv2-Base and drop path 0.3.
#
# Paper: ResT V2 (Zhang & Yang, NeurIPS 2022, https://arxiv.org/abs/2204.07366).
# Expected (authors): 49.6 mIoU (multi-scale + flip), 87.6M parameters (this config builds
# 87.62M).
# Train on 8 GPUs x 2 images:  bash tools/dist_train.sh configs/upernet_restv2_base_ade20k.py 8
# Test: python tools/test.py configs/upernet_restv2_base_ade20k.py work_dirs/<...>/iter_160000.pth
_base_ = './upernet_restv2_small_ade20k.py'

model = dict(backbone=dict(
    arch='base', drop_path_rate=0.3, init_cfg=dict(checkpoint='checkpoints/restv2_base.pth')))
