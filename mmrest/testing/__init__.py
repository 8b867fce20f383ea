"""Synthetic data for the demo, the tests and quick experiments.

Not imported by ``import mmrest`` (it needs OpenCV, pycocotools and, for the box
overlaps of the generator, mmdet); import it explicitly.
"""
from .synthetic_shapes import (CLASS_COLORS, DEMO_CLASSES, GENERATOR_VERSION, SHAPES,
                               generate_shapes_dataset, read_generator_settings,
                               render_shapes_image)

__all__ = [
    'CLASS_COLORS', 'DEMO_CLASSES', 'GENERATOR_VERSION', 'SHAPES', 'generate_shapes_dataset',
    'read_generator_settings', 'render_shapes_image'
]
