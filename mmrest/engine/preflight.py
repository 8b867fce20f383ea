"""Pre-flight checks of a config's datasets, before a runner is built: mmdet, mmseg and
mmpretrain find data problems late, some with messages that name no file (pycocotools'
``JSONDecodeError: Expecting value``). :func:`check_data_config` raises
:class:`DatasetCheckError` naming the config key, the path and the problem: a missing
``data_root``, ``ann_file`` or ``data_prefix`` folder; a ``.json`` annotation file that is
not COCO (or has none of the config's classes); a sample of the images that is missing
or does not decode (the others are checked by mmcv when loaded).
"""
import json
import os
import os.path as osp
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp', '.ppm', '.pgm')


class DatasetCheckError(ValueError):
    """A dataset of the config points at missing or unusable data."""


def _is_remote(path: str) -> bool:
    return '://' in path


def _join(root: Optional[str], path: str) -> str:
    if not root or osp.isabs(path) or _is_remote(path):
        return path
    return osp.join(root, path)


def _leaf_datasets(dataset_cfg: Any, where: str) -> Iterator[Tuple[Dict[str, Any], str]]:
    """Datasets inside wrappers (RepeatDataset, ConcatDataset, ClassBalancedDataset...)."""
    if not isinstance(dataset_cfg, dict):
        return
    if isinstance(dataset_cfg.get('datasets'), (list, tuple)):
        for i, sub in enumerate(dataset_cfg['datasets']):
            yield from _leaf_datasets(sub, f'{where}.datasets[{i}]')
    elif isinstance(dataset_cfg.get('dataset'), dict):
        yield from _leaf_datasets(dataset_cfg['dataset'], f'{where}.dataset')
    else:
        yield dataset_cfg, where


def _decode_image(path: str) -> Optional[str]:
    """None if the image decodes, else the reason."""
    import mmcv
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except OSError as err:
        return f'cannot be read ({err.strerror or err})'
    if not data:
        return 'is empty'
    try:
        img = mmcv.imfrombytes(data)
    except Exception as err:  # noqa: BLE001 - any decoder failure is reported
        return f'cannot be decoded ({type(err).__name__}: {err})'
    if img is None or getattr(img, 'size', 0) == 0:
        return 'cannot be decoded as an image (corrupted, or not an image file)'
    return None


def _spread(items: Sequence[Any], count: int) -> List[Any]:
    if count < 0 or len(items) <= count:
        return list(items)
    if count == 0:
        return []
    step = len(items) / count
    return [items[int(i * step)] for i in range(count)]


def _check_coco_json(ann_path: str, where: str, classes: Optional[Sequence[str]]) -> dict:
    try:
        with open(ann_path, encoding='utf-8') as f:
            data = json.load(f)
    except UnicodeDecodeError as err:
        raise DatasetCheckError(
            f'{where}.ann_file: {ann_path} is not a COCO annotation file: it is not text '
            f'({err})') from err
    except json.JSONDecodeError as err:
        raise DatasetCheckError(
            f'{where}.ann_file: {ann_path} is not a COCO annotation file: invalid JSON '
            f'({err})') from err
    if not isinstance(data, dict):
        raise DatasetCheckError(
            f'{where}.ann_file: {ann_path} is not a COCO annotation file: the top level is '
            f'a JSON {type(data).__name__}, expected an object with "images", '
            f'"annotations" and "categories"')
    missing = [key for key in ('images', 'annotations', 'categories') if key not in data]
    if missing:
        raise DatasetCheckError(
            f'{where}.ann_file: {ann_path} is not a COCO annotation file: missing '
            f'{", ".join(repr(k) for k in missing)} (it has {sorted(data)[:10]})')
    for key in ('images', 'annotations', 'categories'):
        if not isinstance(data[key], list):
            raise DatasetCheckError(
                f'{where}.ann_file: {ann_path} is not a COCO annotation file: "{key}" is a '
                f'{type(data[key]).__name__}, expected a list')
    for key, (first, second) in (('images', ('id', 'file_name')),
                                 ('categories', ('id', 'name')),
                                 ('annotations', ('image_id', 'category_id'))):
        for i, entry in enumerate(data[key]):
            if not isinstance(entry, dict) or first not in entry or second not in entry:
                raise DatasetCheckError(
                    f'{where}.ann_file: {ann_path}: {key}[{i}] = {str(entry)[:120]} has no '
                    f'"{first}" and "{second}"')
    if classes:
        names = {cat['name'] for cat in data['categories']}
        if not names.intersection(classes):
            raise DatasetCheckError(
                f'{where}: none of the classes {tuple(classes)[:10]} of the config is a '
                f'category of {ann_path} (it has {sorted(names)[:10]})')
    return data


