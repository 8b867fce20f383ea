"""Shared, cached ResT V2 models and weights of the ``test_restv2_*`` files.

The caches live for the whole test session (one process), so each model and each random
state dict is built once however many tests use it. Do not modify what they return:
copy it (``copy.deepcopy``) or build a fresh model.
"""
import functools
from typing import Dict, Tuple

import torch
from _backbone_helpers import backbone_part
from reference_rest_v2 import random_authors_state_dict

from mmrest.models import ResTV2

ARCHS = ('tiny', 'small', 'base', 'large')


@functools.lru_cache(maxsize=2)  # a few archs at a time: large weighs ~0.35 GB
def authors_state_dict(arch: str, seed: int = 0, out_norms: Tuple[int, ...] = (),
                       num_classes: int = 1000) -> Dict[str, torch.Tensor]:
    """Random weights in the authors' layout (see ``reference_rest_v2``)."""
    return random_authors_state_dict(arch, num_classes=num_classes, seed=seed,
                                     out_norms=out_norms)


@functools.lru_cache(maxsize=2)  # a few archs at a time: large weighs ~0.35 GB
def eval_model(arch: str) -> ResTV2:
    """One ResTV2 per arch with the authors' initialisation, in eval mode (shapes only)."""
    torch.manual_seed(0)
    model = ResTV2(arch, drop_path_rate=0.)
    model.init_weights()
    return model.eval()


def model_with_authors_weights(arch: str, seed: int = 0, dtype=torch.float64,
                               **kwargs) -> Tuple[ResTV2, Dict[str, torch.Tensor]]:
    """A fresh ResTV2 holding random authors'-layout weights, loaded with
    ``strict=True`` (so the key names are the authors'), in eval mode and ``dtype``;
    returns the model and the state dict (in ``dtype``, head included)."""
    kwargs.setdefault('drop_path_rate', 0.)
    model = ResTV2(arch, **kwargs)
    out_norms = tuple(i for i in model.out_indices if i < 3)
    sd = authors_state_dict(arch, seed, out_norms)
    model.load_state_dict(backbone_part(sd), strict=True)
    model.to(dtype)
    return model.eval(), {k: v.to(dtype) if v.is_floating_point() else v
                          for k, v in sd.items()}
