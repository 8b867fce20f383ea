"""Parameters and FLOPs of ResT classifiers and of whole detectors, segmentors, classifiers.

Usage::

    # the four ImageNet models (ResT backbone + global average pooling + 1000-class fc)
    python tools/analysis/get_flops.py
    python tools/analysis/get_flops.py --arch small --shape 384
    # the same models with the paper-era stem (see "The paper's numbers" below)
    python tools/analysis/get_flops.py --paper-stem
    # the four ResT V2 ImageNet models, also counted as the authors count them
    python tools/analysis/get_flops.py --family ResTV2
    # any config: a whole detector / segmentor / classifier at an input shape (H W)
    python tools/analysis/get_flops.py configs/retinanet_rest_small_coco.py --shape 800 1333

Counting convention (documented because papers rarely state theirs):

* FLOPs are multiply-accumulates counted as mmengine's :class:`~mmengine.analysis.FlopAnalyzer`
  (the fvcore convention) does on a JIT trace of the model: convolutions and fully
  connected layers ``in * out`` per output position (biases not counted), matmuls
  ``m * n * k``, BatchNorm in eval mode 2 per element, LayerNorm 5 per element (4 without
  affine), adaptive average pooling 1 per input element; element-wise ops (activations,
  sigmoid, softmax, additions) are free.
* The backbone is traced with ``attn_impl='reference'``, which writes the EMSA attention as
  the plain matmuls ``q @ k^T`` and ``attn @ v`` (2 * N * M * C per block for N queries, M
  keys and C channels; this equals the analytic term ``2*h*w*(h//r)*(w//r)*dim`` that the
  authors' own get_flops.py adds to mmcv 1.x's count whenever h, w are multiples of r).
* The instance norm of each attention map, which the authors' code runs as
  ``nn.InstanceNorm2d`` (counted 4 per element by this convention), is written out in the
  reference implementation with element-wise ops that the tracer does not see; it is added
  analytically: ``4 * heads * N * M`` per block with head mixing.

With this convention the released ResT models (3-conv stem) count 1.543, 2.107, 4.646 and
8.392 GFLOPs at 224x224 (lite, small, base, large), i.e. the 1.54, 2.11, 4.65 and 8.39 that
the authors' models give with the attention matmuls counted. (mmcv 1.x's per-module rules,
emulated with hooks while writing this tool, plus the authors' analytic attention term give
1.540, 2.102, 4.638, 8.377: they count biases, ReLU and norms differently.)

The paper's numbers (1.4, 1.9, 4.3, 7.9 GFLOPs; 13.66 M parameters for small and 51.63 M for
large as listed with the paper): the same convention without the attention matmuls gives
1.47, 2.01, 4.51, 8.16 GFLOPs for the released models, which does not round to them, and the
released models have 13.68 M and 51.68 M parameters. A model whose stem is a 7x7 stride-2
convolution, BN, ReLU and 3x3 stride-2 max pooling followed by the pixel attention (the
``Stem`` class that is still in the authors' models/rest.py) reproduces all of them when
counted without the attention matmuls: 1.404, 1.947, 4.276, 7.934 GFLOPs and 10.49, 13.66,
30.28, 51.63 M parameters. ``--paper-stem`` builds that variant, for counting only. This
suggests that the paper's table was computed on models with that stem, without the
attention matmuls; the released checkpoints have the 3-conv stem.

ResT V2 (``--family ResTV2``; Zhang & Yang, NeurIPS 2022, https://arxiv.org/abs/2204.07366):
its attention is plain multi-head attention (no instance norm) plus an up-sampling conv
that the tracer counts as a convolution. The authors' README gives 4.1, 6.0, 7.9 and 13.8
GFLOPs at 224x224 for tiny, small, base and large, counted by their get_flops.py: mmcv
1.x's ``get_model_complexity_info`` (per-module rules, :func:`mmcv1_flops` here) plus
``2*h*w*(h//r)*(w//r)*dim`` per block with ``h = H // 2**(i+2)``
(:func:`authors_attention_flops`). That "authors' count" column gives 4.10, 5.97, 7.88 and
13.83, i.e. their numbers; this tool's own convention gives 4.11, 5.98, 7.90 and 13.86
with the attention matmuls counted (the difference: mmcv 1.x counts conv biases, ReLU and
2 per element for affine norms, and no LayerNorm statistics). Parameters with the
1000-class head: 30,434,776, 41,205,976, 55,965,208 and 86,532,520, the authors' models'.
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
    """Parameters and FLOPs of one model at one input shape.

    Attributes:
        params (int): Number of parameters.
        flops (int): FLOPs (multiply-accumulates) with the attention matmuls counted.
        attn_matmul_flops (int): FLOPs of the attention matmuls ``q @ k^T`` and
            ``attn @ v``.
        attn_norm_flops (int): FLOPs assigned to the attention maps' instance norms.
        authors_flops (int, optional): The count of the authors' get_flops.py (mmcv 1.x
            rules plus their analytic attention term), where computed. Defaults to None.
    """
    params: int
    flops: int
    attn_matmul_flops: int
    attn_norm_flops: int
    authors_flops: Optional[int] = None

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


def _conv_out(size: int, conv: nn.Conv2d, dim: int) -> int:
    k, s, p = conv.kernel_size[dim], conv.stride[dim], conv.padding[dim]
    return (size + 2 * p - k) // s + 1


def count_complexity(model: nn.Module, inputs: Tuple) -> Complexity:
    """Count parameters and FLOPs of ``model(*inputs)`` with the convention of this module.

    Attention modules (EMSA, EMSAv2) should use ``attn_impl='reference'`` so that their
    matmuls are traced.

    Args:
        model (nn.Module): The model, in eval mode.
        inputs (tuple): Positional inputs of its forward.

    Returns:
        Complexity: The counts.
    """
    from mmengine.analysis import FlopAnalyzer

    from mmrest.models.layers import EMSA, EMSAv2

    emsa_names = [name for name, m in model.named_modules() if isinstance(m, (EMSA, EMSAv2))]
    bad = [n for n in emsa_names if model.get_submodule(n).attn_impl != 'reference']
    if bad:
        raise ValueError(f'EMSA modules {bad[:3]} use attn_impl != "reference"; their attention '
                         'matmuls would not be traced. Build the backbone with '
                         'attn_impl="reference".')
    norm_flops: List[int] = []

    def norm_hook(module: nn.Module, args: Tuple, output: torch.Tensor) -> None:
        if not getattr(module, 'apply_transform', False):  # EMSAv2 has no instance norm
            return
        x, (h, w) = args
        # Under the JIT tracer sizes may be traced values: make them plain ints.
        batch, h, w = int(x.shape[0]), int(h), int(w)
        if module.sr_ratio > 1:
            keys = _conv_out(h, module.sr, 0) * _conv_out(w, module.sr, 1)
        else:
            keys = h * w
        norm_flops.append(INSTANCE_NORM_FLOPS_PER_ELEMENT * batch * module.num_heads * h * w *
                          keys)

    handles = [model.get_submodule(n).register_forward_hook(norm_hook) for n in emsa_names]
    try:
        analyzer = FlopAnalyzer(model, inputs)
        analyzer.unsupported_ops_warnings(False)
        analyzer.uncalled_modules_warnings(False)
        analyzer.tracer_warnings('none')
        total = analyzer.total()
        by_module = analyzer.by_module_and_operator()
    finally:
        for handle in handles:
            handle.remove()
    # The tracer runs the forward once; the hooks saw exactly that run.
    matmul = sum(by_module.get(n, {}).get('matmul', 0) for n in emsa_names)
    attn_norm = sum(norm_flops)
    params = sum(p.numel() for p in model.parameters())
    return Complexity(params=params, flops=int(total) + attn_norm,
                      attn_matmul_flops=int(matmul), attn_norm_flops=attn_norm)


def mmcv1_flops(model: nn.Module, inputs: Tuple) -> int:
    """Multiply-adds as mmcv 1.x's ``get_model_complexity_info`` counts them.

    Its per-module rules, for the modules of the ResT models: ``Conv2d`` kernel x
    in / groups x out per output position plus one per output for the bias; ``Linear``
    input elements x output features; BatchNorm / LayerNorm 2 per input element with an
    affine (1 without); ``ReLU`` 1 per output element; adaptive average pooling 1 per
    input element; nothing else (GELU, sigmoid, pixel shuffle, matmuls) is counted.

    Args:
        model (nn.Module): The model, in eval mode.
        inputs (tuple): Positional inputs of its forward.

    Returns:
        int: The count.
    """
    total = [0]

    def conv(m: nn.Conv2d, args: Tuple, out: torch.Tensor) -> None:
        positions = out.numel() // out.shape[1]
        kernel = m.kernel_size[0] * m.kernel_size[1]
        total[0] += kernel * m.in_channels * (m.out_channels // m.groups) * positions
        total[0] += m.out_channels * positions if m.bias is not None else 0

    def linear(m: nn.Linear, args: Tuple, out: torch.Tensor) -> None:
        total[0] += args[0].numel() * out.shape[-1]

    def norm(m: nn.Module, args: Tuple, out: torch.Tensor) -> None:
        affine = getattr(m, 'affine', False) or getattr(m, 'elementwise_affine', False)
        total[0] += args[0].numel() * (2 if affine else 1)

    def relu(m: nn.Module, args: Tuple, out: torch.Tensor) -> None:
        total[0] += out.numel()

    def pool(m: nn.Module, args: Tuple, out: torch.Tensor) -> None:
        total[0] += args[0].numel()

    rules = {nn.Conv2d: conv, nn.Linear: linear, nn.BatchNorm2d: norm, nn.LayerNorm: norm,
             nn.ReLU: relu, nn.AdaptiveAvgPool2d: pool}
    handles = [m.register_forward_hook(rules[type(m)]) for m in model.modules()
               if type(m) in rules]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return total[0]


def authors_attention_flops(backbone: nn.Module, shape: Sequence[int]) -> int:
    """The attention term the authors' get_flops.py adds: ``2*h*w*(h//r)*(w//r)*dim`` per
    block, with ``h, w = H // 2**(i+2), W // 2**(i+2)`` at stage i."""
    total = 0
    for i, (dims, depth) in enumerate(zip(backbone.embed_dims, backbone.depths)):
        r = backbone.arch_settings['sr_ratios'][i]
        h, w = shape[0] // 2**(i + 2), shape[1] // 2**(i + 2)
        total += 2 * h * w * (h // r) * (w // r) * dims * depth
    return total


def classifier_complexity(arch: str, shape: Sequence[int] = (224, 224),
                          paper_stem: bool = False, family: str = 'ResT') -> Complexity:
    """Complexity of the ImageNet classifier of ``arch`` (1000 classes).

    Args:
        arch (str): Arch name of the family.
        shape (Sequence[int]): Input (H, W). Defaults to (224, 224).
        paper_stem (bool): Count the paper-era stem (see module docstring; ResT only).
            Defaults to False.
        family (str): ``'ResT'`` or ``'ResTV2'``; for ResTV2 the authors' count is
            filled in too. Defaults to 'ResT'.

    Returns:
        Complexity: The counts.
    """
    model = ResTClassifier(arch, paper_stem=paper_stem, family=family).eval()
    inputs = (torch.zeros(1, 3, *shape), )
    result = count_complexity(model, inputs)
    if family == 'ResTV2':
        result.authors_flops = mmcv1_flops(model, inputs) + authors_attention_flops(
            model.backbone, shape)
    return result


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
    """Markdown table of :func:`classifier_complexity` results.

    Args:
        rows (dict): Arch name -> complexity.
        shape (Sequence[int]): Input (H, W) the counts were made at.
        paper_stem (bool): Whether the counts are of the paper-era stem.
            Defaults to False.
        family (str): ``'ResT'`` or ``'ResTV2'`` (which adds the authors' count).
            Defaults to 'ResT'.

    Returns:
        str: The table.
    """
    stem = ' (paper-era 7x7 stem)' if paper_stem else ''
    authors = family == 'ResTV2'
    lines = [
        f'| {family}{stem} | params (M) | GFLOPs at {shape[0]}x{shape[1]}, attention matmuls '
        'counted | GFLOPs, without attention matmuls |' +
        (" GFLOPs, the authors' count (mmcv 1.x + 2*h*w*(h//r)*(w//r)*C) |" if authors else ''),
        '|---|---|---|---|' + ('---|' if authors else ''),
    ]
    for arch, c in rows.items():
        lines.append(f'| {arch} | {c.params / 1e6:.2f} ({c.params:,}) | {_gflops(c.flops)} | '
                     f'{_gflops(c.flops_without_matmul)} |' +
                     (f' {_gflops(c.authors_flops)} |' if authors else ''))
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
                     f'config names its own backbone)')
    from mmengine.config import DictAction
    cfg_options = None
    if args.cfg_options:
        action = DictAction(option_strings=[], dest='cfg_options')
        ns = argparse.Namespace()
        action(parser, ns, args.cfg_options)
        cfg_options = ns.cfg_options
    shape = _parse_shape(args.shape or [800, 1333])
    c = config_complexity(args.config, shape, cfg_options)
    print(f'| config | input | params (M) | GFLOPs, attention matmuls counted | '
          'GFLOPs, without attention matmuls |')
    print('|---|---|---|---|---|')
    print(f'| {args.config} | {shape[0]}x{shape[1]} | {c.params / 1e6:.2f} | '
          f'{_gflops(c.flops)} | {_gflops(c.flops_without_matmul)} |')


if __name__ == '__main__':
    main()
