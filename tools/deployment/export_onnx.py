"""Export a ResT backbone, or a whole OpenMMLab model with a ResT backbone, to ONNX.

    python tools/deployment/export_onnx.py --arch small --checkpoint rest_small.pth \\
        --out work_dirs/onnx/rest_small.onnx
    python tools/deployment/export_onnx.py configs/retinanet_rest_small_coco.py \\
        --checkpoint work_dirs/retinanet/epoch_12.pth --out work_dirs/onnx/retinanet.onnx

A whole model exports its ``tensor`` mode (no post-processing): RetinaNet its raw
``cls_score_i`` / ``bbox_pred_i``, Mask R-CNN backbone and FPN (``fpn_i``; mmcv's RoIAlign
has no ONNX form here), UperNet ``seg_logits``, a classifier ``logits``. ``OUT.json`` beside
``OUT.onnx`` holds what onnx_pipeline.py's numpy pre- and post-processing need. The input
``input`` (N, 3, H, W) is float32, normalised; batch, height and width are dynamic unless
``--static-shape H W``. Needs ``pip install -e .[deploy]``.
"""
import argparse
import copy
import json
import os
import os.path as osp
import sys
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from mmrest.utils.torch_compat import require_torch  # noqa: E402

#: Traced when height and width are dynamic: every map of strides up to 128 (RetinaNet's
#: P7) has at least 2 rows and columns (torch.export specialises a size of 1).
DEFAULT_TRACE_SHAPE = (256, 320)
#: Batch of the example input: 2 spares other libraries' heads the proof that no op
#: depends on a batch of 1.
TRACE_BATCH = 2
ONNX_EXPORT_NEEDS = ('2.6', 'ONNX export (torch.onnx.export with dynamo=True)')


class ShapeGenericAdaptiveAvgPool2d(nn.Module):
    """``nn.AdaptiveAvgPool2d`` as ``P_h @ x @ P_w^T`` with averaging matrices built from
    ``arange`` (bin ``i`` of ``n`` over ``L``: ``[floor(i L / n), ceil((i + 1) L / n))``):
    ``torch.onnx.export`` writes the original with indices of the traced size."""

    def __init__(self, output_size) -> None:
        super().__init__()
        self.output_size = (output_size, ) * 2 if isinstance(output_size, int) else \
            tuple(output_size)

    @staticmethod
    def _pool_matrix(length, bins: Optional[int], like: Tensor) -> Tensor:
        bins = length if bins is None else bins
        i = torch.arange(bins, device=like.device)
        start, end = (i * length) // bins, ((i + 1) * length + bins - 1) // bins
        j = torch.arange(length, device=like.device)[None, :]
        inside = ((j >= start[:, None]) & (j < end[:, None])).to(like.dtype)
        return inside / inside.sum(1, keepdim=True)

    def forward(self, x: Tensor) -> Tensor:
        ph = self._pool_matrix(x.shape[-2], self.output_size[0], x)
        pw = self._pool_matrix(x.shape[-1], self.output_size[1], x)
        return ph @ x @ pw.transpose(0, 1)


def make_export_friendly(model: nn.Module) -> List[str]:
    """Replace in place the modules whose ONNX form holds trace-time sizes; their names."""
    replaced = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.AdaptiveAvgPool2d:
                setattr(module, child_name, ShapeGenericAdaptiveAvgPool2d(child.output_size))
                replaced.append(f'{name}.{child_name}' if name else child_name)
    return replaced


def _flatten(out: Any) -> List[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in _flatten(item)]
    raise TypeError(f'cannot export an output of type {type(out).__name__}')


class TensorOutputs(nn.Module):
    """``input -> tuple of tensors`` of one method of a model (its raw outputs)."""

    def __init__(self, model: nn.Module, method: str) -> None:
        super().__init__()
        self.model, self.method = model, method

    def forward(self, input: Tensor) -> Tuple[Tensor, ...]:  # noqa: A002 (ONNX name)
        return tuple(_flatten(getattr(self.model, self.method)(input)))


class ExportSpec(NamedTuple):
    module: nn.Module  # input (N, 3, H, W) -> tuple of tensors, eval mode
    output_names: List[str]
    meta: dict  # JSON-able, written beside the ONNX file


