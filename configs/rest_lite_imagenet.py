# ResT-Lite ImageNet-1k classification, 300 epochs: the ResT-Small recipe
# (configs/rest_small_imagenet.py, where the details are) with ResT-Lite (drop path 0.1).
#
# Paper: ResT (Zhang & Yang, NeurIPS 2021, https://arxiv.org/abs/2105.13677).
# Expected (paper): 77.2 top-1, 10.5M parameters (10,508,300), 1.4 GFLOPs as the paper counts
# them (tools/analysis/get_flops.py).
# Train on 8 GPUs x 256 images:  bash tools/dist_train.sh configs/rest_lite_imagenet.py 8
# Test: python tools/test.py configs/rest_lite_imagenet.py work_dirs/<...>/epoch_300.pth
_base_ = './rest_small_imagenet.py'

model = dict(backbone=dict(arch='lite', drop_path_rate=0.1))
