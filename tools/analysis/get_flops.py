"""Parameters and FLOPs of ResT classifiers and of whole detectors, segmentors, classifiers.

Usage::

    # the ImageNet models (backbone + global average pooling + 1000-class fc)
    python tools/analysis/get_flops.py
    python tools/analysis/get_flops.py --family ResTV2 --arch tiny --shape 384
    # the ResT models with the paper-era stem (see below)
    python tools/analysis/get_flops.py --paper-stem
    # any config: a whole detector / segmentor / classifier at an input shape (H W)
    python tools/analysis/get_flops.py configs/retinanet_rest_small_coco.py --shape 800 1333

Counts are mmengine's (:func:`mmengine.analysis.get_model_complexity_info`, the fvcore
convention: multiply-accumulates on a JIT trace; convolutions and fully connected layers
``in * out`` per output position, matmuls ``m * n * k``, norms a few per element,
element-wise ops free), of models built with ``attn_impl='reference'``, whose attention
matmuls ``q @ k^T`` and ``attn @ v`` the tracer sees (2 * N * M * C per block). The instance
norm of each ResT attention map, written with element-wise ops, is added as
``nn.InstanceNorm2d`` counts: 4 per map element. The released ResT models then count 1.54,
2.11, 4.65 and 8.39 GFLOPs at 224x224, ResT V2 4.11, 5.98, 7.90 and 13.86.

The ResT paper's 1.4, 1.9, 4.3, 7.9 GFLOPs (13.66 M and 51.63 M parameters for small and
large) are reproduced, without the attention matmuls, by models whose stem is a 7x7
stride-2 conv, BN, ReLU and 3x3 stride-2 max-pool before the pixel attention (the ``Stem``
still in the authors' models/rest.py): ``--paper-stem``, for counting only.
"""
import argparse
import copy
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

ARCHS = ('lite', 'small', 'base', 'large')
#: Arch names of each backbone family (``--family``).
FAMILY_ARCHS = {'ResT': ARCHS, 'ResTV2': ('tiny', 'small', 'base', 'large')}
#: FLOPs the instance-norm convention assigns per element of an attention map (fvcore's
#: count of ``aten::instance_norm`` without affine parameters).
INSTANCE_NORM_FLOPS_PER_ELEMENT = 4


@dataclass
class Complexity:
    """Parameters and FLOPs of one model at one input shape: ``flops`` counts the attention
    matmuls (``attn_matmul_flops`` of them) and the instance norms (``attn_norm_flops``)."""
    params: int
    flops: int
    attn_matmul_flops: int
    attn_norm_flops: int

    @property
    def flops_without_matmul(self) -> int:
        """FLOPs without the attention matmuls."""
        return self.flops - self.attn_matmul_flops


