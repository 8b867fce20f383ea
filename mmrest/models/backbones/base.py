"""What ResT and ResT V2 share: arch parsing, stages, output norms, freezing, loading."""
import re
import warnings
from typing import (Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Type,
                    Union)

import torch
import torch.distributed as dist
import torch.utils.checkpoint as cp
from mmcv.cnn import build_norm_layer
from mmengine.logging import MMLogger
from mmengine.model import BaseModule
from mmengine.model.weight_init import trunc_normal_
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ...utils.checkpoint import CheckpointError, fetch_checkpoint, safe_load_checkpoint
from ..layers import map_to_tokens, tokens_to_map
from ..layers.emsa_ops import trace_friendly
from ..utils.ckpt_convert import (check_rest_family, convert_rest_checkpoint, normalize_rest_key,
                                  unwrap_checkpoint)

NUM_STAGES = 4
_OUT_NORM_KEY = re.compile(r'^norm([123])\.')
#: mmengine's torch.hub names (``open-mmlab://resnet50_v1c``, ...): other networks' weights.
_HUB_NAME = re.compile(r'^(open-?mmlab|torchvision|modelzoo|mmcls|mmpretrain)://')


def make_arch(embed_dims: List[int], depths: List[int],
              num_heads: Sequence[int] = (1, 2, 4, 8)) -> Dict[str, List[int]]:
    """An ``arch_zoo`` entry with the authors' MLP ratios (4) and reduction ratios."""
    return dict(embed_dims=embed_dims, depths=depths, num_heads=list(num_heads),
                mlp_ratios=[4, 4, 4, 4], sr_ratios=[8, 4, 2, 1])


def pretrained_to_init_cfg(family: str, pretrained: Optional[str],
                           init_cfg: Optional[Union[dict, List[dict]]]
                           ) -> Optional[Union[dict, List[dict]]]:
    """The ``init_cfg`` of the deprecated ``pretrained`` (mmseg's ``EncoderDecoder`` passes
    it): a ``Pretrained`` config with a ``DeprecationWarning``; torch.hub names (another
    network's weights, unpickled unsafely) and ``pretrained`` with ``init_cfg`` raise."""
    if pretrained is None:
        return init_cfg
    if not isinstance(pretrained, str):
        raise TypeError(f'{family} pretrained must be a str (the path of ResT weights) or '
                        f'None, got {type(pretrained).__name__}')
    if _HUB_NAME.match(pretrained):
        raise ValueError(
            f'{family} got pretrained={pretrained!r} (mmseg passes model.pretrained of a '
            f'base config to the backbone): those are the weights of another network, and '
            f'mmrest does not read torch.hub names; set model.pretrained=None and give '
            f"{family} weights as model.backbone.init_cfg=dict(type='Pretrained', "
            "checkpoint=PATH)")
    if init_cfg is not None:
        raise ValueError(
            f'{family} got both pretrained={pretrained!r} and init_cfg={init_cfg}; '
            f"give the weights once, as init_cfg=dict(type='Pretrained', checkpoint=PATH) "
            '(pretrained is deprecated; in an mmseg config set model.pretrained=None)')
    message = (f'{family}: pretrained is deprecated, please use "init_cfg" instead: '
               f"init_cfg=dict(type='Pretrained', checkpoint={pretrained!r}) (in an mmseg "
               'config, model.pretrained=None and model.backbone.init_cfg)')
    warnings.warn(message, DeprecationWarning, stacklevel=4)
    MMLogger.get_current_instance().warning(message)
    return dict(type='Pretrained', checkpoint=pretrained)


def _uses_batch_statistics(norm: _BatchNorm) -> bool:
    """Whether ``norm`` normalises with the statistics of its input computed on this
    process alone."""
    if not (norm.training or (norm.running_mean is None and norm.running_var is None)):
        return False
    # a SyncBatchNorm in training gathers the statistics of every process
    return not (isinstance(norm, nn.SyncBatchNorm) and norm.training
                and dist.is_available() and dist.is_initialized()
                and dist.get_world_size(norm.process_group or dist.group.WORLD) > 1)


