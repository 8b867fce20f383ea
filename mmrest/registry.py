"""The ``mmrest`` registry scope.

Children of mmengine's root registries. Their ``locations`` make mmengine import the
modules that fill them lazily, so once ``mmrest`` is imported (e.g. by
``custom_imports=dict(imports=['mmrest'])``), a config whose default scope is ``mmdet``,
``mmseg`` or ``mmpretrain`` can name ``type='mmrest.ResT'`` (:mod:`mmrest.models`),
``type='mmrest.AtomicCheckpointHook'`` or ``type='mmrest.CPUAmpOptimWrapper'``
(:mod:`mmrest.engine`).
"""
from mmengine.registry import HOOKS as MMENGINE_HOOKS
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import OPTIM_WRAPPERS as MMENGINE_OPTIM_WRAPPERS
from mmengine.registry import Registry

MODELS = Registry('model', parent=MMENGINE_MODELS, scope='mmrest',
                  locations=['mmrest.models'])
HOOKS = Registry('hook', parent=MMENGINE_HOOKS, scope='mmrest', locations=['mmrest.engine'])
OPTIM_WRAPPERS = Registry('optim_wrapper', parent=MMENGINE_OPTIM_WRAPPERS, scope='mmrest',
                          locations=['mmrest.engine'])

__all__ = ['MODELS', 'HOOKS', 'OPTIM_WRAPPERS']
