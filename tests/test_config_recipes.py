"""The recipes of the configs: paramwise keys that match real parameters, weight decay
exactly where each recipe says, the learning rates of every parameter, the settings of the
authors' detection, segmentation and classification recipes."""
import copy
import os.path as osp

import pytest
import torch
from _config_helpers import (ALL_CONFIGS, MAIN_CONFIGS, ROOT, built, config_name, fromfile, is_v2,
                             optim_wrapper_cfg)
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

pytestmark = pytest.mark.stack


def _custom_keys(cfg: Config) -> dict:
    return cfg.optim_wrapper.get('paramwise_cfg', {}).get('custom_keys', {})


@pytest.mark.parametrize(
    'path', [p for p in ALL_CONFIGS if _custom_keys(fromfile(p))], ids=config_name)
def test_paramwise_keys_match_real_parameters(path):
    cfg, model = built(path)
    names = [n for n, _ in model.named_parameters()]
    for key in _custom_keys(cfg):
        assert any(key in n for n in names), f'{config_name(path)}: key {key!r} matches nothing'


def _norm_param_names(model) -> set:
    norms = (_BatchNorm, _InstanceNorm, torch.nn.GroupNorm, torch.nn.LayerNorm)
    return {f'{m_name}.{p_name}' for m_name, m in model.named_modules() if isinstance(m, norms)
            for p_name, _ in m.named_parameters(recurse=False)}


# The ResT V2 UperNet recipes follow the authors' other rules (test_restv2_segmentation_*).
NORM_RULE_CONFIGS = [p for p in MAIN_CONFIGS
                     if 'imagenet' not in p and not (is_v2(p) and 'upernet' in p)]


@pytest.mark.parametrize('path', NORM_RULE_CONFIGS, ids=config_name)
def test_no_weight_decay_exactly_on_norm_layers(path):
    """The downstream recipes exempt every norm layer, and nothing else, from weight decay."""
    cfg, model = built(path)
    optim_wrapper = build_optim_wrapper(model, optim_wrapper_cfg(cfg))
    base_wd = cfg.optim_wrapper.optimizer.weight_decay
    by_param = {id(p): n for n, p in model.named_parameters()}
    no_decay, decay = set(), set()
    for group in optim_wrapper.optimizer.param_groups:
        for p in group['params']:
            (no_decay if group['weight_decay'] == 0 else decay).add(by_param[id(p)])
            assert group['weight_decay'] in (0, base_wd)
    trainable_norms = {n for n in _norm_param_names(model)
                       if dict(model.named_parameters())[n].requires_grad}
    assert no_decay == trainable_norms
    assert decay and not decay & trainable_norms


def test_imagenet_recipe_skips_decay_on_all_1d_parameters():
    cfg, model = built(osp.join(ROOT, 'configs', 'rest_small_imagenet.py'))
    optim_wrapper = build_optim_wrapper(model, copy.deepcopy(cfg.optim_wrapper))
    by_param = {id(p): p for p in model.parameters()}
    for group in optim_wrapper.optimizer.param_groups:
        for p in group['params']:
            assert group['weight_decay'] == (0 if by_param[id(p)].ndim <= 1 else 0.05)
    assert optim_wrapper.optimizer.defaults['lr'] == pytest.approx(5e-4 * 2048 / 512)
    assert cfg.auto_scale_lr.base_batch_size == 8 * cfg.train_dataloader.batch_size