class ResTClassifier(nn.Module):
    """ResT backbone, global average pooling and a linear head (the authors' classifier).

    Args:
        arch (str): ResT arch name. Defaults to 'small'.
        num_classes (int): Classes of the linear head. Defaults to 1000.
        paper_stem (bool): Replace the 3-conv stem by the paper-era 7x7 conv, BN, ReLU,
            max-pool and pixel-attention stem (for counting the paper's numbers only;
            ResT only). Defaults to False.
        family (str): ``'ResT'`` or ``'ResTV2'``. Defaults to 'ResT'.
    """

    def __init__(self, arch: str = 'small', num_classes: int = 1000,
                 paper_stem: bool = False, family: str = 'ResT') -> None:
        super().__init__()
        import mmrest.models
        from mmrest.models.layers.embed import PixelAttention
        if paper_stem and family != 'ResT':
            raise ValueError('paper_stem applies to ResT only')
        self.backbone = getattr(mmrest.models, family)(
            arch=arch, out_indices=(3, ), attn_impl='reference')
        if paper_stem:
            channels = self.backbone.embed_dims[0]
            self.backbone.stem = nn.Sequential(
                nn.Conv2d(3, channels, kernel_size=7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=3, stride=2, padding=1), PixelAttention(channels))
        self.head = nn.Linear(self.backbone.embed_dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.backbone(x)[0]
        return self.head(nn.functional.adaptive_avg_pool2d(feat, 1).flatten(1))


def count_complexity(model: nn.Module, inputs: Tuple) -> Complexity:
    """Parameters and FLOPs of ``model(*inputs)`` (eval mode) as the module docstring
    counts them; its attention modules must use ``attn_impl='reference'``.

    Raises:
        ValueError: If an attention module uses another ``attn_impl`` (the tracer would
            not see its matmuls).
    """
    from mmengine.analysis import get_model_complexity_info

    from mmrest.models.layers import EMSA, EMSAv2

    attns = {n: m for n, m in model.named_modules() if isinstance(m, (EMSA, EMSAv2))}
    bad = [n for n, m in attns.items() if m.attn_impl != 'reference']
    if bad:
        raise ValueError(f'EMSA modules {bad[:3]} use attn_impl != "reference"; their attention '
                         'matmuls would not be traced. Build the backbone with '
                         'attn_impl="reference".')
    matmul: Dict[str, int] = {}
    norm: Dict[str, int] = {}

    def hook(name: str):
        def record(module: nn.Module, args: Tuple, output: torch.Tensor) -> None:
            x, (h, w) = args
            batch, n, channels = (int(s) for s in x.shape)  # traced sizes to ints
            keys = n
            if module.sr_ratio > 1:  # the reduction conv's output size
                (k, _), (r, _), (p, _) = (module.sr.kernel_size, module.sr.stride,
                                          module.sr.padding)
                keys = ((int(h) + 2 * p - k) // r + 1) * ((int(w) + 2 * p - k) // r + 1)
            matmul[name] = 2 * batch * n * keys * channels
            heads = module.num_heads if getattr(module, 'apply_transform', False) else 0
            norm[name] = INSTANCE_NORM_FLOPS_PER_ELEMENT * batch * heads * n * keys
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in attns.items()]
    try:
        info = get_model_complexity_info(model, inputs=inputs, show_table=False,
                                         show_arch=False)
    finally:
        for handle in handles:
            handle.remove()
    return Complexity(params=int(info['params']),
                      flops=int(info['flops']) + sum(norm.values()),
                      attn_matmul_flops=sum(matmul.values()),
                      attn_norm_flops=sum(norm.values()))


def classifier_complexity(arch: str, shape: Sequence[int] = (224, 224),
                          paper_stem: bool = False, family: str = 'ResT') -> Complexity:
    """Complexity of the ImageNet classifier of ``arch`` (1000 classes) at ``shape``."""
    model = ResTClassifier(arch, paper_stem=paper_stem, family=family).eval()
    return count_complexity(model, (torch.zeros(1, 3, *shape), ))


def _set_reference_attention(model_cfg: dict) -> None:
    backbone = model_cfg.get('backbone')
    if isinstance(backbone, dict) and str(backbone.get('type', '')).split('.')[-1] in (
            'ResT', 'ResTV2'):
        backbone['attn_impl'] = 'reference'
        backbone['init_cfg'] = None


def _dummy_data_samples(model: nn.Module, shape: Sequence[int]) -> Optional[list]:
    """Data samples for a ``mode='tensor'`` forward of mmdet/mmseg models, else None."""
    h, w = shape
    meta = dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w),
                batch_input_shape=(h, w), scale_factor=(1., 1.), img_id=0)
    module = type(model).__module__
    if module.startswith('mmdet.'):
        from mmdet.structures import DetDataSample
        return [DetDataSample(metainfo=meta)]
    if module.startswith('mmseg.'):
        from mmseg.structures import SegDataSample
        return [SegDataSample(metainfo=meta)]
    return None


def config_complexity(config: str, shape: Sequence[int],
                      cfg_options: Optional[dict] = None) -> Complexity:
    """Complexity of the whole model of a config (detector, segmentor or classifier).

    The backbone's ``init_cfg`` is dropped (no weights are read) and a ResT backbone is
    built with ``attn_impl='reference'``. The count is the model's ``mode='tensor'``
    forward on one image of ``shape``: for two-stage detectors it includes the RoI heads
    on the proposals that the (randomly initialised) RPN keeps.

    Args:
        config (str): Path of the config file.
        shape (Sequence[int]): Input (H, W).
        cfg_options (dict, optional): Overrides merged into the config. Defaults to None.

    Returns:
        Complexity: The counts.
    """
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope

    cfg = Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    init_default_scope(cfg.get('default_scope', 'mmengine'))
    model_cfg = copy.deepcopy(cfg.model)
    if cfg.get('data_preprocessor') is not None:  # as mmengine's Runner does
        model_cfg.setdefault('data_preprocessor', copy.deepcopy(cfg.data_preprocessor))
    _set_reference_attention(model_cfg)
    model = MODELS.build(model_cfg).eval()
    inputs = torch.zeros(1, 3, *shape)
    data_samples = _dummy_data_samples(model, shape)

    class _TensorForward(nn.Module):
        """Wraps ``model(inputs, data_samples, mode='tensor')`` for the tracer."""

        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor):
            if data_samples is None:
                return self.inner(x, mode='tensor')
            return self.inner(x, data_samples, mode='tensor')

    wrapped = _TensorForward(model)
    with torch.no_grad():
        return count_complexity(wrapped, (inputs, ))


