"""Train a detector, segmentor or classifier from an OpenMMLab config (scope from its
``default_scope``) with mmengine's runner, plus: safe checkpoint loading, atomic checkpoints
and saved random generators (a killed run resumes exactly), ``--resume`` falling back to the
previous good checkpoint, ``load_from`` downloads read safely, the datasets checked first,
``--amp`` / ``--no-amp`` on any device, ``--launcher`` on CPU-only machines (gloo).

    python tools/train.py configs/retinanet_rest_small_coco.py
    python tools/train.py CONFIG --work-dir work_dirs/x --resume            # latest
    python tools/train.py CONFIG --resume work_dirs/x/iter_4000.pth --amp
    python tools/train.py CONFIG --cfg-options train_dataloader.batch_size=4
    bash tools/dist_train.sh CONFIG 8                                       # 8 GPUs
"""
import argparse
import logging
import os.path as osp
import sys
from typing import List, Optional

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # mmrest of this clone


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Command line of the training tool (``argv`` defaults to ``sys.argv``)."""
    from mmrest.engine import add_common_tool_arguments, parse_tool_arguments
    parser = argparse.ArgumentParser(description='Train a model from an OpenMMLab config')
    parser.add_argument('config')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument('--resume', nargs='?', const='auto', help='resume from this '
                        'checkpoint; without a path, from the latest of the work dir (or '
                        'the previous good one if it is damaged)')
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument('--amp', action='store_true', help='mixed precision: float16 '
                           '(+loss scaling) on CUDA, bfloat16 on the CPU')
    precision.add_argument('--no-amp', action='store_true', help='float32 with a plain '
                           'OptimWrapper, also where the config asks for AmpOptimWrapper')
    parser.add_argument('--auto-scale-lr', action='store_true', help='scale the learning '
                        'rate with the total batch size (auto_scale_lr.base_batch_size)')
    add_common_tool_arguments(parser)
    return parse_tool_arguments(parser, argv)


def build_config(args: argparse.Namespace):
    """The config of the runner: the file with the command line applied."""
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
        _warn('AmpOptimWrapper needs a GPU: using mmrest.CPUAmpOptimWrapper (bfloat16 '
              'autocast on cpu)', logging.INFO)

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


def _warn(msg: str, level: int = logging.WARNING) -> None:
    from mmengine.logging import print_log
    print_log(msg, logger='current', level=level)


def main(argv: Optional[List[str]] = None) -> None:
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
