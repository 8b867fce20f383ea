"""Turn the metrics JSON that ``tools/test.py`` writes into rows of the README results table.

``tools/test.py`` writes ``<work_dir>/test_metrics.json`` (or its ``--metrics-out`` file):
``{"config": ..., "checkpoint": ..., "metrics": {...}}``; its ``metrics`` object is read.
mmengine's runner (0.10.7) also writes the test metrics of a run to
``<work_dir>/<timestamp>/<timestamp>.json``: one JSON object such as
``{"coco/bbox_mAP": 0.403, "coco/bbox_mAP_50": 0.61, ..., "time": 0.09}`` (mmdet, AP as a
fraction), ``{"aAcc": 81.2, "mIoU": 45.3, "mAcc": 56.1, ...}`` (mmseg, percent) or
``{"accuracy/top1": 79.6, "accuracy/top5": 94.9, ...}`` (mmpretrain, percent); the
``metrics`` object of ``test_metrics.json`` holds the same metric keys. The per-iteration
``vis_data/*.json`` files of training runs are JSON lines; their last record that holds a
metric is used.

Usage::

    python tools/analysis/results_table.py CONFIG RESULT [CONFIG RESULT ...]
    # e.g.
    python tools/analysis/results_table.py configs/retinanet_rest_small_coco.py \\
        work_dirs/retinanet_rest_small_coco

``RESULT`` is the JSON file or a work directory (its ``test_metrics.json`` if there is
one, else its newest ``<timestamp>/<timestamp>.json``). The rows have the README columns
``| Method | Backbone | Config | Params | Paper | Reproduced here |``; the paper and
parameter cells of the configs in this repository are filled in, the "Reproduced here"
cell comes from the JSON (AP and mIoU in percent, one decimal; box / mask for Mask R-CNN).
"""
import argparse
import json
import os
import os.path as osp
import re
from typing import Dict, List, Optional, Sequence, Tuple

HEADER = ('| Method | Backbone | Config | Params | Paper | Reproduced here |\n'
          '|---|---|---|---|---|---|')

#: the known configs, a row each: config stem, method, backbone, params measured here and
#: the paper's result cell, two or more spaces apart
_KNOWN = """
retinanet_rest_small_coco       RetinaNet 1x        ResT-Small    23.40M  40.3 box AP
retinanet_rest_base_coco        RetinaNet 1x        ResT-Base     40.50M  42.0 box AP
mask_rcnn_rest_small_coco       Mask R-CNN 1x       ResT-Small    33.32M  39.6 box / 37.2 mask AP
mask_rcnn_rest_base_coco        Mask R-CNN 1x       ResT-Base     49.83M  41.6 box / 38.7 mask AP
upernet_rest_small_ade20k       UperNet 160k        ResT-Small    43.48M  not reported
upernet_rest_base_ade20k        UperNet 160k        ResT-Base     61.98M  not reported
rest_lite_imagenet              ImageNet-1k 300 ep  ResT-Lite     10.51M  77.2 top-1
rest_small_imagenet             ImageNet-1k 300 ep  ResT-Small    13.68M  79.6 top-1
rest_base_imagenet              ImageNet-1k 300 ep  ResT-Base     30.33M  81.6 top-1
rest_large_imagenet             ImageNet-1k 300 ep  ResT-Large    51.68M  83.6 top-1
mask_rcnn_restv2_tiny_3x_coco   Mask R-CNN 3x       ResTv2-Tiny   49.94M  47.6 box / 43.2 mask AP
mask_rcnn_restv2_small_3x_coco  Mask R-CNN 3x       ResTv2-Small  60.71M  48.1 box / 43.3 mask AP
mask_rcnn_restv2_base_3x_coco   Mask R-CNN 3x       ResTv2-Base   75.47M  48.7 box / 43.9 mask AP
retinanet_restv2_tiny_3x_coco   RetinaNet 3x        ResTv2-Tiny   40.61M  not reported
upernet_restv2_tiny_ade20k      UperNet 160k        ResTv2-Tiny   62.09M  47.3 mIoU
upernet_restv2_small_ade20k     UperNet 160k        ResTv2-Small  72.86M  49.2 mIoU
upernet_restv2_base_ade20k      UperNet 160k        ResTv2-Base   87.62M  49.6 mIoU
restv2_tiny_imagenet            ImageNet-1k 300 ep  ResTv2-Tiny   30.43M  82.3 top-1
restv2_small_imagenet           ImageNet-1k 300 ep  ResTv2-Small  41.21M  83.2 top-1
restv2_base_imagenet            ImageNet-1k 300 ep  ResTv2-Base   55.97M  83.7 top-1
restv2_large_imagenet           ImageNet-1k 300 ep  ResTv2-Large  86.53M  84.2 top-1
"""
#: config stem -> (method, backbone, params measured here, paper result cell).
KNOWN_CONFIGS: Dict[str, Tuple[str, str, str, str]] = {
    row[0]: tuple(row[1:])
    for row in (re.split(r' {2,}', line) for line in _KNOWN.strip().splitlines())}

_TIMESTAMP = re.compile(r'^\d{8}_\d{6}$')

#: The file ``tools/test.py`` writes into the work dir unless given ``--metrics-out``.
TEST_METRICS_FILE = 'test_metrics.json'


class ResultsError(ValueError):
    """A results file that cannot be read or holds no known metric."""


