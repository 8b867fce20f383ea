# The 3x schedule of the authors' ResT V2 detection recipes (github.com/wofmanaf/ResT,
# object_detection, *_restv2_*_FPN_3x): total batch 16, 270k iterations ~ 36 epochs with
# steps at 210k and 250k (epochs 28 and 33), 1000 linear warm-up iterations, mixed
# precision on GPUs (AmpOptimWrapper; tools/train.py uses the CPU's bfloat16 wrapper
# without CUDA), no weight decay on normalisation layers (by module type).
#
# The detection configs that use it inherit parents which define optim_wrapper, train_cfg
# and param_scheduler themselves, and mmengine refuses a key defined by two bases; so they
# list this file as a second base and take its values by reference:
#   optim_wrapper = {{_base_.restv2_3x_optim_wrapper}}
restv2_3x_optim_wrapper = dict(
    type='AmpOptimWrapper',
    loss_scale='dynamic',
    paramwise_cfg=dict(_delete_=True, norm_decay_mult=0.))
restv2_3x_train_cfg = dict(max_epochs=36)
restv2_3x_param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=1000),
    dict(type='MultiStepLR', begin=0, end=36, by_epoch=True, milestones=[28, 33], gamma=0.1),
]
