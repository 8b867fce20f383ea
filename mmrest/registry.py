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

# Why ResT is registered twice, and nothing else is injected anywhere: a config of scope
# mmdet, mmseg or mmpretrain names it in one of two ways (all six combinations are built
# in fresh processes by tests/test_configs.py::test_registry_from_downstream_scopes).
# * ``type='mmrest.ResT'``, no custom_imports: mmengine imports ``mmrest.registry`` for
#   the ``mmrest.`` prefix and finds the child scope below under the root registry; its
#   location imports mmrest.models. The same holds for ``mmrest.AtomicCheckpointHook``,
#   ``mmrest.RNGStateHook`` and ``mmrest.CPUAmpOptimWrapper`` (locations: mmrest.engine),
#   which are only ever named with the prefix.
# * ``type='ResT'`` after ``custom_imports=dict(imports=['mmrest'])``: a scope searches
#   itself and its parents, never its siblings, so the class must also be in mmengine's
#   root MODELS (mmrest/models/backbones/rest.py registers it there). That one root entry
#   serves all three libraries; no entry in their own registries is needed.
MODELS = Registry('model', parent=MMENGINE_MODELS, scope='mmrest',
                  locations=['mmrest.models'])
HOOKS = Registry('hook', parent=MMENGINE_HOOKS, scope='mmrest', locations=['mmrest.engine'])
OPTIM_WRAPPERS = Registry('optim_wrapper', parent=MMENGINE_OPTIM_WRAPPERS, scope='mmrest',
                          locations=['mmrest.engine'])

# Optimizer wrapper constructors, e.g.
# ``constructor='mmrest.ResTLearningRateDecayOptimWrapperConstructor'``.
OPTIM_WRAPPER_CONSTRUCTORS = Registry(
    'optimizer wrapper constructor',
    parent=MMENGINE_OPTIM_WRAPPER_CONSTRUCTORS,
    scope='mmrest',
    locations=['mmrest.engine.optim_constructor'])

__all__ = ['MODELS', 'HOOKS', 'OPTIM_WRAPPERS', 'OPTIM_WRAPPER_CONSTRUCTORS']
