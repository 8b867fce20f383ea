# UperNet with a ResT-Small backbone, ADE20K, 512x512 crops, 160k iterations.
#
# Backbone paper: ResT: An Efficient Transformer for Visual Recognition (Qing-Long Zhang,
# Yu-Bin Yang, NeurIPS 2021, https://arxiv.org/abs/2105.13677). The ResT paper reports no
# semantic segmentation, so there is no paper number to compare with. Recipe: UPerHead on
# all four stages plus an auxiliary FCN head on stage 3 (loss weight 0.4), AdamW lr 6e-5,
# weight decay 0.01 with none on norm layers, linear warm-up over 1500 iterations then poly
# decay (power 1) to 0, total batch 16 (8 GPUs x 2), drop path 0.1. The authors' UperNet
# configs for ResTv2 (github.com/wofmanaf/ResT, semantic_segmentation) share the model,
# warm-up, poly schedule and batch, but use lr 1.5e-4, weight decay 0.05 and a stage-wise
# learning-rate decay of 0.9 for their v2 backbones.
#
# Pretrained weights: put the authors' ImageNet-1k ResT-Small file at the path below or pass
#   --cfg-options model.backbone.init_cfg.checkpoint=PATH
# (model.backbone.init_cfg=None trains from scratch).
# Train on 8 GPUs x 2 images:  bash tools/dist_train.sh configs/upernet_rest_small_ade20k.py 8
# Other total batches: add --cfg-options auto_scale_lr.enable=True (linear rule, base 16).
# Test: python tools/test.py configs/upernet_rest_small_ade20k.py work_dirs/<...>/iter_160000.pth
_base_ = [
    'mmseg::_base_/models/upernet_r50.py',
    'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_160k.py',
    './_base_/mmrest.py',
]

crop_size = (512, 512)
pretrained_ckpt = 'checkpoints/rest_small.pth'

model = dict(
    data_preprocessor=dict(size=crop_size),
    pretrained=None,
    backbone=dict(
        _delete_=True, type='mmrest.ResT', arch='small', out_indices=(0, 1, 2, 3),
        drop_path_rate=0.1, init_cfg=dict(type='Pretrained', checkpoint=pretrained_ckpt)),
    decode_head=dict(in_channels=[64, 128, 256, 512], num_classes=150),
    auxiliary_head=dict(in_channels=256, in_index=2, num_classes=150))

train_dataloader = dict(batch_size=2)

# No weight decay on norm layers: 'norm' names every norm of the backbone (BatchNorms of
# the stem and patch embeddings, LayerNorms of the blocks, reductions and outputs); '.bn.'
# names the SyncBatchNorms of the heads' ConvModules.
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(custom_keys={
        'norm': dict(decay_mult=0.),
        '.bn.': dict(decay_mult=0.),
    }))

param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=1500, end=160000, by_epoch=False),
]

auto_scale_lr = dict(enable=False, base_batch_size=16)
