"""Every config under configs/ loads, builds and trains/predicts one step; parameter totals
match the paper; the ``mmrest`` scope works from mmdet, mmseg and mmpretrain configs with
and without ``custom_imports`` (the recipes: tests/test_config_recipes.py)."""
import os
import os.path as osp
import subprocess
import sys
import textwrap

import pytest
import torch
from _config_helpers import (ALL_CONFIGS, MAIN_CONFIGS, ROOT, build, built, config_name, fromfile,
                             is_v2, optim_wrapper_cfg, scope_of)
from _tools import load_script
from mmengine.optim import build_optim_wrapper

pytestmark = pytest.mark.stack


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


@pytest.mark.parametrize('path', ALL_CONFIGS, ids=config_name)
def test_config_loads_with_its_scope_and_the_rest_backbone(path):
    text = open(path, encoding='utf-8').read()
    assert not [line for line in text.splitlines()
                if line.startswith(('import ', 'from '))], 'configs must not import'
    cfg = fromfile(path)
    assert cfg.default_scope in ('mmdet', 'mmseg', 'mmpretrain')
    assert cfg.model.backbone.type == ('mmrest.ResTV2' if is_v2(path) else 'mmrest.ResT')
    # what README "Inference" promises: the inferencers import mmrest from the config
    assert cfg.custom_imports == dict(imports=['mmrest'], allow_failed_imports=False)
    if path in MAIN_CONFIGS:
        paper = 'arxiv.org/abs/2204.07366' if is_v2(path) else 'arxiv.org/abs/2105.13677'
        assert text.startswith('# ') and paper in text
        assert 'python tools/test.py' in text and 'tools/dist_train.sh' in text
        init_cfg = cfg.model.backbone.get('init_cfg')
        if 'imagenet' not in path:  # downstream: ImageNet weights through init_cfg
            assert init_cfg.type == 'Pretrained' and init_cfg.checkpoint.endswith('.pth')


@pytest.mark.slow
@pytest.mark.parametrize('path', ALL_CONFIGS, ids=config_name)
def test_config_trains_one_step_and_predicts(path):
    cfg, model = build(path, small_seg_size=(64, 64))
    scope = scope_of(cfg)
    assert type(model.backbone).__module__ == (
        'mmrest.models.backbones.rest_v2' if is_v2(path) else 'mmrest.models.backbones.rest')

    # one optimisation step with the config's own optimiser wrapper (paramwise_cfg, clip);
    # a GPU AMP config in float32 where bfloat16 autocast cannot run on the CPU: mmcv
    # 2.1.0's CPU nms (the RPN's proposals while training) takes float32 only
    model.train()
    optim_wrapper = build_optim_wrapper(
        model, optim_wrapper_cfg(cfg, cpu_amp=not hasattr(model, 'rpn_head')))
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    log_vars = model.train_step(_batch(scope, model), optim_wrapper)
    assert torch.isfinite(log_vars['loss']), log_vars
    changed = [n for n, p in model.named_parameters()
               if p.requires_grad and not torch.equal(p.detach(), trainable[n])]
    deepest = max(cfg.model.backbone.get('out_indices', (3, ))) + 1  # the stages run
    last_stage = [n for n in changed if n.startswith(f'backbone.stage{deepest}.')]
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
    _, model = built(osp.join(ROOT, 'configs', name))
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
        _, model = built(osp.join(ROOT, 'configs', stem + '.py'))
        assert params_cell == f'{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M'


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
