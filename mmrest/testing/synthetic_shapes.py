"""A deterministic COCO-format dataset of coloured shapes on textured backgrounds, for the
demo, the tests and quick experiments (docs/get_started.md)::

    out_dir/{train,val}/000000.png ...            RGB images
    out_dir/annotations/instances_{train,val}.json boxes, RLE masks, info['generator']
    out_dir/semantic/{train,val}/000000.png ...   0 background, k category id k (no 255)

Every annotation describes the *visible* pixels of a shape (a later one may hide part of
it). Train and val come from independent random streams of the seed. Needs OpenCV, mmcv,
pycocotools and mmdet; ``import mmrest`` does not import it.
"""
import json
import os
import os.path as osp
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import mmcv
import numpy as np
from pycocotools import mask as mask_utils

#: Shapes the generator can draw, as polygons in a unit box ``[-0.5, 0.5]^2``.
SHAPES: Tuple[str, ...] = ('circle', 'square', 'triangle', 'diamond', 'hexagon', 'star',
                           'cross')

#: The classes of the built-in demo.
DEMO_CLASSES: Tuple[str, ...] = ('circle', 'square', 'triangle', 'star', 'cross')

#: The base RGB colour of each shape when ``class_colors=True``.
CLASS_COLORS: Dict[str, Tuple[int, int, int]] = {
    'circle': (230, 50, 45), 'square': (40, 190, 60), 'triangle': (45, 85, 235),
    'diamond': (245, 210, 30), 'hexagon': (205, 55, 225), 'star': (30, 215, 225),
    'cross': (250, 135, 20)}

#: Version of the written files, bumped when the output for a seed changes.
GENERATOR_VERSION = 2


def _unit_polygon(shape: str) -> np.ndarray:
    """Vertices (N, 2) of ``shape`` inside the unit box ``[-0.5, 0.5]^2``, as (x, y)."""
    if shape not in SHAPES:
        raise KeyError(f'Unknown shape {shape!r}; choose from {list(SHAPES)}')
    if shape in ('circle', 'hexagon'):
        t = (np.linspace(0, 2 * np.pi, 64, endpoint=False) if shape == 'circle'
             else np.arange(6) * np.pi / 3)
        return 0.5 * np.stack([np.cos(t), np.sin(t)], axis=1)
    if shape == 'star':
        t = -np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 0.5, 0.2)
        return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
    a, b = 1 / 6, 0.5
    return np.array({
        'square': [[-.5, -.5], [.5, -.5], [.5, .5], [-.5, .5]],
        'triangle': [[0., -.5], [.5, .5], [-.5, .5]],
        'diamond': [[0., -.5], [.5, 0.], [0., .5], [-.5, 0.]],
        'cross': [[-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a], [a, b], [-a, b],
                  [-a, a], [-b, a], [-b, -a], [-a, -a]]}[shape])


