"""Conversion of ResT and ResT V2 checkpoints of every published layout (the authors'
ImageNet files, detectron2 detectors and mmseg 0.x segmentors; OpenMMLab, DDP and plain
state dicts: docs/checkpoints.md) to the backbones' keys. The authors' output norms of
stages 1-3 become ``norm1``-``norm3``, that of stage 4 the final ``norm``.
"""
import re
from collections import OrderedDict
from typing import Dict, Mapping, Optional

import torch

#: Prefixes stripped, in this order, from the keys of a whole-model checkpoint. The bare
#: ``bottom_up.`` is what the backbone's load hook sees of a detectron2 key under the
#: detector's ``backbone.`` prefix.
BACKBONE_PREFIXES = ('module.', 'backbone.bottom_up.', 'backbone.', 'bottom_up.')

# A key of the ResT / ResT V2 backbone itself (after the prefixes are stripped).
_BACKBONE_KEY = re.compile(r'^(stem|patch_embed_[234]|patch_[234]|stage[1-4]|norm[123]?)\.')
# The authors' ResT V2 output norms: ``norm_1.0.`` (detectron2), ``norm_1.`` (mmseg 0.x).
_AUTHORS_OUT_NORM = re.compile(r'^norm_([1-4])\.(?:0\.)?')
# Keys found in one version only.
_VERSION_KEYS = {
    'ResT': re.compile(r'^(stem\.conv[123]\.|patch_embed_[234]\.|stage[1-4]\.\d+\.attn\.'
                       r'transform_conv\.)'),
    'ResTV2': re.compile(r'^(stem\.proj\.|patch_[234]\.|stage[1-4]\.\d+\.attn\.up(_norm)?\.)'),
}
# The classifier's linear head: the authors' ``head.*``, mmpretrain's ``head.fc.*``.
_CLS_HEAD_KEY = re.compile(r'^(?:module\.)?head\.(?:fc\.)?(weight|bias)$')


def normalize_rest_key(key: str) -> Optional[str]:
    """The backbone's key (e.g. ``'stage1.0.attn.q.weight'``) of a checkpoint key of any
    supported layout, or None if it is not one."""
    for prefix in BACKBONE_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
    key = _AUTHORS_OUT_NORM.sub(
        lambda m: 'norm.' if m.group(1) == '4' else f'norm{m.group(1)}.', key)
    return key if _BACKBONE_KEY.match(key) else None


def rest_checkpoint_family(state_dict: Mapping) -> Optional[str]:
    """``'ResT'`` or ``'ResTV2'``, by the backbone keys only one has; None where neither's
    keys (or both's) are found."""
    keys = [normalize_rest_key(str(k)) or '' for k in state_dict]
    found = [name for name, pattern in _VERSION_KEYS.items()
             if any(pattern.match(k) for k in keys)]
    return found[0] if len(found) == 1 else None


def check_rest_family(state_dict: Mapping, family: str) -> None:
    """Refuse (``ValueError``) the weights of the other ResT version than ``family``."""
    found = rest_checkpoint_family(state_dict)
    if found is not None and found != family:
        example = next(k for k in state_dict
                       if _VERSION_KEYS[found].match(normalize_rest_key(str(k)) or ''))
        raise ValueError(f'it holds {found} weights (keys such as {example!r}), but the '
                         f'model is a {family}: use a {found} backbone or {family} weights')


def unwrap_checkpoint(checkpoint: Mapping) -> Mapping:
    """The ``state_dict`` or ``model`` entry of a loaded checkpoint, or the checkpoint."""
    if not isinstance(checkpoint, Mapping):
        raise TypeError('a ResT checkpoint must be a dict of tensors or a dict with '
                        f"'state_dict' or 'model', got {type(checkpoint).__name__}")
    for field in ('state_dict', 'model'):
        inner = checkpoint.get(field)
        if isinstance(inner, Mapping):
            return inner
    return checkpoint


def convert_rest_checkpoint(checkpoint: Mapping,
                            target: str = 'backbone') -> Dict[str, torch.Tensor]:
    """Convert a ResT or ResT V2 checkpoint of any supported layout.

    Args:
        checkpoint (Mapping): The loaded checkpoint (see the module docstring).
        target (str): ``'backbone'`` for the keys of :class:`mmrest.models.ResT` and
            :class:`mmrest.models.ResTV2`, or
            ``'classifier'`` for an mmpretrain ``ImageClassifier`` with a
            ``LinearClsHead`` (``backbone.*`` and ``head.fc.*``). Defaults to 'backbone'.

    Returns:
        OrderedDict[str, Tensor]: The converted state dict.

    Raises:
        TypeError: If the checkpoint is not a mapping or holds non-tensor weights.
        ValueError: If no ResT weight is found, if two keys of other layouts give one
            key different weights, or ``target`` is unknown.
    """
    if target not in ('backbone', 'classifier'):
        raise ValueError(f"target must be 'backbone' or 'classifier', got {target!r}")
    state_dict = unwrap_checkpoint(checkpoint)
    out: Dict[str, torch.Tensor] = OrderedDict()
    sources: Dict[str, str] = {}
    for key, value in state_dict.items():
        new_key = normalize_rest_key(key)
        head_key = _CLS_HEAD_KEY.match(key)
        if new_key is None and not (target == 'classifier' and head_key):
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(f'checkpoint entry {key!r} is a {type(value).__name__}, '
                            'not a tensor')
        if new_key is not None:
            new_key = 'backbone.' + new_key if target == 'classifier' else new_key
        else:
            new_key = 'head.fc.' + head_key.group(1)
        kept = out.get(new_key)
        if kept is not None and not (kept.shape == value.shape and kept.dtype == value.dtype
                                     and torch.equal(kept, value)):
            raise ValueError(f'the checkpoint has two different weights for {new_key!r}: '
                             f'{sources[new_key]!r} and {key!r}')
        out[new_key] = value
        sources[new_key] = key
    if not any(normalize_rest_key(k) for k in state_dict):
        sample = ', '.join(list(map(str, state_dict))[:5]) or '<empty>'
        raise ValueError('no ResT backbone weights found in the checkpoint (expected keys '
                         "like 'stem.conv1.weight', 'stem.proj.0.weight' or "
                         "'stage1.0.attn.q.weight', with an optional 'backbone.' or "
                         f"'module.' prefix); its keys start: {sample}")
    return out
