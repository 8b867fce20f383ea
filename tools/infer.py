"""Predict images with a trained detector, segmentor or classifier through OpenMMLab's
inferencers (mmdet's ``DetInferencer``, ``MMSegInferencer``, mmpretrain's
``ImageClassificationInferencer``, from the config's ``default_scope``). They read the test
pipeline, the class names of the checkpoint and draw into ``OUT_DIR/vis``; every image's
predictions, with class names, go to ``OUT_DIR/predictions.json``. Checkpoints are read
safely (``import mmrest``).

    python tools/infer.py configs/retinanet_rest_small_coco.py epoch_12.pth a.jpg b.jpg \\
        --out-dir work_dirs/infer
"""
import argparse
import json
import os
import os.path as osp
import sys
from typing import Any, Dict, List, Optional, Tuple

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

TASKS = {'mmdet': 'detection', 'mmseg': 'segmentation', 'mmpretrain': 'classification'}


def _names(classes, labels) -> List[str]:
    return [str(classes[i]) if classes is not None and 0 <= i < len(classes) else str(i)
            for i in labels]


def _predict(scope: str, cfg, checkpoint: str, images: List[str], out_dir: str,
             device: str, score_thr: float) -> Tuple[Optional[list], List[Dict[str, Any]]]:
    """The class names and one entry per image, from the inferencer of ``scope``."""
    import numpy as np
    entries: List[Dict[str, Any]] = []
    if scope == 'mmdet':
        from mmdet.apis import DetInferencer
        inferencer = DetInferencer(model=cfg, weights=checkpoint, device=device)
        classes = inferencer.model.dataset_meta.get('classes')
        out = inferencer(images, out_dir=out_dir, no_save_pred=False,
                         pred_score_thr=score_thr)
        for img, pred in zip(images, out['predictions']):
            entry = dict(image=img, labels=pred['labels'], scores=pred['scores'],
                         bboxes=pred['bboxes'], label_names=_names(classes, pred['labels']))
            if 'masks' in pred:
                entry['masks_rle'] = pred['masks']
            entries.append(entry)
    elif scope == 'mmseg':
        from mmseg.apis import MMSegInferencer
        inferencer = MMSegInferencer(model=cfg, weights=checkpoint, device=device)
        classes = inferencer.model.dataset_meta.get('classes')
        for i, img in enumerate(images):  # one at a time: the label maps differ in size
            label = inferencer(img, out_dir=out_dir)['predictions']
            ids, counts = (v.tolist() for v in np.unique(label, return_counts=True))
            entries.append(dict(image=img, shape=list(label.shape),
                                sem_seg_file=osp.join(out_dir, 'pred', f'{i:08d}_pred.png'),
                                pixels_per_class=dict(zip(_names(classes, ids), counts))))
    else:
        from mmpretrain.apis import ImageClassificationInferencer
        inferencer = ImageClassificationInferencer(model=cfg, pretrained=checkpoint,
                                                   device=device)
        classes = inferencer.classes
        for img, pred in zip(images, inferencer(images, show_dir=osp.join(out_dir, 'vis'))):
            entries.append(dict(image=img, pred_label=pred['pred_label'],
                                pred_score=pred['pred_score'],
                                pred_class=pred.get('pred_class'),
                                pred_scores=pred['pred_scores']))
    return classes, entries


def infer(config, checkpoint: str, images: List[str], out_dir: str,
          device: Optional[str] = None, score_thr: float = 0.3) -> Dict[str, Any]:
    """Predict ``images`` with the inferencer of the config's scope (file or Config) on
    ``device`` (default: mmengine's ``get_device()``); returns what ``predictions.json``
    holds. FileNotFoundError, ValueError (no inferencer) or CheckpointError (damaged, or
    loading it could run code) say what is wrong."""
    import mmengine
    from mmengine.config import Config
    from mmengine.device import get_device
    from mmengine.registry import DefaultScope

    import mmrest  # noqa: F401  (ResT registry, safe checkpoint loading)
    cfg = config if isinstance(config, Config) else Config.fromfile(config)
    scope = cfg.get('default_scope', None)
    if scope not in TASKS:
        raise ValueError(f'the config\'s default_scope must be one of {sorted(TASKS)}, '
                         f'got {scope!r}')
    for path in [checkpoint] + list(images):
        if not osp.isfile(path):
            raise FileNotFoundError(f'no such file: {path}')
    # complete and safe to load (else a one-line CheckpointError, not torch's advice to
    # unpickle it anyway)
    from mmrest.engine import inspect_checkpoint
    inspect_checkpoint(checkpoint, for_resume=False)
    device = device or get_device()
    vis_dir = osp.join(out_dir, 'vis')
    os.makedirs(vis_dir, exist_ok=True)
    # the inferencers build their pipelines in the current default scope
    with DefaultScope.overwrite_default_scope(scope):
        classes, entries = _predict(scope, cfg, checkpoint, images, out_dir, device,
                                    score_thr)
    for entry in entries:
        stem = osp.basename(entry['image'])
        candidates = [osp.join(vis_dir, stem), osp.join(vis_dir, osp.splitext(stem)[0] + '.png')]
        entry['visualization'] = next((c for c in candidates if osp.isfile(c)), None)
    result = dict(config=cfg.filename, checkpoint=checkpoint, task=TASKS[scope],
                  classes=classes, images=entries)
    # mmengine's JSON handler turns numpy arrays and scalars into lists and numbers; the
    # returned dict is the file's content read back, plain Python throughout
    text = mmengine.dump(result, file_format='json', indent=1)
    with open(osp.join(out_dir, 'predictions.json'), 'w', encoding='utf-8') as f:
        f.write(text)
    return json.loads(text)


def main(argv: Optional[List[str]] = None) -> int:
    """0 on success, 1 with the reason on stderr otherwise."""
    from mmrest.utils import CheckpointError
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config')
    parser.add_argument('checkpoint')
    parser.add_argument('images', nargs='+')
    parser.add_argument('--out-dir', required=True, help='where the results go')
    parser.add_argument('--device', help="default: mmengine's get_device() (cuda, npu, "
                        'mlu, musa, mps where available, else cpu)')
    parser.add_argument('--score-thr', type=float, default=0.3,
                        help='detection: smallest score drawn (default 0.3)')
    args = parser.parse_args(argv)
    try:
        result = infer(args.config, args.checkpoint, args.images, args.out_dir,
                       args.device, args.score_thr)
    except (FileNotFoundError, ValueError, CheckpointError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 1
    for entry in result['images']:
        print(f"{entry['image']} -> {entry['visualization']}")
    print(f"predictions: {osp.join(args.out_dir, 'predictions.json')}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
