"""Pre- and post-processing around a model exported by ``export_onnx.py``, in numpy and
OpenCV (no torch, mmcv or mmdet at deployment), with the settings of the ``.json`` beside the
``.onnx`` file: :func:`preprocess` (keep-ratio ``Resize`` as ``mmcv.imrescale``, channel
order, normalisation, padding), :func:`detection_postprocess` (mmdet's ``predict_by_feat``
of RetinaNet-style heads: score threshold, ``nms_pre``, delta decoding, rescaling,
``min_bbox_size``, class-aware NMS, ``max_per_img``) and :func:`segmentation_postprocess`
(mmseg's resize of the logits, crop of the padding, arg-max)::

    meta = load_meta('work_dirs/onnx/retinanet.onnx')
    batch, info = preprocess(cv2.imread('photo.jpg'), meta)
    dets = detection_postprocess(sess.run(None, {'input': batch}), meta, [info])[0]
"""
import json
import os.path as osp
from typing import Dict, List, Sequence, Tuple

import cv2
import numpy as np

#: Test-pipeline transforms that only load or pack data (nothing to do on an array).
_PASSIVE = {
    'LoadImageFromFile', 'LoadImageFromNDArray', 'InferencerLoader', 'LoadAnnotations',
    'PackDetInputs', 'PackSegInputs', 'PackInputs'
}


def load_meta(onnx_path: str) -> dict:
    """The metadata ``export_onnx.py`` wrote beside ``onnx_path`` (same name, ``.json``)."""
    path = osp.splitext(onnx_path)[0] + '.json'
    if not osp.isfile(path):
        raise FileNotFoundError(f'{path} not found: it is written by export_onnx.py beside '
                                'the .onnx file')
    with open(path, encoding='utf-8') as f:
        return json.load(f)


def _type_name(transform: dict) -> str:
    return str(transform.get('type', '')).split('.')[-1]


def rescale_size(w: int, h: int, scale: Sequence[int]) -> Tuple[int, int]:
    """New (w, h) of a keep-ratio resize to fit ``scale`` (long, short), as mmcv does."""
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(w * float(factor) + 0.5), int(h * float(factor) + 0.5)


