"""Export a ResT backbone, or a whole OpenMMLab model with a ResT backbone, to ONNX.

Two modes::

    # the backbone alone: maps of the four stages (strides 4, 8, 16, 32)
    python tools/deployment/export_onnx.py --arch small --checkpoint rest_small.pth \\
        --out work_dirs/onnx/rest_small.onnx
    # a whole model from its config and a checkpoint written by tools/train.py
    python tools/deployment/export_onnx.py configs/retinanet_rest_small_coco.py \\
        --checkpoint work_dirs/retinanet/epoch_12.pth --out work_dirs/onnx/retinanet.onnx

What a whole model exports (the model's ``tensor`` mode: raw outputs, no post-processing):

* single-stage detectors (RetinaNet): the head's raw ``cls_score_i`` and ``bbox_pred_i``
  of every pyramid level; box decoding and NMS run after ONNX Runtime, in numpy, with
  ``onnx_pipeline.detection_postprocess`` (this folder);
* two-stage detectors (Mask R-CNN): backbone and FPN (``fpn_i``); the RoI heads stay in
  PyTorch (mmcv's RoIAlign has no ONNX form here);
* segmentors (UperNet): the decode head's logits at 1/4 of the input size (``seg_logits``);
  ``onnx_pipeline.segmentation_postprocess`` resizes them and takes the arg-max;
* classifiers (mmpretrain): the logits (``logits``).

Beside ``OUT.onnx`` it writes ``OUT.json``: what the numpy pre- and post-processing need
(normalisation, test-time resize, anchors, box coder, test settings, class names).

The input is ``input`` (N, 3, H, W), float32, normalised; batch, height and width are
dynamic unless ``--static-shape H W``. Under export the ResT attention and
``nn.AdaptiveAvgPool2d`` run shape-generic formulations, so the graph traced at
``--trace-shape`` is right at every size. Checkpoints are read safely; a backbone
checkpoint may be in any layout the backbone loads, a whole-model one must fit the config.

Needs ``pip install -e .[deploy]`` (onnx, onnxruntime, onnxscript).
"""
import argparse
import copy
import json
import os
import os.path as osp
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from mmrest.utils.torch_compat import require_torch  # noqa: E402

#: Example size the graph is traced at when height and width are dynamic. Any size works
#: whose every feature map has at least 2 rows and columns (torch.export specialises a
#: dimension that is 1 at trace time); this one does for strides up to 128 (RetinaNet's
#: P7).
DEFAULT_TRACE_SHAPE = (256, 320)
#: Batch of the example input. With 1, torch.export has to prove that no op depends on
#: the batch being 1 (ResT does not: see ``mmrest.models.layers.embed.cpu_channels_last``);
#: 2 spares the heads of other libraries that question.
TRACE_BATCH = 2
#: The oldest torch whose ``torch.onnx.export(dynamo=True)`` takes dynamic shapes as used
#: here, and the feature's name in the message on an older one.
ONNX_EXPORT_NEEDS = ('2.6', 'ONNX export (torch.onnx.export with dynamo=True)')


class ShapeGenericAdaptiveAvgPool2d(nn.Module):
    """``nn.AdaptiveAvgPool2d`` written with ops that follow the input size under export.

    ``torch.onnx.export`` turns ``adaptive_avg_pool2d`` into gathers with indices computed
    at the traced size, so the graph reads the wrong bins (or out of range) at any other
    size. Here bin ``i`` of ``n`` over a length ``L`` is ``[floor(i L / n), ceil((i + 1) L /
    n))``, as in PyTorch, written as an averaging matrix built from ``arange(L)``; the
    pooling is ``P_h @ x @ P_w^T``.

    Args:
        output_size (int | tuple[int | None, int | None]): As for
            ``nn.AdaptiveAvgPool2d``.
    """

    def __init__(self, output_size) -> None:
        super().__init__()
        if isinstance(output_size, int):
            output_size = (output_size, output_size)
        self.output_size = tuple(output_size)

    @staticmethod
    def _pool_matrix(length, bins: Optional[int], like: Tensor) -> Tensor:
        if bins is None:
            bins = length
        i = torch.arange(bins, device=like.device)
        start = (i * length) // bins
        end = ((i + 1) * length + bins - 1) // bins
        j = torch.arange(length, device=like.device)
        inside = ((j[None, :] >= start[:, None]) & (j[None, :] < end[:, None])).to(like.dtype)
        return inside / inside.sum(1, keepdim=True)

    def forward(self, x: Tensor) -> Tensor:
        ph = self._pool_matrix(x.shape[-2], self.output_size[0], x)
        pw = self._pool_matrix(x.shape[-1], self.output_size[1], x)
        return ph @ x @ pw.transpose(0, 1)


