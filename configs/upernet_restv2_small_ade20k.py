# UperNet with a ResTv2-Small backbone, ADE20K, 512x512, 160k iterations: the ResTv2-Tiny
# recipe (configs/upernet_restv2_tiny_ade20k.py, where the details are) with ResTv2-Small,
# drop path 0.2 and the authors' optimiser for small and base (upernet_restv2_small_512_
# 160k_ade20k): AdamW lr 1.5e-4, weight decay 0.05 with none on 1-D parameters (biases and
# norms: the rule of the layer-decay constructor their config names), and the learning rate
# decayed stage-wise by 0.9 from the heads down (heads 1, stage 4 0.9, ..., stem 0.9^5:
# mmrest.ResTLearningRateDecayOptimWrapperConstructor, mmrest/engine/optim_constructor.py).
#
# Paper: ResT V2 (Zhang & Yang, NeurIPS 2022, https://arxiv.org/abs/2204.07366).
# Expected (authors): 49.2 mIoU (multi-scale + flip), 72.9M parameters (this config builds
# 72.86M).
# Train on 8 GPUs x 2 images:  bash tools/dist_train.sh configs/upernet_restv2_small_ade20k.py 8
# Test: python tools/test.py configs/upernet_restv2_small_ade20k.py work_dirs/<...>/iter_160000.pth
_base_ = './upernet_restv2_tiny_ade20k.py'

model = dict(backbone=dict(
    arch='small', drop_path_rate=0.2, init_cfg=dict(checkpoint='checkpoints/restv2_small.pth')))

optim_wrapper = dict(
    constructor='mmrest.ResTLearningRateDecayOptimWrapperConstructor',
    optimizer=dict(lr=1.5e-4, weight_decay=0.05),
    paramwise_cfg=dict(
        _delete_=True, decay_rate=0.9, decay_type='stage_wise', flat_decay_mult=0.))
