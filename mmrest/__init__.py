"""mmrest: the ResT vision transformer as an OpenMMLab backbone.

ResT: An Efficient Transformer for Visual Recognition (Qing-Long Zhang and Yu-Bin Yang,
NeurIPS 2021, https://arxiv.org/abs/2105.13677) and ResT V2 (NeurIPS 2022,
https://arxiv.org/abs/2204.07366); authors' code: https://github.com/wofmanaf/ResT.

``import mmrest`` (needs torch, mmengine and mmcv or mmcv-lite only, in the versions of
:data:`mmrest.stack_check.REQUIREMENTS`, checked first) changes exactly this in the
process:

* registers :class:`mmrest.models.ResT` and :class:`mmrest.models.ResTV2` in the
  ``mmrest`` registry scope and in mmengine's root ``MODELS`` (see :mod:`mmrest.registry`
  for why both);
* on torch >= 2.6, adds the types mmengine writes into its checkpoints to torch's
  weights-only allowlist (:func:`mmrest.utils.setup_safe_loading`; the list and what it
  does not change are in :mod:`mmrest.utils.checkpoint`), so mmengine's
  ``load_checkpoint``, ``Runner.resume``, ``load_from`` and the OpenMMLab inferencers
  read training checkpoints;
* makes mmengine's ``mmseg::`` config bases resolve where mmsegmentation is installed
  under the OneDL fork's distribution name (:func:`mmrest.stack_check.resolve_renamed_toolboxes`).

The detection, segmentation and classification integrations live in the configs and
tools and need mmdet, mmsegmentation or mmpretrain respectively.
"""
from .stack_check import check_stack, resolve_renamed_toolboxes

check_stack()

from .models import ResT, ResTV2  # noqa: E402,F401  (registers the backbones)
from .utils.checkpoint import setup_safe_loading  # noqa: E402
from .version import __version__  # noqa: E402

setup_safe_loading()
resolve_renamed_toolboxes()

__all__ = ['ResT', 'ResTV2', '__version__']
