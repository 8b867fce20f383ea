# ResT-Small ImageNet-1k classification (mmpretrain ImageClassifier), 300 epochs from scratch.
#
# Paper: ResT: An Efficient Transformer for Visual Recognition (Qing-Long Zhang, Yu-Bin Yang,
# NeurIPS 2021, https://arxiv.org/abs/2105.13677). Reproduces the authors' DeiT-style recipe
# (github.com/wofmanaf/ResT, main.py defaults and get_started.md): AdamW, lr 5e-4 per 512
# images (8 GPUs x 256 = 2048 -> 2e-3), weight decay 0.05 (none on biases and norms, timm's
# filter_bias_and_bn), cosine decay to 1e-5 per 512 images after 5 linear warm-up epochs from
# 1e-6 per 512 images, gradient-norm clipping at 5.0, RandAugment rand-m9-mstd0.5-inc1, label
# smoothing 0.1, Mixup 0.8, CutMix 1.0, random erasing 0.25, repeated augmentation (the
# authors' default), 224 input, bicubic, the authors' test crop ratio 0.875 (their
# datasets.py resizes the short side to int(256 / 224 * 224) = 256, then center-crops 224;
# timm's crop_pct 0.9 in their model file is not used by their evaluation), drop path 0.1
# (get_started.md: lite 0.1, small 0.1, base 0.2, large 0.3).
# timm's cosine schedule adds 10 cool-down epochs at the minimum lr (310 in all); this config
# trains the 300 epochs of the paper.
# Expected (paper): 79.6 top-1, 13.7M parameters (13,679,708), 1.9 GFLOPs as the paper counts
# them (tools/analysis/get_flops.py).
#
# Train on 8 GPUs x 256 images:  bash tools/dist_train.sh configs/rest_small_imagenet.py 8
# Other total batches: add --cfg-options auto_scale_lr.enable=True (linear rule, base 2048).
# Test: python tools/test.py configs/rest_small_imagenet.py work_dirs/<...>/epoch_300.pth
# (ImageNet in data/imagenet as mmpretrain expects, see the stock dataset config).
_base_ = [
    'mmpretrain::_base_/datasets/imagenet_bs64_swin_224.py',
    'mmpretrain::_base_/schedules/imagenet_bs1024_adamw_swin.py',
    'mmpretrain::_base_/default_runtime.py',
    './_base_/mmrest.py',
]

model = dict(
    type='ImageClassifier',
    backbone=dict(
        type='mmrest.ResT', arch='small', out_indices=(3, ), drop_path_rate=0.1),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(
        type='LinearClsHead',
        num_classes=1000,
        in_channels=512,
        loss=dict(type='LabelSmoothLoss', label_smooth_val=0.1, mode='original'),
        init_cfg=dict(type='TruncNormal', layer='Linear', std=.02, bias=0.)),
    train_cfg=dict(augments=[
        dict(type='Mixup', alpha=0.8),
        dict(type='CutMix', alpha=1.0),
    ]))

test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(
        type='ResizeEdge',
        scale=256,  # int(224 / 0.875), as the authors' evaluation
        edge='short',
        backend='pillow',
        interpolation='bicubic'),
    dict(type='CenterCrop', crop_size=224),
    dict(type='PackInputs'),
]
train_dataloader = dict(batch_size=256, sampler=dict(type='RepeatAugSampler', shuffle=True))
val_dataloader = dict(batch_size=256, dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

optim_wrapper = dict(
    optimizer=dict(lr=5e-4 * 2048 / 512, weight_decay=0.05),
    paramwise_cfg=dict(_delete_=True, flat_decay_mult=0.0),
    clip_grad=dict(max_norm=5.0))

param_scheduler = [
    dict(
        type='LinearLR',
        start_factor=1e-6 / 5e-4,
        by_epoch=True,
        begin=0,
        end=5,
        convert_to_iter_based=True),
    dict(
        type='CosineAnnealingLR',
        eta_min_ratio=1e-5 / 5e-4,
        by_epoch=True,
        begin=5,
        end=300),
]

train_cfg = dict(by_epoch=True, max_epochs=300, val_interval=1)
auto_scale_lr = dict(base_batch_size=2048)
