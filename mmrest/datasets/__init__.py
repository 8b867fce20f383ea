"""Datasets of mmrest: a synthetic COCO-format shapes generator for quick experiments.

Not imported by ``import mmrest`` (it needs numpy and OpenCV); import it explicitly.
"""
from .synthetic_shapes import (CLASS_COLORS, DEMO_CLASSES, SHAPES, generate_shapes_dataset,
                               mask_to_rle, read_generator_settings, render_shapes_image,
                               rle_to_mask)

__all__ = [
    'CLASS_COLORS', 'DEMO_CLASSES', 'SHAPES', 'generate_shapes_dataset', 'mask_to_rle',
    'read_generator_settings', 'render_shapes_image', 'rle_to_mask'
]