def _gflops(flops: int) -> str:
    return f'{flops / 1e9:.2f}'


def format_arch_table(rows: Dict[str, Complexity], shape: Sequence[int],
                      paper_stem: bool = False, family: str = 'ResT') -> str:
    """Markdown table of :func:`classifier_complexity` results."""
    stem = ' (paper-era 7x7 stem)' if paper_stem else ''
    lines = [f'| {family}{stem} | params (M) | GFLOPs at {shape[0]}x{shape[1]}, attention '
             'matmuls counted | GFLOPs, without attention matmuls |', '|---|---|---|---|']
    for arch, c in rows.items():
        lines.append(f'| {arch} | {c.params / 1e6:.2f} ({c.params:,}) | {_gflops(c.flops)} | '
                     f'{_gflops(c.flops_without_matmul)} |')
    return '\n'.join(lines)


def _parse_shape(values: List[int]) -> Tuple[int, int]:
    if len(values) == 1:
        return values[0], values[0]
    if len(values) == 2:
        return values[0], values[1]
    raise SystemExit(f'--shape takes H or H W, got {values}')


def main(argv: Optional[List[str]] = None) -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('config', nargs='?', help='a config file; without it, the ResT '
                        'ImageNet classifiers are counted')
    parser.add_argument('--family', choices=sorted(FAMILY_ARCHS), default='ResT',
                        help='backbone family of the classifiers (without a config)')
    parser.add_argument('--arch', nargs='+', default=None,
                        choices=sorted(set(a for v in FAMILY_ARCHS.values() for a in v)),
                        help="archs to count (without a config; default: all of the "
                        "family's)")
    parser.add_argument('--shape', type=int, nargs='+', default=None,
                        help='input H [W]; default 224 (classifiers) or 800 1333 (config)')
    parser.add_argument('--paper-stem', action='store_true',
                        help='count the paper-era 7x7 stem (reproduces the paper table; '
                        'without a config)')
    parser.add_argument('--cfg-options', nargs='+', default=None, metavar='KEY=VALUE',
                        help='config overrides, as in tools/train.py')
    args = parser.parse_args(argv)

    if args.config is None:
        shape = _parse_shape(args.shape or [224])
        archs = args.arch or list(FAMILY_ARCHS[args.family])
        wrong = [a for a in archs if a not in FAMILY_ARCHS[args.family]]
        if wrong:
            parser.error(f'--arch {" ".join(wrong)}: not a {args.family} arch; choose from '
                         f'{", ".join(FAMILY_ARCHS[args.family])}')
        if args.paper_stem and args.family != 'ResT':
            parser.error('--paper-stem applies to --family ResT only')
        rows = {a: classifier_complexity(a, shape, args.paper_stem, args.family)
                for a in archs}
        print(format_arch_table(rows, shape, args.paper_stem, args.family))
        return
    given = [flag for flag, used in (('--family', args.family != 'ResT'),
                                     ('--arch', args.arch is not None),
                                     ('--paper-stem', args.paper_stem)) if used]
    if given:
        parser.error(f'{", ".join(given)}: for the classifiers, without a config (a '
                     'config names its own backbone)')
    from mmengine.config import DictAction
    cfg_options = None
    if args.cfg_options:
        action = DictAction(option_strings=[], dest='cfg_options')
        ns = argparse.Namespace()
        action(parser, ns, args.cfg_options)
        cfg_options = ns.cfg_options
    shape = _parse_shape(args.shape or [800, 1333])
    c = config_complexity(args.config, shape, cfg_options)
    print('| config | input | params (M) | GFLOPs, attention matmuls counted | '
          'GFLOPs, without attention matmuls |')
    print('|---|---|---|---|---|')
    print(f'| {args.config} | {shape[0]}x{shape[1]} | {c.params / 1e6:.2f} | '
          f'{_gflops(c.flops)} | {_gflops(c.flops_without_matmul)} |')


if __name__ == '__main__':
    main()
