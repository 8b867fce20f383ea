"""Every config under configs/ loads, builds and trains/predicts one step; parameter totals
match the paper; paramwise keys are real; the ``mmrest`` scope works from mmdet, mmseg and
mmpretrain configs with and without ``custom_imports``."""
import copy
import functools
import glob
import os
import os.path as osp
import subprocess
import sys
import textwrap

import pytest
import torch
from _tools import load_script
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from mmengine.registry import MODELS, init_default_scope
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

pytestmark = pytest.mark.stack

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
MAIN_CONFIGS = sorted(glob.glob(osp.join(ROOT, 'configs', '*.py')))
DEMO_CONFIGS = sorted(glob.glob(osp.join(ROOT, 'configs', 'demo', '*.py')))
ALL_CONFIGS = MAIN_CONFIGS + DEMO_CONFIGS


def _name(path: str) -> str:
    return osp.relpath(path, osp.join(ROOT, 'configs'))


# Whole-model parameter counts of the paper (M) and the authors' ImageNet models (exact).
# ResT V2: the authors' counts (M, within 0.1M) and their ImageNet models (exact).
V2_PAPER_PARAMS_M = {
    'mask_rcnn_restv2_tiny_3x_coco.py': 49.9,
    'mask_rcnn_restv2_small_3x_coco.py': 60.7,
    'mask_rcnn_restv2_base_3x_coco.py': 75.5,
    'upernet_restv2_tiny_ade20k.py': 62.1,
    'upernet_restv2_small_ade20k.py': 72.9,
    'upernet_restv2_base_ade20k.py': 87.6,
}
V2_AUTHORS_PARAMS = {
    'restv2_tiny_imagenet.py': 30_434_776,
    'restv2_small_imagenet.py': 41_205_976,
    'restv2_base_imagenet.py': 55_965_208,
    'restv2_large_imagenet.py': 86_532_520,
}
PAPER_PARAMS_M = {
    'retinanet_rest_small_coco.py': 23.40,
    'retinanet_rest_base_coco.py': 40.50,
    'mask_rcnn_rest_small_coco.py': 33.32,
    'mask_rcnn_rest_base_coco.py': 49.83,
}
AUTHORS_PARAMS = {
    'rest_lite_imagenet.py': 10_508_300,
    'rest_small_imagenet.py': 13_679_708,
    'rest_base_imagenet.py': 30_327_052,
    'rest_large_imagenet.py': 51_676_156,
}


@functools.lru_cache(maxsize=None)
def _parsed(path: str) -> Config:
    # mmengine re-reads every model-index of a package for each ``pkg::`` base: parse once.
    return Config.fromfile(path)


def _fromfile(path: str) -> Config:
    """``Config.fromfile(path)`` (a private copy of a cached parse)."""
    return copy.deepcopy(_parsed(path))


def _load_cfg(path: str) -> Config:
    cfg = _fromfile(path)
    init_default_scope(cfg.get('default_scope', 'mmengine'))
    return cfg


def _model_cfg(cfg: Config, small_seg_size=None) -> dict:
    """The model config as the Runner builds it, with the backbone's weights switched off."""
    model = copy.deepcopy(cfg.model)
    if cfg.get('data_preprocessor') is not None:  # what mmengine's Runner does
        model.setdefault('data_preprocessor', copy.deepcopy(cfg.data_preprocessor))
    model.backbone.init_cfg = None
    if small_seg_size is not None and model.get('data_preprocessor', {}).get('size'):
        model.data_preprocessor.size = small_seg_size
    return model


def _build(path: str, small_seg_size=None, init: bool = True):
    cfg = _load_cfg(path)
    model = MODELS.build(_model_cfg(cfg, small_seg_size))
    if init:
        model.init_weights()
    return cfg, model


@functools.lru_cache(maxsize=None)
def _built_once(path: str):
    return _build(path, init=False)


def _built(path: str):
    """A model per config, built once (not initialised) for the static checks."""
    cfg, model = _built_once(path)
    init_default_scope(_scope(cfg))
    return cfg, model


