"""The built-in demo: a detector with a ResT backbone learns synthetic shapes on the CPU.

One command (``make demo`` runs it after installing the stack)::

    python tools/demo.py

1. writes the synthetic COCO-format shapes dataset into ``data/synthetic_shapes/`` unless
   it is already there with the config's settings (``synthetic_shapes`` in the config);
2. trains ``configs/demo/retinanet_rest_lite_shapes.py`` from scratch with mmengine's
   Runner (log and checkpoint in ``work_dirs/demo/``), on the GPU when one is visible;
3. evaluates COCO bbox mAP on the validation split (never trained on) at several points
   of the run (the config's ``val_interval``), per class at the last one;
4. draws, into ``work_dirs/demo/``, ``predictions.png`` (a few validation images, each
   with its ground truth on the left and the predictions on the right) and
   ``learning_curve.png`` (training loss and validation mAP against iterations);
5. prints a one-line summary and writes it, with the metrics and the learning curve, to
   ``work_dirs/demo/demo_result.json``.

Exit status: 0 on success, 1 on failure (or when ``--expect-map`` is not reached).
"""
import argparse
import json
import logging
import os
import os.path as osp
import sys
import time
from typing import Dict, List, Optional

from mmengine.config import DictAction

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEFAULT_CONFIG = osp.join('configs', 'demo', 'retinanet_rest_lite_shapes.py')
#: The training loss of a learning-curve point: the mean of this many last iterations.
LOSS_WINDOW = 50


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Train and evaluate a ResT detector on synthetic shapes (CPU, or a GPU '
        'when one is visible).')
    parser.add_argument('--config', default=DEFAULT_CONFIG,
                        help='demo config file (default: %(default)s)')
    parser.add_argument('--work-dir', default=osp.join('work_dirs', 'demo'),
                        help='where the log, checkpoint, picture and result go '
                        '(default: %(default)s)')
    parser.add_argument('--data-root', default=None,
                        help="dataset folder (default: the config's data_root)")
    parser.add_argument('--iters', type=int, default=None,
                        help="training iterations (default: the config's)")
    parser.add_argument('--val-interval', type=int, default=None,
                        help='evaluate every N iterations, the points of the learning '
                        "curve (default: the config's, scaled with --iters)")
    parser.add_argument('--num-train', type=int, default=None,
                        help="training images to generate (default: the config's)")
    parser.add_argument('--num-val', type=int, default=None,
                        help="validation images to generate (default: the config's)")
    parser.add_argument('--seed', type=int, default=0,
                        help='training seed (default: %(default)s)')
    parser.add_argument('--threads', type=int, default=None,
                        help="torch CPU threads; 1 on a machine busy with other work "
                        "(default: torch's, one per core)")
    parser.add_argument('--num-pictures', type=int, default=8,
                        help='validation images drawn into the picture '
                        '(default: %(default)s)')
    parser.add_argument('--score-thr', type=float, default=0.4,
                        help='smallest score drawn in the picture (default: %(default)s)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default=None,
                        help='override config settings, key=value in mmengine syntax '
                        '(default: none)')
    parser.add_argument('--expect-map', type=float, default=None,
                        help='exit with status 1 if bbox mAP ends below this '
                        '(default: no check)')
    return parser.parse_args(argv)


def _gen_settings(cfg, args: argparse.Namespace) -> Dict[str, object]:
    settings = dict(cfg.get('synthetic_shapes', {}))
    if not settings:
        raise KeyError(f'{args.config} has no `synthetic_shapes` dict of generator settings')
    if args.num_train is not None:
        settings['num_train'] = args.num_train
    if args.num_val is not None:
        settings['num_val'] = args.num_val
    return settings


def _check_classes(cfg, classes: List[str]) -> None:
    """The datasets, the head and the generator must agree on the classes."""
    for loader in ('train_dataloader', 'val_dataloader'):
        meta = cfg[loader].dataset.get('metainfo') or {}
        found = list(meta.get('classes', []))
        if found != classes:
            raise ValueError(f'{loader}.dataset.metainfo.classes {found} differ from '
                             f'synthetic_shapes.classes {classes}')
        if len(meta.get('palette', [])) < len(classes):
            raise ValueError(f'{loader}.dataset.metainfo.palette needs {len(classes)} '
                             f'colours, got {len(meta.get("palette", []))}')
    num_classes = cfg.model.bbox_head.num_classes
    if num_classes != len(classes):
        raise ValueError(f'model.bbox_head.num_classes is {num_classes} but '
                         f'synthetic_shapes.classes has {len(classes)}: {classes}')