def make_export_friendly(model: nn.Module) -> List[str]:
    """Replace, in place, the modules whose ONNX form holds trace-time sizes.

    Args:
        model (nn.Module): The model to export.

    Returns:
        list[str]: Names of the replaced modules.
    """
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
    """``input -> tuple of tensors`` around one method of a model (its raw outputs).

    Args:
        model (nn.Module): The model.
        method (str): The method called with the input batch, e.g. ``'_forward'``.
    """

    def __init__(self, model: nn.Module, method: str) -> None:
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, input: Tensor) -> Tuple[Tensor, ...]:  # noqa: A002 (ONNX name)
        return tuple(_flatten(getattr(self.model, self.method)(input)))


class ExportSpec:
    """What to export: the module, its output names and the post-processing metadata.

    Args:
        module (nn.Module): ``input (N, 3, H, W) -> tuple of tensors``, in eval mode.
        output_names (list[str]): One name per output.
        meta (dict): JSON-able metadata written beside the ONNX file.
    """

    def __init__(self, module: nn.Module, output_names: List[str], meta: dict) -> None:
        self.module = module
        self.output_names = output_names
        self.meta = meta


# ------------------------------------------------------------------------ backbone
def backbone_spec(arch: str, checkpoint: Optional[str]) -> ExportSpec:
    """A ResT backbone (all four stages), with weights of any layout it loads.

    Args:
        arch (str): An arch name of ``mmrest.models`` (e.g. ``'small'``) or a backbone type
            and arch, ``'ResTV2:small'``, where other backbones are registered.
        checkpoint (str, optional): Weights; None keeps the random initialisation (the
            caller must ask for that explicitly).

    Returns:
        ExportSpec: The backbone, outputs ``stage1``-``stage4``.
    """
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
    model.eval()
    names = [f'stage{i + 1}' for i in range(4)]
    meta = dict(task='backbone', arch=arch, checkpoint=checkpoint, outputs=names,
                strides=[4, 8, 16, 32], embed_dims=list(model.embed_dims))
    return ExportSpec(TensorOutputs(model, 'forward'), names, meta)