def _scope(cfg: Config) -> str:
    return cfg.get('default_scope', 'mmengine')


def _is_v2(path: str) -> bool:
    return 'restv2' in osp.basename(path)


def _optim_wrapper_cfg(cfg: Config, cpu_amp: bool = True) -> dict:
    """A copy of ``cfg.optim_wrapper`` as ``tools/train.py`` uses it on this machine: a
    GPU config's ``AmpOptimWrapper`` becomes the CPU's bfloat16 wrapper without CUDA
    (with ``cpu_amp=False``, the float32 ``OptimWrapper`` of ``--no-amp``)."""
    from mmrest.engine import cpu_amp_config_fix, disable_amp
    copied = Config(dict(optim_wrapper=copy.deepcopy(cfg.optim_wrapper)))
    if cpu_amp:
        cpu_amp_config_fix(copied)
    else:
        disable_amp(copied)
    return copied.optim_wrapper


def _det_batch(model, h=64, w=96):
    from mmdet.testing import demo_mm_inputs
    with_mask = getattr(model, 'with_mask', False)
    packed = demo_mm_inputs(2, [[3, h, w], [3, h - 8, w + 8]], num_items=[3, 2],
                            num_classes=3, with_mask=with_mask)
    return packed


def _seg_batch(h=64, w=64):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    g = torch.Generator().manual_seed(0)
    inputs, samples = [], []
    for _ in range(2):
        inputs.append(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g))
        label = torch.randint(0, 150, (1, h, w), generator=g)
        sample = SegDataSample(gt_sem_seg=PixelData(data=label))
        sample.set_metainfo(dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w)))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def _cls_batch(h=64, w=64):
    from mmpretrain.structures import DataSample
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
              for _ in range(2)]
    samples = [DataSample().set_gt_label(label) for label in (3, 7)]
    return dict(inputs=inputs, data_samples=samples)


def _batch(scope: str, model):
    if scope == 'mmdet':
        return _det_batch(model)
    if scope == 'mmseg':
        return _seg_batch()
    if scope == 'mmpretrain':
        return _cls_batch()
    raise AssertionError(f'no test batch for scope {scope}')


@pytest.mark.parametrize('path', ALL_CONFIGS, ids=_name)
def test_config_loads_with_its_scope_and_the_rest_backbone(path):
    text = open(path, encoding='utf-8').read()
    assert not [line for line in text.splitlines()
                if line.startswith(('import ', 'from '))], 'configs must not import'
    cfg = _fromfile(path)
    assert cfg.default_scope in ('mmdet', 'mmseg', 'mmpretrain')
    assert cfg.model.backbone.type == ('mmrest.ResTV2' if _is_v2(path) else 'mmrest.ResT')
    # what README "Inference" promises: the inferencers import mmrest from the config
    assert cfg.custom_imports == dict(imports=['mmrest'], allow_failed_imports=False)
    if path in MAIN_CONFIGS:
        paper = 'arxiv.org/abs/2204.07366' if _is_v2(path) else 'arxiv.org/abs/2105.13677'
        assert text.startswith('# ') and paper in text
        assert 'python tools/test.py' in text and 'tools/dist_train.sh' in text
        init_cfg = cfg.model.backbone.get('init_cfg')
        if 'imagenet' not in path:  # downstream: ImageNet weights through init_cfg
            assert init_cfg.type == 'Pretrained' and init_cfg.checkpoint.endswith('.pth')


