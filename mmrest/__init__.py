"""mmrest: the ResT vision transformer as an OpenMMLab backbone.

ResT: An Efficient Transformer for Visual Recognition (Qing-Long Zhang and Yu-Bin Yang,
NeurIPS 2021, https://arxiv.org/abs/2105.13677); authors' code:
https://github.com/wofmanaf/ResT.

``import mmrest`` (needs torch, mmengine and mmcv only) changes exactly this in the
process:

* registers :class:`mmrest.models.ResT` in the ``mmrest`` registry scope and in
  mmengine's root ``MODELS`` (see :mod:`mmrest.registry` for why both);
* adds the types mmengine writes into its checkpoints to torch's weights-only allowlist
  (:func:`mmrest.utils.setup_safe_loading`; the list and what it does not change are in
  :mod:`mmrest.utils.checkpoint`), so mmengine's ``load_checkpoint``, ``Runner.resume``,
  ``load_from`` and the OpenMMLab inferencers read training checkpoints on torch >= 2.6.

The detection, segmentation and classification integrations live in the configs and
tools and need mmdet, mmsegmentation or mmpretrain respectively.
"""
from .models import ResT  # noqa: F401  (registers the backbone)
from .utils.checkpoint import setup_safe_loading
from .version import __version__

setup_safe_loading()

__all__ = ['ResT', '__version__']
