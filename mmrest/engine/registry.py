"""``mmrest`` scope registries of the engine parts (hooks and optimizer wrappers).

Children of mmengine's root registries, so ``type='mmrest.AtomicCheckpointHook'`` or
``type='mmrest.CPUAmpOptimWrapper'`` builds from a config whose default scope is
``mmdet``, ``mmseg`` or ``mmpretrain`` once :mod:`mmrest.engine` is imported.
"""
from mmengine.registry import HOOKS as MMENGINE_HOOKS
from mmengine.registry import OPTIM_WRAPPERS as MMENGINE_OPTIM_WRAPPERS
from mmengine.registry import Registry

HOOKS = Registry('hook', parent=MMENGINE_HOOKS, scope='mmrest', locations=['mmrest.engine'])
OPTIM_WRAPPERS = Registry('optim_wrapper', parent=MMENGINE_OPTIM_WRAPPERS, scope='mmrest',
                          locations=['mmrest.engine'])

__all__ = ['HOOKS', 'OPTIM_WRAPPERS']