@pytest.mark.slow
@pytest.mark.parametrize('path', ALL_CONFIGS, ids=_name)
def test_config_trains_one_step_and_predicts(path):
    cfg, model = _build(path, small_seg_size=(64, 64))
    scope = _scope(cfg)
    assert type(model.backbone).__module__ == (
        'mmrest.models.backbones.rest_v2' if _is_v2(path) else 'mmrest.models.backbones.rest')

    # one optimisation step with the config's own optimiser wrapper (paramwise_cfg, clip);
    # a GPU AMP config in float32 where bfloat16 autocast cannot run on the CPU: mmcv
    # 2.1.0's CPU nms (the RPN's proposals while training) takes float32 only
    model.train()
    optim_wrapper = build_optim_wrapper(
        model, _optim_wrapper_cfg(cfg, cpu_amp=not hasattr(model, 'rpn_head')))
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    log_vars = model.train_step(_batch(scope, model), optim_wrapper)
    assert torch.isfinite(log_vars['loss']), log_vars
    changed = [n for n, p in model.named_parameters()
               if p.requires_grad and not torch.equal(p.detach(), trainable[n])]
    last_stage = [n for n in changed if n.startswith('backbone.stage4.')]
    assert last_stage, 'the optimiser step did not update the backbone'

    # one prediction step
    model.eval()
    with torch.no_grad():
        results = model.val_step(_batch(scope, model))
    assert len(results) == 2
    if scope == 'mmdet':
        for r in results:
            inst = r.pred_instances
            assert inst.bboxes.shape[1] == 4 and len(inst.scores) == len(inst.labels)
            if getattr(model, 'with_mask', False):
                assert inst.masks.shape[0] == len(inst.bboxes)
                assert tuple(inst.masks.shape[1:]) == tuple(r.ori_shape)
    elif scope == 'mmseg':
        for r in results:
            assert tuple(r.pred_sem_seg.data.shape) == (1, 64, 64)
            assert int(r.pred_sem_seg.data.max()) < 150
    else:
        for r in results:
            assert r.pred_score.shape == (1000, )
            assert torch.allclose(r.pred_score.sum(), torch.tensor(1.0), atol=1e-4)


@pytest.mark.parametrize('name', list(PAPER_PARAMS_M) + list(AUTHORS_PARAMS) +
                         list(V2_PAPER_PARAMS_M) + list(V2_AUTHORS_PARAMS))
def test_parameter_totals_match_the_paper(name):
    _, model = _built(osp.join(ROOT, 'configs', name))
    params = sum(p.numel() for p in model.parameters())
    if name in AUTHORS_PARAMS or name in V2_AUTHORS_PARAMS:
        assert params == {**AUTHORS_PARAMS, **V2_AUTHORS_PARAMS}[name]
    elif name in V2_PAPER_PARAMS_M:
        assert abs(params / 1e6 - V2_PAPER_PARAMS_M[name]) <= 0.1, params
    else:
        assert abs(params / 1e6 - PAPER_PARAMS_M[name]) <= 0.05, params


@pytest.mark.ops
def test_results_table_params_are_the_measured_ones():
    """The parameter cells that tools/analysis/results_table.py prints are measured here."""
    rt = load_script('tools/analysis/results_table.py')
    for stem, (_, _, params_cell, _) in rt.KNOWN_CONFIGS.items():
        assert osp.isfile(osp.join(ROOT, 'configs', stem + '.py')), stem
        if params_cell == '-':
            continue
        _, model = _built(osp.join(ROOT, 'configs', stem + '.py'))
        assert params_cell == f'{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M'


def _custom_keys(cfg: Config) -> dict:
    return cfg.optim_wrapper.get('paramwise_cfg', {}).get('custom_keys', {})


@pytest.mark.parametrize(
    'path', [p for p in ALL_CONFIGS if _custom_keys(_fromfile(p))], ids=_name)
def test_paramwise_keys_match_real_parameters(path):
    cfg, model = _built(path)
    names = [n for n, _ in model.named_parameters()]
    for key in _custom_keys(cfg):
        assert any(key in n for n in names), f'{_name(path)}: key {key!r} matches nothing'


def _norm_param_names(model) -> set:
    norms = (_BatchNorm, _InstanceNorm, torch.nn.GroupNorm, torch.nn.LayerNorm)
    return {f'{m_name}.{p_name}' for m_name, m in model.named_modules() if isinstance(m, norms)
            for p_name, _ in m.named_parameters(recurse=False)}