@pytest.mark.parametrize('version', ['v1', 'v2'])
def test_detection_recipes(version):
    """The settings of the authors' detectron2 recipes (ResT 1x, ResT V2 3x) that mmdet
    spells differently."""
    v2 = version == 'v2'
    retina, mask = (fromfile(osp.join(ROOT, 'configs', name)) for name in (
        ('retinanet_restv2_tiny_3x_coco.py', 'mask_rcnn_restv2_tiny_3x_coco.py') if v2 else
        ('retinanet_rest_small_coco.py', 'mask_rcnn_rest_base_coco.py')))
    assert retina.model.backbone.out_indices == (1, 2, 3)
    assert retina.model.neck.in_channels == ([192, 384, 768] if v2 else [128, 256, 512])
    assert mask.model.neck.in_channels == [96, 192, 384, 768]
    assert mask.optim_wrapper.clip_grad == dict(max_norm=0.01, norm_type=2)
    assert 'clip_grad' not in retina.optim_wrapper
    crop = [t for t in mask.train_pipeline if t.type == 'RandomCrop']
    assert crop and crop[0].crop_type == 'relative' and crop[0].crop_size == (0.9, 0.9)
    shorter = {'mask': [480, 512, 534, 576, 640, 672, 704, 736, 768, 800],
               'retina': [384, 512, 640, 768, 896, 1024]} if v2 else {
                   'mask': list(range(640, 801, 32)), 'retina': list(range(640, 801, 32))}
    for name, cfg in (('mask', mask), ('retina', retina)):
        assert (cfg.optim_wrapper.optimizer.lr, cfg.optim_wrapper.optimizer.weight_decay) == (
            1e-4, 0.05)
        assert cfg.train_cfg.max_epochs == (36 if v2 else 12)
        assert cfg.auto_scale_lr.base_batch_size == 16 == 8 * cfg.train_dataloader.batch_size
        resize = [t for t in cfg.train_dataloader.dataset.pipeline
                  if t.type == 'RandomChoiceResize'][0]
        assert [s[1] for s in resize.scales] == shorter[name]
        assert all(s[0] == 1333 for s in resize.scales)
        if not v2:
            assert [t for t in cfg.test_pipeline if t.type == 'Resize'][0].scale == (1333, 800)
            continue
        backbone = cfg.model.backbone
        assert (backbone.arch, backbone.frozen_stages, backbone.drop_path_rate) == (
            'tiny', -1, 0.1)
        assert cfg.optim_wrapper.type == 'AmpOptimWrapper'
        assert cfg.optim_wrapper.paramwise_cfg == dict(norm_decay_mult=0.)
        warm, steps = cfg.param_scheduler
        assert (warm.end, warm.by_epoch, steps.milestones, steps.end) == (1000, False,
                                                                          [28, 33], 36)
    if not v2:
        assert retina.model.neck.add_extra_convs == 'on_input'
        assert mask.model.backbone.drop_path_rate == 0.2
        return
    assert not [t for t in retina.train_pipeline if t.type == 'RandomCrop']
    for arch, rate in (('small', 0.2), ('base', 0.3)):
        cfg = fromfile(osp.join(ROOT, 'configs', f'mask_rcnn_restv2_{arch}_3x_coco.py'))
        assert (cfg.model.backbone.arch, cfg.model.backbone.drop_path_rate) == (arch, rate)
        assert cfg.model.backbone.init_cfg.checkpoint == f'checkpoints/restv2_{arch}.pth'


def test_full_model_clip_is_one_global_norm():
    """detectron2's CLIP_TYPE 'full_model' = one clip_grad_norm_ over all parameters, which
    is what the optim wrapper of the Mask R-CNN configs does."""
    cfg = fromfile(osp.join(ROOT, 'configs', 'mask_rcnn_rest_small_coco.py'))
    a, b = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)
    model = torch.nn.Sequential(a, b)
    wrapper = build_optim_wrapper(model, dict(
        type='OptimWrapper', optimizer=dict(type='SGD', lr=0.),
        clip_grad=dict(cfg.optim_wrapper.clip_grad)))
    model(torch.randn(5, 3)).pow(2).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    total = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
    wrapper.step()
    for before, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, before * (0.01 / (total + 1e-6)))
    clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert clipped == pytest.approx(0.01, rel=1e-4)


@pytest.mark.parametrize('name', ['upernet_rest_base_ade20k.py',
                                  'upernet_restv2_tiny_ade20k.py'])
