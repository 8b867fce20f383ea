"""Train a detector, segmentor or classifier from an OpenMMLab config (with mmrest models).

The scope (mmdet, mmseg or mmpretrain) comes from the config's ``default_scope``. On top
of mmengine's runner, this tool

* loads checkpoints safely on torch >= 2.6 (``import mmrest`` allows exactly the types
  mmengine writes; see ``mmrest.utils.checkpoint``);
* writes checkpoints atomically and keeps the previous one
  (``mmrest.AtomicCheckpointHook``), and saves/restores the random generators
  (``mmrest.RNGStateHook``), so a killed run resumes exactly;
* ``--resume`` checks the checkpoint (CRC of every record, safe unpickling) and falls
  back to the previous good one when the newest is damaged, saying which file is bad;
  with nothing to resume yet, the config's ``load_from`` is loaded as without ``--resume``;
* ``load_from`` at an ``http(s)://`` address is downloaded first and then read like a
  local file (mmengine would unpickle the download with ``weights_only=False``);
* checks the datasets of the config before building anything (paths, COCO JSON, a
  sample of images);
* ``--amp``: float16 autocast with loss scaling on CUDA, bfloat16 autocast on the CPU;
  a config that asks for ``AmpOptimWrapper`` gets the CPU's bfloat16 wrapper on a machine
  without CUDA;
* ``--no-amp``: float32, mmengine's plain ``OptimWrapper`` on any device, also for a config
  that asks for ``AmpOptimWrapper`` (e.g. the ResT V2 detectors; bfloat16 Mask R-CNN
  training fails in mmcv's CPU ``nms``);
* ``--launcher pytorch|slurm`` also works on CPU-only machines (gloo).

Examples::

    python tools/train.py configs/retinanet_rest_small_coco.py
    python tools/train.py CONFIG --work-dir work_dirs/x --resume            # latest
    python tools/train.py CONFIG --resume work_dirs/x/iter_4000.pth --amp
    python tools/train.py configs/mask_rcnn_restv2_tiny_3x_coco.py --no-amp    # fp32
    python tools/train.py CONFIG --cfg-options train_dataloader.batch_size=4
    bash tools/dist_train.sh CONFIG 8                                       # 8 GPUs
"""
import argparse
import logging
import os.path as osp
import sys
from typing import List, Optional

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Command line of the training tool (``argv`` defaults to ``sys.argv``)."""
    from mmrest.engine import add_common_tool_arguments, parse_tool_arguments
    parser = argparse.ArgumentParser(description='Train a model from an OpenMMLab config')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument(
        '--resume',
        nargs='?',
        type=str,
        const='auto',
        help='resume from the given checkpoint; without a path, from the latest '
        'checkpoint of the work dir (falling back to the previous good one if it is '
        'damaged)')
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument(
        '--amp',
        action='store_true',
        default=False,
        help='automatic mixed precision: float16 (+loss scaling) on CUDA, bfloat16 on CPU')
    precision.add_argument(
        '--no-amp',
        action='store_true',
        default=False,
        help='train in float32 with a plain OptimWrapper, also when the config asks for '
        'AmpOptimWrapper (which without CUDA otherwise becomes bfloat16 autocast)')
    parser.add_argument(
        '--auto-scale-lr',
        action='store_true',
        help='scale the learning rate linearly with the total batch size '
        '(auto_scale_lr.base_batch_size in the config)')
    add_common_tool_arguments(parser)
    return parse_tool_arguments(parser, argv)


def build_config(args: argparse.Namespace):
    """Load the config and apply the command line to it.

    Args:
        args (argparse.Namespace): From :func:`parse_args`.

    Returns:
        Config: The config to build the runner from.
    """
    import mmrest  # noqa: F401  (registers mmrest.ResT, allows mmengine's checkpoint types)
    from mmrest.engine import (apply_reliability_hooks, check_resume_path, checked_load_from,
                               checkpoint_templates, configure_amp, cpu_amp_config_fix,
                               disable_amp, find_resume_checkpoint, load_tool_config,
                               prepare_compile)
    from mmrest.engine.config import ToolConfigError

    cfg = load_tool_config(args.config, args.cfg_options, args.launcher, args.work_dir)

    apply_reliability_hooks(cfg)
    prepare_compile(cfg)  # compile=True: optimizer groups dynamo can trace

    if args.amp:
        from mmengine.logging import MMLogger
        configure_amp(cfg, logger=MMLogger.get_current_instance())  # logs dtype and device
    elif args.no_amp:
        from mmengine.logging import MMLogger
        disable_amp(cfg, logger=MMLogger.get_current_instance())  # logs what it changed
    elif cpu_amp_config_fix(cfg):
        _info('AmpOptimWrapper needs a GPU: using mmrest.CPUAmpOptimWrapper (bfloat16 '
              'autocast on cpu)')

    if args.auto_scale_lr:
        scale = cfg.get('auto_scale_lr')
        if isinstance(scale, dict) and 'base_batch_size' in scale:
            cfg.auto_scale_lr.enable = True
        else:
            raise ToolConfigError('--auto-scale-lr: the config has no '
                                  'auto_scale_lr.base_batch_size')

    templates = checkpoint_templates(cfg)
    if args.resume == 'auto' or (args.resume is None and cfg.get('resume', False)
                                 and cfg.get('load_from') is None):
        found = find_resume_checkpoint(cfg.work_dir, templates, log=_warn)
        cfg.resume = found is not None
        if found is not None:
            cfg.load_from = found
        elif cfg.get('load_from'):
            # the first run of a job that is always started with --resume (a requeued
            # Slurm job): the config's weights are still its starting point
            _warn(f'--resume: no checkpoint in {cfg.work_dir}; training starts from '
                  f'iteration 0 with the weights of load_from={cfg.load_from}')
            cfg.load_from = checked_load_from(cfg.load_from)
        else:
            _warn(f'--resume: no checkpoint in {cfg.work_dir}; training starts from '
                  f'iteration 0')
    elif args.resume is not None:
        cfg.resume = True
        cfg.load_from = check_resume_path(args.resume, templates)
    elif cfg.get('resume', False) and cfg.get('load_from'):
        check_resume_path(cfg.load_from, templates)
    elif cfg.get('load_from'):
        cfg.load_from = checked_load_from(cfg.load_from)
    return cfg


def _warn(msg: str) -> None:
    from mmengine.logging import print_log
    print_log(msg, logger='current', level=logging.WARNING)


def _info(msg: str) -> None:
    from mmengine.logging import print_log
    print_log(msg, logger='current', level=logging.INFO)


def main(argv: Optional[List[str]] = None) -> None:
    """Train.

    Args:
        argv (list[str], optional): Command line. Defaults to None (``sys.argv``).
    """
    args = parse_args(argv)
    from mmrest.engine import build_runner, check_data_config, init_cpu_distributed
    cfg = build_config(args)
    if not args.no_data_check:
        check_data_config(cfg, splits=('train', 'val'), max_images=args.data_check_images)
    init_cpu_distributed(cfg, args.launcher)

    runner = build_runner(cfg)
    runner.train()


if __name__ == '__main__':
    from mmrest.engine import run_tool_cli
    run_tool_cli(main, osp.basename(__file__))