# The ResT V2 UperNet recipes follow the authors' other rules (test_restv2_segmentation_*).
NORM_RULE_CONFIGS = [p for p in MAIN_CONFIGS
                     if 'imagenet' not in p and not (_is_v2(p) and 'upernet' in p)]


@pytest.mark.parametrize('path', NORM_RULE_CONFIGS, ids=_name)
def test_no_weight_decay_exactly_on_norm_layers(path):
    """The downstream recipes exempt every norm layer, and nothing else, from weight decay."""
    cfg, model = _built(path)
    optim_wrapper = build_optim_wrapper(model, _optim_wrapper_cfg(cfg))
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
    cfg, model = _built(osp.join(ROOT, 'configs', 'rest_small_imagenet.py'))
    optim_wrapper = build_optim_wrapper(model, copy.deepcopy(cfg.optim_wrapper))
    by_param = {id(p): p for p in model.parameters()}
    for group in optim_wrapper.optimizer.param_groups:
        for p in group['params']:
            assert group['weight_decay'] == (0 if by_param[id(p)].ndim <= 1 else 0.05)
    assert optim_wrapper.optimizer.defaults['lr'] == pytest.approx(5e-4 * 2048 / 512)
    assert cfg.auto_scale_lr.base_batch_size == 8 * cfg.train_dataloader.batch_size


def test_detection_recipes():
    """The settings of the authors' detectron2 recipe that mmdet spells differently."""
    retina = _fromfile(osp.join(ROOT, 'configs', 'retinanet_rest_small_coco.py'))
    mask = _fromfile(osp.join(ROOT, 'configs', 'mask_rcnn_rest_base_coco.py'))
    assert retina.model.backbone.out_indices == (1, 2, 3)
    assert retina.model.neck.add_extra_convs == 'on_input'
    assert retina.model.neck.in_channels == [128, 256, 512]
    assert mask.model.neck.in_channels == [96, 192, 384, 768]
    assert mask.model.backbone.drop_path_rate == 0.2
    assert mask.optim_wrapper.clip_grad == dict(max_norm=0.01, norm_type=2)
    assert 'clip_grad' not in retina.optim_wrapper
    crop = [t for t in mask.train_pipeline if t.type == 'RandomCrop']
    assert crop and crop[0].crop_type == 'relative' and crop[0].crop_size == (0.9, 0.9)
    for cfg in (retina, mask):
        assert cfg.train_cfg.max_epochs == 12
        assert cfg.optim_wrapper.optimizer.lr == 1e-4
        assert cfg.optim_wrapper.optimizer.weight_decay == 0.05
        assert cfg.auto_scale_lr.base_batch_size == 16 == 8 * cfg.train_dataloader.batch_size
        resize = [t for t in cfg.train_pipeline if t.type == 'RandomChoiceResize'][0]
        assert [s[1] for s in resize.scales] == list(range(640, 801, 32))
        assert all(s[0] == 1333 for s in resize.scales)
        test_resize = [t for t in cfg.test_pipeline if t.type == 'Resize'][0]
        assert test_resize.scale == (1333, 800)


def test_full_model_clip_is_one_global_norm():
    """detectron2's CLIP_TYPE 'full_model' = one clip_grad_norm_ over all parameters, which
    is what the optim wrapper of the Mask R-CNN configs does."""
    cfg = _fromfile(osp.join(ROOT, 'configs', 'mask_rcnn_rest_small_coco.py'))
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


