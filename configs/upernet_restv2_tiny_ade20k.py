# UperNet with a ResTv2-Tiny backbone, ADE20K, 512x512 crops, 160k iterations.
#
# Paper: ResT V2: Simpler, Faster and Stronger (Qing-Long Zhang, Yu-Bin Yang, NeurIPS 2022,
# https://arxiv.org/abs/2204.07366), UperNet on ADE20K val.
# Reproduces the authors' mmseg recipe (github.com/wofmanaf/ResT, semantic_segmentation:
# upernet_restv2_tiny_512_160k_ade20k): UPerHead on all four stages plus an auxiliary FCN
# head on stage 3 (384 channels in, 256 inside, loss weight 0.4), AdamW lr 6e-5, weight
# decay 0.01 with decay_mult=0 for the parameters whose names contain 'norm' (the authors'
# rule: it spares the backbone's LayerNorms and output norms, not the stem's BatchNorms
# stem.proj.1/.4 nor the heads' BatchNorms), linear warm-up over 1500 iterations then poly
# decay (power 1) to 0, total batch 16 (8 GPUs x 2), drop path 0.1, nothing frozen.
# Expected (authors): 47.3 mIoU (multi-scale + flip), 62.1M parameters (this config builds
# 62.09M).
#
# Pretrained weights: put the authors' ImageNet-1k ResTv2-T file at the path below or pass
#   --cfg-options model.backbone.init_cfg.checkpoint=PATH
# (model.backbone.init_cfg=None trains from scratch).
# Train on 8 GPUs x 2 images:  bash tools/dist_train.sh configs/upernet_restv2_tiny_ade20k.py 8
# Other total batches: add --cfg-options auto_scale_lr.enable=True (linear rule, base 16).
# Test: python tools/test.py configs/upernet_restv2_tiny_ade20k.py work_dirs/<...>/iter_160000.pth
_base_ = './upernet_rest_small_ade20k.py'

model = dict(
    backbone=dict(type='mmrest.ResTV2', arch='tiny', drop_path_rate=0.1,
                  init_cfg=dict(checkpoint='checkpoints/restv2_tiny.pth')),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))

optim_wrapper = dict(
    paramwise_cfg=dict(_delete_=True, custom_keys={'norm': dict(decay_mult=0.)}))
