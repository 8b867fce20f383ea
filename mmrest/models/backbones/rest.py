"""ResT backbone (https://arxiv.org/abs/2105.13677). Module names follow the authors'
code (https://github.com/wofmanaf/ResT) so that their checkpoints load as they are."""
from typing import Dict, List, Optional, Sequence, Union

from mmengine.registry import MODELS as MMENGINE_MODELS
from torch import nn

from ...registry import MODELS
from ..layers import EMSA, ConvStem, PatchEmbed, PreNormBlock
from .base import ResTBase, make_arch


@MODELS.register_module()
class ResT(ResTBase):
    """ResT: An Efficient Transformer for Visual Recognition.

    Works on any input size: the maps of stage i are ``ceil(H / 2**(i+2))`` x
    ``ceil(W / 2**(i+2))``. Pretrained on RGB inputs with the ImageNet mean and std of
    mmdet's and mmseg's stock bases (``bgr_to_rgb=True``).

    Args:
        arch (str | dict): A name in :attr:`arch_zoo` or a dict with the keys
            ``embed_dims``, ``depths``, ``num_heads``, ``mlp_ratios`` and ``sr_ratios``
            (four values each). Defaults to 'small'.
        in_channels (int): Channels of the input images. Defaults to 3.
        out_indices (Sequence[int] | int): Stages (0-3) whose maps are returned, at
            strides 4, 8, 16, 32; the stages after the last one do not run. Defaults
            to (0, 1, 2, 3).
        qkv_bias (bool): Bias in the q and kv projections. Defaults to True.
        qk_scale (float, optional): Override of ``head_dim ** -0.5``. Defaults to None.
        drop_rate (float): Dropout after the attention projection and MLP fcs.
            Defaults to 0.
        attn_drop_rate (float): Dropout on the attention maps. Defaults to 0.
        drop_path_rate (float): Stochastic depth rate, rising linearly over the blocks.
            Defaults to 0.1.
        apply_transform (bool): EMSA head mixing and instance norm. Defaults to True.
        norm_cfg (dict, optional): Config of the LayerNorms. Defaults to
            ``dict(type='LN')``.
        embed_norm_cfg (dict, optional): Config of the BatchNorms of the stem and patch
            embeddings. Defaults to ``dict(type='BN')``.
        out_norm_in_main_path (bool): Whether the next stage consumes the new output
            norms ``norm1``-``norm3`` (the authors' detection code) or the returned maps
            only get them. Defaults to True.
        frozen_stages (int): -1 freezes nothing, 0 the stem, k (1-4) also stages 1..k.
            Defaults to -1.
        norm_eval (bool): Keep the BatchNorms in eval mode while training.
            Defaults to False.
        with_cp (bool): Gradient checkpointing of every block. Defaults to False.
        attn_impl (str): ``'lean'``, ``'dense'`` or ``'reference'``: how the attention
            core runs, the same function (see :func:`mmrest.models.layers.attend`).
            Defaults to 'lean'.
        pretrained (str, optional): Deprecated, use ``init_cfg``. Defaults to None.
        init_cfg (dict | list[dict], optional): Initialization config;
            ``dict(type='Pretrained', checkpoint=PATH)`` loads any ResT checkpoint
            layout, safely. Defaults to None.
    """
    arch_zoo: Dict[str, Dict[str, List[int]]] = {
        'lite': make_arch([64, 128, 256, 512], [2, 2, 2, 2]),
        **dict.fromkeys(['s', 'small'], make_arch([64, 128, 256, 512], [2, 2, 6, 2])),
        **dict.fromkeys(['b', 'base'], make_arch([96, 192, 384, 768], [2, 2, 6, 2])),
        **dict.fromkeys(['l', 'large'], make_arch([96, 192, 384, 768], [2, 2, 18, 2])),
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

        def block(i: int, drop_path: float) -> PreNormBlock:
            attn = EMSA(dims[i], num_heads=settings['num_heads'][i],
                        sr_ratio=settings['sr_ratios'][i], qkv_bias=qkv_bias,
                        qk_scale=qk_scale, attn_drop=attn_drop_rate, proj_drop=drop_rate,
                        apply_transform=apply_transform, norm_cfg=norm_cfg,
                        attn_impl=attn_impl)
            return PreNormBlock(dims[i], attn, mlp_ratio=settings['mlp_ratios'][i],
                                drop=drop_rate, drop_path=drop_path, norm_cfg=norm_cfg)

        self._build_stages(embedding, block, drop_path_rate, norm_cfg)


# also in mmengine's root MODELS, for ``type='ResT'`` after ``custom_imports`` (see registry.py)
MMENGINE_MODELS.register_module(module=ResT)
