# ResTv2-Tiny ImageNet-1k classification (mmpretrain ImageClassifier), 300 epochs from
# scratch.
#
# Paper: ResT V2: Simpler, Faster and Stronger (Qing-Long Zhang, Yu-Bin Yang, NeurIPS 2022,
# https://arxiv.org/abs/2204.07366). Reproduces the authors' v2 recipe (github.com/wofmanaf/
# ResT, TRAINING.md): AdamW, lr 1.5e-4 per 256 images (8 GPUs x 256 = 2048 -> 1.2e-3),
# weight decay 0.05 (none on 1-D parameters: biases and norms), 50 linear warm-up epochs
# from ~0, then cosine decay to 1e-6 over the remaining 250 of 300 epochs, gradient-norm
# clipping at 1.0, EMA of the weights with decay 0.9999 (mmpretrain's EMAHook, evaluated on
# the EMA weights), RandAugment rand-m9-mstd0.5-inc1, Mixup 0.8, CutMix 1.0, label smoothing
# 0.1, random erasing 0.25, 224 input, bicubic, no repeated augmentation, test crop ratio
# 1.0 (resize the short side to 224, center crop 224), drop path 0.1 (TRAINING.md's value
# for tiny). The augmentation and loss settings are those of configs/rest_small_imagenet.py.
# Expected (authors' README): 82.3 top-1, 30.4M parameters (30,434,776), 4.1 GFLOPs as they
# count them (tools/analysis/get_flops.py --family ResTV2).
#
# Train on 8 GPUs x 256 images:  bash tools/dist_train.sh configs/restv2_tiny_imagenet.py 8
# Other total batches: add --cfg-options auto_scale_lr.enable=True (linear rule, base 2048).
# Test: python tools/test.py configs/restv2_tiny_imagenet.py work_dirs/<...>/epoch_300.pth
# (ImageNet in data/imagenet as mmpretrain expects, see the stock dataset config).
_base_ = './rest_small_imagenet.py'

model = dict(
    backbone=dict(type='mmrest.ResTV2', arch='tiny', drop_path_rate=0.1),
    head=dict(in_channels=768))

test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(
        type='ResizeEdge', scale=224, edge='short', backend='pillow',
        interpolation='bicubic'),
    dict(type='CenterCrop', crop_size=224),
    dict(type='PackInputs'),
]
train_dataloader = dict(sampler=dict(_delete_=True, type='DefaultSampler', shuffle=True))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

optim_wrapper = dict(optimizer=dict(lr=1.5e-4 * 2048 / 256), clip_grad=dict(max_norm=1.0))

# warm-up from ~0 (the authors' starts at 0, which mmengine's LinearLR cannot chain from)
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=True, begin=0, end=50,
         convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=1e-6, by_epoch=True, begin=50, end=300,
         convert_to_iter_based=True),
]

custom_hooks = [dict(type='EMAHook', momentum=1e-4, priority='ABOVE_NORMAL')]
