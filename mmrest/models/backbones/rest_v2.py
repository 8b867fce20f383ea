"""ResT V2 backbone (https://arxiv.org/abs/2204.07366). Module names follow the authors'
code (https://github.com/wofmanaf/ResT) so that their checkpoints load as they are."""
from typing import Dict, List, Optional, Sequence, Tuple, Union

from mmengine.registry import MODELS as MMENGINE_MODELS
from torch import Tensor, nn

from ...registry import MODELS
from ..layers import ConvStemV2, EMSAv2, PatchEmbedV2, PreNormBlock
from .base import ResTBase, make_arch


@MODELS.register_module()
class ResTV2(ResTBase):
    """ResT V2: Simpler, Faster and Stronger.

    ResT with LayerNorm-normalised embeddings and EMSAv2 (plain attention on reduced keys
    and values plus an up-sampling branch). Works on any input size.

    Args:
        arch (str | dict): A name in :attr:`arch_zoo` or an arch dict as in
            :class:`mmrest.models.ResT` (reduction ratios 1 or even). Defaults to 'tiny'.
        in_channels (int): Channels of the input images. Defaults to 3.
        out_indices (Sequence[int] | int): Stages (0-3) whose maps are returned;
            the stages after the last one do not run. Defaults to (0, 1, 2, 3).
        drop_path_rate (float): Stochastic depth rate. Defaults to 0.1.
        attn_impl (str): ``'lean'``, ``'dense'`` or ``'reference'``. Defaults to 'lean'.
        norm_cfg (dict, optional): Config of the LayerNorms. Defaults to
            ``dict(type='LN', eps=1e-6)``.
        embed_norm_cfg (dict, optional): Config of the two BatchNorms of the stem.
            Defaults to ``dict(type='BN')``.
        out_norm_in_main_path (bool): See :class:`mmrest.models.ResT`; False as in the
            authors' ResT V2 downstream code. Defaults to False.
        frozen_stages (int): As in :class:`mmrest.models.ResT`. Defaults to -1.
        norm_eval (bool): Keep the BatchNorms in eval mode while training.
            Defaults to False.
        with_cp (bool): Gradient checkpointing of every block. Defaults to False.
        pretrained (str, optional): Deprecated, use ``init_cfg``. Defaults to None.
        init_cfg (dict | list[dict], optional): Initialization config. Defaults to None.

    Note:
        ``'large'`` is the authors' classifier (whose ImageNet weights load), not their
        detection "large" (depths 2, 3, 16, 3).
    """
    arch_zoo: Dict[str, Dict[str, List[int]]] = {
        **dict.fromkeys(['t', 'tiny'], make_arch([96, 192, 384, 768], [1, 2, 6, 2])),
        **dict.fromkeys(['s', 'small'], make_arch([96, 192, 384, 768], [1, 2, 12, 2])),
        **dict.fromkeys(['b', 'base'], make_arch([96, 192, 384, 768], [1, 3, 16, 3])),
        **dict.fromkeys(['l', 'large'], make_arch([128, 256, 512, 1024], [2, 3, 16, 2],
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
        return self._embedding(i)(x)


# also in mmengine's root MODELS (see rest.py)
MMENGINE_MODELS.register_module(module=ResTV2)