class ResTBase(BaseModule):
    """The four-stage backbone that ResT and ResT V2 share.

    Stage i (0-3) embeds its input (the stem, or the patch embedding
    ``{patch_embed_prefix}{i + 1}``), runs the blocks ``stage{i + 1}`` and returns its map
    through an output norm (the pretrained ``norm`` for stage 4, new ``norm1``-``norm3``
    otherwise). A version sets ``arch_zoo``, ``family_name``, ``patch_embed_prefix`` and
    ``zero_bias_types``, builds its modules with :meth:`_build_stages` and may override
    :meth:`_embed`. The arguments are those of :class:`mmrest.models.ResT`.
    """
    arch_zoo: Dict[str, Dict[str, List[int]]] = {}
    arch_keys = ('embed_dims', 'depths', 'num_heads', 'mlp_ratios', 'sr_ratios')
    family_name = 'ResT'
    patch_embed_prefix = 'patch_embed_'
    zero_bias_types: Tuple[Type[nn.Module], ...] = (nn.Linear, )

    def __init__(self,
                 arch: Union[str, dict],
                 in_channels: int,
                 out_indices: Union[Sequence[int], int],
                 frozen_stages: int,
                 norm_eval: bool,
                 with_cp: bool,
                 out_norm_in_main_path: bool,
                 init_cfg: Optional[Union[dict, List[dict]]] = None,
                 pretrained: Optional[str] = None) -> None:
        super().__init__(
            init_cfg=pretrained_to_init_cfg(self.family_name, pretrained, init_cfg))
        self.arch_settings = self._parse_arch(arch)
        self.embed_dims = list(self.arch_settings['embed_dims'])
        self.depths = list(self.arch_settings['depths'])
        self.in_channels = in_channels
        self.out_indices = self._parse_out_indices(out_indices)
        if (not isinstance(frozen_stages, int) or isinstance(frozen_stages, bool)
                or not -1 <= frozen_stages <= NUM_STAGES):
            raise ValueError(f'frozen_stages must be in [-1, {NUM_STAGES}], '
                             f'got {frozen_stages}')
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.with_cp = with_cp
        self.out_norm_in_main_path = out_norm_in_main_path

    def _build_stages(self, embedding: Callable[[int], nn.Module],
                      block: Callable[[int, float], nn.Module], drop_path_rate: float,
                      norm_cfg: dict) -> None:
        """Add the embeddings (``embedding(stage)``), the blocks
        (``block(stage, drop_path)``) and the output norms; register the checkpoint-layout
        hook and apply ``frozen_stages``."""
        self.stem = embedding(0)
        for i in range(1, NUM_STAGES):
            self.add_module(f'{self.patch_embed_prefix}{i + 1}', embedding(i))
        # python floats (computed on the CPU whatever the default device)
        dpr = torch.linspace(0, drop_path_rate, sum(self.depths), device='cpu').tolist()
        cur = 0
        for i, depth in enumerate(self.depths):
            self.add_module(f'stage{i + 1}',
                            nn.ModuleList([block(i, dpr[cur + j]) for j in range(depth)]))
            cur += depth
        # Output norms of stages 1-3 (new, as in the authors' detection backbones), and
        # the pretrained final norm of stage 4.
        for i in self.out_indices:
            if i < NUM_STAGES - 1:
                self.add_module(f'norm{i + 1}',
                                build_norm_layer(norm_cfg, self.embed_dims[i])[1])
        self.norm = build_norm_layer(norm_cfg, self.embed_dims[-1])[1]

        self._register_load_state_dict_pre_hook(self._convert_old_layout)
        self._freeze_stages()

    # ------------------------------------------------------------------ config
    @classmethod
    def _parse_arch(cls, arch: Union[str, dict]) -> Dict[str, List[int]]:
        name = cls.family_name
        if isinstance(arch, str):
            if arch not in cls.arch_zoo:
                raise KeyError(f'Unknown {name} arch {arch!r}; choose one of '
                               f'{sorted(set(cls.arch_zoo), key=str.lower)} or pass a dict '
                               f'with the keys {list(cls.arch_keys)}')
            return {k: list(v) for k, v in cls.arch_zoo[arch].items()}
        if not isinstance(arch, dict):
            raise TypeError(f'arch must be a str or a dict, got {type(arch).__name__}')
        missing = [k for k in cls.arch_keys if k not in arch]
        if missing:
            raise KeyError(f'The {name} arch dict is missing the keys {missing}; it needs '
                           f'{list(cls.arch_keys)}')
        extra = sorted(set(arch) - set(cls.arch_keys))
        if extra:
            raise KeyError(f'The {name} arch dict has unknown keys {extra}; it takes '
                           f'{list(cls.arch_keys)}')
        for key in cls.arch_keys:
            values = arch[key]
            # mlp_ratios may be fractional; the other entries count channels, blocks,
            # heads or a stride
            kinds = (int, float) if key == 'mlp_ratios' else (int, )
            if (not isinstance(values, (list, tuple)) or len(values) != NUM_STAGES
                    or not all(isinstance(v, kinds) and not isinstance(v, bool) and v > 0
                               for v in values)):
                raise ValueError(f'arch[{key!r}] needs {NUM_STAGES} positive '
                                 f'{"numbers" if key == "mlp_ratios" else "integers"}, '
                                 f'got {values!r}')
        return {k: list(arch[k]) for k in cls.arch_keys}

    @staticmethod
    def _parse_out_indices(out_indices: Union[Sequence[int], int]) -> Tuple[int, ...]:
        if isinstance(out_indices, int):
            out_indices = [out_indices]
        out = []
        for index in out_indices:
            if (not isinstance(index, int) or isinstance(index, bool)
                    or not -NUM_STAGES <= index < NUM_STAGES):
                raise ValueError(f'out_indices must be stage indices in [0, {NUM_STAGES - 1}]'
                                 f' (or negative), got {index!r}')
            out.append(index % NUM_STAGES)
        if not out or len(set(out)) != len(out):
            raise ValueError(f'out_indices must be non-empty and unique, got {out_indices}')
        return tuple(sorted(out))

    # ------------------------------------------------------------ weights/init
    def _embedding(self, i: int) -> nn.Module:
        """The stem (i = 0) or the patch embedding of stage i (0-3)."""
        return self.stem if i == 0 else getattr(self, f'{self.patch_embed_prefix}{i + 1}')

    def _freeze_stages(self) -> None:
        """Freeze the stem (``frozen_stages >= 0``) and stages 1..``frozen_stages``."""
        if self.frozen_stages < 0:
            return
        mods = [self.stem]
        for i in range(1, self.frozen_stages + 1):  # embedding, blocks, output norm
            mods += [self._embedding(i - 1), getattr(self, f'stage{i}'),
                     getattr(self, 'norm' if i == NUM_STAGES else f'norm{i}', None)]
        for m in mods:
            if m is not None:
                m.eval()
                m.requires_grad_(False)

    def train(self, mode: bool = True) -> 'ResTBase':
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self

    def init_weights(self) -> None:
        """Initialise: a ``Pretrained`` ``init_cfg`` through :meth:`load_pretrained`,
        other ``init_cfg`` by mmengine, else as the authors."""
        cfgs = self.init_cfg if isinstance(self.init_cfg, list) else [self.init_cfg]
        pretrained = [c for c in cfgs if isinstance(c, dict) and c.get('type') == 'Pretrained']
        if pretrained:
            if len(cfgs) > 1:
                raise ValueError(f'{self.family_name} init_cfg: a Pretrained config sets '
                                 'every weight, so give it alone (as a dict), got '
                                 f'{self.init_cfg}')
            cfg = pretrained[0]
            unknown = sorted(set(cfg) - {'type', 'checkpoint', 'prefix', 'map_location'})
            if unknown or 'checkpoint' not in cfg:
                raise ValueError(f'{self.family_name} init_cfg {cfg}: Pretrained takes '
                                 "'checkpoint' and optionally 'prefix' and 'map_location'"
                                 + (f', not {unknown}' if unknown else ''))
            # map_location does not matter: the weights are copied into the parameters
            self.load_pretrained(cfg['checkpoint'], prefix=cfg.get('prefix'))
        elif self.init_cfg is not None:
            super().init_weights()
        else:
            # The authors' initialisation.
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    trunc_normal_(m.weight, std=.02)
                    if isinstance(m, self.zero_bias_types) and m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, (nn.LayerNorm, _BatchNorm)):
                    if m.weight is not None:
                        nn.init.ones_(m.weight)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
        self._is_init = True

    def load_pretrained(self, checkpoint: str, prefix: Optional[str] = None) -> None:
        """Load weights of any supported layout from a file, safely: only the new output
        norms (and BN counters) may be missing and only output norms of unselected stages
        extra; any other difference, and unsafe, unreadable or other-version files, raise
        :class:`CheckpointError`.

        Args:
            checkpoint (str): Path or ``http(s)://`` address of the checkpoint.
            prefix (str, optional): Take only the weights under this prefix (e.g.
                ``'backbone'``), as mmengine's ``Pretrained`` init does. Defaults to None.
        """
        logger = MMLogger.get_current_instance()
        name = self.family_name
        try:
            loaded = safe_load_checkpoint(fetch_checkpoint(checkpoint))
            if prefix:
                prefix = prefix if prefix.endswith('.') else prefix + '.'
                weights = unwrap_checkpoint(loaded)
                loaded = {k[len(prefix):]: v for k, v in weights.items()
                          if k.startswith(prefix)}
                if not loaded:
                    raise ValueError(f'no weights under the prefix {prefix!r}; its keys '
                                     f'start: {list(weights)[:5]}')
            state_dict = convert_rest_checkpoint(loaded)
            check_rest_family(state_dict, name)
        except (TypeError, ValueError) as err:
            raise CheckpointError(f'{checkpoint}: {err}') from err
        own = self.state_dict()
        mismatched = [
            f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}'
            for k, v in state_dict.items() if k in own and v.shape != own[k].shape
        ]
        if mismatched:
            raise CheckpointError(
                f'{checkpoint} does not fit this {name} (arch embed_dims='
                f'{self.embed_dims}, depths={self.depths}): {len(mismatched)} shape '
                'mismatches, e.g. ' + '; '.join(mismatched[:5]))
        matched = [k for k in state_dict if k in own]
        if not matched:
            raise CheckpointError(f'{checkpoint}: none of its keys match this {name}')
        # anything but output norms (and BN counters) missing or extra is another arch
        absent = [k for k in own if k not in state_dict and
                  not re.match(r'^norm[123]\.|.*\.num_batches_tracked$', k)]
        extra = [k for k in state_dict if k not in own and not re.match(r'^norm[123]\.', k)]
        if absent or extra:
            raise CheckpointError(
                f'{checkpoint} does not fit this {name} (arch embed_dims={self.embed_dims}, '
                f'depths={self.depths}): {len(absent)} of its weights are missing from the '
                f'checkpoint {absent[:5]}, {len(extra)} checkpoint weights are not in the '
                f'model {extra[:5]}')
        self._check_dropped_out_norms(state_dict, checkpoint)
        missing, unexpected = self.load_state_dict(state_dict, strict=False)
        logger.info(f'Loaded {len(matched)} {name} tensors from {checkpoint}')
        if missing:
            logger.warning(f'Keys missing from {checkpoint} (left at their '
                           f'initialisation): {missing}' + self._new_out_norms_note(missing))
        if unexpected:
            logger.warning(f'Unexpected keys in {checkpoint} (ignored): {unexpected}')

    def _new_out_norms_note(self, missing: Sequence[str]) -> str:
        """What the missing output norms of a load are and do; empty if none is missing."""
        norms = sorted({m.group(0)[:-1] for m in map(_OUT_NORM_KEY.match, missing) if m})
        if not norms:
            return ''
        note = (f'. {", ".join(norms)} are new output norms (LayerNorms of the authors\' '
                'detection design, one for each returned map of stride 4, 8 or 16) that '
                'weights of a classifier lack; the detector or segmentor trains them. ')
        if self.out_norm_in_main_path:
            return note + (
                'With out_norm_in_main_path=True they also feed the next layers, so until '
                'trained they change the pretrained function (the stride-32 map differs '
                "from the classifier's); out_norm_in_main_path=False applies them to the "
                'returned maps only')
        return note + ('With out_norm_in_main_path=False they normalise the returned maps '
                       'only: the pretrained function is unchanged')

    def _convert_old_layout(self, state_dict: dict, prefix: str, *args) -> None:
        """Load-state-dict pre-hook: rename keys of other layouts under ``prefix`` (e.g.
        detectron2's ``bottom_up.``), and refuse main-path output norms this backbone
        lacks."""
        for key in [k for k in state_dict if k.startswith(prefix)]:
            new = normalize_rest_key(key[len(prefix):])
            if new is not None and prefix + new != key and prefix + new not in state_dict:
                state_dict[prefix + new] = state_dict.pop(key)
        self._check_dropped_out_norms(
            [k[len(prefix):] for k in state_dict if k.startswith(prefix)],
            'the state dict being loaded')

    def _check_dropped_out_norms(self, keys: Iterable[str], source: str) -> None:
        """Refuse weights (backbone ``keys``, from ``source``) whose output norms this
        backbone would drop from its main path (stage not in ``out_indices``)."""
        if not self.out_norm_in_main_path:
            return
        dropped = sorted({int(m.group(1)) for m in map(_OUT_NORM_KEY.match, keys)
                          if m and not hasattr(self, f'norm{m.group(1)}')})
        if dropped:
            raise CheckpointError(
                f'{source} has the output norms {[f"norm{i}" for i in dropped]} of the '
                f'stages {[i - 1 for i in dropped]} that are not in out_indices='
                f'{list(self.out_indices)}; with out_norm_in_main_path=True the next stage '
                'consumes them, so without them every later stage would compute another '
                'function. Add those stages to out_indices, or set '
                'out_norm_in_main_path=False to use the weights without them.')

    # ---------------------------------------------------------------- forward
    def _check_input(self, x: Tensor) -> None:
        """Refuse an input the backbone cannot run on (``ValueError`` naming it)."""
        name = self.family_name
        if not isinstance(x, Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f'{name} expects a 4-D (N, C, H, W) tensor, got {shape}')
        if x.shape[1] != self.in_channels:
            raise ValueError(f'{name} was built for {self.in_channels} input channels '
                             f'(in_channels), got an input of shape {tuple(x.shape)}')
        if x.shape[0] == 0:
            raise ValueError(f'{name} got an empty batch: input shape {tuple(x.shape)}')
        self._check_batch_norm_maps(x)

    def _embedding_batch_norms(self) -> Iterator[Tuple[str, _BatchNorm, int, int]]:
        """The BatchNorms of the embeddings that run (up to the last of ``out_indices``),
        with the (vertical, horizontal) strides of their maps."""
        sh = sw = 1
        for i in range(self.out_indices[-1] + 1):
            prefix = 'stem' if i == 0 else f'{self.patch_embed_prefix}{i + 1}'
            for sub, module in self._embedding(i).named_modules():
                if isinstance(module, nn.Conv2d):
                    sh, sw = sh * module.stride[0], sw * module.stride[1]
                elif isinstance(module, _BatchNorm):
                    yield f'{prefix}.{sub}', module, sh, sw

    def _check_batch_norm_maps(self, x: Tensor) -> None:
        """Refuse one image on which a BatchNorm with batch statistics would see a 1x1
        map (PyTorch's own error names no layer)."""
        if trace_friendly():  # a recorded graph must not depend on the check
            return
        norms = [(n, sh, sw) for n, m, sh, sw in self._embedding_batch_norms()
                 if _uses_batch_statistics(m)]
        if not norms or x.shape[0] != 1:
            return
        layer, sh, sw = max(norms, key=lambda n: n[1] * n[2])
        height, width = x.shape[2], x.shape[3]
        if -(-height // sh) * -(-width // sw) > 1:
            return
        raise ValueError(
            f'{self.family_name} got one {height}x{width} image, but its BatchNorm {layer} '
            f'(stride {sh}) then sees a 1x1 map, one value per channel, which it cannot '
            f'normalise with batch statistics (training mode): at batch 1 give inputs larger '
            f'than {sh}x{sw} (at least {sh + 1} px high or {sw + 1} px wide), or a batch of '
            '2 or more, or keep the BatchNorms in eval mode (norm_eval=True)')

    def _embed(self, i: int, x: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        """Stage i's embedding of ``x``: tokens (B, H * W, C) and (H, W)."""
        x = self._embedding(i)(x)
        return map_to_tokens(x), (x.shape[2], x.shape[3])

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
            (N, C_i, ceil(H / 2**(i+2)), ceil(W / 2**(i+2))), contiguous NCHW.
        """
        self._check_input(x)
        outs, last = [], self.out_indices[-1]
        for i in range(last + 1):  # the stages after the last output do not run
            tokens, (H, W) = self._embed(i, x)
            B, _, C = tokens.shape
            for block in getattr(self, f'stage{i + 1}'):
                tokens = self._run_block(block, tokens, (H, W))
            norm = self.norm if i == NUM_STAGES - 1 else getattr(self, f'norm{i + 1}', None)
            out = None
            if norm is not None:
                out = norm(tokens)
                if self.out_norm_in_main_path or i == NUM_STAGES - 1:
                    tokens = out
            if i in self.out_indices:
                # contiguous NCHW: mmcv's RoIAlign misreads channels-last views
                outs.append(out.transpose(1, 2).reshape(B, C, H, W).contiguous())
            if i < last:
                x = tokens_to_map(tokens, (H, W))
        return tuple(outs)
