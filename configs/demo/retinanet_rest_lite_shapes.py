# The built-in demo: RetinaNet with a small ResT backbone, trained from scratch on the CPU
# on the synthetic shapes dataset (tools/demo.py generates it, or run
# tools/dataset_converters/make_synthetic_shapes.py with its defaults).
#
# Not a paper setting. Changed from RetinaNet-R50-FPN-1x-COCO for a few minutes on 2 CPU
# cores: a reduced ResT arch ("ResT-demo", below; the paper's ResT-lite has embed_dims
# 64-128-256-512 and depths 2-2-2-2), no drop path, no pretrained weights, FPN P3-P5 with
# 64 channels, a lighter head with GroupNorm, anchors matched to the shapes, AdamW with
# warm-up and cosine decay, iteration-based schedule evaluated at the end only.
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'

# --- data -----------------------------------------------------------------------------
# The generator settings of data/synthetic_shapes/ (mmrest.datasets.generate_shapes_dataset
# keywords); tools/demo.py regenerates the data when they differ from what is on disk.
synthetic_shapes = dict(
    num_train=1000,
    num_val=200,
    img_size=(128, 128),
    min_shapes=1,
    max_shapes=3,
    size_range=(0.2, 0.5),
    classes=('circle', 'square', 'triangle'),
    max_overlap=0.0,
    rotate=False,
    class_colors=True,
    seed=0)

dataset_type = 'CocoDataset'
data_root = 'data/synthetic_shapes/'
metainfo = dict(
    classes=('circle', 'square', 'triangle'),
    palette=[(230, 50, 45), (40, 190, 60), (45, 85, 235)])
img_scale = (128, 128)

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(
        type='PackDetInputs',
        meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(
    batch_size=8,
    num_workers=1,
    persistent_workers=True,
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_train.json',
        data_prefix=dict(img='train/'),
        filter_cfg=dict(filter_empty_gt=True, min_size=8),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=8,
    num_workers=1,
    persistent_workers=True,
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_val.json',
        data_prefix=dict(img='val/'),
        test_mode=True,
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json', metric='bbox')
test_evaluator = val_evaluator

# --- model ----------------------------------------------------------------------------
model = dict(
    data_preprocessor=dict(pad_size_divisor=32),
    backbone=dict(
        _delete_=True,
        type='mmrest.ResT',
        # "ResT-demo": a reduced ResT (half the widths of ResT-lite, one block per stage)
        arch=dict(
            embed_dims=[32, 64, 128, 256],
            depths=[1, 1, 1, 1],
            num_heads=[1, 2, 4, 8],
            mlp_ratios=[4, 4, 4, 4],
            sr_ratios=[8, 4, 2, 1]),
        drop_path_rate=0.0,
        out_indices=(1, 2, 3),
        init_cfg=None),
    neck=dict(in_channels=[64, 128, 256], out_channels=64, start_level=0, num_outs=3),
    bbox_head=dict(
        num_classes=3,
        in_channels=64,
        feat_channels=64,
        stacked_convs=2,
        norm_cfg=dict(type='GN', num_groups=16, requires_grad=True),
        anchor_generator=dict(
            octave_base_scale=3, scales_per_octave=2, ratios=[1.0], strides=[8, 16, 32])))

# --- schedule -------------------------------------------------------------------------
max_iters = 2000
train_cfg = dict(
    _delete_=True, type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-3, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0),
    clip_grad=dict(max_norm=10.0, norm_type=2))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=100),
    dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=False, begin=100, end=max_iters),
]
auto_scale_lr = dict(enable=False, base_batch_size=8)

default_hooks = dict(
    logger=dict(type='LoggerHook', interval=50),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=max_iters,
                    max_keep_ckpts=1))
log_processor = dict(by_epoch=False)
