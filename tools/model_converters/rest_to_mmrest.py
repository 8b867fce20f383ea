"""Convert a ResT or ResT V2 checkpoint of any supported layout to a plain tensor state dict.

Understood layouts (see :func:`mmrest.models.utils.convert_rest_checkpoint`, the same
conversion the backbones' ``init_cfg=dict(type='Pretrained', ...)`` uses): the authors'
ImageNet files (``{'model': state_dict}``, https://github.com/wofmanaf/ResT), their
detectron2 detectors (``backbone.bottom_up.``; ResT V2 output norms ``norm_1.0`` ...), their
mmseg 0.x ResT V2 segmentors (``backbone.``, ``norm_1`` ...), mmdet/mmseg/mmpretrain
checkpoints (``{'state_dict': ...}`` with ``backbone.``), DDP files (``module.``) and plain
state dicts. The output says which family (ResT or ResTV2) the weights are of.

The input is loaded with ``torch.load(weights_only=True)``: a file holding anything but
tensors and plain containers is refused, never unpickled. The output is written
atomically (temporary file, fsync, rename).

Examples::

    # backbone weights (keys ``stem.conv1.weight`` ...), for ResT(init_cfg=Pretrained)
    python tools/model_converters/rest_to_mmrest.py rest_small.pth rest_small_mm.pth
    # the same for ResT V2 (keys ``stem.proj.0.weight`` ...)
    python tools/model_converters/rest_to_mmrest.py restv2_tiny_224.pth restv2_tiny.pth
    # an mmpretrain ImageClassifier with a LinearClsHead (``backbone.*``, ``head.fc.*``)
    python tools/model_converters/rest_to_mmrest.py rest_small.pth cls.pth --target classifier
"""
import argparse
import os
import os.path as osp
import sys
from typing import List, Optional

from mmrest.models.utils import convert_rest_checkpoint, rest_checkpoint_family
from mmrest.utils import CheckpointError, atomic_torch_save, safe_load_checkpoint


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse the command line.

    Args:
        argv (list[str], optional): Arguments without the program name; None reads
            ``sys.argv``. Defaults to None.

    Returns:
        argparse.Namespace: ``src``, ``dst`` and ``target``.
    """
    parser = argparse.ArgumentParser(
        description='Convert a ResT or ResT V2 checkpoint (authors\' ImageNet, detectron2 '
        'or mmseg 0.x file, mmdet/mmseg/mmpretrain checkpoint, DDP file or plain state '
        'dict) to a plain tensor state dict for mmrest.')
    parser.add_argument('src', help='input checkpoint file')
    parser.add_argument('dst', help='output file (a dict of tensors, written atomically)')
    parser.add_argument(
        '--target',
        choices=['backbone', 'classifier'],
        default='backbone',
        help="'backbone': keys of mmrest.ResT / mmrest.ResTV2 (for "
        "init_cfg=dict(type='Pretrained')); "
        "'classifier': keys of an mmpretrain ImageClassifier with a LinearClsHead "
        "('backbone.*', 'head.fc.*'). Default: backbone")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    """Run the conversion.

    Args:
        argv (list[str], optional): Arguments without the program name; None reads
            ``sys.argv``. Defaults to None.

    Returns:
        int: 0 on success, 1 on a bad input file (the reason goes to stderr).
    """
    args = parse_args(argv)
    if osp.abspath(args.src) == osp.abspath(args.dst):
        print(f'error: refusing to overwrite the input {args.src}; choose another output',
              file=sys.stderr)
        return 1
    try:
        checkpoint = safe_load_checkpoint(args.src)
        state_dict = convert_rest_checkpoint(checkpoint, target=args.target)
    except (FileNotFoundError, CheckpointError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 1
    except (TypeError, ValueError) as err:
        print(f'error: {args.src}: {err}', file=sys.stderr)
        return 1
    try:
        os.makedirs(osp.dirname(osp.abspath(args.dst)), exist_ok=True)
        atomic_torch_save(state_dict, args.dst)
    except OSError as err:
        print(f'error: cannot write {args.dst}: {err}', file=sys.stderr)
        return 1
    num_params = sum(v.numel() for v in state_dict.values())
    family = rest_checkpoint_family(state_dict) or 'unknown family'
    print(f'{args.src} -> {args.dst}: {len(state_dict)} tensors '
          f'({num_params / 1e6:.2f} M values, {family}), target {args.target}')
    if args.target == 'classifier' and 'head.fc.weight' not in state_dict:
        print(f'warning: {args.src} has no classification head (head.weight or '
              'head.fc.weight); only the backbone was converted', file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())
