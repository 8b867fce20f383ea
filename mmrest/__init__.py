"""mmrest: the ResT vision transformer as an OpenMMLab backbone.

ResT: An Efficient Transformer for Visual Recognition (Qing-Long Zhang and Yu-Bin Yang,
NeurIPS 2021, https://arxiv.org/abs/2105.13677); authors' code:
https://github.com/wofmanaf/ResT.

``import mmrest`` registers :class:`mmrest.models.ResT` (needs torch, mmengine and mmcv
only). The detection, segmentation and classification integrations live in the configs
and tools and need mmdet, mmsegmentation or mmpretrain respectively.
"""
from .models import ResT  # noqa: F401  (registers the backbone)
from .version import __version__

__all__ = ['ResT', '__version__']