def preprocess(img: np.ndarray, meta: dict) -> Tuple[np.ndarray, Dict[str, tuple]]:
    """A BGR ``uint8`` image (H, W, 3) -> the float32 input (1, 3, H', W') and
    ``ori_shape``, ``img_shape`` (resized), ``pad_shape``, ``scale_factor`` (w, h);
    ``NotImplementedError`` for a test transform other than a keep-ratio ``Resize``."""
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f'expected a (H, W, 3) BGR image, got shape {img.shape}')
    settings = meta['input']
    ori_h, ori_w = img.shape[:2]
    scale_factor = (1.0, 1.0)
    for transform in settings.get('test_pipeline', []):
        name = _type_name(transform)
        if name in _PASSIVE:
            continue
        if name == 'Resize' and transform.get('keep_ratio') and 'scale' in transform:
            new_w, new_h = rescale_size(img.shape[1], img.shape[0], transform['scale'])
            h, w = img.shape[:2]
            img = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
            scale_factor = (new_w / w * scale_factor[0], new_h / h * scale_factor[1])
            continue
        raise NotImplementedError(f'test-pipeline transform {transform} is not implemented '
                                  'here; run the OpenMMLab pipeline for this model')
    img_h, img_w = img.shape[:2]
    x = img[..., ::-1] if settings.get('bgr_to_rgb') else img
    x = x.astype(np.float32)
    if settings.get('mean') is not None:
        x = (x - np.asarray(settings['mean'], np.float32)) / np.asarray(
            settings['std'], np.float32)
    div = int(settings.get('pad_size_divisor') or 1)
    pad_h, pad_w = -(-img_h // div) * div, -(-img_w // div) * div
    batch = np.full((1, 3, pad_h, pad_w), settings.get('pad_value', 0), np.float32)
    batch[0, :, :img_h, :img_w] = x.transpose(2, 0, 1)
    info = dict(ori_shape=(ori_h, ori_w), img_shape=(img_h, img_w), pad_shape=(pad_h, pad_w),
                scale_factor=scale_factor)
    return batch, info


# --------------------------------------------------------------------------- detection
def grid_anchors(base_anchors: np.ndarray, stride: Sequence[float], height: int,
                 width: int) -> np.ndarray:
    """Anchors of one level, (height * width * A, 4), location-major as in mmdet."""
    shift_x = np.arange(width, dtype=np.float32) * np.float32(stride[0])
    shift_y = np.arange(height, dtype=np.float32) * np.float32(stride[1])
    xx = np.tile(shift_x, height)
    yy = np.repeat(shift_y, width)
    shifts = np.stack([xx, yy, xx, yy], axis=-1)
    return (base_anchors[None, :, :] + shifts[:, None, :]).reshape(-1, 4)


def decode_deltas(anchors: np.ndarray, deltas: np.ndarray, coder: dict,
                  max_shape: Tuple[int, int]) -> np.ndarray:
    """(dx, dy, dw, dh) deltas -> (x1, y1, x2, y2) boxes (mmdet's ``DeltaXYWHBBoxCoder``)."""
    deltas = deltas * np.asarray(coder['stds'], np.float32) + np.asarray(
        coder['means'], np.float32)
    dxy, dwh = deltas[:, :2], deltas[:, 2:]
    pxy = (anchors[:, :2] + anchors[:, 2:]) * np.float32(0.5)
    pwh = anchors[:, 2:] - anchors[:, :2]
    dxy_wh = pwh * dxy
    max_ratio = np.float32(abs(np.log(coder['wh_ratio_clip'])))
    if coder.get('add_ctr_clamp'):
        dxy_wh = np.clip(dxy_wh, -coder['ctr_clamp'], coder['ctr_clamp'])
        dwh = np.minimum(dwh, max_ratio)
    else:
        dwh = np.clip(dwh, -max_ratio, max_ratio)
    gxy = pxy + dxy_wh
    gwh = pwh * np.exp(dwh)
    boxes = np.concatenate([gxy - gwh * np.float32(0.5), gxy + gwh * np.float32(0.5)], -1)
    if coder.get('clip_border', True) and max_shape is not None:
        boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, max_shape[1])
        boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, max_shape[0])
    return boxes.astype(np.float32)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices kept by greedy NMS, best score first (mmcv's rule: drop IoU > threshold)."""
    order = np.argsort(-scores, kind='stable')
    x1, y1, x2, y2 = (boxes[:, i] for i in range(4))
    areas = (x2 - x1) * (y2 - y1)
    thr = np.float32(iou_threshold)
    keep = np.ones(len(order), bool)
    for a in range(len(order)):
        if not keep[a]:
            continue
        i = order[a]
        rest = order[a + 1:]
        w = np.maximum(np.float32(0), np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        h = np.maximum(np.float32(0), np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
        inter = w * h
        iou = inter / (areas[i] + areas[rest] - inter)
        keep[a + 1:] &= ~(iou > thr)
    return order[keep]


def batched_nms(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                nms_cfg: dict) -> np.ndarray:
    """Class-aware NMS as mmcv's ``batched_nms``: boxes of each class are shifted apart by
    ``label * (max coordinate + 1)`` and suppressed together; returns the kept indices,
    best score first."""
    if nms_cfg.get('class_agnostic', False):
        shifted = boxes
    else:
        offsets = labels.astype(np.float32) * (boxes.max() + np.float32(1))
        shifted = boxes + offsets[:, None]
    if len(boxes) < nms_cfg.get('split_thr', 10000):
        return nms(shifted, scores, nms_cfg['iou_threshold'])
    kept = np.concatenate([
        np.flatnonzero(labels == c)[nms(shifted[labels == c], scores[labels == c],
                                        nms_cfg['iou_threshold'])]
        for c in np.unique(labels)
    ])
    return kept[np.argsort(-scores[kept], kind='stable')]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1 / (1 + np.exp(-x))).astype(np.float32)


def detection_postprocess(outputs: Sequence[np.ndarray], meta: dict,
                          img_infos: Sequence[dict],
                          rescale: bool = True) -> List[Dict[str, np.ndarray]]:
    """``cls_score_0..L-1`` and ``bbox_pred_0..L-1`` (ONNX Runtime's order) -> per image
    ``bboxes`` (n, 4) x1y1x2y2, ``scores`` and ``labels``, best first; ``img_infos`` from
    :func:`preprocess` (``img_shape``, and ``scale_factor`` with ``rescale``)."""
    if meta.get('task') != 'detection':
        raise ValueError(f"expected the metadata of a detection export, got task "
                         f"{meta.get('task')!r}")
    levels = len(meta['strides'])
    if len(outputs) != 2 * levels:
        raise ValueError(f'expected {2 * levels} outputs (cls_score and bbox_pred of '
                         f'{levels} levels), got {len(outputs)}')
    cfg = meta['test_cfg']
    num_classes = meta['num_classes']
    base = [np.asarray(a, np.float32) for a in meta['base_anchors']]
    results = []
    for b, info in enumerate(img_infos):
        all_boxes, all_scores, all_labels = [], [], []
        for lvl in range(levels):
            cls = outputs[lvl][b]
            reg = outputs[levels + lvl][b]
            h, w = cls.shape[-2:]
            logits = cls.transpose(1, 2, 0).reshape(-1, cls.shape[0] // base[lvl].shape[0])
            if meta['use_sigmoid_cls']:
                scores = _sigmoid(logits)
            else:
                e = np.exp(logits - logits.max(1, keepdims=True))
                scores = (e / e.sum(1, keepdims=True))[:, :num_classes]
            deltas = reg.transpose(1, 2, 0).reshape(-1, 4)
            flat = scores.reshape(-1)
            valid = np.flatnonzero(flat > cfg.get('score_thr', 0))
            order = np.argsort(-flat[valid], kind='stable')
            top = valid[order[:min(cfg.get('nms_pre', -1), len(valid))]]
            anchor_idx, labels = top // scores.shape[1], top % scores.shape[1]
            anchors = grid_anchors(base[lvl], meta['strides'][lvl], h, w)[anchor_idx]
            all_boxes.append(decode_deltas(anchors, deltas[anchor_idx], meta['bbox_coder'],
                                           tuple(info['img_shape'])))
            all_scores.append(flat[top])
            all_labels.append(labels)
        boxes = np.concatenate(all_boxes).astype(np.float32)
        scores = np.concatenate(all_scores).astype(np.float32)
        labels = np.concatenate(all_labels).astype(np.int64)
        if rescale:
            sw, sh = info['scale_factor']
            boxes = boxes * np.asarray([1 / sw, 1 / sh, 1 / sw, 1 / sh], np.float32)
        if cfg.get('min_bbox_size', -1) >= 0:
            ok = ((boxes[:, 2] - boxes[:, 0] > cfg['min_bbox_size'])
                  & (boxes[:, 3] - boxes[:, 1] > cfg['min_bbox_size']))
            boxes, scores, labels = boxes[ok], scores[ok], labels[ok]
        if len(boxes) and cfg.get('nms') is not None:
            keep = batched_nms(boxes, scores, labels, cfg['nms'])
            keep = keep[:cfg.get('max_per_img', len(keep))]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        results.append(dict(bboxes=boxes, scores=scores, labels=labels))
    return results


# ------------------------------------------------------------------------ segmentation
def _source_index(out_len: int, in_len: int,
                  align_corners: bool) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear source rows (i0, i1) and weights of i1, as PyTorch's ``interpolate``."""
    d = np.arange(out_len, dtype=np.float32)
    if align_corners:
        src = d * np.float32((in_len - 1) / (out_len - 1) if out_len > 1 else 0.)
    else:
        src = np.maximum((d + np.float32(0.5)) * np.float32(in_len / out_len)
                         - np.float32(0.5), np.float32(0))
    i0 = np.minimum(src.astype(np.int64), in_len - 1)
    i1 = np.minimum(i0 + 1, in_len - 1)
    return i0, i1, (src - i0).astype(np.float32)


def resize_bilinear(x: np.ndarray, size: Tuple[int, int],
                    align_corners: bool = False) -> np.ndarray:
    """Bilinear resize of a (C, H, W) array to ``size`` (h, w), as
    ``torch.nn.functional.interpolate(mode='bilinear')`` computes it."""
    h0, h1, lh = _source_index(size[0], x.shape[1], align_corners)
    w0, w1, lw = _source_index(size[1], x.shape[2], align_corners)
    rows = x[:, h0] * (1 - lh)[None, :, None] + x[:, h1] * lh[None, :, None]
    return rows[:, :, w0] * (1 - lw) + rows[:, :, w1] * lw


def segmentation_postprocess(seg_logits: np.ndarray, meta: dict,
                             img_infos: Sequence[dict]) -> List[Dict[str, np.ndarray]]:
    """``seg_logits`` (N, C, h, w) -> per image ``seg_logits`` (C, H, W) and ``sem_seg``
    (H, W) at ``ori_shape``; ``img_infos`` from :func:`preprocess`."""
    if meta.get('task') != 'segmentation':
        raise ValueError(f"expected the metadata of a segmentation export, got task "
                         f"{meta.get('task')!r}")
    align = meta.get('align_corners', False)
    results = []
    for b, info in enumerate(img_infos):
        logits = resize_bilinear(seg_logits[b], tuple(info['pad_shape']), align)
        img_h, img_w = info['img_shape']
        logits = resize_bilinear(logits[:, :img_h, :img_w], tuple(info['ori_shape']), align)
        if logits.shape[0] > 1:
            label = logits.argmax(0)
        else:
            label = (_sigmoid(logits[0]) > meta.get('threshold', 0.3)).astype(np.int64)
        results.append(dict(seg_logits=logits, sem_seg=label.astype(np.int64)))
    return results
