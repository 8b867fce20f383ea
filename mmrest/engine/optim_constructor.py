"""Stage-wise learning-rate decay of the authors' ResT V2 UperNet recipes
(https://github.com/wofmanaf/ResT, ``semantic_segmentation/configs/ResTv2``), on top of
every other ``paramwise_cfg`` rule of mmengine's ``DefaultOptimWrapperConstructor``.
"""
import re
from typing import List, Optional

from mmengine.optim import DefaultOptimWrapperConstructor
from torch import nn

from ..registry import OPTIM_WRAPPER_CONSTRUCTORS

#: Stages of the ResT backbones; the heads are stage ``NUM_STAGES + 1``.
NUM_STAGES = 4

# Backbone parameter names (without ``backbone.``) -> their stage (1-4).
_STAGE_KEY = re.compile(r'^(?:patch_embed_|patch_|stage|norm)(\d)\.')


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class ResTLearningRateDecayOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """Stage-wise learning-rate decay for models with a ResT / ResT V2 ``backbone``: the lr
    of the other rules times ``decay_rate ** (5 - stage id)``, the stem's id 0, stage i's
    (its patch embedding, blocks and output norm) i, the rest of the model's (neck,
    heads) 5.

    Args:
        optim_wrapper_cfg (dict): The optimizer wrapper config, as for mmengine's
            ``DefaultOptimWrapperConstructor``.
        paramwise_cfg (dict, optional): mmengine's paramwise rules plus ``decay_rate``
            (float in (0, 1], required) and ``decay_type`` (``'stage_wise'``, the only
            one). Defaults to None.

    Example::

        optim_wrapper = dict(
            constructor='mmrest.ResTLearningRateDecayOptimWrapperConstructor',
            optimizer=dict(type='AdamW', lr=1.5e-4, weight_decay=0.05),
            paramwise_cfg=dict(decay_rate=0.9, decay_type='stage_wise',
                               flat_decay_mult=0.))
    """

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg: Optional[dict] = None) -> None:
        # the keys stay in paramwise_cfg (mmengine ignores them): an empty paramwise_cfg
        # would make it skip add_params
        paramwise_cfg = dict(paramwise_cfg or {})
        decay_rate = paramwise_cfg.get('decay_rate')
        decay_type = paramwise_cfg.get('decay_type', 'stage_wise')
        if not isinstance(decay_rate, (int, float)) or not 0 < decay_rate <= 1:
            raise ValueError('paramwise_cfg.decay_rate must be a number in (0, 1], got '
                             f'{decay_rate!r}')
        if decay_type != 'stage_wise':
            raise ValueError(f"paramwise_cfg.decay_type must be 'stage_wise', got "
                             f'{decay_type!r}')
        super().__init__(optim_wrapper_cfg, paramwise_cfg)
        self.decay_rate = float(decay_rate)

    @staticmethod
    def stage_id(name: str) -> int:
        """The stage id (0-5) of a parameter name of the whole model.

        Raises:
            ValueError: For a backbone parameter of no known stage.
        """
        if not name.startswith('backbone.'):
            return NUM_STAGES + 1
        key = name[len('backbone.'):]
        if key.startswith('stem.'):
            return 0
        if key.startswith('norm.'):
            return NUM_STAGES
        match = _STAGE_KEY.match(key)
        if match is None or not 1 <= int(match.group(1)) <= NUM_STAGES:
            raise ValueError(f'{name}: not a parameter of a ResT backbone stage; the '
                             'stage-wise lr decay needs the ResT / ResTV2 parameter names')
        return int(match.group(1))

    def add_params(self, params: List[dict], module: nn.Module, prefix: str = '',
                   is_dcn_module: Optional[bool] = None) -> None:
        """mmengine's parameter groups (appended to ``params``), with the stage's factor
        applied to their lr."""
        start = len(params)
        super().add_params(params, module, prefix, is_dcn_module)
        if prefix:  # a submodule: the whole model's call below scales its groups
            return
        names = {id(p): n for n, p in module.named_parameters()}
        for group in params[start:]:
            name = names[id(group['params'][0])]
            scale = self.decay_rate**(NUM_STAGES + 1 - self.stage_id(name))
            group['lr'] = group.get('lr', self.base_lr) * scale