def check_dataset(dataset_cfg: Dict[str, Any], where: str = 'dataset',
                  max_images: int = 16) -> None:
    """Check one (leaf) dataset config.

    Args:
        dataset_cfg (dict): The dataset config (``data_root``, ``ann_file``,
            ``data_prefix``, ``metainfo``...).
        where (str): Its key in the config, for messages. Defaults to 'dataset'.
        max_images (int): Images decoded, spread over the list (-1: all, 0: none).
            Defaults to 16.

    Raises:
        DatasetCheckError: Naming the config key, the path and the problem.
    """
    data_root = dataset_cfg.get('data_root') or None
    if data_root and not _is_remote(data_root) and not osp.isdir(data_root):
        raise DatasetCheckError(
            f'{where}.data_root: folder not found: {osp.abspath(data_root)} '
            f'(data_root={data_root!r}; run from the folder it is relative to, or set it '
            f'with --cfg-options)')

    prefixes: Dict[str, str] = {}
    data_prefix = dataset_cfg.get('data_prefix')
    if isinstance(data_prefix, dict):
        prefixes = {k: v for k, v in data_prefix.items() if isinstance(v, str) and v}
    elif isinstance(data_prefix, str) and data_prefix:
        prefixes = {'': data_prefix}
    for key, value in prefixes.items():
        path = _join(data_root, value)
        if not _is_remote(path) and not osp.isdir(path):
            label = f'{where}.data_prefix' + (f'.{key}' if key else '')
            raise DatasetCheckError(f'{label}: folder not found: {osp.abspath(path)} '
                                    f'(data_root={data_root!r}, value={value!r})')

    ann_file = dataset_cfg.get('ann_file')
    ann_path = None
    if isinstance(ann_file, str) and ann_file:
        ann_path = _join(data_root, ann_file)
        if not _is_remote(ann_path) and not osp.isfile(ann_path):
            raise DatasetCheckError(
                f'{where}.ann_file: annotation file not found: {osp.abspath(ann_path)} '
                f'(data_root={data_root!r}, ann_file={ann_file!r})')

    img_prefix = next((prefixes[k] for k in ('img', 'img_path') if k in prefixes), None)
    img_dir = _join(data_root, img_prefix) if img_prefix else data_root
    images: List[str] = []
    if ann_path and ann_path.endswith('.json') and not _is_remote(ann_path):
        metainfo = dataset_cfg.get('metainfo') or {}
        classes = metainfo.get('classes') if isinstance(metainfo, dict) else None
        data = _check_coco_json(ann_path, where, classes)
        images = [_join(img_dir, img['file_name']) for img in data['images']]
        if not images:
            raise DatasetCheckError(f'{where}.ann_file: {ann_path} lists no images')
        source = f'listed in {ann_path}'
    elif img_dir and not _is_remote(img_dir) and osp.isdir(img_dir) and not ann_path:
        with os.scandir(img_dir) as entries:
            names = sorted(e.name for e in entries
                           if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS))
        images = [osp.join(img_dir, name) for name in names]
        source = f'in {img_dir}'
    for path in _spread(images, max_images):
        if not osp.isfile(path):
            raise DatasetCheckError(f'{where}: image {source} not found: {osp.abspath(path)}')
        reason = _decode_image(path)
        if reason is not None:
            raise DatasetCheckError(f'{where}: image {source} {reason}: {osp.abspath(path)}')


def check_data_config(cfg: Any,
                      splits: Sequence[str] = ('train', 'val', 'test'),
                      max_images: int = 16) -> None:
    """:func:`check_dataset` on every dataset (inside wrappers too) of the
    ``<split>_dataloader`` of each of ``splits``; raises for the first problem."""
    checked = set()
    for split in splits:
        loader = cfg.get(f'{split}_dataloader')
        if not isinstance(loader, dict) or not isinstance(loader.get('dataset'), dict):
            continue
        for leaf, where in _leaf_datasets(loader['dataset'], f'{split}_dataloader.dataset'):
            key = json.dumps({k: leaf.get(k) for k in ('data_root', 'ann_file', 'data_prefix')},
                             sort_keys=True, default=str)
            if key in checked:
                continue
            checked.add(key)
            check_dataset(leaf, where, max_images=max_images)
