# ResT-Base ImageNet-1k classification, 300 epochs: the ResT-Small recipe
# (configs/rest_small_imagenet.py, where the details are) with ResT-Base and drop path 0.2.
#
# Paper: ResT (Zhang & Yang, NeurIPS 2021, https://arxiv.org/abs/2105.13677).
# Expected (paper): 81.6 top-1, 30.3M parameters (30,327,052), 4.3 GFLOPs as the paper counts
# them (tools/analysis/get_flops.py).
# Train on 8 GPUs x 256 images:  bash tools/dist_train.sh configs/rest_base_imagenet.py 8
# Test: python tools/test.py configs/rest_base_imagenet.py work_dirs/<...>/epoch_300.pth
_base_ = './rest_small_imagenet.py'

model = dict(
    backbone=dict(arch='base', drop_path_rate=0.2),
    head=dict(in_channels=768))