# ---------------------------------------------------------------------- whole model
def _to_builtin(value: Any) -> Any:
    """ConfigDicts, tuples, tensors and numpy values as JSON-able builtins."""
    if isinstance(value, dict):
        return {str(k): _to_builtin(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_builtin(v) for v in value]
    if isinstance(value, Tensor):
        return value.tolist()
    if hasattr(value, 'tolist'):  # numpy arrays and scalars
        return value.tolist()
    return value


def _input_meta(cfg, model: nn.Module) -> dict:
    """Normalisation and padding of the data preprocessor, and the test pipeline."""
    pre = cfg.model.get('data_preprocessor') or cfg.get('data_preprocessor') or {}
    pipeline = cfg.test_dataloader.dataset.pipeline if cfg.get('test_dataloader') else []
    return dict(
        mean=_to_builtin(pre.get('mean')),
        std=_to_builtin(pre.get('std')),
        bgr_to_rgb=bool(pre.get('bgr_to_rgb', pre.get('to_rgb', False))),
        pad_size_divisor=int(pre.get('pad_size_divisor') or pre.get('size_divisor') or 1),
        pad_value=float(pre.get('pad_value', pre.get('pad_val', 0))),
        test_pipeline=_to_builtin(pipeline))


def _dataset_meta(cfg, checkpoint_meta: dict) -> dict:
    """Class names (and palette) from the checkpoint, else from the config's test set."""
    meta = dict(checkpoint_meta.get('dataset_meta') or {})
    if not meta.get('classes') and cfg.get('test_dataloader'):
        from mmengine.registry import DATASETS
        dataset_cfg = copy.deepcopy(cfg.test_dataloader.dataset)
        meta = dict(dataset_cfg.get('metainfo') or {})
        if not meta.get('classes'):
            dataset_cls = DATASETS.get(dataset_cfg.type)
            meta = dict(getattr(dataset_cls, 'METAINFO', {}) or {})
    return dict(classes=_to_builtin(meta.get('classes')),
                palette=_to_builtin(meta.get('palette')))


def _retinanet_meta(head: nn.Module) -> dict:
    """Anchors, box coder and test settings of a dense anchor head, for numpy decoding."""
    coder = head.bbox_coder
    if type(coder).__name__ != 'DeltaXYWHBBoxCoder':
        raise NotImplementedError(f'post-processing of {type(coder).__name__} boxes is not '
                                  'implemented (DeltaXYWHBBoxCoder is)')
    test_cfg = _to_builtin(head.test_cfg)
    if test_cfg.get('nms', {}).get('type', 'nms') != 'nms':
        raise NotImplementedError(f"NMS type {test_cfg['nms']['type']!r} is not implemented "
                                  "('nms' is)")
    gen = head.prior_generator
    return dict(
        num_classes=int(head.num_classes),
        use_sigmoid_cls=bool(head.use_sigmoid_cls),
        strides=[list(map(float, s)) for s in gen.strides],
        base_anchors=[a.tolist() for a in gen.base_anchors],
        bbox_coder=dict(means=list(map(float, coder.means)),
                        stds=list(map(float, coder.stds)),
                        clip_border=bool(coder.clip_border),
                        add_ctr_clamp=bool(coder.add_ctr_clamp),
                        ctr_clamp=float(coder.ctr_clamp),
                        wh_ratio_clip=16 / 1000),
        test_cfg=test_cfg)


def config_spec(config, checkpoint: Optional[str],
                cfg_options: Optional[dict] = None) -> ExportSpec:
    """A whole model from an OpenMMLab config (see the module docstring for what it
    outputs), with the weights of ``checkpoint`` loaded strictly.

    Args:
        config (str | Config): Config file or object (its ``default_scope`` picks mmdet,
            mmseg or mmpretrain).
        checkpoint (str, optional): Checkpoint of the whole model; None keeps the random
            initialisation (the caller must ask for that explicitly).
        cfg_options (dict, optional): Overrides merged into the config. Defaults to None.

    Returns:
        ExportSpec: The model's raw outputs and the post-processing metadata.
    """
    import mmrest  # noqa: F401  (the ResT registry and safe checkpoint loading)
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope
    from mmengine.runner import load_checkpoint

    cfg = copy.deepcopy(config) if isinstance(config, Config) else Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    scope = cfg.get('default_scope', None)
    if scope not in ('mmdet', 'mmseg', 'mmpretrain'):
        raise ValueError(f"{config}: default_scope must be 'mmdet', 'mmseg' or "
                         f"'mmpretrain', got {scope!r}")
    init_default_scope(scope)
    model_cfg = copy.deepcopy(cfg.model)
    if scope == 'mmpretrain':
        model_cfg.setdefault('data_preprocessor', cfg.get('data_preprocessor', None))
    # the checkpoint holds every weight: no pretrained backbone file is read
    if isinstance(model_cfg.get('backbone'), dict):
        model_cfg.backbone.init_cfg = None
    model = MODELS.build(model_cfg)
    ckpt_meta: dict = {}
    if checkpoint is not None:
        if not osp.isfile(checkpoint):
            raise FileNotFoundError(f'checkpoint not found: {checkpoint}')
        loaded = load_checkpoint(model, checkpoint, map_location='cpu', strict=True,
                                 logger='current')
        ckpt_meta = dict(loaded.get('meta') or {}) if isinstance(loaded, dict) else {}
    else:
        model.init_weights()
    model.eval()

    meta: Dict[str, Any] = dict(config=cfg.filename, checkpoint=checkpoint,
                                scope=scope, model=type(model).__name__,
                                input=_input_meta(cfg, model), **_dataset_meta(cfg, ckpt_meta))
    if scope == 'mmdet' and hasattr(model, 'roi_head'):
        levels = len(model.extract_feat(torch.zeros(1, 3, 64, 64)))
        names = [f'fpn_{i}' for i in range(levels)]
        meta.update(task='features', outputs=names)
        return ExportSpec(TensorOutputs(model, 'extract_feat'), names, meta)
    if scope == 'mmdet':
        head = model.bbox_head
        levels = len(head.prior_generator.strides)
        names = [f'cls_score_{i}' for i in range(levels)] + \
            [f'bbox_pred_{i}' for i in range(levels)]
        meta.update(task='detection', outputs=names, **_retinanet_meta(head))
        return ExportSpec(TensorOutputs(model, '_forward'), names, meta)
    if scope == 'mmseg':
        head = model.decode_head
        meta.update(task='segmentation', outputs=['seg_logits'],
                    num_classes=int(head.num_classes),
                    align_corners=bool(head.align_corners),
                    threshold=float(getattr(head, 'threshold', 0.3) or 0.3))
        return ExportSpec(TensorOutputs(model, '_forward'), ['seg_logits'], meta)
    meta.update(task='classification', outputs=['logits'])
    return ExportSpec(TensorOutputs(model, 'forward'), ['logits'], meta)


# --------------------------------------------------------------------------- export
def export_onnx(spec: ExportSpec,
                out: str,
                trace_shape: Sequence[int] = DEFAULT_TRACE_SHAPE,
                dynamic_hw: bool = True,
                opset: Optional[int] = None,
                trace_batch: int = TRACE_BATCH) -> str:
    """Export ``spec`` to ``out`` (plus ``out`` with ``.json`` for the metadata).

    The model is deep-copied before the export-only module replacements
    (:func:`make_export_friendly`); ``spec.module`` is left as it was.

    Args:
        spec (ExportSpec): From :func:`backbone_spec` or :func:`config_spec`.
        out (str): The ``.onnx`` file to write.
        trace_shape (Sequence[int]): (H, W) of the example input. Defaults to
            :data:`DEFAULT_TRACE_SHAPE`.
        dynamic_hw (bool): Dynamic height and width (the batch is always dynamic).
            Defaults to True.
        opset (int, optional): ONNX opset; None takes the exporter's default.
            Defaults to None.
        trace_batch (int): Batch of the example input (the batch stays dynamic).
            Defaults to :data:`TRACE_BATCH`.

    Returns:
        str: ``out``.
    """
    require_torch(*ONNX_EXPORT_NEEDS)
    import onnx
    from torch.export import Dim

    module = copy.deepcopy(spec.module).eval()
    replaced = make_export_friendly(module)
    h, w = (int(v) for v in trace_shape)
    example = torch.randn(trace_batch, 3, h, w)
    axes = {0: Dim('batch')}
    if dynamic_hw:
        axes.update({2: Dim('height'), 3: Dim('width')})
    os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
    with torch.no_grad():
        program = torch.onnx.export(
            module, (example, ),
            dynamo=True,
            input_names=['input'],
            output_names=list(spec.output_names),
            dynamic_shapes=(axes, ),
            opset_version=opset,
            external_data=False,
            verbose=False)
    program.save(out)
    onnx.checker.check_model(out, full_check=True)
    model = onnx.load(out)
    meta = dict(spec.meta, onnx=osp.basename(out), trace_shape=[h, w], dynamic_hw=dynamic_hw,
                opset=int(next(o.version for o in model.opset_import if o.domain == '')),
                replaced_for_export=replaced)
    with open(osp.splitext(out)[0] + '.json', 'w', encoding='utf-8') as f:
        json.dump(meta, f, indent=1)
    return out


def describe_onnx(path: str) -> str:
    """Inputs, outputs (dtype and shape, dynamic axes by name) and opset of an ONNX file."""
    import onnx
    model = onnx.load(path, load_external_data=False)

    def shape(value) -> List[str]:
        return [d.dim_param or str(d.dim_value) for d in value.type.tensor_type.shape.dim]

    def dtype(value) -> str:
        return onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name

    lines = [f'{path}: opset {next(o.version for o in model.opset_import if o.domain == "")}'
             ', onnx.checker: ok']
    for title, values in (('inputs', model.graph.input), ('outputs', model.graph.output)):
        lines.append(f'{title}:')
        for v in values:
            lines.append(f'  {v.name}: {dtype(v)} [{", ".join(shape(v))}]')
    dyn = []
    for v in model.graph.input:
        named = [f'{i}={d}' for i, d in enumerate(shape(v)) if not d.isdigit()]
        if named:
            dyn.append(f'{v.name}: ' + ', '.join(named))
    lines.append('dynamic axes: ' + ('; '.join(dyn) if dyn else 'none'))
    return '\n'.join(lines)


# ------------------------------------------------------------------------------ CLI
def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Command line (see the module docstring).

    Args:
        argv (list[str], optional): Arguments; None reads ``sys.argv``. Defaults to None.

    Returns:
        argparse.Namespace: The arguments.
    """
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(
        description='Export a ResT backbone or a whole OpenMMLab model with a ResT '
        'backbone to ONNX (dynamic batch, height and width by default).')
    parser.add_argument('config', nargs='?', help='config of a whole model (mmdet, mmseg '
                        'or mmpretrain); omit it and give --arch for the backbone alone')
    parser.add_argument('--arch', help="backbone arch, e.g. 'small' (ResT) or "
                        "'ResTV2:small' where that backbone exists")
    parser.add_argument('--checkpoint', help='weights: any layout the backbone loads '
                        '(--arch), or a checkpoint of the whole model (config)')
    parser.add_argument('--random-weights', action='store_true',
                        help='export without a checkpoint (random weights; for tests and '
                        'timing only)')
    parser.add_argument('--out', help='output .onnx file (default: work_dirs/onnx/'
                        '<config or arch name>.onnx)')
    parser.add_argument('--static-shape', nargs=2, type=int, metavar=('H', 'W'),
                        help='fixed input height and width (the batch stays dynamic)')
    parser.add_argument('--trace-shape', nargs=2, type=int, metavar=('H', 'W'),
                        default=list(DEFAULT_TRACE_SHAPE),
                        help='example size the graph is traced at (dynamic shapes only)')
    parser.add_argument('--trace-batch', type=int, default=TRACE_BATCH,
                        help='batch of the example input (the batch stays dynamic)')
    parser.add_argument('--opset', type=int, default=None,
                        help='ONNX opset (default: the exporter\'s)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default=None,
                        help='override config settings, key=value (mmengine syntax)')
    args = parser.parse_args(argv)
    if (args.config is None) == (args.arch is None):
        parser.error('give either a CONFIG or --arch')
    if args.checkpoint is None and not args.random_weights:
        parser.error('--checkpoint is required (or --random-weights to export random '
                     'weights on purpose)')
    if args.checkpoint is not None and args.random_weights:
        parser.error('--checkpoint and --random-weights exclude each other')
    if args.checkpoint is not None and not osp.isfile(args.checkpoint):
        parser.error(f'--checkpoint: no such file: {args.checkpoint}')
    for opt, shape in (('--static-shape', args.static_shape),
                       ('--trace-shape', args.trace_shape)):
        if shape is not None and min(shape) < 1:
            parser.error(f'{opt} needs positive H and W, got {shape}')
    if args.trace_batch < 1:
        parser.error(f'--trace-batch must be >= 1, got {args.trace_batch}')
    if args.out is None:
        name = (osp.splitext(osp.basename(args.config))[0] if args.config
                else 'rest_' + args.arch.replace(':', '_').lower())
        args.out = osp.join('work_dirs', 'onnx', name + '.onnx')
    return args


def main(argv: Optional[List[str]] = None) -> int:
    """Run the export; returns the exit status (1 with the reason on stderr where the
    model cannot be built or its checkpoint is refused)."""
    import pickle

    from mmrest.utils import CheckpointError
    args = parse_args(argv)
    try:
        require_torch(*ONNX_EXPORT_NEEDS)
        if args.config is not None:
            spec = config_spec(args.config, args.checkpoint, args.cfg_options)
        else:
            spec = backbone_spec(args.arch, args.checkpoint)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError, CheckpointError,
            pickle.UnpicklingError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f'export_onnx.py: error: {type(err).__name__}: {message}', file=sys.stderr)
        return 1
    shape = args.static_shape or args.trace_shape
    export_onnx(spec, args.out, trace_shape=shape, dynamic_hw=args.static_shape is None,
                opset=args.opset, trace_batch=args.trace_batch)
    print(describe_onnx(args.out))
    print(f'metadata for pre- and post-processing: {osp.splitext(args.out)[0]}.json')
    return 0


if __name__ == '__main__':
    sys.exit(main())
