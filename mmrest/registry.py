"""The ``mmrest`` registry scope: MODELS, HOOKS, OPTIM_WRAPPERS and
OPTIM_WRAPPER_CONSTRUCTORS.

Children of mmengine's root registries; their ``locations`` make mmengine import the
modules that fill them (:mod:`mmrest.models`, :mod:`mmrest.engine`) on first use.
"""
from mmengine.registry import HOOKS as MMENGINE_HOOKS
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS as MMENGINE_OPTIM_WRAPPER_CONSTRUCTORS
from mmengine.registry import OPTIM_WRAPPERS as MMENGINE_OPTIM_WRAPPERS
from mmengine.registry import Registry

# ``type='mmrest.ResT'`` finds the child scope below through its ``mmrest.`` prefix (and
# its location imports the module); ``type='ResT'`` after ``custom_imports`` needs the
# class in mmengine's root MODELS too (a scope searches its parents, never its siblings),
# which serves mmdet, mmseg and mmpretrain (tests/test_configs.py).
MODELS = Registry('model', parent=MMENGINE_MODELS, scope='mmrest',
                  locations=['mmrest.models'])
HOOKS = Registry('hook', parent=MMENGINE_HOOKS, scope='mmrest', locations=['mmrest.engine'])
OPTIM_WRAPPERS = Registry('optim_wrapper', parent=MMENGINE_OPTIM_WRAPPERS, scope='mmrest',
                          locations=['mmrest.engine'])

OPTIM_WRAPPER_CONSTRUCTORS = Registry(
    'optimizer wrapper constructor',
    parent=MMENGINE_OPTIM_WRAPPER_CONSTRUCTORS,
    scope='mmrest',
    locations=['mmrest.engine.optim_constructor'])

__all__ = ['MODELS', 'HOOKS', 'OPTIM_WRAPPERS', 'OPTIM_WRAPPER_CONSTRUCTORS']