def prepare_data(data_root: str, settings: Dict[str, object]) -> bool:
    """Generate the dataset unless ``data_root`` already holds it; True if generated."""
    from mmrest.testing import (GENERATOR_VERSION, generate_shapes_dataset,
                                read_generator_settings)
    on_disk = read_generator_settings(data_root)
    if (on_disk is not None and on_disk.get('version') == GENERATOR_VERSION
            and _same_settings(on_disk, settings)):
        return False
    generate_shapes_dataset(data_root, **settings)
    return True


def _same_settings(on_disk: Dict[str, object], settings: Dict[str, object]) -> bool:
    def norm(v):
        return list(v) if isinstance(v, (list, tuple)) else v

    return all(norm(on_disk.get(k)) == norm(v) for k, v in settings.items())


def configure(cfg, args: argparse.Namespace, data_root: str) -> None:
    """Point the config at the work dir and data, set iterations and seed, in place.

    ``--iters`` scales the schedule (warm-up, decay, evaluation points) to the new length,
    so a shortened run draws a learning curve of as many points as the full one.
    """
    cfg.work_dir = args.work_dir
    root = data_root.rstrip('/') + '/'
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[loader].dataset.data_root = root
    for evaluator in ('val_evaluator', 'test_evaluator'):
        cfg[evaluator].ann_file = root + 'annotations/instances_val.json'
    cfg.val_evaluator.classwise = True  # per-class AP in the metrics
    old = cfg.train_cfg.max_iters
    if args.iters is not None:
        cfg.train_cfg.max_iters = args.iters
        interval = cfg.train_cfg.get('val_interval', old)
        cfg.train_cfg.val_interval = max(1, round(interval * args.iters / old))
        for sched in cfg.param_scheduler:  # rescale the schedule to the new length
            for key in ('begin', 'end'):
                if key in sched:
                    sched[key] = min(args.iters, round(sched[key] * args.iters / old))
            if 'end' in sched:  # each scheduler still spans at least one iteration
                sched['end'] = max(sched['end'], sched.get('begin', 0) + 1)
        cfg.default_hooks.checkpoint.interval = args.iters
    if args.val_interval is not None:
        cfg.train_cfg.val_interval = args.val_interval
    cfg.randomness = dict(seed=args.seed)


def _device_name(device: str) -> str:
    import torch
    if device == 'cuda':
        return f'cuda, {torch.cuda.get_device_name(0)}'
    if device == 'cpu':
        threads = torch.get_num_threads()
        return f'CPU, {threads} thread{"s" if threads > 1 else ""}'
    return device


def _label(img, text: str, x0: int, y0: int, y1: int, color: tuple) -> None:
    """Draw ``text`` on a filled box of ``color`` above the box (below it at the top)."""
    import cv2
    font, size = cv2.FONT_HERSHEY_SIMPLEX, 0.5
    (tw, th), _ = cv2.getTextSize(text, font, size, 1)
    ty = y0 - 5 if y0 - th - 8 >= 0 else min(y1 + th + 5, img.shape[0] - 4)
    tx = min(max(x0, 0), img.shape[1] - tw - 3)
    cv2.rectangle(img, (tx, ty - th - 4), (tx + tw + 3, ty + 4), color, -1)
    # white text on dark colours, black on light ones
    ink = (0, 0, 0) if sum(color) > 3 * 150 else (255, 255, 255)
    cv2.putText(img, text, (tx + 1, ty), font, size, ink, 1, cv2.LINE_AA)


