"""Where the code paths part: how the attention runs (:func:`attend`), in which layout the
convolutions run (:func:`cpu_channels_last`) and where the LayerNorm + MLP runs in blocks
of tokens (:func:`blocked_norm_mlp`). Every other module computes one way."""
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .emsa_ops import autocast_dtype, emsa_dense, emsa_lean, emsa_reference, trace_friendly

#: The values of ``attn_impl`` (:mod:`.emsa_ops`); ``'fused'``, the former name of
#: ``'lean'``, is accepted for it.
ATTN_IMPLS = ('lean', 'dense', 'reference')


def has_hooks(*modules: nn.Module) -> bool:
    """Whether calling these modules would run hooks, their own or global ones."""
    from torch.nn.modules import module as module_globals
    tables = [module_globals._global_forward_hooks, module_globals._global_forward_pre_hooks,
              module_globals._global_backward_hooks, module_globals._global_backward_pre_hooks]
    for m in modules:
        tables += (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks,
                   m._backward_pre_hooks)
    return any(tables)


def runs_as_written(module: nn.Module, cls: type) -> bool:
    """Whether ``module``'s parameters may stand in for calling it: a plain ``cls`` (not
    a subclass, e.g. a quantization-aware variant) whose call would run no hook."""
    return type(module) is cls and not has_hooks(module)


def cpu_channels_last(x: Tensor) -> bool:
    """Whether the convolutions on ``x`` run on channels-last maps: CPU tensors in eager
    mode (oneDNN is fastest in that layout, and token maps convert to it for free)."""
    return x.device.type == 'cpu' and not trace_friendly()


def map_to_tokens(x: Tensor) -> Tensor:
    """(B, C, H, W) map -> contiguous (B, H * W, C) tokens (free for a channels-last map)."""
    return x.flatten(2).transpose(1, 2).contiguous()


def tokens_to_map(tokens: Tensor, hw_shape: Tuple[int, int]) -> Tensor:
    """(B, H * W, C) tokens -> (B, C, H, W) map: a channels-last view where
    :func:`cpu_channels_last`, else a contiguous NCHW copy."""
    B, _, C = tokens.shape
    if cpu_channels_last(tokens):
        return tokens.reshape(B, *hw_shape, C).permute(0, 3, 1, 2)
    return tokens.transpose(1, 2).reshape(B, C, *hw_shape).contiguous()


def stem_layout(x: Tensor) -> Tensor:
    """Images in the layout the stem's convolutions run in (:func:`cpu_channels_last`)."""
    if cpu_channels_last(x):
        return x.contiguous(memory_format=torch.channels_last)
    return x


def attend(q: Tensor, k: Tensor, v: Tensor, scale: float, impl: str = 'lean',
           transform: Optional[nn.Module] = None, attn_drop: float = 0.,
           training: bool = False) -> Tensor:
    """The attention core of EMSA and EMSAv2 (arguments and result as
    :func:`~.emsa_ops.emsa_reference`), as ``impl`` (one of :data:`ATTN_IMPLS`) names it.
    The reference also runs for attention dropout while training and for a head-mixing
    ``transform`` that is not a plain hook-free ``nn.Conv2d``; while a graph is recorded,
    ``'lean'`` runs as ``'dense'``."""
    if (impl == 'reference' or (training and attn_drop > 0)
            or (transform is not None and not runs_as_written(transform, nn.Conv2d))):
        return emsa_reference(q, k, v, scale, attn_drop=attn_drop, training=training,
                              transform=transform)
    weight = None if transform is None else transform.weight
    bias = None if transform is None else transform.bias
    if impl == 'dense' or trace_friendly():
        return emsa_dense(q, k, v, scale, weight, bias)
    return emsa_lean(q, k, v, scale, weight, bias)


def blocked_norm_mlp(x: Tensor, norm: nn.Module, mlp: nn.Module) -> bool:
    """Whether ``mlp(norm(x))`` runs as :func:`~.norm_mlp.norm_mlp`: float32/float64 CPU
    tensors in eager mode outside autocast, plain affine LayerNorm, linears with biases
    and exact GELU, no active dropout, no hooks."""
    fc1, act, fc2 = (getattr(mlp, name, None) for name in ('fc1', 'act', 'fc2'))
    return (x.device.type == 'cpu' and not trace_friendly()
            and x.dtype in (torch.float32, torch.float64) and autocast_dtype('cpu') is None
            and type(norm) is nn.LayerNorm and norm.elementwise_affine
            and norm.bias is not None and len(norm.normalized_shape) == 1
            and type(act) is nn.GELU and act.approximate == 'none'
            and type(fc1) is nn.Linear and type(fc2) is nn.Linear
            and fc1.bias is not None and fc2.bias is not None
            and (not mlp.training or mlp.drop.p == 0)
            and not has_hooks(norm, *mlp.modules()))
