# UperNet with a ResT-Base backbone, ADE20K, 512x512, 160k iterations: the ResT-Small recipe
# (configs/upernet_rest_small_ade20k.py, where the details are) with ResT-Base and drop path
# 0.2. The ResT paper reports no ADE20K result to compare with.
#
# Paper: ResT (Zhang & Yang, NeurIPS 2021, https://arxiv.org/abs/2105.13677).
# Train on 8 GPUs x 2 images:  bash tools/dist_train.sh configs/upernet_rest_base_ade20k.py 8
# Test: python tools/test.py configs/upernet_rest_base_ade20k.py work_dirs/<...>/iter_160000.pth
_base_ = './upernet_rest_small_ade20k.py'

pretrained_ckpt = 'checkpoints/rest_base.pth'

model = dict(
    backbone=dict(arch='base', drop_path_rate=0.2, init_cfg=dict(checkpoint=pretrained_ckpt)),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))
