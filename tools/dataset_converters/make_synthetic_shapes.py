"""Write a synthetic COCO-format dataset of coloured shapes on textured backgrounds.

Boxes, instance masks (COCO RLE) and semantic label maps, deterministic by seed;
see :mod:`mmrest.testing.synthetic_shapes` for the layout. Examples::

    # the data of the built-in demo (configs/demo/retinanet_rest_lite_shapes.py)
    python tools/dataset_converters/make_synthetic_shapes.py

    # an easier variant: upright shapes, apart, one colour per class
    python tools/dataset_converters/make_synthetic_shapes.py --out-dir data/shapes_easy \\
        --no-rotate --max-overlap 0 --class-colors --classes circle square triangle

    # a harder one, larger and more crowded
    python tools/dataset_converters/make_synthetic_shapes.py --out-dir data/shapes_hard \\
        --num-train 5000 --img-size 256 320 --max-shapes 8 --size-range 0.08 0.3 \\
        --classes circle square triangle diamond hexagon star cross --max-overlap 0.4
"""
import argparse
import sys
import time
from typing import List, Optional

from mmrest.testing import DEMO_CLASSES, SHAPES, generate_shapes_dataset


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Write a synthetic COCO-format shapes dataset: out_dir/{train,val}/*.png,'
        ' out_dir/annotations/instances_{train,val}.json (boxes, RLE masks) and '
        'out_dir/semantic/{train,val}/*.png (0 = background, k = category id k).',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--out-dir', default='data/synthetic_shapes',
                        help='folder to write to')
    parser.add_argument('--num-train', type=int, default=1000, help='training images')
    parser.add_argument('--num-val', type=int, default=200, help='validation images')
    parser.add_argument('--img-size', type=int, nargs=2, default=[128, 128],
                        metavar=('H', 'W'), help='image height and width')
    parser.add_argument('--min-shapes', type=int, default=1, help='fewest shapes per image')
    parser.add_argument('--max-shapes', type=int, default=4, help='most shapes per image')
    parser.add_argument('--size-range', type=float, nargs=2, default=[0.15, 0.45],
                        metavar=('MIN', 'MAX'),
                        help='shape size as fractions of the shorter image side')
    parser.add_argument('--classes', nargs='+', default=list(DEMO_CLASSES),
                        choices=SHAPES, metavar='SHAPE',
                        help=f'one class per shape, from {list(SHAPES)}')
    parser.add_argument('--max-overlap', type=float, default=0.2,
                        help='largest box IoU between two shapes (0: apart; later shapes '
                        'may hide part of earlier ones)')
    parser.add_argument('--min-visible', type=float, default=0.6,
                        help='fraction of a shape that must stay visible under later ones')
    parser.add_argument('--rotate', action=argparse.BooleanOptionalAction, default=True,
                        help='rotate shapes by random angles')
    parser.add_argument('--class-colors', action=argparse.BooleanOptionalAction,
                        default=False,
                        help='one hue per class (much easier) instead of random colours')
    parser.add_argument('--noise-std', type=float, default=6.0, help='pixel noise std')
    parser.add_argument('--seed', type=int, default=0, help='random seed')
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    start = time.time()
    try:
        result = generate_shapes_dataset(
            args.out_dir, num_train=args.num_train, num_val=args.num_val,
            img_size=tuple(args.img_size), min_shapes=args.min_shapes,
            max_shapes=args.max_shapes, size_range=tuple(args.size_range),
            classes=args.classes, max_overlap=args.max_overlap,
            min_visible=args.min_visible, rotate=args.rotate,
            class_colors=args.class_colors, noise_std=args.noise_std, seed=args.seed)
    except (ValueError, KeyError, OSError) as err:
        print(f'make_synthetic_shapes: error: {err}', file=sys.stderr)
        return 2
    imgs, insts = result['num_images'], result['num_instances']
    print(f'wrote {imgs["train"]} train images ({insts["train"]} shapes) and {imgs["val"]} '
          f'val images ({insts["val"]} shapes) of {args.img_size[0]}x{args.img_size[1]} to '
          f'{args.out_dir} in {time.time() - start:.1f} s')
    print(f'annotations: {result["ann_file_train"]}, {result["ann_file_val"]}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
