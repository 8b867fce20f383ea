# ResTv2-Large ImageNet-1k classification, 300 epochs: the ResTv2-Tiny recipe
# (configs/restv2_tiny_imagenet.py, where the details are) with ResTv2-Large and drop path
# 0.5 (the authors' per-model value in their downstream code; TRAINING.md gives tiny's
# only).
#
# Paper: ResT V2 (Zhang & Yang, NeurIPS 2022, https://arxiv.org/abs/2204.07366).
# Expected (authors' README): 84.2 top-1, 86.5M parameters (86,532,520), 13.8 GFLOPs as
# they count them (tools/analysis/get_flops.py --family ResTV2).
# Train on 8 GPUs x 256 images:  bash tools/dist_train.sh configs/restv2_large_imagenet.py 8
# Test: python tools/test.py configs/restv2_large_imagenet.py work_dirs/<...>/epoch_300.pth
_base_ = './restv2_tiny_imagenet.py'

model = dict(
    backbone=dict(arch='large', drop_path_rate=0.5), head=dict(in_channels=1024))
