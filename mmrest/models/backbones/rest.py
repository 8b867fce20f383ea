"""ResT backbone.

ResT: An Efficient Transformer for Visual Recognition (Qing-Long Zhang and Yu-Bin Yang,
NeurIPS 2021, https://arxiv.org/abs/2105.13677). Module names follow the authors' code
(https://github.com/wofmanaf/ResT) so that their ImageNet and detectron2 checkpoints load
as they are.
"""
import re
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.utils.checkpoint as cp
from mmcv.cnn import build_norm_layer
from mmengine.logging import MMLogger
from mmengine.model import BaseModule
from mmengine.model.weight_init import trunc_normal_
from mmengine.registry import MODELS as MMENGINE_MODELS
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ...registry import MODELS
from ...utils.checkpoint import CheckpointError, safe_load_checkpoint
from ..layers import ConvStem, PatchEmbed, ResTBlock, map_to_tokens, tokens_to_map
from ..utils.ckpt_convert import convert_rest_checkpoint, normalize_rest_key

NUM_STAGES = 4


@MODELS.register_module()
class ResT(BaseModule):
    """ResT: An Efficient Transformer for Visual Recognition.

    A four-stage transformer with a convolutional stem, overlapping patch embeddings, a
    pixel-attention position encoding and efficient multi-head self-attention (EMSA);
    paper: https://arxiv.org/abs/2105.13677, authors' code:
    https://github.com/wofmanaf/ResT. Works on any input size: the maps of stage i are
    ``ceil(H / 2**(i+2)) x ceil(W / 2**(i+2))``.

    Args:
        arch (str | dict): A name in :attr:`arch_zoo` (``'lite'``, ``'small'``,
            ``'base'``, ``'large'`` or an alias such as ``'s'``) or a dict with the keys
            ``embed_dims``, ``depths``, ``num_heads``, ``mlp_ratios`` and ``sr_ratios``
            (four values each). Defaults to 'small'.
        in_channels (int): Channels of the input images. Defaults to 3.
        out_indices (Sequence[int] | int): Stages (0-3) whose maps are returned, at
            strides 4, 8, 16, 32. Defaults to (0, 1, 2, 3).
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
            the returned map only and the next stage sees the un-normalised tokens.
            Defaults to True.
        frozen_stages (int): -1 freezes nothing, 0 the stem, k (1-4) also the patch
            embedding, the blocks and the output norm of stages 1..k (requires_grad off,
            norms and dropout in eval mode, re-applied on every ``train()``).
            Defaults to -1.
        norm_eval (bool): Keep the BatchNorms in eval mode while training.
            Defaults to False.
        with_cp (bool): Gradient checkpointing (non-reentrant) of every block while
            training: less memory, more time. Defaults to False.
        attn_impl (str): EMSA implementation: ``'fused'`` (fast and memory-lean) or
            ``'reference'`` (the equations as written). Both compute the same function.
            Defaults to 'fused'.
        init_cfg (dict | list[dict], optional): Initialization config. With
            ``dict(type='Pretrained', checkpoint=PATH)`` any ResT checkpoint layout is
            loaded (see :func:`mmrest.models.utils.convert_rest_checkpoint`), safely.
            Defaults to None.
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
    arch_keys = ('embed_dims', 'depths', 'num_heads', 'mlp_ratios', 'sr_ratios')

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
                 attn_impl: str = 'fused',
                 init_cfg: Optional[Union[dict, List[dict]]] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        self.arch_settings = self._parse_arch(arch)
        norm_cfg = dict(type='LN') if norm_cfg is None else norm_cfg
        embed_norm_cfg = dict(type='BN') if embed_norm_cfg is None else embed_norm_cfg
        embed_dims = self.arch_settings['embed_dims']
        depths = self.arch_settings['depths']
        self.embed_dims = list(embed_dims)
        self.depths = list(depths)
        self.in_channels = in_channels
        self.out_indices = self._parse_out_indices(out_indices)
        if not -1 <= frozen_stages <= NUM_STAGES:
            raise ValueError(f'frozen_stages must be in [-1, {NUM_STAGES}], '
                             f'got {frozen_stages}')
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.with_cp = with_cp
        self.out_norm_in_main_path = out_norm_in_main_path

        self.stem = ConvStem(in_channels, embed_dims[0], norm_cfg=embed_norm_cfg)
        for i in range(1, NUM_STAGES):
            self.add_module(
                f'patch_embed_{i + 1}',
                PatchEmbed(embed_dims[i - 1], embed_dims[i], norm_cfg=embed_norm_cfg))

        # python floats (computed on the CPU whatever the default device)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()
        cur = 0
        for i in range(NUM_STAGES):
            blocks = nn.ModuleList([
                ResTBlock(
                    embed_dims[i],
                    num_heads=self.arch_settings['num_heads'][i],
                    mlp_ratio=self.arch_settings['mlp_ratios'][i],
                    sr_ratio=self.arch_settings['sr_ratios'][i],
                    qkv_bias=qkv_bias,
                    qk_scale=qk_scale,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=dpr[cur + j],
                    apply_transform=apply_transform,
                    norm_cfg=norm_cfg,
                    attn_impl=attn_impl) for j in range(depths[i])
            ])
            self.add_module(f'stage{i + 1}', blocks)
            cur += depths[i]
        # Output norms of stages 1-3 (new, as in the authors' detection backbone), and
        # the pretrained final norm of stage 4.
        for i in self.out_indices:
            if i < NUM_STAGES - 1:
                self.add_module(f'norm{i + 1}',
                                build_norm_layer(norm_cfg, embed_dims[i])[1])
        self.norm = build_norm_layer(norm_cfg, embed_dims[-1])[1]

        self._register_load_state_dict_pre_hook(self._convert_old_layout)
        self._freeze_stages()

    # ------------------------------------------------------------------ config
    @classmethod
    def _parse_arch(cls, arch: Union[str, dict]) -> Dict[str, List[int]]:
        if isinstance(arch, str):
            if arch not in cls.arch_zoo:
                raise KeyError(f'Unknown ResT arch {arch!r}; choose one of '
                               f'{sorted(set(cls.arch_zoo), key=str.lower)} or pass a dict '
                               f'with the keys {list(cls.arch_keys)}')
            return {k: list(v) for k, v in cls.arch_zoo[arch].items()}
        if not isinstance(arch, dict):
            raise TypeError(f'arch must be a str or a dict, got {type(arch).__name__}')
        missing = [k for k in cls.arch_keys if k not in arch]
        if missing:
            raise KeyError(f'The ResT arch dict is missing the keys {missing}; it needs '
                           f'{list(cls.arch_keys)}')
        extra = sorted(set(arch) - set(cls.arch_keys))
        if extra:
            raise KeyError(f'The ResT arch dict has unknown keys {extra}; it takes '
                           f'{list(cls.arch_keys)}')
        for key in cls.arch_keys:
            if len(arch[key]) != NUM_STAGES:
                raise ValueError(f'arch[{key!r}] needs {NUM_STAGES} values, got '
                                 f'{list(arch[key])}')
        return {k: list(arch[k]) for k in cls.arch_keys}

    @staticmethod
    def _parse_out_indices(out_indices: Union[Sequence[int], int]) -> Tuple[int, ...]:
        if isinstance(out_indices, int):
            out_indices = [out_indices]
        out = []
        for index in out_indices:
            if not isinstance(index, int) or not -NUM_STAGES <= index < NUM_STAGES:
                raise ValueError(f'out_indices must be stage indices in [0, {NUM_STAGES - 1}]'
                                 f' (or negative), got {index!r}')
            out.append(index % NUM_STAGES)
        if not out or len(set(out)) != len(out):
            raise ValueError(f'out_indices must be non-empty and unique, got {out_indices}')
        return tuple(sorted(out))

    # ------------------------------------------------------------ weights/init
    def _stage_modules(self, i: int) -> List[nn.Module]:
        """Modules of stage i (1-4): patch embedding, blocks and output norm."""
        mods: List[nn.Module] = []
        if i > 1:
            mods.append(getattr(self, f'patch_embed_{i}'))
        mods.append(getattr(self, f'stage{i}'))
        norm_name = 'norm' if i == NUM_STAGES else f'norm{i}'
        if hasattr(self, norm_name):
            mods.append(getattr(self, norm_name))
        return mods

    def _freeze_stages(self) -> None:
        if self.frozen_stages < 0:
            return
        mods = [self.stem]
        for i in range(1, self.frozen_stages + 1):
            mods += self._stage_modules(i)
        for m in mods:
            m.eval()
            for p in m.parameters():
                p.requires_grad = False

    def train(self, mode: bool = True) -> 'ResT':
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self

    def init_weights(self) -> None:
        if isinstance(self.init_cfg, dict) and self.init_cfg.get('type') == 'Pretrained':
            self.load_pretrained(self.init_cfg['checkpoint'])
            return
        if self.init_cfg is not None:
            super().init_weights()
            return
        # The authors' initialisation.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                trunc_normal_(m.weight, std=.02)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, _BatchNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def load_pretrained(self, checkpoint: str) -> None:
        """Load ResT weights of any supported layout from a file, safely.

        Missing and unexpected keys are logged by name. Only the new output norms
        ``norm1``-``norm3`` (and BN ``num_batches_tracked``) may be missing, and only
        output norms of unselected stages may be extra; any other difference means
        another architecture and raises.

        Args:
            checkpoint (str): Path of the checkpoint file.

        Raises:
            CheckpointError: If the file is unsafe, unreadable, holds no ResT weights,
                or its weights do not fit this architecture.
        """
        logger = MMLogger.get_current_instance()
        try:
            state_dict = convert_rest_checkpoint(safe_load_checkpoint(checkpoint))
        except (TypeError, ValueError) as err:
            raise CheckpointError(f'{checkpoint}: {err}') from err
        own = self.state_dict()
        mismatched = [
            f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}'
            for k, v in state_dict.items() if k in own and v.shape != own[k].shape
        ]
        if mismatched:
            raise CheckpointError(
                f'{checkpoint} does not fit this ResT (arch embed_dims='
                f'{self.embed_dims}, depths={self.depths}): {len(mismatched)} shape '
                'mismatches, e.g. ' + '; '.join(mismatched[:5]))
        matched = [k for k in state_dict if k in own]
        if not matched:
            raise CheckpointError(f'{checkpoint}: none of its keys match this ResT')
        # Only the new output norms (and BN counters) may be absent, and only output
        # norms of unselected stages may be extra; anything else is another arch (e.g.
        # small weights into large would leave 12 blocks at their random init).
        absent = [k for k in own if k not in state_dict and
                  not re.match(r'^norm[123]\.|.*\.num_batches_tracked$', k)]
        extra = [k for k in state_dict if k not in own and not re.match(r'^norm[123]\.', k)]
        if absent or extra:
            raise CheckpointError(
                f'{checkpoint} does not fit this ResT (arch embed_dims={self.embed_dims}, '
                f'depths={self.depths}): {len(absent)} of its weights are missing from the '
                f'checkpoint {absent[:5]}, {len(extra)} checkpoint weights are not in the '
                f'model {extra[:5]}')
        missing, unexpected = self.load_state_dict(state_dict, strict=False)
        logger.info(f'Loaded {len(matched)} ResT tensors from {checkpoint}')
        if missing:
            logger.warning(f'Keys missing from {checkpoint} (left at their '
                           f'initialisation): {missing}')
        if unexpected:
            logger.warning(f'Unexpected keys in {checkpoint} (ignored): {unexpected}')

    def _convert_old_layout(self, state_dict: dict, prefix: str, *args) -> None:
        """Load-state-dict pre-hook: rename keys of other ResT layouts under ``prefix``.

        E.g. an authors' detectron2 detector loaded into an mmdet detector has
        ``backbone.bottom_up.stem.conv1.weight`` where ``backbone.stem.conv1.weight`` is
        expected; the classification head ``head.*`` of the authors' ImageNet models is
        left in place (reported as unexpected by a non-strict load).
        """
        for key in [k for k in state_dict if k.startswith(prefix)]:
            new = normalize_rest_key(key[len(prefix):])
            if new is not None and prefix + new != key and prefix + new not in state_dict:
                state_dict[prefix + new] = state_dict.pop(key)

    # ---------------------------------------------------------------- forward
    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f'ResT expects a 4-D (N, C, H, W) tensor, got {shape}')
        if x.shape[1] != self.in_channels:
            raise ValueError(f'ResT was built for {self.in_channels} input channels '
                             f'(in_channels), got an input of shape {tuple(x.shape)}')
        if x.shape[0] == 0:
            raise ValueError(f'ResT got an empty batch: input shape {tuple(x.shape)}')

    def _run_block(self, block: nn.Module, x: Tensor, hw: Tuple[int, int]) -> Tensor:
        if self.with_cp and self.training and torch.is_grad_enabled():
            return cp.checkpoint(block, x, hw, use_reentrant=False)
        return block(x, hw)

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        """Forward.

        Args:
            x (Tensor): Images of shape (N, in_channels, H, W), any H, W.

        Returns:
            tuple[Tensor]: Maps of the stages in ``out_indices``, each
            (N, C_i, ceil(H / 2**(i+2)), ceil(W / 2**(i+2))).
        """
        self._check_input(x)
        outs = []
        x = self.stem(x)
        for i in range(NUM_STAGES):
            if i > 0:
                x = getattr(self, f'patch_embed_{i + 1}')(x)
            B, C, H, W = x.shape
            tokens = map_to_tokens(x)
            for block in getattr(self, f'stage{i + 1}'):
                tokens = self._run_block(block, tokens, (H, W))
            norm = self.norm if i == NUM_STAGES - 1 else getattr(self, f'norm{i + 1}', None)
            out = None
            if norm is not None:
                out = norm(tokens)
                if self.out_norm_in_main_path or i == NUM_STAGES - 1:
                    tokens = out
            if i in self.out_indices:
                # plain contiguous NCHW, as mmdet's backbones return (a channels-last
                # view would be misread by ops that index data_ptr as NCHW, such as
                # mmcv's RoIAlign)
                outs.append(out.transpose(1, 2).reshape(B, C, H, W).contiguous())
            if i < NUM_STAGES - 1:
                x = tokens_to_map(tokens, (H, W))
        return tuple(outs)


# A scope's registry searches itself and its parents, never its siblings: for ``type='ResT'``
# (no ``mmrest.`` prefix) to resolve from an mmdet, mmseg or mmpretrain config once
# ``custom_imports`` has imported mmrest, the class is also in mmengine's root MODELS.
MMENGINE_MODELS.register_module(module=ResT)
