"""``torch.compile`` of mmengine's training step (``compile=True`` in a config): with a
``paramwise_cfg`` mmengine 0.10.7 builds the optimizer's parameter groups as
``ConfigDict``s, on which dynamo fails (``'UserDefinedDictVariable' object has no
attribute 'items'``); :class:`PlainParamGroupsHook` makes them plain dicts.
"""
from typing import Any

from mmengine.hooks import Hook

from ..registry import HOOKS
from .config import add_custom_hook

PLAIN_PARAM_GROUPS_HOOK = 'mmrest.PlainParamGroupsHook'


@HOOKS.register_module()
class PlainParamGroupsHook(Hook):
    """Make every optimizer's parameter groups plain ``dict``s before training."""

    priority = 'VERY_HIGH'

    def before_train(self, runner) -> None:
        wrapper = runner.optim_wrapper
        wrappers = wrapper.values() if hasattr(wrapper, 'values') else [wrapper]
        for optim_wrapper in wrappers:
            groups = optim_wrapper.optimizer.param_groups
            for i, group in enumerate(groups):
                if type(group) is not dict:
                    groups[i] = dict(group)


def prepare_compile(cfg: Any) -> bool:
    """Add :class:`PlainParamGroupsHook` to a config (in place) whose ``compile`` is set;
    returns whether it is."""
    if not cfg.get('compile'):
        return False
    add_custom_hook(cfg, PLAIN_PARAM_GROUPS_HOOK)
    return True
