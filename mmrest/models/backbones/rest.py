"""ResT backbone.

ResT: An Efficient Transformer for Visual Recognition (Qing-Long Zhang and Yu-Bin Yang,
NeurIPS 2021, https://arxiv.org/abs/2105.13677). Module names follow the authors' code
(https://github.com/wofmanaf/ResT) so that their ImageNet and detectron2 checkpoints load
as they are.
"""
from typing import Dict, List, Optional, Sequence, Union

from mmengine.registry import MODELS as MMENGINE_MODELS
from torch import nn

from ...registry import MODELS
from ..layers import ConvStem, PatchEmbed, ResTBlock
from .base import ResTBase


@MODELS.register_module()
class ResT(ResTBase):
    """ResT: An Efficient Transformer for Visual Recognition.

    A four-stage transformer with a convolutional stem, overlapping patch embeddings, a
    pixel-attention position encoding and efficient multi-head self-attention (EMSA);
    paper: https://arxiv.org/abs/2105.13677, authors' code:
    https://github.com/wofmanaf/ResT. Works on any input size: the maps of stage i are
    ``ceil(H / 2**(i+2)) x ceil(W / 2**(i+2))``. Training at batch 1 needs inputs larger
    than 32x32 (at least 33 px on one side): the BatchNorm of the last patch embedding
    normalises the stride-32 map with batch statistics (a smaller input raises a
    ``ValueError`` naming it).

    It was pretrained on ImageNet with RGB inputs normalised by mean (123.675, 116.28,
    103.53) and std (58.395, 57.12, 57.375), the data preprocessor of mmdet's and mmseg's
    stock ImageNet-backbone bases (``bgr_to_rgb=True``); caffe-style bases (BGR, std 1)
    need that preprocessor set.

    Args:
        arch (str | dict): A name in :attr:`arch_zoo` (``'lite'``, ``'small'``,
            ``'base'``, ``'large'`` or an alias such as ``'s'``) or a dict with the keys
            ``embed_dims``, ``depths``, ``num_heads``, ``mlp_ratios`` and ``sr_ratios``
            (four values each). Defaults to 'small'.
        in_channels (int): Channels of the input images. Defaults to 3.
        out_indices (Sequence[int] | int): Stages (0-3) whose maps are returned, at
            strides 4, 8, 16, 32. Every selected stage but the last gets a new output
            norm (``norm1``-``norm3``), which, with ``out_norm_in_main_path=True``, the
            next stage consumes: selecting stages 0-2 changes the function of the
            pretrained stages after them until the norms are trained.
            Defaults to (0, 1, 2, 3).
        qkv_bias (bool): Bias in the q and kv projections. Defaults to True.
        qk_scale (float, optional): Override of ``head_dim ** -0.5``. Defaults to None.
        drop_rate (float): Dropout after the attention projection and MLP fcs.
            Defaults to 0.
        attn_drop_rate (float): Dropout on the attention maps. Defaults to 0.
        drop_path_rate (float): Stochastic depth rate, rising linearly from 0 over all
            blocks to this value. Defaults to 0.1 (the authors' default).
        apply_transform (bool): The EMSA "transform" (head mixing and instance norm of
            the attention map); all published models use it. Defaults to True.
        norm_cfg (dict, optional): Config of the LayerNorms (blocks, EMSA reduction,
            output norms). Defaults to ``dict(type='LN')``.
        embed_norm_cfg (dict, optional): Config of the BatchNorms of the stem and patch
            embeddings; e.g. ``dict(type='SyncBN')`` for multi-GPU training. Defaults to
            ``dict(type='BN')``.
        out_norm_in_main_path (bool): Each selected stage but the last gets a new
            LayerNorm (``norm1``-``norm3``); stage 4 uses the pretrained ``norm``. If True,
            as in the authors' detection code that produced the paper's COCO numbers, the
            normalised map is also what the next stage consumes; if False it is applied to
            the returned map only and the next stage sees the un-normalised tokens, so
            ImageNet weights keep their function. Defaults to True.
        frozen_stages (int): -1 freezes nothing, 0 the stem, k (1-4) also the patch
            embedding, the blocks and the output norm of stages 1..k (requires_grad off,
            norms and dropout in eval mode, re-applied on every ``train()``).
            Defaults to -1.
        norm_eval (bool): Keep the BatchNorms in eval mode while training.
            Defaults to False.
        with_cp (bool): Gradient checkpointing (non-reentrant) of every block while
            training: less memory, more time. Defaults to False.
        attn_impl (str): How the attention core runs: ``'lean'`` (memory-lean kernels),
            ``'dense'`` (materialised scores) or ``'reference'`` (the equations as
            written); the same function (see :func:`mmrest.models.layers.attend`).
            Defaults to 'lean'.
        pretrained (str, optional): Deprecated, use ``init_cfg``. A path or
            ``http(s)://`` address of ResT weights becomes
            ``init_cfg=dict(type='Pretrained', checkpoint=pretrained)`` with a
            ``DeprecationWarning``; mmengine's ``open-mmlab://`` and other torch.hub
            names (mmseg hands a base config's ``model.pretrained`` to the backbone) raise
            a ``ValueError`` naming the fix. Defaults to None.
        init_cfg (dict | list[dict], optional): Initialization config. With
            ``dict(type='Pretrained', checkpoint=PATH)`` any ResT checkpoint layout is
            loaded (see :func:`mmrest.models.utils.convert_rest_checkpoint`), safely.
            Defaults to None.

    Raises:
        KeyError: For an unknown ``arch`` name, or an arch dict with missing or unknown
            keys.
        TypeError: For an ``arch`` that is neither a str nor a dict.
        ValueError: For arch entries that are not four positive numbers, bad
            ``out_indices`` or ``frozen_stages``, a torch.hub name or a second set of
            weights in ``pretrained``; in :meth:`forward`, for an input of the wrong
            shape or too small to train on (see above).
    """
    arch_zoo: Dict[str, Dict[str, List[int]]] = {
        # aliases mean what they mean in mmpretrain: 's' small, 'b' base, 'l' large
        'lite': {
            'embed_dims': [64, 128, 256, 512],
            'depths': [2, 2, 2, 2],
            'num_heads': [1, 2, 4, 8],
            'mlp_ratios': [4, 4, 4, 4],
            'sr_ratios': [8, 4, 2, 1],
        },
        **dict.fromkeys(['s', 'small'], {
            'embed_dims': [64, 128, 256, 512],
            'depths': [2, 2, 6, 2],
            'num_heads': [1, 2, 4, 8],
            'mlp_ratios': [4, 4, 4, 4],
            'sr_ratios': [8, 4, 2, 1],
        }),
        **dict.fromkeys(['b', 'base'], {
            'embed_dims': [96, 192, 384, 768],
            'depths': [2, 2, 6, 2],
            'num_heads': [1, 2, 4, 8],
            'mlp_ratios': [4, 4, 4, 4],
            'sr_ratios': [8, 4, 2, 1],
        }),
        **dict.fromkeys(['l', 'large'], {
            'embed_dims': [96, 192, 384, 768],
            'depths': [2, 2, 18, 2],
            'num_heads': [1, 2, 4, 8],
            'mlp_ratios': [4, 4, 4, 4],
            'sr_ratios': [8, 4, 2, 1],
        }),
    }

    def __init__(self,
                 arch: Union[str, dict] = 'small',
                 in_channels: int = 3,
                 out_indices: Union[Sequence[int], int] = (0, 1, 2, 3),
                 qkv_bias: bool = True,
                 qk_scale: Optional[float] = None,
                 drop_rate: float = 0.,
                 attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0.1,
                 apply_transform: bool = True,
                 norm_cfg: Optional[dict] = None,
                 embed_norm_cfg: Optional[dict] = None,
                 out_norm_in_main_path: bool = True,
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 with_cp: bool = False,
                 attn_impl: str = 'lean',
                 pretrained: Optional[str] = None,
                 init_cfg: Optional[Union[dict, List[dict]]] = None) -> None:
        super().__init__(arch, in_channels, out_indices, frozen_stages, norm_eval, with_cp,
                         out_norm_in_main_path, init_cfg, pretrained)
        norm_cfg = dict(type='LN') if norm_cfg is None else norm_cfg
        embed_norm_cfg = dict(type='BN') if embed_norm_cfg is None else embed_norm_cfg
        dims, settings = self.embed_dims, self.arch_settings

        def embedding(i: int) -> nn.Module:
            if i == 0:
                return ConvStem(in_channels, dims[0], norm_cfg=embed_norm_cfg)
            return PatchEmbed(dims[i - 1], dims[i], norm_cfg=embed_norm_cfg)

        def block(i: int, drop_path: float) -> ResTBlock:
            return ResTBlock(
                dims[i], num_heads=settings['num_heads'][i],
                mlp_ratio=settings['mlp_ratios'][i], sr_ratio=settings['sr_ratios'][i],
                qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop_rate,
                attn_drop=attn_drop_rate, drop_path=drop_path,
                apply_transform=apply_transform, norm_cfg=norm_cfg, attn_impl=attn_impl)

        self._build_stages(embedding, block, drop_path_rate, norm_cfg)


# A scope's registry searches itself and its parents, never its siblings: for ``type='ResT'``
# (no ``mmrest.`` prefix) to resolve from an mmdet, mmseg or mmpretrain config once
# ``custom_imports`` has imported mmrest, the class is also in mmengine's root MODELS.
MMENGINE_MODELS.register_module(module=ResT)
