"""Run a trained detector, segmentor or classifier on images with OpenMMLab's inferencers.

The task comes from the config's ``default_scope``: ``mmdet`` (mmdet's ``DetInferencer``),
``mmseg`` (``MMSegInferencer``) or ``mmpretrain`` (``ImageClassificationInferencer``). The
inferencers read the config's test pipeline, the class names stored in the checkpoint
(``meta.dataset_meta``) and draw with the config's visualizer; this tool only chooses
the inferencer, passes the images and writes::

    OUT_DIR/vis/<image>           the drawn predictions (by the inferencer's visualizer)
    OUT_DIR/preds/..., pred/...   what the inferencer itself saves (detection JSON,
                                  segmentation label PNGs)
    OUT_DIR/predictions.json      every image's predictions, with class names

Checkpoints are read safely: ``import mmrest`` (done here, and by any config with
``custom_imports=dict(imports=['mmrest'])``) allows exactly the types mmengine writes into
them and nothing else.

Examples::

    python tools/infer.py configs/retinanet_rest_small_coco.py work_dirs/x/epoch_12.pth \\
        demo.jpg --out-dir work_dirs/infer
    python tools/infer.py configs/rest_small_imagenet.py rest_small_cls.pth a.jpg b.jpg \\
        --out-dir work_dirs/infer_cls
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


def _default_device() -> str:
    import torch
    return 'cuda:0' if torch.cuda.is_available() else 'cpu'


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
    """Predict ``images`` with the inferencer of the config's scope; write the results.

    Args:
        config (str | Config): The config (file or object).
        checkpoint (str): The weights.
        images (list[str]): Image files.
        out_dir (str): Where the pictures and ``predictions.json`` go.
        device (str, optional): Defaults to None (``cuda:0`` if available, else ``cpu``).
        score_thr (float): Detections drawn from this score on. Defaults to 0.3.

    Returns:
        dict: What ``predictions.json`` holds.

    Raises:
        FileNotFoundError: If the checkpoint or an image does not exist.
        ValueError: If the config's scope has no inferencer here.
        CheckpointError: If the checkpoint is damaged or loading it could run code.
    """
    import mmengine
    from mmengine.config import Config
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
    device = device or _default_device()
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


def predict_photo(config, checkpoint: str, out_file: str, photo: str = 'chelsea',
                  score_thr: float = 0.3) -> str:
    """Draw a detector's predictions on one of scikit-image's bundled photos.

    The demo uses it to show its detector (trained on synthetic shapes) on a real photo.

    Args:
        config (str | Config): The detector's config.
        checkpoint (str): Its weights.
        out_file (str): The picture to write.
        photo (str): A photo of ``skimage.data``. Defaults to 'chelsea'.
        score_thr (float): Smallest score drawn. Defaults to 0.3.

    Returns:
        str: ``out_file``.
    """
    import tempfile

    import cv2
    import skimage.data
    with tempfile.TemporaryDirectory() as tmp:
        image = osp.join(tmp, photo + '.png')
        cv2.imwrite(image, getattr(skimage.data, photo)()[..., ::-1])
        result = infer(config, checkpoint, [image], tmp, score_thr=score_thr)
        picture = cv2.imread(result['images'][0]['visualization'])
    os.makedirs(osp.dirname(osp.abspath(out_file)), exist_ok=True)
    if picture is None or not cv2.imwrite(out_file, picture):
        raise OSError(f'could not write the picture {out_file}')
    return out_file


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description='Predict images with a trained model through the OpenMMLab '
        'inferencers (task from the config\'s default_scope)')
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('images', nargs='+', help='image files')
    parser.add_argument('--out-dir', required=True, help='where the results go')
    parser.add_argument('--device', default=None, help='default: cuda:0 if available')
    parser.add_argument('--score-thr', type=float, default=0.3,
                        help='detection: smallest score drawn (default 0.3)')
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    """Run the tool; 0 on success, 1 with the reason on stderr otherwise."""
    from mmrest.utils import CheckpointError
    args = parse_args(argv)
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