def test_segmentation_recipe(name):
    cfg = fromfile(osp.join(ROOT, 'configs', name))
    assert cfg.train_cfg.max_iters == 160000
    warm, poly = cfg.param_scheduler
    assert (warm.type, warm.end, poly.type, poly.begin, poly.end, poly.power) == (
        'LinearLR', 1500, 'PolyLR', 1500, 160000, 1.0)
    assert cfg.auto_scale_lr.base_batch_size == 16 == 8 * cfg.train_dataloader.batch_size
    aux = cfg.model.auxiliary_head
    assert (aux.in_index, aux.in_channels, aux.channels, aux.loss_decode.loss_weight) == (
        2, 384, 256, 0.4)
    assert cfg.model.decode_head.in_channels == [96, 192, 384, 768]
    if 'restv2' in name:
        assert cfg.model.backbone.drop_path_rate == 0.1
    else:
        assert (cfg.optim_wrapper.optimizer.lr, cfg.optim_wrapper.optimizer.weight_decay) == (
            6e-5, 0.01)


def _assert_imagenet_augmentations(cfg: Config) -> None:
    """Mixup 0.8 / CutMix 1.0, label smoothing 0.1, bicubic crops, RandAugment m9
    mstd0.5, random erasing 0.25: the augmentations of both ResT recipes."""
    assert [a.type for a in cfg.model.train_cfg.augments] == ['Mixup', 'CutMix']
    assert [a.alpha for a in cfg.model.train_cfg.augments] == [0.8, 1.0]
    assert cfg.model.head.loss.label_smooth_val == 0.1
    train = {t.type: t for t in cfg.train_pipeline}
    assert train['RandomResizedCrop'].interpolation == 'bicubic'
    assert (train['RandAugment'].magnitude_level, train['RandAugment'].magnitude_std) == (9, 0.5)
    assert train['RandomErasing'].erase_prob == 0.25


def test_classification_recipe():
    cfg = fromfile(osp.join(ROOT, 'configs', 'rest_large_imagenet.py'))
    warm, cos = cfg.param_scheduler
    assert warm.start_factor * 5e-4 == pytest.approx(1e-6)
    assert (warm.end, cos.begin, cos.end) == (5, 5, 300)
    assert cos.eta_min_ratio * 5e-4 == pytest.approx(1e-5)
    assert cfg.train_cfg.max_epochs == 300
    assert cfg.optim_wrapper.clip_grad.max_norm == 5.0
    assert cfg.model.backbone.drop_path_rate == 0.3
    assert cfg.optim_wrapper.optimizer.lr == pytest.approx(5e-4 * 1920 / 512)
    _assert_imagenet_augmentations(cfg)
    test = {t.type: t for t in cfg.val_dataloader.dataset.pipeline}
    assert test['ResizeEdge'].scale == 256  # the authors' ratio 224 / 256
    assert test['CenterCrop'].crop_size == 224


def test_restv2_amp_config_becomes_the_cpu_wrapper_on_this_machine():
    """``AmpOptimWrapper`` (the GPU recipe) needs CUDA; on this machine the configs get the
    CPU's bfloat16 wrapper, as tools/train.py gives them."""
    cfg = fromfile(osp.join(ROOT, 'configs', 'mask_rcnn_restv2_tiny_3x_coco.py'))
    wrapper = optim_wrapper_cfg(cfg)
    assert wrapper.type == 'mmrest.CPUAmpOptimWrapper' and wrapper.dtype == 'bfloat16'
    assert wrapper.paramwise_cfg == cfg.optim_wrapper.paramwise_cfg
    assert wrapper.clip_grad == cfg.optim_wrapper.clip_grad


def _decay_by_name(path: str):
    cfg, model = built(path)
    optim_wrapper = build_optim_wrapper(model, optim_wrapper_cfg(cfg))
    name_of = {id(p): n for n, p in model.named_parameters()}
    groups = {name_of[id(p)]: g for g in optim_wrapper.optimizer.param_groups
              for p in g['params']}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(groups) == set(trainable)
    return cfg, trainable, groups


