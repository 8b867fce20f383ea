"""Parameters and FLOPs (mmengine's counter) of the ResT / ResT V2 ImageNet classifiers, or
of the whole model of a config, built with ``attn_impl='reference'`` (its attention matmuls
trace); ``--paper-stem``: the 7x7-conv + max-pool stem of the authors' models/rest.py, which
gives the ResT paper's GFLOPs without the attention matmuls.

    python tools/analysis/get_flops.py [--family ResTV2] [--arch tiny] [--shape 224]
    python tools/analysis/get_flops.py configs/retinanet_rest_small_coco.py --shape 800 1333
"""
import argparse
import functools
from collections import namedtuple

import torch
from torch import nn

FAMILY_ARCHS = {'ResT': ('lite', 'small', 'base', 'large'),
                'ResTV2': ('tiny', 'small', 'base', 'large')}
#: params; FLOPs (multiply-adds); those of the attention matmuls; FLOPs by operator
Complexity = namedtuple('Complexity', 'params flops attn_matmul by_operator')


class Classifier(nn.Module):
    """Backbone, global average pooling and a 1000-class linear head (the authors')."""

    def __init__(self, family='ResT', arch='small', paper_stem=False):
        super().__init__()
        import mmrest.models
        self.backbone = getattr(mmrest.models, family)(arch=arch, out_indices=(3, ),
                                                       attn_impl='reference')
        if paper_stem:
            from mmrest.models.layers.embed import PixelAttention
            c = self.backbone.embed_dims[0]
            self.backbone.stem = nn.Sequential(
                nn.Conv2d(3, c, 7, 2, 3, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                nn.MaxPool2d(3, 2, 1), PixelAttention(c))
        self.head = nn.Linear(self.backbone.embed_dims[-1], 1000)

    def forward(self, x):
        return self.head(nn.functional.adaptive_avg_pool2d(self.backbone(x)[0], 1).flatten(1))


def complexity(model: nn.Module, shape) -> Complexity:
    """Counts of ``model`` (eval mode) on one zero image of ``shape`` (H, W)."""
    from mmengine.analysis import FlopAnalyzer, parameter_count
    with torch.no_grad():
        flops = FlopAnalyzer(model.eval(), torch.zeros(1, 3, *shape))
        flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        ops = dict(flops.by_operator())
    return Complexity(parameter_count(model)[''], sum(ops.values()), ops.get('matmul', 0), ops)


def config_model(config: str, cfg_options=None, shape=(800, 1333)) -> nn.Module:
    """A config's whole model (no weights read, ResT attention as written) in tensor mode."""
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope
    cfg = Config.fromfile(config)
    cfg.merge_from_dict(cfg_options or {})
    init_default_scope(cfg.get('default_scope', 'mmengine'))
    if cfg.get('data_preprocessor') is not None:  # as mmengine's Runner does
        cfg.model.setdefault('data_preprocessor', cfg.data_preprocessor)
    backbone = cfg.model.get('backbone') or {}
    if str(backbone.get('type', '')).split('.')[-1] in FAMILY_ARCHS:
        backbone.update(attn_impl='reference', init_cfg=None)
    samples = None
    if cfg.get('default_scope') == 'mmdet':  # the RPN of two-stage detectors needs them
        from mmdet.structures import DetDataSample
        samples = [DetDataSample(metainfo=dict(img_shape=shape, ori_shape=shape,
                                               pad_shape=shape, batch_input_shape=shape,
                                               scale_factor=(1., 1.)))]
    model = MODELS.build(cfg.model)
    model.forward = functools.partial(model.forward, data_samples=samples, mode='tensor')
    return model


def main(argv=None) -> None:
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config', nargs='?', help='a config (default: the classifiers)')
    parser.add_argument('--family', choices=list(FAMILY_ARCHS), default='ResT')
    parser.add_argument('--arch', nargs='+', help="default: all of the family's")
    parser.add_argument('--shape', type=int, nargs='+', help='H [W]; default 224 or 800 1333')
    parser.add_argument('--paper-stem', action='store_true', help='ResT classifiers only')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    args = parser.parse_args(argv)
    shape = args.shape or ([800, 1333] if args.config else [224])
    shape = tuple(shape * 2 if len(shape) == 1 else shape)
    if len(shape) != 2:
        parser.error(f'--shape takes H or H W, got {args.shape}')
    if args.config:
        if args.arch or args.paper_stem or args.family != 'ResT':
            parser.error('--family, --arch, --paper-stem: for the classifiers, not a config')
        models = {args.config: config_model(args.config, args.cfg_options, shape)}
    else:
        archs = args.arch or FAMILY_ARCHS[args.family]
        if set(archs) - set(FAMILY_ARCHS[args.family]) or (args.paper_stem and
                                                           args.family != 'ResT'):
            parser.error(f'{args.family} archs: {", ".join(FAMILY_ARCHS[args.family])}; '
                         '--paper-stem is for ResT')
        models = {f'{args.family}-{a}': Classifier(args.family, a, args.paper_stem)
                  for a in archs}
    print('| model | input | params | GFLOPs | GFLOPs without attention matmuls |\n'
          '|---|---|---:|---:|---:|')
    for name, model in models.items():
        c = complexity(model, shape)
        print(f'| {name} | {shape[0]}x{shape[1]} | {c.params:,} | {c.flops / 1e9:.2f} | '
              f'{(c.flops - c.attn_matmul) / 1e9:.2f} |')


if __name__ == '__main__':
    main()
