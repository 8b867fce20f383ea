"""``torch.compile`` of mmengine's training step (``compile=True`` in a config).

mmengine's Runner compiles the whole ``train_step``, the optimizer step included. With a
``paramwise_cfg`` (every mmrest config has one) mmengine 0.10.7 builds the optimizer's
parameter groups as ``ConfigDict``s, on which torch 2.14's dynamo fails while tracing the
step (``InternalTorchDynamoError: 'UserDefinedDictVariable' object has no attribute
'items'``). :class:`PlainParamGroupsHook` turns them into plain dicts before the first
iteration (same keys and values, the same parameter objects); :func:`prepare_compile`
adds it to a config that asks for ``compile``.
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
    """Add :class:`PlainParamGroupsHook` to a config whose ``compile`` is set.

    Args:
        cfg (Config): The config, changed in place.

    Returns:
        bool: Whether the config asks for ``torch.compile``.
    """
    if not cfg.get('compile'):
        return False
    add_custom_hook(cfg, PLAIN_PARAM_GROUPS_HOOK)
    return True
