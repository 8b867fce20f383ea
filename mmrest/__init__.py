"""mmrest: the ResT vision transformer as an OpenMMLab backbone.

ResT (NeurIPS 2021, https://arxiv.org/abs/2105.13677) and ResT V2 (NeurIPS 2022,
https://arxiv.org/abs/2204.07366); authors' code: https://github.com/wofmanaf/ResT.

``import mmrest`` checks the stack (:mod:`mmrest.stack_check`), registers ``ResT`` and
``ResTV2`` (:mod:`mmrest.registry`), lets torch >= 2.6 read mmengine's checkpoints safely
(:func:`mmrest.utils.setup_safe_loading`) and makes ``mmseg::`` config bases resolve under
the OneDL fork's distribution names; nothing else.
"""
from .stack_check import check_stack, resolve_renamed_toolboxes

check_stack()

from .models import ResT, ResTV2  # noqa: E402,F401  (registers the backbones)
from .utils.checkpoint import setup_safe_loading  # noqa: E402
from .version import __version__  # noqa: E402

setup_safe_loading()
resolve_renamed_toolboxes()

__all__ = ['ResT', 'ResTV2', '__version__']
