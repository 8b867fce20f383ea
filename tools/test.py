"""Evaluate a checkpoint with an OpenMMLab config (scope from its ``default_scope``). The
checkpoint is checked and read safely; the metrics go to ``<work dir>/test_metrics.json``
(or ``--metrics-out``) as ``{"config", "checkpoint", "metrics"}``.

    python tools/test.py configs/retinanet_rest_small_coco.py work_dirs/x/epoch_12.pth
    python tools/test.py CONFIG CKPT --out results.pkl --show-dir vis/
    bash tools/dist_test.sh CONFIG CKPT 8
"""
import argparse
import logging
import os
import os.path as osp
import sys
from typing import Any, Dict, List, Optional

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # mmrest of this clone


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Command line of the test tool (``argv`` defaults to ``sys.argv``)."""
    from mmrest.engine import add_common_tool_arguments, parse_tool_arguments
    parser = argparse.ArgumentParser(description='Evaluate a checkpoint')
    parser.add_argument('config')
    parser.add_argument('checkpoint')
    parser.add_argument('--work-dir', help='the dir to save logs and metrics')
    parser.add_argument('--out', help='dump the predictions to a pickle file (.pkl)')
    parser.add_argument('--show', action='store_true', help='show the predictions')
    parser.add_argument('--show-dir', help='save pictures of the predictions here (for '
                        'detection, relative to the timestamped folder of the work dir)')
    parser.add_argument('--wait-time', type=float, default=2, help='the interval of show (s)')
    parser.add_argument('--metrics-out', help='JSON file of the metrics (default: '
                        '<work dir>/test_metrics.json)')
    add_common_tool_arguments(parser)
    args = parse_tool_arguments(parser, argv)
    if args.out is not None and not args.out.endswith(('.pkl', '.pickle')):
        parser.error(f'--out {args.out}: the dump file must be a .pkl or .pickle file')
    return args


def _enable_visualization(cfg, args: argparse.Namespace) -> None:
    hooks = cfg.get('default_hooks') or {}
    hook = hooks.get('visualization')
    if not isinstance(hook, dict):
        from mmrest.engine import ToolConfigError
        raise ToolConfigError('--show/--show-dir: the config has no '
                              'default_hooks.visualization hook')
    hook_type = str(hook.get('type', '')).split('.')[-1]
    mmpretrain = hook_type == 'VisualizationHook'
    hook['enable' if mmpretrain else 'draw'] = True
    if args.show:
        hook.update(show=True, wait_time=args.wait_time)
    if args.show_dir and mmpretrain:
        hook['out_dir'] = args.show_dir
    elif args.show_dir and hook_type == 'SegVisualizationHook':
        cfg.visualizer['save_dir'] = args.show_dir  # mmseg saves through the visualizer
    elif args.show_dir:  # mmdet's DetVisualizationHook
        hook['test_out_dir'] = args.show_dir


def build_config(args: argparse.Namespace):
    """The config of the runner: the file with the command line applied."""
    import mmrest  # noqa: F401  (registers mmrest.ResT, allows mmengine's checkpoint types)
    from mmrest.engine import checked_load_from, load_tool_config

    cfg = load_tool_config(args.config, args.cfg_options, args.launcher, args.work_dir)

    # an http(s) address is downloaded and then read like a local file, safely
    cfg.load_from = checked_load_from(args.checkpoint)
    cfg.resume = False

    if args.show or args.show_dir:
        _enable_visualization(cfg, args)
    return cfg


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Evaluate; returns the metrics."""
    args = parse_args(argv)
    from mmrest.engine import build_runner, check_data_config, init_cpu_distributed
    cfg = build_config(args)
    if not args.no_data_check:
        check_data_config(cfg, splits=('test', ), max_images=args.data_check_images)
    init_cpu_distributed(cfg, args.launcher)

    from mmengine.dist import is_main_process
    runner = build_runner(cfg)

    if args.out is not None:
        if cfg.default_scope == 'mmdet':
            from mmdet.evaluation import DumpDetResults
            dump = DumpDetResults(out_file_path=args.out)
        else:
            from mmengine.evaluator import DumpResults
            dump = DumpResults(out_file_path=args.out)
        runner.test_evaluator.metrics.append(dump)

    metrics = runner.test()
    if is_main_process():
        out = args.metrics_out or osp.join(cfg.work_dir, 'test_metrics.json')
        os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
        record = dict(
            config=osp.abspath(args.config), checkpoint=args.checkpoint, metrics=metrics)
        import mmengine

        from mmrest.utils import atomic_write
        text = mmengine.dump(record, file_format='json', indent=2)
        atomic_write(out, lambda f: f.write(text), mode='w')
        from mmengine.logging import print_log
        print_log(f'metrics written to {out}', logger='current', level=logging.INFO)
    return metrics


if __name__ == '__main__':
    from mmrest.engine import run_tool_cli
    run_tool_cli(main, osp.basename(__file__))
