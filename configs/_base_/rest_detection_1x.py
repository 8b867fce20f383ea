# The 1x schedule of the authors' ResT detection recipes (github.com/wofmanaf/ResT,
# detectron2, *_rest_*_FPN_1x) over mmdet's stock 1x schedule (12 epochs): AdamW lr 1e-4,
# weight decay 0.05 (none on norm layers, detectron2's WEIGHT_DECAY_NORM=0), total batch 16,
# 1000 warm-up iterations, steps at epochs 8 and 11.
_base_ = 'mmdet::_base_/schedules/schedule_1x.py'

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(custom_keys={'norm': dict(decay_mult=0.)}))

param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=1000),
    dict(type='MultiStepLR', begin=0, end=12, by_epoch=True, milestones=[8, 11], gamma=0.1),
]