def test_segmentation_recipe():
    cfg = _fromfile(osp.join(ROOT, 'configs', 'upernet_rest_base_ade20k.py'))
    assert cfg.train_cfg.max_iters == 160000
    assert cfg.optim_wrapper.optimizer.lr == 6e-5
    assert cfg.optim_wrapper.optimizer.weight_decay == 0.01
    warm, poly = cfg.param_scheduler
    assert (warm.type, warm.end, poly.type, poly.begin, poly.end) == (
        'LinearLR', 1500, 'PolyLR', 1500, 160000)
    assert cfg.auto_scale_lr.base_batch_size == 16 == 8 * cfg.train_dataloader.batch_size
    assert cfg.model.auxiliary_head.in_index == 2
    assert cfg.model.auxiliary_head.in_channels == 384
    assert cfg.model.decode_head.in_channels == [96, 192, 384, 768]


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
    cfg = _fromfile(osp.join(ROOT, 'configs', 'rest_large_imagenet.py'))
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


def test_restv2_detection_recipes():
    """The ResT V2 Mask R-CNN / RetinaNet 3x settings (authors' detectron2 files)."""
    mask = _fromfile(osp.join(ROOT, 'configs', 'mask_rcnn_restv2_tiny_3x_coco.py'))
    retina = _fromfile(osp.join(ROOT, 'configs', 'retinanet_restv2_tiny_3x_coco.py'))
    assert mask.model.neck.in_channels == [96, 192, 384, 768]
    assert retina.model.neck.in_channels == [192, 384, 768]
    assert retina.model.backbone.out_indices == (1, 2, 3)
    assert mask.optim_wrapper.clip_grad == dict(max_norm=0.01, norm_type=2)
    assert 'clip_grad' not in retina.optim_wrapper
    crop = [t for t in mask.train_pipeline if t.type == 'RandomCrop']
    assert crop and crop[0].crop_type == 'relative' and crop[0].crop_size == (0.9, 0.9)
    assert not [t for t in retina.train_pipeline if t.type == 'RandomCrop']
    shorter = {'mask': [480, 512, 534, 576, 640, 672, 704, 736, 768, 800],
               'retina': [384, 512, 640, 768, 896, 1024]}
    for name, cfg in (('mask', mask), ('retina', retina)):
        backbone = cfg.model.backbone
        assert (backbone.arch, backbone.frozen_stages, backbone.drop_path_rate) == (
            'tiny', -1, 0.1)
        assert cfg.optim_wrapper.type == 'AmpOptimWrapper'
        assert cfg.optim_wrapper.paramwise_cfg == dict(norm_decay_mult=0.)
        assert (cfg.optim_wrapper.optimizer.lr, cfg.optim_wrapper.optimizer.weight_decay) == (
            1e-4, 0.05)
        assert cfg.train_cfg.max_epochs == 36
        warm, steps = cfg.param_scheduler
        assert (warm.end, warm.by_epoch, steps.milestones, steps.end) == (1000, False,
                                                                          [28, 33], 36)
        assert cfg.auto_scale_lr.base_batch_size == 16 == 8 * cfg.train_dataloader.batch_size
        resize = [t for t in cfg.train_dataloader.dataset.pipeline
                  if t.type == 'RandomChoiceResize'][0]
        assert [s[1] for s in resize.scales] == shorter[name]
        assert all(s[0] == 1333 for s in resize.scales)
    for arch, rate in (('small', 0.2), ('base', 0.3)):
        cfg = _fromfile(osp.join(ROOT, 'configs', f'mask_rcnn_restv2_{arch}_3x_coco.py'))
        assert (cfg.model.backbone.arch, cfg.model.backbone.drop_path_rate) == (arch, rate)
        assert cfg.model.backbone.init_cfg.checkpoint == f'checkpoints/restv2_{arch}.pth'


def test_restv2_amp_config_becomes_the_cpu_wrapper_on_this_machine():
    """``AmpOptimWrapper`` (the GPU recipe) needs CUDA; on this machine the configs get the
    CPU's bfloat16 wrapper, as tools/train.py gives them."""
    cfg = _fromfile(osp.join(ROOT, 'configs', 'mask_rcnn_restv2_tiny_3x_coco.py'))
    wrapper = _optim_wrapper_cfg(cfg)
    assert wrapper.type == 'mmrest.CPUAmpOptimWrapper' and wrapper.dtype == 'bfloat16'
    assert wrapper.paramwise_cfg == cfg.optim_wrapper.paramwise_cfg
    assert wrapper.clip_grad == cfg.optim_wrapper.clip_grad


