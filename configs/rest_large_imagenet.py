# ResT-Large ImageNet-1k classification, 300 epochs: the ResT-Small recipe
# (configs/rest_small_imagenet.py, where the details are) with ResT-Large, drop path 0.3 and
# the authors' 8 GPUs x 240 images (lr 5e-4 * 1920 / 512).
#
# Paper: ResT (Zhang & Yang, NeurIPS 2021, https://arxiv.org/abs/2105.13677).
# Expected (paper): 83.6 top-1, 51.6M parameters in the authors' table (the released model:
# 51,676,156), 7.9 GFLOPs as the paper counts them (tools/analysis/get_flops.py).
# Train on 8 GPUs x 240 images:  bash tools/dist_train.sh configs/rest_large_imagenet.py 8
# Test: python tools/test.py configs/rest_large_imagenet.py work_dirs/<...>/epoch_300.pth
_base_ = './rest_small_imagenet.py'

model = dict(
    backbone=dict(arch='large', drop_path_rate=0.3),
    head=dict(in_channels=768))

train_dataloader = dict(batch_size=240)
optim_wrapper = dict(optimizer=dict(lr=5e-4 * 1920 / 512))
auto_scale_lr = dict(base_batch_size=1920)