def find_result_json(path: str) -> str:
    """Return ``path`` if it is a file, else the result file in that work directory.

    In a work directory, ``test_metrics.json`` (written by ``tools/test.py``) is used when
    it exists, else the newest ``<timestamp>/<timestamp>.json`` (written by mmengine's
    runner).

    Args:
        path (str): A JSON file or a work directory.

    Returns:
        str: Path of the JSON file.

    Raises:
        ResultsError: If there is no such file.
    """
    if osp.isfile(path):
        return path
    if not osp.isdir(path):
        raise ResultsError(f'{path}: no such file or directory')
    test_metrics = osp.join(path, TEST_METRICS_FILE)
    if osp.isfile(test_metrics):
        return test_metrics
    runs = sorted(d for d in os.listdir(path)
                  if _TIMESTAMP.match(d) and osp.isfile(osp.join(path, d, f'{d}.json')))
    if not runs:
        raise ResultsError(f'{path}: no {TEST_METRICS_FILE} (written by tools/test.py) '
                           'nor <timestamp>/<timestamp>.json (written by mmengine\'s runner) '
                           'in this directory')
    return osp.join(path, runs[-1], f'{runs[-1]}.json')


def _metrics_of(record: dict) -> dict:
    """The metrics of a record: the ``metrics`` object of a ``tools/test.py`` file, else
    the record itself (mmengine's formats)."""
    nested = record.get('metrics')
    return nested if isinstance(nested, dict) else record


def _has_metric(record: dict) -> bool:
    return any(_metric_key(k) for k in record)


def _metric_key(key: str) -> Optional[str]:
    for name in ('bbox_mAP', 'segm_mAP', 'mIoU', 'top1'):
        if key == name or key.endswith('/' + name):
            return name
    return None


def load_metrics(path: str) -> Dict[str, object]:
    """Read the metrics written by ``tools/test.py`` or mmengine (or a JSON-lines log).

    A ``tools/test.py`` file (``{"config", "checkpoint", "metrics"}``) gives its
    ``metrics`` object; mmengine's files are read as they are.

    Args:
        path (str): A JSON file or a work directory (see :func:`find_result_json`).

    Returns:
        dict: The metrics record.

    Raises:
        ResultsError: If the file is not JSON or holds no box AP, mask AP, mIoU or top-1.
    """
    file = find_result_json(path)
    with open(file, encoding='utf-8') as f:
        text = f.read()
    records: List[dict] = []
    try:
        data = json.loads(text)
        records = [data] if isinstance(data, dict) else [r for r in data if isinstance(r, dict)]
    except json.JSONDecodeError:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ResultsError(f'{file}: line {n} is not JSON ({err})') from err
            if isinstance(record, dict):
                records.append(record)
    records = [_metrics_of(r) for r in records]
    with_metrics = [r for r in records if _has_metric(r)]
    if not with_metrics:
        raise ResultsError(f'{file}: no coco/bbox_mAP, coco/segm_mAP, mIoU or accuracy/top1 '
                           f'in it (keys: {sorted(records[-1]) if records else []})')
    return with_metrics[-1]


def reproduced_cell(metrics: Dict[str, object]) -> str:
    """The "Reproduced here" cell: percentages with one decimal.

    COCO AP (fractions in mmdet's output) is multiplied by 100; mIoU and top-1 are already
    percentages. Box and mask AP together read ``box / mask``.

    Args:
        metrics (dict): A record from :func:`load_metrics`.

    Returns:
        str: e.g. ``'40.3 box AP'``, ``'39.6 box / 37.2 mask AP'``, ``'45.2 mIoU'``,
        ``'79.6 top-1'``.
    """
    found: Dict[str, float] = {}
    for key, value in metrics.items():
        name = _metric_key(key)
        if name is not None and isinstance(value, (int, float)):
            found[name] = float(value)
    if 'bbox_mAP' in found and 'segm_mAP' in found:
        return (f"{100 * found['bbox_mAP']:.1f} box / {100 * found['segm_mAP']:.1f} "
                'mask AP')
    if 'bbox_mAP' in found:
        return f"{100 * found['bbox_mAP']:.1f} box AP"
    if 'segm_mAP' in found:
        return f"{100 * found['segm_mAP']:.1f} mask AP"
    if 'mIoU' in found:
        return f"{found['mIoU']:.1f} mIoU"
    if 'top1' in found:
        return f"{found['top1']:.1f} top-1"
    raise ResultsError(f'no numeric box AP, mask AP, mIoU or top-1 in {metrics}')


def table_row(config: str, metrics: Dict[str, object]) -> str:
    """One README row for ``config`` with its reproduced result.

    Args:
        config (str): Path of the config that was tested.
        metrics (dict): A record from :func:`load_metrics`.

    Returns:
        str: The Markdown row.
    """
    stem = osp.splitext(osp.basename(config))[0]
    method, backbone, params, paper = KNOWN_CONFIGS.get(stem, ('-', '-', '-', '-'))
    return (f'| {method} | {backbone} | [{stem}]({config}) | {params} | {paper} | '
            f'{reproduced_cell(metrics)} |')


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('pairs', nargs='+', metavar='CONFIG RESULT',
                        help='config path followed by its result JSON or work dir')
    args = parser.parse_args(argv)
    if len(args.pairs) % 2:
        parser.error(f'expected CONFIG RESULT pairs, got {len(args.pairs)} arguments: '
                     f'{args.pairs}')
    rows = [HEADER]
    for config, result in zip(args.pairs[::2], args.pairs[1::2]):
        try:
            rows.append(table_row(config, load_metrics(result)))
        except ResultsError as err:
            parser.exit(1, f'error: {err}\n')
    print('\n'.join(rows))


if __name__ == '__main__':
    main()
