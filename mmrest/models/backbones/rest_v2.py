"""ResT V2 backbone.

ResT V2: Simpler, Faster and Stronger (Qing-Long Zhang and Yu-Bin Yang, NeurIPS 2022,
https://arxiv.org/abs/2204.07366). Module names follow the authors' code
(https://github.com/wofmanaf/ResT, ``models/rest_v2.py``) so that their ImageNet
checkpoints load as they are; their detectron2 and mmseg 0.x checkpoints load through the
one conversion (:func:`mmrest.models.utils.convert_rest_checkpoint`).
"""
from typing import Dict, List, Optional, Sequence, Tuple, Union

from mmengine.registry import MODELS as MMENGINE_MODELS
from torch import Tensor, nn

from ...registry import MODELS
from ..layers import ConvStemV2, EMSAv2, PatchEmbedV2, PreNormBlock
from .base import ResTBase


def _v2_arch(embed_dims: List[int], depths: List[int], num_heads: List[int]) -> dict:
    return dict(embed_dims=embed_dims, depths=depths, num_heads=num_heads,
                mlp_ratios=[4, 4, 4, 4], sr_ratios=[8, 4, 2, 1])


@MODELS.register_module()
class ResTV2(ResTBase):
    """ResT V2: Simpler, Faster and Stronger.

    ResT (:class:`mmrest.models.ResT`) with a stem and patch embeddings normalised by
    LayerNorms, and EMSAv2 (:class:`mmrest.models.layers.EMSAv2`): plain multi-head
    attention on spatially reduced keys and values plus an up-sampling branch of the
    values. Paper: https://arxiv.org/abs/2204.07366, authors' code:
    https://github.com/wofmanaf/ResT. Works on any input size (odd or not): the maps of
    stage i are ``ceil(H / 2**(i+2)) x ceil(W / 2**(i+2))``; the up-sampled values are
    cropped to the query map where they exceed it (see
    :mod:`mmrest.models.layers.emsa_v2`). Its only BatchNorms are in the stem (strides 2
    and 4), so it trains at batch 1 on inputs larger than 4x4 (a smaller input raises a
    ``ValueError`` naming the norm).

    It was pretrained on ImageNet with RGB inputs normalised by mean (123.675, 116.28,
    103.53) and std (58.395, 57.12, 57.375), the data preprocessor of mmdet's and mmseg's
    stock ImageNet-backbone bases (``bgr_to_rgb=True``); caffe-style bases (BGR, std 1)
    need that preprocessor set.

    Args:
        arch (str | dict): A name in :attr:`arch_zoo` (``'tiny'``, ``'small'``,
            ``'base'``, ``'large'`` or the aliases ``'t'``, ``'s'``, ``'b'``, ``'l'``) or
            a dict with the keys ``embed_dims``, ``depths``, ``num_heads``,
            ``mlp_ratios`` and ``sr_ratios`` (four values each; reduction ratios 1 or
            even). Defaults to 'tiny'.
        in_channels (int): Channels of the input images. Defaults to 3.
        out_indices (Sequence[int] | int): Stages (0-3) whose maps are returned, at
            strides 4, 8, 16, 32. Every selected stage but the last gets a new output
            norm (``norm1``-``norm3``); see ``out_norm_in_main_path``.
            Defaults to (0, 1, 2, 3).
        drop_path_rate (float): Stochastic depth rate, rising linearly from 0 over all
            blocks to this value. Defaults to 0.1 (the authors' value for tiny; they
            train small, base and large downstream with 0.2, 0.3 and 0.5).
        attn_impl (str): How the attention core runs: ``'lean'`` and ``'dense'``
            (PyTorch's ``scaled_dot_product_attention``) or ``'reference'`` (the
            equations as the authors wrote them, with materialised scores); the same
            function. Defaults to 'lean'.
        norm_cfg (dict, optional): Config of the LayerNorms (embeddings, blocks,
            reductions, up-sampling, output norms). Defaults to
            ``dict(type='LN', eps=1e-6)``.
        embed_norm_cfg (dict, optional): Config of the two BatchNorms of the stem; e.g.
            ``dict(type='SyncBN')`` for multi-GPU training. Defaults to
            ``dict(type='BN')``.
        out_norm_in_main_path (bool): Each selected stage but the last gets a new
            LayerNorm (``norm1``-``norm3``); stage 4 uses the pretrained ``norm``. If
            False, as in the authors' ResT V2 detection and segmentation code, the norm
            is applied to the returned map only; if True the next stage consumes the
            normalised map (the authors' ResT v1 detection code). Defaults to False.
        frozen_stages (int): -1 freezes nothing, 0 the stem, k (1-4) also the patch
            embedding, the blocks and the output norm of stages 1..k (requires_grad off,
            norms in eval mode, re-applied on every ``train()``). Defaults to -1.
        norm_eval (bool): Keep the BatchNorms in eval mode while training.
            Defaults to False.
        with_cp (bool): Gradient checkpointing (non-reentrant) of every block while
            training: less memory, more time. Defaults to False.
        pretrained (str, optional): Deprecated, use ``init_cfg``. A path or
            ``http(s)://`` address of ResT V2 weights becomes
            ``init_cfg=dict(type='Pretrained', checkpoint=pretrained)`` with a
            ``DeprecationWarning``; mmengine's ``open-mmlab://`` and other torch.hub
            names (mmseg hands a base config's ``model.pretrained`` to the backbone) raise
            a ``ValueError`` naming the fix. Defaults to None.
        init_cfg (dict | list[dict], optional): Initialization config. With
            ``dict(type='Pretrained', checkpoint=PATH)`` any ResT V2 checkpoint layout is
            loaded (see :func:`mmrest.models.utils.convert_rest_checkpoint`), safely;
            ResT (v1) weights are refused by name. Defaults to None.

    Raises:
        KeyError: For an unknown ``arch`` name, or an arch dict with missing or unknown
            keys.
        TypeError: For an ``arch`` that is neither a str nor a dict.
        ValueError: For arch entries that are not four positive numbers, bad
            ``out_indices`` or ``frozen_stages``, a torch.hub name or a second set of
            weights in ``pretrained``; in :meth:`forward`, for an input of the wrong
            shape or too small to train on (see above).

    Note:
        The authors' detection "large" uses depths 2, 3, 16, 3 and heads 1, 2, 4, 8,
        unlike their classifier; ``'large'`` here is the classifier's, so that the
        ImageNet weights load.
    """
    arch_zoo: Dict[str, Dict[str, List[int]]] = {
        # aliases mean what they mean in mmpretrain: 't' tiny, 's' small, 'b' base,
        # 'l' large
        **dict.fromkeys(['t', 'tiny'], _v2_arch([96, 192, 384, 768], [1, 2, 6, 2],
                                                [1, 2, 4, 8])),
        **dict.fromkeys(['s', 'small'], _v2_arch([96, 192, 384, 768], [1, 2, 12, 2],
                                                 [1, 2, 4, 8])),
        **dict.fromkeys(['b', 'base'], _v2_arch([96, 192, 384, 768], [1, 3, 16, 3],
                                                [1, 2, 4, 8])),
        **dict.fromkeys(['l', 'large'], _v2_arch([128, 256, 512, 1024], [2, 3, 16, 2],
                                                 [2, 4, 8, 16])),
    }
    family_name = 'ResTV2'
    patch_embed_prefix = 'patch_'
    zero_bias_types = (nn.Conv2d, nn.Linear)

    def __init__(self,
                 arch: Union[str, dict] = 'tiny',
                 in_channels: int = 3,
                 out_indices: Union[Sequence[int], int] = (0, 1, 2, 3),
                 drop_path_rate: float = 0.1,
                 attn_impl: str = 'lean',
                 norm_cfg: Optional[dict] = None,
                 embed_norm_cfg: Optional[dict] = None,
                 out_norm_in_main_path: bool = False,
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 with_cp: bool = False,
                 pretrained: Optional[str] = None,
                 init_cfg: Optional[Union[dict, List[dict]]] = None) -> None:
        super().__init__(arch, in_channels, out_indices, frozen_stages, norm_eval, with_cp,
                         out_norm_in_main_path, init_cfg, pretrained)
        norm_cfg = dict(type='LN', eps=1e-6) if norm_cfg is None else norm_cfg
        dims, settings = self.embed_dims, self.arch_settings

        def embedding(i: int) -> nn.Module:
            if i == 0:
                return ConvStemV2(in_channels, dims[0], norm_cfg=embed_norm_cfg,
                                  token_norm_cfg=norm_cfg)
            return PatchEmbedV2(dims[i - 1], dims[i], norm_cfg=norm_cfg)

        def block(i: int, drop_path: float) -> PreNormBlock:
            attn = EMSAv2(dims[i], num_heads=settings['num_heads'][i],
                          sr_ratio=settings['sr_ratios'][i], norm_cfg=norm_cfg,
                          attn_impl=attn_impl)
            return PreNormBlock(dims[i], attn, mlp_ratio=settings['mlp_ratios'][i],
                                drop_path=drop_path, norm_cfg=norm_cfg)

        self._build_stages(embedding, block, drop_path_rate, norm_cfg)

    def _embed(self, i: int, x: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        """ResT V2's embeddings return normalised tokens and their map's (H, W)."""
        return self._embedding(i)(x)


# In mmengine's root MODELS too, for ``type='ResTV2'`` after ``custom_imports`` (see the
# note at the end of rest.py).
MMENGINE_MODELS.register_module(module=ResTV2)
