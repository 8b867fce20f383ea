"""Rows of the README results table from the metrics of a test run.

    python tools/analysis/results_table.py CONFIG RESULT [CONFIG RESULT ...]

``RESULT`` is a JSON file or a work directory: its ``test_metrics.json`` (tools/test.py:
``{"config", "checkpoint", "metrics"}``), else its newest ``<timestamp>/<timestamp>.json``
(mmengine's runner: the metrics themselves). JSON-lines logs give their last record with a
metric. COCO AP (mmdet's fractions) is printed in percent, mIoU and top-1 as they are.
"""
import argparse
import json
import os
import os.path as osp
import re
from typing import Dict, Optional, Sequence, Tuple

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
TEST_METRICS_FILE = 'test_metrics.json'  # tools/test.py's, unless --metrics-out
METRICS = ('bbox_mAP', 'segm_mAP', 'mIoU', 'top1')


class ResultsError(ValueError):
    """A results file that cannot be read or holds no known metric."""


def find_result_json(path: str) -> str:
    """``path`` if it is a file, else the result file of that work directory."""
    if osp.isfile(path):
        return path
    if not osp.isdir(path):
        raise ResultsError(f'{path}: no such file or directory')
    if osp.isfile(osp.join(path, TEST_METRICS_FILE)):
        return osp.join(path, TEST_METRICS_FILE)
    runs = sorted(d for d in os.listdir(path)
                  if _TIMESTAMP.match(d) and osp.isfile(osp.join(path, d, f'{d}.json')))
    if not runs:
        raise ResultsError(f'{path}: no {TEST_METRICS_FILE} (written by tools/test.py) '
                           'nor <timestamp>/<timestamp>.json (written by mmengine\'s runner) '
                           'in this directory')
    return osp.join(path, runs[-1], f'{runs[-1]}.json')


def _metric_key(key: str) -> Optional[str]:
    return next((n for n in METRICS if key == n or key.endswith('/' + n)), None)


def load_metrics(path: str) -> Dict[str, object]:
    """The last record with a box AP, mask AP, mIoU or top-1 of a file (or work dir)."""
    file = find_result_json(path)
    with open(file, encoding='utf-8') as f:
        text = f.read()
    try:
        data = json.loads(text)
        records = [data] if isinstance(data, dict) else data if isinstance(data, list) else []
    except json.JSONDecodeError:
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            try:
                records += [json.loads(line)] if line.strip() else []
            except json.JSONDecodeError as err:
                raise ResultsError(f'{file}: line {n} is not JSON ({err})') from err
    records = [r.get('metrics') if isinstance(r.get('metrics'), dict) else r
               for r in records if isinstance(r, dict)]
    with_metrics = [r for r in records if any(_metric_key(k) for k in r)]
    if not with_metrics:
        raise ResultsError(f'{file}: no coco/bbox_mAP, coco/segm_mAP, mIoU or accuracy/top1 '
                           f'in it (keys: {sorted(records[-1]) if records else []})')
    return with_metrics[-1]


def reproduced_cell(metrics: Dict[str, object]) -> str:
    """E.g. ``'40.3 box AP'``, ``'39.6 box / 37.2 mask AP'``, ``'45.2 mIoU'``, ``'79.6 top-1'``."""
    found = {_metric_key(k): float(v) for k, v in metrics.items()
             if _metric_key(k) and isinstance(v, (int, float))}
    if 'bbox_mAP' in found and 'segm_mAP' in found:
        return f"{100 * found['bbox_mAP']:.1f} box / {100 * found['segm_mAP']:.1f} mask AP"
    for name, scale, unit in (('bbox_mAP', 100, 'box AP'), ('segm_mAP', 100, 'mask AP'),
                              ('mIoU', 1, 'mIoU'), ('top1', 1, 'top-1')):
        if name in found:
            return f'{scale * found[name]:.1f} {unit}'
    raise ResultsError(f'no numeric box AP, mask AP, mIoU or top-1 in {metrics}')


def table_row(config: str, metrics: Dict[str, object]) -> str:
    """The README row of ``config`` with its reproduced result."""
    stem = osp.splitext(osp.basename(config))[0]
    method, backbone, params, paper = KNOWN_CONFIGS.get(stem, ('-', '-', '-', '-'))
    return (f'| {method} | {backbone} | [{stem}]({config}) | {params} | {paper} | '
            f'{reproduced_cell(metrics)} |')


def main(argv: Optional[Sequence[str]] = None) -> None:
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