def _encode_rle(mask: np.ndarray) -> Dict[str, object]:
    """COCO RLE of a binary (H, W) mask, JSON-ready (``counts`` as a string)."""
    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {'size': [int(s) for s in rle['size']], 'counts': rle['counts'].decode('ascii')}


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A muted, textured (H, W, 3) float background: tinted grey, blotches, stripes."""
    img = np.full((h, w, 3), rng.uniform(70, 180)) + rng.normal(0, 12, 3)
    # low-frequency colour blotches
    gh, gw = rng.integers(2, 6, size=2)
    blotch = rng.normal(0, 22, (int(gh), int(gw), 3)).astype(np.float32)
    img += cv2.resize(blotch, (w, h), interpolation=cv2.INTER_CUBIC)
    # oriented stripes or a checker pattern, faint
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    kind = rng.integers(0, 3)
    if kind == 1:
        theta, period = rng.uniform(0, np.pi), rng.uniform(4, 16)
        phase = (xx * np.cos(theta) + yy * np.sin(theta)) * 2 * np.pi / period
        img += rng.uniform(6, 16) * np.sin(phase)[..., None]
    elif kind == 2:
        cell = rng.integers(4, 13)
        img += rng.uniform(5, 12) * (((xx // cell + yy // cell) % 2) * 2 - 1)[..., None]
    return img


def _shape_color(rng: np.random.Generator, shape: str, class_colors: bool) -> np.ndarray:
    if class_colors:
        base = np.asarray(CLASS_COLORS[shape], dtype=np.float64)
        return np.clip(base + rng.uniform(-20, 20, 3), 0, 255)
    hsv = np.array([[[rng.integers(0, 180), rng.integers(170, 256),
                      rng.integers(170, 256)]]], dtype=np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float64)


def _max_iou(box: Tuple[int, int, int, int], others: Sequence[Tuple[int, ...]]) -> float:
    """Largest IoU of an ``(x0, y0, x1, y1)`` box with any of ``others`` (0 if none)."""
    if not others:
        return 0.0
    import torch
    from mmdet.structures.bbox import bbox_overlaps
    ious = bbox_overlaps(torch.tensor([box], dtype=torch.float64),
                         torch.tensor(list(others), dtype=torch.float64))
    return float(ious.max())


def _mask_box(mask: np.ndarray) -> Tuple[int, int, int, int]:
    """Tight ``(x0, y0, x1, y1)`` box (x1, y1 exclusive) of a non-empty mask."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    return int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1


def render_shapes_image(rng: np.random.Generator, img_size: Tuple[int, int],
                        classes: Sequence[str], min_shapes: int = 1, max_shapes: int = 4,
                        size_range: Tuple[float, float] = (0.15, 0.45),
                        max_overlap: float = 0.2, min_visible: float = 0.6,
                        rotate: bool = True, class_colors: bool = False,
                        noise_std: float = 6.0) -> Tuple[np.ndarray, np.ndarray, List[dict]]:
    """Render one image: its arguments are those of :func:`generate_shapes_dataset`.

    Returns:
        tuple: (H, W, 3) uint8 RGB image, (H, W) uint8 semantic map and the instances
        (``{'category_id', 'mask'}`` with the visible mask) in painting order.
    """
    h, w = img_size
    short = min(h, w)
    img = _background(rng, h, w)
    semantic = np.zeros((h, w), dtype=np.uint8)
    placed: List[dict] = []  # category_id, full mask, visible mask, full box
    target = int(rng.integers(min_shapes, max_shapes + 1))
    for _ in range(target):
        label = int(rng.integers(len(classes)))
        shape = classes[label]
        for _attempt in range(50):
            size = rng.uniform(*size_range) * short
            pts = _unit_polygon(shape) * size
            if rotate:
                a = rng.uniform(0, 2 * np.pi)
                rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
                pts = pts @ rot.T
            lo, hi = pts.min(axis=0), pts.max(axis=0)
            ext = hi - lo
            if ext[0] >= w - 1 or ext[1] >= h - 1:
                continue
            cx = rng.uniform(-lo[0], w - 1 - hi[0])
            cy = rng.uniform(-lo[1], h - 1 - hi[1])
            poly = pts + [cx, cy]
            full = np.zeros((h, w), dtype=np.uint8)
            cv2.fillPoly(full, [np.round(poly * 16).astype(np.int32)], 1,
                         lineType=cv2.LINE_8, shift=4)
            full = full.astype(bool)
            if full.sum() < 4:
                continue
            box = _mask_box(full)
            if _max_iou(box, [p['box'] for p in placed]) > max_overlap:
                continue
            if any((p['visible'] & ~full).sum() < min_visible * p['full'].sum()
                   for p in placed):
                continue
            break
        else:
            continue  # no room left for this shape
        for p in placed:
            p['visible'] &= ~full
        color = _shape_color(rng, shape, class_colors)
        img[full] = color
        semantic[full] = label + 1
        placed.append(dict(category_id=label + 1, full=full, visible=full.copy(), box=box))
    if noise_std > 0:
        img += rng.normal(0, noise_std, img.shape)
    img = np.clip(np.round(img), 0, 255).astype(np.uint8)
    instances = [dict(category_id=p['category_id'], mask=p['visible']) for p in placed]
    return img, semantic, instances


