"""The built-in demo: RetinaNet with a ResT backbone learns synthetic shapes on the CPU.

One command (``make demo`` runs it after installing the stack)::

    python tools/demo.py

1. writes the synthetic COCO-format shapes dataset into ``data/synthetic_shapes/`` unless
   it is already there with the config's settings (``synthetic_shapes`` in the config);
2. trains ``configs/demo/retinanet_rest_lite_shapes.py`` from scratch with mmengine's
   Runner (log and checkpoint in ``work_dirs/demo/``);
3. evaluates COCO bbox mAP on the validation split (never on training images);
4. draws the predictions on a few validation images into ``work_dirs/demo/predictions.png``;
5. prints a one-line summary and writes it, with the metrics, to
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

# OpenMP threads that wait by spinning make CPU training many times slower as soon as
# another process competes for the cores (measured here: 2 threads on 2 busy cores went
# from 1.3 to 13.7 s per iteration); sleeping waits cost little on an idle machine. This
# must be set before torch is imported; a value in the environment wins.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

from mmengine.config import DictAction  # noqa: E402

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEFAULT_CONFIG = osp.join('configs', 'demo', 'retinanet_rest_lite_shapes.py')


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Train and evaluate RetinaNet-ResT on synthetic shapes, on the CPU.')
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
                        help='also evaluate every N iterations, for a learning curve '
                        '(default: only once, at the end)')
    parser.add_argument('--num-train', type=int, default=None,
                        help="training images to generate (default: the config's)")
    parser.add_argument('--num-val', type=int, default=None,
                        help="validation images to generate (default: the config's)")
    parser.add_argument('--seed', type=int, default=0,
                        help='training seed (default: %(default)s)')
    parser.add_argument('--threads', type=int, default=None,
                        help='torch CPU threads (default: the number of CPUs available)')
    parser.add_argument('--num-pictures', type=int, default=8,
                        help='validation images drawn into the picture '
                        '(default: %(default)s)')
    parser.add_argument('--score-thr', type=float, default=0.3,
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
    """Point the config at the work dir and data, set iterations and seed, in place."""
    cfg.work_dir = args.work_dir
    root = data_root.rstrip('/') + '/'
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[loader].dataset.data_root = root
    for evaluator in ('val_evaluator', 'test_evaluator'):
        cfg[evaluator].ann_file = root + 'annotations/instances_val.json'
    if args.iters is not None:
        old = cfg.train_cfg.max_iters
        cfg.train_cfg.max_iters = args.iters
        cfg.train_cfg.val_interval = args.iters
        for sched in cfg.param_scheduler:  # rescale the schedule to the new length
            for key in ('begin', 'end'):
                if key in sched:
                    sched[key] = min(args.iters, round(sched[key] * args.iters / old))
        cfg.default_hooks.checkpoint.interval = args.iters
    if args.val_interval is not None:
        cfg.train_cfg.val_interval = args.val_interval
    cfg.randomness = dict(seed=args.seed)


def draw_predictions(model, dataset, indices: List[int], out_file: str,
                     classes: List[str], palette: List[tuple], score_thr: float) -> str:
    """Predict on ``dataset[indices]`` and save a grid of annotated images (2x upscaled).

    Returns:
        str: ``out_file``.
    """
    import cv2
    import numpy as np
    import torch
    tiles = []
    with torch.no_grad():
        for idx in indices:
            data = dataset[idx]
            result = model.test_step(dict(inputs=[data['inputs']],
                                          data_samples=[data['data_samples']]))[0]
            img = cv2.imread(result.img_path)  # BGR, original size
            scale = 2
            img = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
            pred = result.pred_instances
            keep = pred.scores >= score_thr
            for box, label, score in zip(pred.bboxes[keep].tolist(),
                                         pred.labels[keep].tolist(),
                                         pred.scores[keep].tolist()):
                x0, y0, x1, y1 = [int(round(v * scale)) for v in box]
                color = tuple(int(c) for c in palette[label][::-1])  # RGB -> BGR
                cv2.rectangle(img, (x0, y0), (x1, y1), (255, 255, 255), 4)
                cv2.rectangle(img, (x0, y0), (x1, y1), color, 2)
                text = f'{classes[label]} {score:.2f}'
                (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)
                ty = y0 - 4 if y0 - th - 6 >= 0 else min(y1 + th + 4, img.shape[0] - 3)
                tx = min(max(x0, 0), img.shape[1] - tw - 2)
                cv2.rectangle(img, (tx, ty - th - 3), (tx + tw + 2, ty + 3), color, -1)
                cv2.putText(img, text, (tx + 1, ty), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                            (255, 255, 255), 1, cv2.LINE_AA)
            tiles.append(img)
    cols = min(4, len(tiles))
    rows = -(-len(tiles) // cols)
    h, w = tiles[0].shape[:2]
    grid = np.full((rows * (h + 4) - 4, cols * (w + 4) - 4, 3), 255, dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        grid[r * (h + 4):r * (h + 4) + h, c * (w + 4):c * (w + 4) + w] = tile
    os.makedirs(osp.dirname(osp.abspath(out_file)), exist_ok=True)
    if not cv2.imwrite(out_file, grid):
        raise OSError(f'could not write the picture {out_file}')
    return out_file


def _arch_name(backbone: dict) -> str:
    arch = backbone.get('arch', 'small')
    if isinstance(arch, str):
        return f'ResT-{arch}'
    dims = '-'.join(str(d) for d in arch['embed_dims'])
    depths = '-'.join(str(d) for d in arch['depths'])
    return f'ResT dims {dims} depths {depths}'


def run(args: argparse.Namespace) -> Dict[str, object]:
    start = time.time()
    for flag in ('iters', 'val_interval', 'num_train', 'num_val', 'threads', 'num_pictures'):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f'--{flag.replace("_", "-")} must be >= 1, got {value}')
    import torch
    from mmengine.config import Config
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
    _check_classes(cfg, list(settings['classes']))
    t0 = time.time()
    generated = prepare_data(data_root, settings)
    gen_time = time.time() - t0
    print(f'demo: {"generated" if generated else "using"} {settings["num_train"]} train + '
          f'{settings["num_val"]} val images in {data_root}'
          + (f' ({gen_time:.0f} s)' if generated else ''), flush=True)
    configure(cfg, args, data_root)

    curve: List[Dict[str, float]] = []

    class _RecordMetrics(Hook):
        priority = 'LOWEST'

        def after_val_epoch(self, runner, metrics=None) -> None:
            point = dict(iter=runner.iter, minutes=(time.time() - start) / 60,
                         **{k: float(v) for k, v in (metrics or {}).items()
                            if isinstance(v, (int, float))})
            if not metrics:
                # mmdet's CocoMetric returns nothing when the model made no detection at
                # all (e.g. after a few iterations): that is an mAP of 0.
                point['coco/bbox_mAP'] = 0.0
                point['no_detections'] = 1.0
            curve.append(point)

    runner = Runner.from_cfg(cfg)
    runner.register_hook(_RecordMetrics())
    t0 = time.time()
    runner.train()
    train_time = time.time() - t0
    if not curve or curve[-1]['iter'] != runner.iter:
        runner.val()
    final = curve[-1]
    bbox_map = final.get('coco/bbox_mAP')
    if bbox_map is None:
        raise RuntimeError(f'the evaluation produced no coco/bbox_mAP: {final}')

    dataset = runner.val_dataloader.dataset
    n_val = len(dataset)
    meta = dataset.metainfo
    model = runner.model
    model.eval()
    picture = draw_predictions(
        model, dataset, list(range(min(args.num_pictures, n_val))),
        osp.join(args.work_dir, 'predictions.png'), list(meta['classes']),
        list(meta['palette']), args.score_thr)
    total = time.time() - start
    arch = _arch_name(cfg.model.backbone)
    summary = (f'demo: bbox mAP {bbox_map:.3f} on {n_val} val images after {runner.iter} '
               f'iterations in {total / 60:.1f} min ({arch}, RetinaNet, CPU)')
    result = dict(summary=summary, bbox_mAP=bbox_map, metrics=final, curve=curve,
                  num_val_images=n_val, iterations=runner.iter, train_seconds=train_time,
                  total_seconds=total, picture=picture, config=args.config,
                  data_root=data_root, work_dir=args.work_dir,
                  checkpoint=osp.join(args.work_dir, f'iter_{runner.iter}.pth'))
    from infer import predict_photo  # tools/infer.py: the detector on a real photo
    result['photo'] = predict_photo(cfg, result['checkpoint'], osp.join(
        args.work_dir, 'photo_prediction.png'), score_thr=args.score_thr)
    with open(osp.join(args.work_dir, 'demo_result.json'), 'w') as f:
        json.dump(result, f, indent=2)
    print(f'demo: predictions on {len(range(min(args.num_pictures, n_val)))} val images: '
          f'{osp.abspath(picture)}')
    print(f'demo: the same detector on a real photo (trained on shapes only, so its boxes '
          f'there are nonsense): {osp.abspath(result["photo"])}')
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
