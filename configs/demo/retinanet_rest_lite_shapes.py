# The built-in demo: RetinaNet with a small ResT backbone, trained from scratch on the CPU
# on the synthetic shapes dataset (tools/demo.py writes it to data/synthetic_shapes/, as
# does tools/dataset_converters/make_synthetic_shapes.py with its defaults).
#
# NOT a paper setting. Changed from RetinaNet-R50-FPN-1x-COCO to learn in a few minutes on
# 2 CPU cores:
# - backbone "ResT-demo": a reduced ResT arch (half the widths of ResT-lite and one block
#   per stage; ResT-lite itself is 64-128-256-512 wide and 2-2-2-2 deep), no drop path,
#   no pretrained weights;
# - FPN on stages 2-3 (strides 8 and 16: the 19-58 px shapes need no coarser level; the
#   head on P3-P4 alone learned faster than on P3-P5, and costs less) with 64 channels; a
#   head of three 64-channel convs with GroupNorm; one anchor shape, two sizes per octave,
#   24-68 px;
# - AdamW 2e-3 with linear warm-up and cosine decay, 1600 iterations of batch 8 (the
#   class of a shape is learned late: at 1e-3 and 1000 iterations squares and crosses
#   were still often mistaken); the validation set is evaluated every 320 iterations (a
#   few seconds each) for the demo's learning curve (tools/demo.py also asks for
#   per-class AP). The mAP uses mmdet's per-class NMS; tools/demo.py draws its picture
#   with class-agnostic NMS (one box per object).
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['mmrest'], allow_failed_imports=False)

# --- data -----------------------------------------------------------------------------
classes = ('circle', 'square', 'triangle', 'star', 'cross')
palette = [(230, 50, 45), (40, 190, 60), (45, 85, 235), (30, 215, 225), (250, 135, 20)]
# How data/synthetic_shapes/ is generated (keywords of
# mmrest.testing.generate_shapes_dataset); tools/demo.py regenerates the data when the
# settings on disk differ. Random colours (the shape alone tells the class), rotation,
# partial occlusion, textured backgrounds; 1-4 shapes of 19-58 px per 128x128 image.
synthetic_shapes = dict(
    num_train=1000,
    num_val=200,
    img_size=(128, 128),
    min_shapes=1,
    max_shapes=4,
    size_range=(0.15, 0.45),
    classes=classes,
    max_overlap=0.2,
    min_visible=0.6,
    rotate=True,
    class_colors=False,
    noise_std=6.0,
    seed=0)

dataset_type = 'CocoDataset'
data_root = 'data/synthetic_shapes/'
metainfo = dict(classes=classes, palette=palette)
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
    # one endless pass over the shuffled images: no pause between epochs (mmengine's
    # iteration loop sleeps 2 s at each epoch end of a finite sampler, 11 times here)
    sampler=dict(type='InfiniteSampler', shuffle=True),
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
        arch=dict(  # "ResT-demo", see above
            embed_dims=[32, 64, 128, 256],
            depths=[1, 1, 1, 1],
            num_heads=[1, 2, 4, 8],
            mlp_ratios=[4, 4, 4, 4],
            sr_ratios=[8, 4, 2, 1]),
        drop_path_rate=0.0,
        out_indices=(1, 2),
        init_cfg=None),
    neck=dict(in_channels=[64, 128], out_channels=64, start_level=0, num_outs=2),
    bbox_head=dict(
        num_classes=len(classes),
        in_channels=64,
        feat_channels=64,
        stacked_convs=3,
        norm_cfg=dict(type='GN', num_groups=16, requires_grad=True),
        # anchors of 24, 34 (P3), 48, 68 (P4) px
        anchor_generator=dict(
            octave_base_scale=3, scales_per_octave=2, ratios=[1.0], strides=[8, 16])))

# Stage 4 of the backbone is not used (out_indices stop at stage 3): distributed runs
# must tell DDP that some parameters take no gradient.
model_wrapper_cfg = dict(type='MMDistributedDataParallel', find_unused_parameters=True)

# --- schedule -------------------------------------------------------------------------
max_iters = 1600
train_cfg = dict(
    _delete_=True, type='IterBasedTrainLoop', max_iters=max_iters, val_interval=320)
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=2e-3, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0),
    clip_grad=dict(max_norm=10.0, norm_type=2))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=100),
    dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=False, begin=100, end=max_iters),
]
auto_scale_lr = dict(enable=False, base_batch_size=8)

default_hooks = dict(
    logger=dict(type='LoggerHook', interval=50),
    checkpoint=dict(
        type='CheckpointHook', by_epoch=False, interval=max_iters, max_keep_ckpts=1))
log_processor = dict(by_epoch=False)