def _panel(path: str, boxes, labels, scores, classes: List[str], palette: List[tuple],
           scale: int, title: str):
    """One image (upscaled ``scale`` times) with its boxes and a title bar above it."""
    import cv2
    import numpy as np
    img = cv2.imread(path)  # BGR, original size
    if img is None:
        raise OSError(f'could not read the image {path}')
    img = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    drawn = []
    for i, (box, label) in enumerate(zip(boxes, labels)):
        x0, y0, x1, y1 = [int(round(v * scale)) for v in box]
        color = tuple(int(c) for c in palette[label][::-1])  # RGB -> BGR
        cv2.rectangle(img, (x0, y0), (x1, y1), (255, 255, 255), 4)
        cv2.rectangle(img, (x0, y0), (x1, y1), color, 2)
        text = classes[label] if scores is None else f'{classes[label]} {scores[i]:.2f}'
        drawn.append((text, x0, y0, y1, color))
    for args in drawn:  # labels over all the boxes
        _label(img, *args)
    bar = np.full((24, img.shape[1], 3), 255, dtype=np.uint8)
    cv2.putText(bar, title, (4, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1,
                cv2.LINE_AA)
    return np.concatenate([bar, img])


def draw_predictions(model, dataset, indices: List[int], out_file: str,
                     classes: List[str], palette: List[tuple], score_thr: float) -> str:
    """Predict on ``dataset[indices]`` and save a grid of tiles, each the ground truth
    (left) beside the predictions scoring at least ``score_thr`` (right), 3x upscaled.

    The predictions are drawn with class-agnostic NMS, one box per object (the class the
    head scores highest); the metrics keep mmdet's per-class NMS, which also keeps a box
    of each runner-up class of a hesitant head (they rank below the right ones in COCO AP,
    but on a picture they stack on the object).

    Returns:
        str: ``out_file``.
    """
    import copy

    import cv2
    import numpy as np
    import torch
    scale, gap = 3, 6
    head = getattr(model, 'bbox_head', None)
    test_cfg = getattr(head, 'test_cfg', None)
    if test_cfg is not None and test_cfg.get('nms') is not None:
        picture_cfg = copy.deepcopy(test_cfg)
        picture_cfg.nms['class_agnostic'] = True
        head.test_cfg = picture_cfg
    tiles = []
    try:
        with torch.no_grad():
            for idx in indices:
                data = dataset[idx]
                result = model.test_step(dict(inputs=[data['inputs']],
                                              data_samples=[data['data_samples']]))[0]
                info = dataset.get_data_info(idx)
                gt = [inst for inst in info['instances'] if not inst.get('ignore_flag', 0)]
                left = _panel(result.img_path, [inst['bbox'] for inst in gt],
                              [inst['bbox_label'] for inst in gt], None, classes, palette,
                              scale, f'val {osp.basename(result.img_path)}: ground truth')
                pred = result.pred_instances.cpu()
                keep = pred.scores >= score_thr
                right = _panel(result.img_path, pred.bboxes[keep].tolist(),
                               pred.labels[keep].tolist(), pred.scores[keep].tolist(),
                               classes, palette, scale, f'predictions, score >= {score_thr:g}')
                sep = np.full((left.shape[0], 2, 3), 255, dtype=np.uint8)
                tiles.append(np.concatenate([left, sep, right], axis=1))
    finally:
        if test_cfg is not None:
            head.test_cfg = test_cfg
    cols = min(2, len(tiles))
    rows = -(-len(tiles) // cols)
    h, w = tiles[0].shape[:2]
    grid = np.full((rows * (h + gap) - gap, cols * (w + 3 * gap) - 3 * gap, 3), 96,
                   dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        y, x = r * (h + gap), c * (w + 3 * gap)
        grid[y:y + h, x:x + w] = tile
    os.makedirs(osp.dirname(osp.abspath(out_file)), exist_ok=True)
    if not cv2.imwrite(out_file, grid):
        raise OSError(f'could not write the picture {out_file}')
    return out_file


def draw_learning_curve(curve: List[Dict[str, object]], out_file: str, title: str,
                        trace: Optional[Dict[str, list]] = None) -> str:
    """Training loss and validation mAP / AP50 against iterations, as a PNG.

    ``trace`` (``iters`` and ``loss`` lists) adds the training loss at a finer step.

    Returns:
        str: ``out_file``.
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    iters = [p['iter'] for p in curve]
    fig, (ax_loss, ax_map) = plt.subplots(1, 2, figsize=(10, 3.8))
    if trace and trace.get('iters'):
        ax_loss.plot(trace['iters'], trace['loss'], '-', color='tab:red', alpha=0.35,
                     lw=1, label=f'mean of {trace["window"]} iterations')
    ax_loss.plot(iters, [p['loss'] for p in curve], 'o-', color='tab:red',
                 label=f'at the evaluations (mean of {LOSS_WINDOW} iterations)')
    ax_loss.set_xlabel('iteration')
    ax_loss.set_ylabel('training loss')
    ax_loss.legend(loc='upper right')
    ax_loss.set_ylim(bottom=0)
    ax_loss.grid(alpha=0.3)
    ax_map.plot(iters, [p['bbox_mAP_50'] for p in curve], 's--', color='tab:green',
                label='AP50')
    ax_map.plot(iters, [p['bbox_mAP'] for p in curve], 'o-', color='tab:blue',
                label='mAP (IoU 0.5:0.95)')
    ax_map.set_xlabel('iteration')
    ax_map.set_ylabel('validation bbox AP')
    ax_map.set_ylim(0, 1)
    ax_map.grid(alpha=0.3)
    ax_map.legend(loc='upper left')
    for ax in (ax_loss, ax_map):
        ax.set_xlim(0, max(iters) * 1.03)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(osp.dirname(osp.abspath(out_file)), exist_ok=True)
    fig.savefig(out_file, dpi=100)
    plt.close(fig)
    return out_file


def _arch_name(backbone: dict) -> str:
    arch = backbone.get('arch', 'small')
    if isinstance(arch, str):
        return f'ResT-{arch}'
    dims = '-'.join(str(d) for d in arch['embed_dims'])
    depths = '-'.join(str(d) for d in arch['depths'])
    return f'ResT dims {dims} depths {depths}'


def _ap(value) -> Optional[float]:
    """A class's AP as a float; None (not NaN, which JSON lacks) for a class that the
    validation images do not hold."""
    value = float(value)
    return None if value != value else value


def _loss_value(outputs) -> Optional[float]:
    loss = (outputs or {}).get('loss') if isinstance(outputs, dict) else None
    return None if loss is None else float(loss)


def run(args: argparse.Namespace) -> Dict[str, object]:
    start = time.time()
    for flag in ('iters', 'val_interval', 'num_train', 'num_val', 'threads', 'num_pictures'):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f'--{flag.replace("_", "-")} must be >= 1, got {value}')
    import torch
    from mmengine.config import Config
    from mmengine.device import get_device
    from mmengine.hooks import Hook
    from mmengine.runner import Runner

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if not osp.isfile(args.config) and osp.isfile(osp.join(REPO, args.config)):
        args.config = osp.join(REPO, args.config)  # run from outside the repo
    if not osp.isfile(args.config):
        raise FileNotFoundError(f'config file not found: {args.config}')
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    data_root = args.data_root or cfg.data_root
    settings = _gen_settings(cfg, args)
    classes = list(settings['classes'])
    _check_classes(cfg, classes)
    device = get_device()  # where mmengine's Runner puts the model
    t0 = time.time()
    generated = prepare_data(data_root, settings)
    gen_time = time.time() - t0
    print(f'demo: {"generated" if generated else "using"} {settings["num_train"]} train + '
          f'{settings["num_val"]} val images in {data_root}'
          + (f' ({gen_time:.0f} s)' if generated else ''), flush=True)
    configure(cfg, args, data_root)
    print(f'demo: training on {_device_name(device)}', flush=True)

    curve: List[Dict[str, object]] = []

    class _RecordCurve(Hook):
        """At every evaluation: the training loss (mean of the last ``LOSS_WINDOW``
        iterations), the validation mAP, AP50 and per-class AP."""
        priority = 'LOWEST'

        def __init__(self) -> None:
            self.losses: List[float] = []
            self.all_losses: List[float] = []

        def after_train_iter(self, runner, batch_idx, data_batch=None,
                             outputs=None) -> None:
            loss = _loss_value(outputs)
            if loss is not None:
                self.losses.append(loss)
                self.all_losses.append(loss)

        def after_val_epoch(self, runner, metrics=None) -> None:
            metrics = metrics or {}
            point: Dict[str, object] = dict(
                iter=runner.iter, minutes=round((time.time() - start) / 60, 3),
                loss=(sum(self.losses[-LOSS_WINDOW:]) / len(self.losses[-LOSS_WINDOW:])
                      if self.losses else None),
                bbox_mAP=float(metrics.get('coco/bbox_mAP', 0.0)),
                bbox_mAP_50=float(metrics.get('coco/bbox_mAP_50', 0.0)),
                per_class_AP={c: _ap(metrics.get(f'coco/{c}_precision', 0.0))
                              for c in classes})
            if not metrics:
                # mmdet's CocoMetric returns nothing when the model made no detection at
                # all (e.g. after a few iterations): that is an mAP of 0.
                point['no_detections'] = True
            point['metrics'] = {k: float(v) for k, v in metrics.items()
                                if isinstance(v, (int, float))}
            self.losses = []
            curve.append(point)

    runner = Runner.from_cfg(cfg)
    recorder = _RecordCurve()
    runner.register_hook(recorder)
    t0 = time.time()
    runner.train()
    train_time = time.time() - t0
    if not curve or curve[-1]['iter'] != runner.iter:
        runner.val()
    final = curve[-1]
    bbox_map = final['bbox_mAP']

    dataset = runner.val_dataloader.dataset
    n_val = len(dataset)
    meta = dataset.metainfo
    model = runner.model
    model.eval()
    n_pictures = min(args.num_pictures, n_val)
    picture = draw_predictions(
        model, dataset, list(range(n_pictures)),
        osp.join(args.work_dir, 'predictions.png'), list(meta['classes']),
        list(meta['palette']), args.score_thr)
    total = time.time() - start
    arch = _arch_name(cfg.model.backbone)
    detector = cfg.model.type
    summary = (f'demo: bbox mAP {bbox_map:.3f} (AP50 {final["bbox_mAP_50"]:.3f}) on {n_val} '
               f'val images after {runner.iter} iterations in {total / 60:.1f} min ({arch}, '
               f'{detector}, {_device_name(device)})')
    losses = recorder.all_losses
    window = max(1, len(losses) // 40)
    trace = dict(window=window, iters=[], loss=[])
    for i in range(0, len(losses) - window + 1, window):
        trace['iters'].append(i + window)
        trace['loss'].append(sum(losses[i:i + window]) / window)
    curve_png = draw_learning_curve(
        curve, osp.join(args.work_dir, 'learning_curve.png'),
        f'{detector} + {arch}, {settings["num_train"]} training images, evaluated on '
        f'{n_val} validation images', trace)
    result = dict(summary=summary, device=device,
                  threads=torch.get_num_threads() if device == 'cpu' else None,
                  bbox_mAP=bbox_map,
                  bbox_mAP_50=final['bbox_mAP_50'], per_class_AP=final['per_class_AP'],
                  metrics=final['metrics'], learning_curve=curve, loss_trace=trace,
                  num_val_images=n_val,
                  num_train_images=settings['num_train'], iterations=runner.iter,
                  data_seconds=gen_time, train_seconds=train_time, total_seconds=total,
                  picture=picture, picture_score_thr=args.score_thr,
                  learning_curve_picture=curve_png, config=args.config,
                  data_root=data_root, work_dir=args.work_dir,
                  checkpoint=osp.join(args.work_dir, f'iter_{runner.iter}.pth'))
    with open(osp.join(args.work_dir, 'demo_result.json'), 'w') as f:
        json.dump(result, f, indent=2)
    print(f'demo: ground truth and predictions (score >= {args.score_thr:g}) on '
          f'{n_pictures} val images: {osp.abspath(picture)}')
    print(f'demo: learning curve ({len(curve)} evaluations): {osp.abspath(curve_png)}')
    print('demo: AP per class: ' + ', '.join(
        f'{c} {"-" if ap is None else f"{ap:.3f}"}' for c, ap in final['per_class_AP'].items()))
    print(f'demo: metrics and learning curve: '
          f'{osp.abspath(osp.join(args.work_dir, "demo_result.json"))}')
    print(summary, flush=True)
    return result


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except Exception as err:  # report and fail with a non-zero status
        logging.getLogger(__name__).exception('demo failed')
        print(f'demo: FAILED: {type(err).__name__}: {err}', file=sys.stderr)
        return 1
    if args.expect_map is not None and result['bbox_mAP'] < args.expect_map:
        print(f'demo: FAILED: bbox mAP {result["bbox_mAP"]:.3f} is below --expect-map '
              f'{args.expect_map}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
