"""mmrest.ResTLearningRateDecayOptimWrapperConstructor: the lr of every parameter group,
the other paramwise rules on top, the registry, and its errors."""
import pytest
import torch
from mmengine.optim import build_optim_wrapper
from torch import nn

from mmrest.models import ResT, ResTV2

pytestmark = pytest.mark.stack

CONSTRUCTOR = 'mmrest.ResTLearningRateDecayOptimWrapperConstructor'


class Segmentor(nn.Module):
    """A backbone and a head, named as in mmseg / mmdet models."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.decode_head = nn.Sequential(nn.Conv2d(backbone.embed_dims[-1], 4, 1),
                                         nn.BatchNorm2d(4))


def tiny_arch() -> dict:
    return dict(embed_dims=[8, 16, 16, 32], depths=[1, 2, 1, 1], num_heads=[1, 2, 2, 4],
                mlp_ratios=[2, 2, 2, 2], sr_ratios=[8, 4, 2, 1])


def groups_by_name(model: nn.Module, paramwise_cfg: dict, lr: float = 1.0, wd: float = 0.05):
    wrapper = build_optim_wrapper(model, dict(
        constructor=CONSTRUCTOR,
        optimizer=dict(type='AdamW', lr=lr, weight_decay=wd),
        paramwise_cfg=paramwise_cfg))
    name_of = {id(p): n for n, p in model.named_parameters()}
    return {name_of[id(p)]: g for g in wrapper.optimizer.param_groups for p in g['params']}


def expected_stage(name: str) -> int:
    """Stage ids spelled out by hand for the names of both backbones."""
    table = [('backbone.stem.', 0), ('backbone.patch_embed_2.', 2), ('backbone.patch_2.', 2),
             ('backbone.patch_embed_3.', 3), ('backbone.patch_3.', 3),
             ('backbone.patch_embed_4.', 4), ('backbone.patch_4.', 4),
             ('backbone.stage1.', 1), ('backbone.stage2.', 2), ('backbone.stage3.', 3),
             ('backbone.stage4.', 4), ('backbone.norm1.', 1), ('backbone.norm2.', 2),
             ('backbone.norm3.', 3), ('backbone.norm.', 4), ('decode_head.', 5)]
    matches = [stage for prefix, stage in table if name.startswith(prefix)]
    assert len(matches) == 1, name
    return matches[0]


@pytest.mark.parametrize('backbone_cls', [ResT, ResTV2])
def test_every_group_gets_its_stage_lr(backbone_cls):
    model = Segmentor(backbone_cls(tiny_arch(), drop_path_rate=0.))
    groups = groups_by_name(model, dict(decay_rate=0.5, decay_type='stage_wise'), lr=0.8)
    assert set(groups) == {n for n, _ in model.named_parameters()}
    stages = set()
    for name, group in groups.items():
        stage = expected_stage(name)
        stages.add(stage)
        assert group['lr'] == pytest.approx(0.8 * 0.5**(5 - stage), rel=1e-12), name
        assert group['weight_decay'] == 0.05, name
    assert stages == {0, 1, 2, 3, 4, 5}


def test_other_paramwise_rules_apply_first():
    """``flat_decay_mult`` sets the weight decay and ``custom_keys`` lr multipliers combine
    with the stage factor; frozen parameters are left out as mmengine does."""
    model = Segmentor(ResTV2(tiny_arch(), drop_path_rate=0., frozen_stages=0))
    groups = groups_by_name(model, dict(
        decay_rate=0.9, flat_decay_mult=0., custom_keys={'.attn.q.': dict(lr_mult=2.)}),
        lr=1e-3)
    assert not [n for n in groups if n.startswith('backbone.stem.')]
    params = dict(model.named_parameters())
    for name, group in groups.items():
        stage = expected_stage(name)
        mult = 2. if '.attn.q.' in name else 1.
        assert group['lr'] == pytest.approx(1e-3 * mult * 0.9**(5 - stage), rel=1e-12), name
        if '.attn.q.' not in name:  # a custom key sets its own decay_mult (default 1)
            assert group['weight_decay'] == (0. if params[name].ndim == 1 else 0.05), name
    assert groups['backbone.stage2.1.attn.q.weight']['lr'] == pytest.approx(2e-3 * 0.9**3)


def test_the_lr_reaches_the_optimizer_step():
    """A step of AdamW moves the stem by decay_rate**5 of the head's step (same gradient
    sign, first AdamW step = lr * sign)."""
    model = Segmentor(ResTV2(tiny_arch(), drop_path_rate=0.))
    wrapper = build_optim_wrapper(model, dict(
        constructor=CONSTRUCTOR, optimizer=dict(type='AdamW', lr=0.1, weight_decay=0.),
        paramwise_cfg=dict(decay_rate=0.5)))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    out = model.decode_head(model.backbone(torch.randn(2, 3, 32, 32))[-1])
    wrapper.update_params(out.square().mean())
    for name, p in model.named_parameters():
        step = (p.detach() - before[name]).abs().max().item()
        if p.grad is not None and p.grad.abs().max() > 1e-6:
            assert step == pytest.approx(0.1 * 0.5**(5 - expected_stage(name)), rel=1e-3), name


@pytest.mark.parametrize('paramwise_cfg,match', [
    (dict(), 'decay_rate must be a number in \\(0, 1\\], got None'),
    (dict(decay_rate=1.5), 'got 1.5'),
    (dict(decay_rate=0.9, decay_type='layer_wise'), "decay_type must be 'stage_wise'"),
])
def test_bad_settings(paramwise_cfg, match):
    model = Segmentor(ResTV2(tiny_arch()))
    with pytest.raises(ValueError, match=match):
        groups_by_name(model, paramwise_cfg)


def test_a_backbone_of_other_names_is_refused():
    model = nn.Module()
    model.backbone = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r'backbone.0.weight: not a parameter of a ResT '
                       'backbone stage'):
        groups_by_name(model, dict(decay_rate=0.9))


def test_registered_in_the_mmrest_scope_from_downstream_scopes():
    from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS, DefaultScope

    from mmrest.engine.optim_constructor import ResTLearningRateDecayOptimWrapperConstructor
    for scope in ('mmseg', 'mmdet'):
        with DefaultScope.overwrite_default_scope(scope):
            assert OPTIM_WRAPPER_CONSTRUCTORS.get(CONSTRUCTOR) is \
                ResTLearningRateDecayOptimWrapperConstructor
