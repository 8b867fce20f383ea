"""The ``mmrest`` registry scope.

``MODELS`` is a child of mmengine's root ``MODELS``; its ``locations`` make mmengine import
:mod:`mmrest.models` lazily, so ``type='mmrest.ResT'`` builds from a config whose default
scope is ``mmdet``, ``mmseg`` or ``mmpretrain`` without ``custom_imports``.
"""
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import Registry

MODELS = Registry('model', parent=MMENGINE_MODELS, scope='mmrest',
                  locations=['mmrest.models'])

__all__ = ['MODELS']