def backbone_spec(arch: str, checkpoint: Optional[str]) -> ExportSpec:
    """A backbone of ``mmrest.models`` (``'small'``: ResT; ``'ResTV2:small'``), all four
    stages, with weights of any layout it loads (None: random, asked for explicitly)."""
    import mmrest.models as models
    type_name, _, arch_name = arch.rpartition(':')
    cls = getattr(models, type_name or 'ResT', None)
    if cls is None:
        raise KeyError(f'mmrest.models has no backbone {type_name!r}')
    model = cls(arch=arch_name, out_indices=(0, 1, 2, 3), drop_path_rate=0.)
    if checkpoint is not None:
        model.load_pretrained(checkpoint)
    else:
        model.init_weights()
    names = [f'stage{i + 1}' for i in range(4)]
    meta = dict(task='backbone', arch=arch, checkpoint=checkpoint, outputs=names,
                strides=[4, 8, 16, 32], embed_dims=list(model.embed_dims))
    return ExportSpec(TensorOutputs(model.eval(), 'forward'), names, meta)


def _to_builtin(value: Any) -> Any:
    """ConfigDicts, tuples, tensors and numpy values as JSON-able builtins."""
    if isinstance(value, dict):
        return {str(k): _to_builtin(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_builtin(v) for v in value]
    return value.tolist() if hasattr(value, 'tolist') else value


def _model_meta(cfg, checkpoint_meta: dict) -> dict:
    """Normalisation, padding and test pipeline; class names and palette from the
    checkpoint, else from the config's test set."""
    pre = cfg.model.get('data_preprocessor') or cfg.get('data_preprocessor') or {}
    test = cfg.get('test_dataloader')
    classes = dict(checkpoint_meta.get('dataset_meta') or {})
    if not classes.get('classes') and test:
        from mmengine.registry import DATASETS
        classes = dict(test.dataset.get('metainfo') or {})
        if not classes.get('classes'):
            classes = dict(getattr(DATASETS.get(test.dataset.type), 'METAINFO', {}) or {})
    return dict(
        input=dict(mean=_to_builtin(pre.get('mean')), std=_to_builtin(pre.get('std')),
                   bgr_to_rgb=bool(pre.get('bgr_to_rgb', pre.get('to_rgb', False))),
                   pad_size_divisor=int(pre.get('pad_size_divisor') or pre.get('size_divisor')
                                        or 1),
                   pad_value=float(pre.get('pad_value', pre.get('pad_val', 0))),
                   test_pipeline=_to_builtin(test.dataset.pipeline if test else [])),
        classes=_to_builtin(classes.get('classes')), palette=_to_builtin(classes.get('palette')))


def _retinanet_meta(head: nn.Module) -> dict:
    """Anchors, box coder and test settings of a dense anchor head, for numpy decoding."""
    coder, test_cfg = head.bbox_coder, _to_builtin(head.test_cfg)
    if type(coder).__name__ != 'DeltaXYWHBBoxCoder':
        raise NotImplementedError(f'post-processing of {type(coder).__name__} boxes is not '
                                  'implemented (DeltaXYWHBBoxCoder is)')
    if test_cfg.get('nms', {}).get('type', 'nms') != 'nms':
        raise NotImplementedError(f"NMS type {test_cfg['nms']['type']!r} is not implemented "
                                  "('nms' is)")
    gen = head.prior_generator
    return dict(num_classes=int(head.num_classes), use_sigmoid_cls=bool(head.use_sigmoid_cls),
                strides=[list(map(float, s)) for s in gen.strides],
                base_anchors=[a.tolist() for a in gen.base_anchors],
                bbox_coder=dict(means=list(map(float, coder.means)),
                                stds=list(map(float, coder.stds)),
                                clip_border=bool(coder.clip_border),
                                add_ctr_clamp=bool(coder.add_ctr_clamp),
                                ctr_clamp=float(coder.ctr_clamp), wh_ratio_clip=16 / 1000),
                test_cfg=test_cfg)


def config_spec(config, checkpoint: Optional[str], cfg_options: Optional[dict] = None
                ) -> ExportSpec:
    """The whole model of a config (file or Config; its ``default_scope`` mmdet, mmseg or
    mmpretrain) with the weights of ``checkpoint`` loaded strictly (None: random)."""
    import mmrest  # noqa: F401  (the ResT registry and safe checkpoint loading)
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope
    from mmengine.runner import load_checkpoint

    cfg = copy.deepcopy(config) if isinstance(config, Config) else Config.fromfile(config)
    cfg.merge_from_dict(cfg_options or {})
    scope = cfg.get('default_scope', None)
    if scope not in ('mmdet', 'mmseg', 'mmpretrain'):
        raise ValueError(f"{config}: default_scope must be 'mmdet', 'mmseg' or "
                         f"'mmpretrain', got {scope!r}")
    init_default_scope(scope)
    model_cfg = copy.deepcopy(cfg.model)
    if scope == 'mmpretrain':
        model_cfg.setdefault('data_preprocessor', cfg.get('data_preprocessor', None))
    if isinstance(model_cfg.get('backbone'), dict):
        model_cfg.backbone.init_cfg = None  # the checkpoint holds every weight
    model = MODELS.build(model_cfg)
    ckpt_meta: dict = {}
    if checkpoint is None:
        model.init_weights()
    elif not osp.isfile(checkpoint):
        raise FileNotFoundError(f'checkpoint not found: {checkpoint}')
    else:
        loaded = load_checkpoint(model, checkpoint, map_location='cpu', strict=True,
                                 logger='current')
        ckpt_meta = dict(loaded.get('meta') or {}) if isinstance(loaded, dict) else {}
    model.eval()
    meta = dict(config=cfg.filename, checkpoint=checkpoint, scope=scope,
                model=type(model).__name__, **_model_meta(cfg, ckpt_meta))
    if scope == 'mmdet' and hasattr(model, 'roi_head'):
        names = [f'fpn_{i}' for i in range(len(model.extract_feat(torch.zeros(1, 3, 64, 64))))]
        method, task = 'extract_feat', 'features'
    elif scope == 'mmdet':
        levels = len(model.bbox_head.prior_generator.strides)
        names = [f'{o}_{i}' for o in ('cls_score', 'bbox_pred') for i in range(levels)]
        method, task = '_forward', 'detection'
        meta.update(_retinanet_meta(model.bbox_head))
    elif scope == 'mmseg':
        head = model.decode_head
        names, method, task = ['seg_logits'], '_forward', 'segmentation'
        meta.update(num_classes=int(head.num_classes), align_corners=bool(head.align_corners),
                    threshold=float(getattr(head, 'threshold', 0.3) or 0.3))
    else:
        names, method, task = ['logits'], 'forward', 'classification'
    meta.update(task=task, outputs=names)
    return ExportSpec(TensorOutputs(model, method), names, meta)


def export_onnx(spec: ExportSpec, out: str, trace_shape: Sequence[int] = DEFAULT_TRACE_SHAPE,
                dynamic_hw: bool = True, opset: Optional[int] = None,
                trace_batch: int = TRACE_BATCH) -> str:
    """Export ``spec`` to ``out`` and its metadata to ``out`` with ``.json``; a copy of the
    model gets the replacements of :func:`make_export_friendly`. The batch is dynamic."""
    require_torch(*ONNX_EXPORT_NEEDS)
    import onnx
    from torch.export import Dim

    module = copy.deepcopy(spec.module).eval()
    replaced = make_export_friendly(module)
    h, w = (int(v) for v in trace_shape)
    axes = {0: Dim('batch'), **({2: Dim('height'), 3: Dim('width')} if dynamic_hw else {})}
    os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
    with torch.no_grad():
        program = torch.onnx.export(
            module, (torch.randn(trace_batch, 3, h, w), ), dynamo=True, input_names=['input'],
            output_names=list(spec.output_names), dynamic_shapes=(axes, ),
            opset_version=opset, external_data=False, verbose=False)
    program.save(out)
    onnx.checker.check_model(out, full_check=True)
    opset_used = next(o.version for o in onnx.load(out).opset_import if o.domain == '')
    meta = dict(spec.meta, onnx=osp.basename(out), trace_shape=[h, w], dynamic_hw=dynamic_hw,
                opset=int(opset_used), replaced_for_export=replaced)
    with open(osp.splitext(out)[0] + '.json', 'w', encoding='utf-8') as f:
        json.dump(meta, f, indent=1)
    return out


def describe_onnx(path: str) -> str:
    """Inputs, outputs (dtype, shape with dynamic axes by name) and opset of an ONNX file."""
    import onnx
    model = onnx.load(path, load_external_data=False)

    def shape(value) -> List[str]:
        return [d.dim_param or str(d.dim_value) for d in value.type.tensor_type.shape.dim]

    def dtype(value) -> str:
        return onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name

    lines = [f'{path}: opset {next(o.version for o in model.opset_import if o.domain == "")}'
             ', onnx.checker: ok']
    for title, values in (('inputs', model.graph.input), ('outputs', model.graph.output)):
        lines += [f'{title}:'] + [f'  {v.name}: {dtype(v)} [{", ".join(shape(v))}]'
                                  for v in values]
    named = {v.name: [f'{i}={d}' for i, d in enumerate(shape(v)) if not d.isdigit()]
             for v in model.graph.input}
    dyn = '; '.join(f'{name}: ' + ', '.join(axes) for name, axes in named.items() if axes)
    return '\n'.join(lines + [f'dynamic axes: {dyn or "none"}'])


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    add = parser.add_argument
    add('config', nargs='?', help='config of a whole model; without it, --arch')
    add('--arch', help="the backbone alone: 'small' (ResT) or 'ResTV2:small'")
    add('--checkpoint', help='weights: any layout the backbone loads, or the whole model\'s')
    add('--random-weights', action='store_true', help='no checkpoint (tests and timing)')
    add('--out', help='the .onnx file (default: work_dirs/onnx/<config or arch>.onnx)')
    add('--static-shape', nargs=2, type=int, metavar=('H', 'W'), help='fixed height, width')
    add('--trace-shape', nargs=2, type=int, metavar=('H', 'W'), default=DEFAULT_TRACE_SHAPE,
        help='example size traced (dynamic shapes)')
    add('--trace-batch', type=int, default=TRACE_BATCH, help='batch of the example input')
    add('--opset', type=int, help="ONNX opset (default: the exporter's)")
    add('--cfg-options', nargs='+', action=DictAction, help='config overrides, key=value')
    args = parser.parse_args(argv)
    if (args.config is None) == (args.arch is None):
        parser.error('give either a CONFIG or --arch')
    if (args.checkpoint is None) != args.random_weights:
        parser.error('--checkpoint is required (or --random-weights to export random weights '
                     'on purpose), not both')
    if args.checkpoint is not None and not osp.isfile(args.checkpoint):
        parser.error(f'--checkpoint: no such file: {args.checkpoint}')
    if min(list(args.static_shape or [1]) + list(args.trace_shape) + [args.trace_batch]) < 1:
        parser.error('--static-shape, --trace-shape and --trace-batch need positive sizes')
    name = (osp.splitext(osp.basename(args.config))[0] if args.config
            else 'rest_' + args.arch.replace(':', '_').lower())
    args.out = args.out or osp.join('work_dirs', 'onnx', name + '.onnx')
    return args


def main(argv: Optional[List[str]] = None) -> int:
    """Export; 1 with the reason on stderr where the model or its checkpoint is refused."""
    import pickle

    from mmrest.utils import CheckpointError
    args = parse_args(argv)
    try:
        require_torch(*ONNX_EXPORT_NEEDS)
        spec = (config_spec(args.config, args.checkpoint, args.cfg_options) if args.config
                else backbone_spec(args.arch, args.checkpoint))
    except (FileNotFoundError, ValueError, KeyError, RuntimeError, CheckpointError,
            pickle.UnpicklingError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f'export_onnx.py: error: {type(err).__name__}: {message}', file=sys.stderr)
        return 1
    export_onnx(spec, args.out, trace_shape=args.static_shape or args.trace_shape,
                dynamic_hw=args.static_shape is None, opset=args.opset,
                trace_batch=args.trace_batch)
    print(describe_onnx(args.out))
    print(f'metadata for pre- and post-processing: {osp.splitext(args.out)[0]}.json')
    return 0


if __name__ == '__main__':
    sys.exit(main())
