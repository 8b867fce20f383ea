# ResTv2-Base ImageNet-1k classification, 300 epochs: the ResTv2-Tiny recipe
# (configs/restv2_tiny_imagenet.py, where the details are) with ResTv2-Base and drop path
# 0.3 (the authors' per-model value in their downstream code; TRAINING.md gives tiny's
# only).
#
# Paper: ResT V2 (Zhang & Yang, NeurIPS 2022, https://arxiv.org/abs/2204.07366).
# Expected (authors' README): 83.7 top-1, 56.0M parameters (55,965,208), 7.9 GFLOPs as
# they count them (tools/analysis/get_flops.py --family ResTV2).
# Train on 8 GPUs x 256 images:  bash tools/dist_train.sh configs/restv2_base_imagenet.py 8
# Test: python tools/test.py configs/restv2_base_imagenet.py work_dirs/<...>/epoch_300.pth
_base_ = './restv2_tiny_imagenet.py'

model = dict(
    backbone=dict(arch='base', drop_path_rate=0.3))