def _check_args(num_train: int, num_val: int, img_size: Tuple[int, int], min_shapes: int,
                max_shapes: int, size_range: Tuple[float, float], classes: Sequence[str],
                max_overlap: float, min_visible: float) -> None:
    if num_train < 0 or num_val < 0:
        raise ValueError(f'num_train and num_val must be >= 0, got {num_train}, {num_val}')
    if len(img_size) != 2 or min(img_size) < 16:
        raise ValueError(f'img_size must be (H, W) with both >= 16, got {tuple(img_size)}')
    if not 1 <= min_shapes <= max_shapes:
        raise ValueError(f'need 1 <= min_shapes <= max_shapes, got min_shapes={min_shapes}'
                         f', max_shapes={max_shapes}')
    lo, hi = size_range
    if not 0 < lo <= hi <= 0.9:
        raise ValueError(f'size_range must satisfy 0 < min <= max <= 0.9 (fractions of the'
                         f' shorter image side), got {tuple(size_range)}')
    if min(img_size) * lo < 3:
        raise ValueError(f'size_range {tuple(size_range)} gives shapes under 3 px in an '
                         f'image of {tuple(img_size)}')
    if not classes:
        raise ValueError('classes must name at least one shape')
    unknown = [c for c in classes if c not in SHAPES]
    if unknown:
        raise KeyError(f'Unknown shape(s) {unknown} in classes; choose from {list(SHAPES)}')
    if len(set(classes)) != len(classes):
        raise ValueError(f'classes must be unique, got {list(classes)}')
    if not 0 <= max_overlap < 1:
        raise ValueError(f'max_overlap must be in [0, 1), got {max_overlap}')
    if not 0 < min_visible <= 1:
        raise ValueError(f'min_visible must be in (0, 1], got {min_visible}')