def _decay_by_name(path: str):
    cfg, model = _built(path)
    optim_wrapper = build_optim_wrapper(model, _optim_wrapper_cfg(cfg))
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


def test_restv2_segmentation_recipe():
    cfg = _fromfile(osp.join(ROOT, 'configs', 'upernet_restv2_tiny_ade20k.py'))
    assert cfg.train_cfg.max_iters == 160000
    warm, poly = cfg.param_scheduler
    assert (warm.type, warm.end, poly.type, poly.begin, poly.end, poly.power) == (
        'LinearLR', 1500, 'PolyLR', 1500, 160000, 1.0)
    assert cfg.auto_scale_lr.base_batch_size == 16 == 8 * cfg.train_dataloader.batch_size
    aux = cfg.model.auxiliary_head
    assert (aux.in_index, aux.in_channels, aux.channels, aux.loss_decode.loss_weight) == (
        2, 384, 256, 0.4)
    assert cfg.model.decode_head.in_channels == [96, 192, 384, 768]
    assert cfg.model.backbone.drop_path_rate == 0.1


def test_restv2_classification_recipe():
    cfg = _fromfile(osp.join(ROOT, 'configs', 'restv2_tiny_imagenet.py'))
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
    large = _fromfile(osp.join(ROOT, 'configs', 'restv2_large_imagenet.py'))
    assert (large.model.backbone.arch, large.model.head.in_channels) == ('large', 1024)
    assert large.model.backbone.drop_path_rate == 0.5


# ---------------------------------------------------------------- registry scopes
REGISTRY_SCRIPT = textwrap.dedent('''
    import sys
    import torch
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    cfg = Config.fromfile(sys.argv[1])
    init_default_scope(cfg.default_scope)
    registry = __import__(cfg.default_scope + '.registry', fromlist=['MODELS']).MODELS
    assert ('mmrest' in sys.modules) == ('custom_imports' in cfg), sorted(
        m for m in sys.modules if m.startswith('mmrest'))
    for model_cfg in (cfg.model, cfg.model_v2):
        model = registry.build(model_cfg)
        out = model(torch.zeros(1, 3, 64, 96))
        print(type(model).__module__, type(model).__name__, tuple(out[-1].shape))
''')


@pytest.mark.slow
@pytest.mark.parametrize('custom_imports', [False, True], ids=['scoped-type', 'custom-imports'])
@pytest.mark.parametrize('scope', [pytest.param('mmdet', marks=pytest.mark.ops),
                                   pytest.param('mmseg', marks=pytest.mark.ops),
                                   'mmpretrain'])
def test_registry_from_downstream_scopes(tmp_path, scope, custom_imports):
    """ResT and ResTV2 by ``type='mmrest.X'`` or, after ``custom_imports``, ``type='X'``."""
    if custom_imports:
        body = ("custom_imports = dict(imports=['mmrest'], allow_failed_imports=False)\n"
                "model = dict(type='ResT', arch='lite', out_indices=(3, ))\n"
                "model_v2 = dict(type='ResTV2', arch='tiny', out_indices=(3, ))\n")
    else:
        body = ("model = dict(type='mmrest.ResT', arch='lite', out_indices=(3, ))\n"
                "model_v2 = dict(type='mmrest.ResTV2', arch='tiny', out_indices=(3, ))\n")
    cfg_file = tmp_path / 'cfg.py'
    cfg_file.write_text(f"default_scope = '{scope}'\n" + body)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [ROOT] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]))
    res = subprocess.run([sys.executable, '-c', REGISTRY_SCRIPT, str(cfg_file)],
                         capture_output=True, text=True, cwd=str(tmp_path), env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-2:] == [
        'mmrest.models.backbones.rest ResT (1, 512, 2, 3)',
        'mmrest.models.backbones.rest_v2 ResTV2 (1, 768, 2, 3)']