@pytest.mark.ops
def test_restv2_segmentation_tiny_spares_names_with_norm():
    """Tiny: lr 6e-5, wd 0.01, no decay exactly where the name contains 'norm' (so the
    stem's BatchNorms stem.proj.1/.4 and the heads' BatchNorms do decay)."""
    cfg, params, groups = _decay_by_name(
        osp.join(ROOT, 'configs', 'upernet_restv2_tiny_ade20k.py'))
    assert (cfg.optim_wrapper.optimizer.lr, cfg.optim_wrapper.optimizer.weight_decay) == (
        6e-5, 0.01)
    for name in params:
        assert groups[name]['weight_decay'] == (0 if 'norm' in name else 0.01), name
        assert groups[name]['lr'] == 6e-5, name
    assert groups['backbone.stem.proj.1.weight']['weight_decay'] == 0.01
    assert groups['backbone.stage1.0.attn.up_norm.weight']['weight_decay'] == 0


@pytest.mark.ops
@pytest.mark.parametrize('arch', ['small', 'base'])
def test_restv2_segmentation_stage_wise_lr_decay(arch):
    """Small and base: every parameter's lr is 1.5e-4 x 0.9 ** (5 - stage id) (heads 5,
    stem 0, stage i its patch embedding, blocks and output norm) and only the 1-D
    parameters skip the 0.05 weight decay."""
    cfg, params, groups = _decay_by_name(
        osp.join(ROOT, 'configs', f'upernet_restv2_{arch}_ade20k.py'))
    assert cfg.optim_wrapper.constructor == \
        'mmrest.ResTLearningRateDecayOptimWrapperConstructor'

    def stage(name: str) -> int:
        if not name.startswith('backbone.'):
            return 5
        part = name.split('.')[1]
        if part == 'stem':
            return 0
        return 4 if part == 'norm' else int(part[-1])

    seen = set()
    for name, param in params.items():
        expected_lr = 1.5e-4 * 0.9**(5 - stage(name))
        assert groups[name]['lr'] == pytest.approx(expected_lr, rel=1e-12), name
        assert groups[name]['weight_decay'] == (0 if param.ndim == 1 else 0.05), name
        seen.add(stage(name))
    assert seen == {0, 1, 2, 3, 4, 5}
    assert cfg.model.backbone.drop_path_rate == {'small': 0.2, 'base': 0.3}[arch]


def test_restv2_classification_recipe():
    cfg = fromfile(osp.join(ROOT, 'configs', 'restv2_tiny_imagenet.py'))
    lr = 1.5e-4 * 2048 / 256
    assert cfg.optim_wrapper.optimizer.lr == pytest.approx(lr)
    assert cfg.optim_wrapper.optimizer.weight_decay == 0.05
    assert cfg.optim_wrapper.paramwise_cfg == dict(flat_decay_mult=0.0)
    assert cfg.optim_wrapper.clip_grad.max_norm == 1.0
    warm, cos = cfg.param_scheduler
    assert (warm.type, warm.begin, warm.end, cos.type, cos.begin, cos.end) == (
        'LinearLR', 0, 50, 'CosineAnnealingLR', 50, 300)
    assert warm.start_factor * lr < 1e-8 and cos.eta_min == 1e-6
    assert cfg.train_cfg.max_epochs == 300
    assert cfg.auto_scale_lr.base_batch_size == 2048
    assert cfg.custom_hooks == [dict(type='EMAHook', momentum=1e-4, priority='ABOVE_NORMAL')]
    assert cfg.train_dataloader.sampler.type == 'DefaultSampler'
    _assert_imagenet_augmentations(cfg)
    test = {t.type: t for t in cfg.val_dataloader.dataset.pipeline}
    assert test['ResizeEdge'].scale == 224 == test['CenterCrop'].crop_size  # crop ratio 1.0
    large = fromfile(osp.join(ROOT, 'configs', 'restv2_large_imagenet.py'))
    assert (large.model.backbone.arch, large.model.head.in_channels) == ('large', 1024)
    assert large.model.backbone.drop_path_rate == 0.5