def generate_shapes_dataset(out_dir: str, num_train: int = 1000, num_val: int = 200,
                            img_size: Tuple[int, int] = (128, 128), min_shapes: int = 1,
                            max_shapes: int = 4,
                            size_range: Tuple[float, float] = (0.15, 0.45),
                            classes: Sequence[str] = DEMO_CLASSES, max_overlap: float = 0.2,
                            min_visible: float = 0.6, rotate: bool = True,
                            class_colors: bool = False, noise_std: float = 6.0,
                            seed: int = 0) -> Dict[str, object]:
    """Write a synthetic shapes dataset (see the module docstring). The same arguments
    give byte-identical files; the defaults are the demo's data
    (``configs/demo/retinanet_rest_lite_shapes.py``). Other files in ``out_dir`` are
    left alone.

    Args:
        out_dir (str): Folder to write to (created if needed).
        num_train (int): Training images. Defaults to 1000.
        num_val (int): Validation images. Defaults to 200.
        img_size (tuple[int, int]): ``(H, W)`` of every image. Defaults to (128, 128).
        min_shapes (int): Fewest shapes per image. Defaults to 1.
        max_shapes (int): Most shapes per image (fewer where they do not fit).
            Defaults to 4.
        size_range (tuple[float, float]): Shape size (side of its unrotated box) as
            fractions of the shorter image side. Defaults to (0.15, 0.45).
        classes (Sequence[str]): Names from :data:`SHAPES`, in category-id order (1-based).
            Defaults to :data:`DEMO_CLASSES`.
        max_overlap (float): Largest box IoU between two shapes of an image.
            Defaults to 0.2.
        min_visible (float): Fraction of a shape that must stay visible under later
            ones. Defaults to 0.6.
        rotate (bool): Rotate shapes by random angles. Defaults to True.
        class_colors (bool): One hue per class (:data:`CLASS_COLORS`, jittered) instead
            of random colours. Defaults to False.
        noise_std (float): Pixel noise std. Defaults to 6.0.
        seed (int): Random seed. Defaults to 0.

    Returns:
        dict: ``out_dir``, ``ann_file_train``, ``ann_file_val``, ``num_images`` and
        ``num_instances`` per split, and ``settings`` (as ``info['generator']``).

    Raises:
        ValueError: On an impossible setting (named with its value).
        KeyError: On an unknown shape name.
    """
    img_size = (int(img_size[0]), int(img_size[1]))
    size_range = (float(size_range[0]), float(size_range[1]))
    classes = [str(c) for c in classes]
    _check_args(num_train, num_val, img_size, min_shapes, max_shapes, size_range, classes,
                max_overlap, min_visible)
    settings = dict(version=GENERATOR_VERSION, num_train=int(num_train),
                    num_val=int(num_val), img_size=list(img_size),
                    min_shapes=int(min_shapes), max_shapes=int(max_shapes),
                    size_range=list(size_range), classes=list(classes),
                    max_overlap=float(max_overlap), min_visible=float(min_visible),
                    rotate=bool(rotate), class_colors=bool(class_colors),
                    noise_std=float(noise_std), seed=int(seed))
    categories = [dict(id=i + 1, name=name, supercategory='shape')
                  for i, name in enumerate(classes)]
    os.makedirs(osp.join(out_dir, 'annotations'), exist_ok=True)
    result: Dict[str, object] = dict(out_dir=out_dir, settings=settings, num_images={},
                                     num_instances={})
    for split_index, (split, count) in enumerate([('train', num_train), ('val', num_val)]):
        rng = np.random.default_rng([int(seed), split_index])
        img_dir, sem_dir = osp.join(out_dir, split), osp.join(out_dir, 'semantic', split)
        for folder in (img_dir, sem_dir):
            os.makedirs(folder, exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            img, semantic, instances = render_shapes_image(
                rng, img_size, classes, min_shapes=min_shapes, max_shapes=max_shapes,
                size_range=size_range, max_overlap=max_overlap, min_visible=min_visible,
                rotate=rotate, class_colors=class_colors, noise_std=noise_std)
            name = f'{i:06d}.png'
            _imwrite(osp.join(img_dir, name), img[..., ::-1])
            _imwrite(osp.join(sem_dir, name), semantic)
            image_id = i + 1
            images.append(dict(id=image_id, file_name=name, height=img_size[0],
                               width=img_size[1]))
            for inst in instances:
                x0, y0, x1, y1 = _mask_box(inst['mask'])
                annotations.append(dict(
                    id=len(annotations) + 1, image_id=image_id,
                    category_id=inst['category_id'], bbox=[x0, y0, x1 - x0, y1 - y0],
                    area=int(inst['mask'].sum()), segmentation=_encode_rle(inst['mask']),
                    iscrowd=0))
        ann_file = osp.join(out_dir, 'annotations', f'instances_{split}.json')
        coco = dict(info=dict(description=f'mmrest synthetic shapes, {split} split',
                              generator=settings),
                    licenses=[], images=images, annotations=annotations,
                    categories=categories)
        with open(ann_file, 'w') as f:
            json.dump(coco, f, separators=(',', ':'))
        result[f'ann_file_{split}'] = ann_file
        result['num_images'][split] = count
        result['num_instances'][split] = len(annotations)
    return result


def read_generator_settings(out_dir: str) -> Optional[Dict[str, object]]:
    """The ``info['generator']`` settings of a dataset :func:`generate_shapes_dataset`
    wrote to ``out_dir``; None unless both splits, and every image they list, exist and
    agree on them."""
    found = []
    for split in ('train', 'val'):
        ann_file = osp.join(out_dir, 'annotations', f'instances_{split}.json')
        try:
            with open(ann_file) as f:
                coco = json.load(f)
            found.append(coco['info']['generator'])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        for img in coco.get('images', []):
            if not (osp.isfile(osp.join(out_dir, split, img['file_name'])) and osp.isfile(
                    osp.join(out_dir, 'semantic', split, img['file_name']))):
                return None
    return found[0] if found[0] == found[1] else None


def _imwrite(path: str, array: np.ndarray) -> None:
    if not mmcv.imwrite(np.ascontiguousarray(array), path):
        raise OSError(f'could not write the image {path}')
