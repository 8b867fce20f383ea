"""Checks and state-dict helpers shared by the ResT and ResT V2 tests."""
import math
from typing import Callable, Dict, List, Sequence

import torch

ATTN_IMPLS = ('lean', 'dense', 'reference')


def backbone_part(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The state dict without the classification head."""
    return {k: v for k, v in sd.items() if not k.startswith('head.')}


def double(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Float tensors of a state dict in float64 (others unchanged)."""
    return {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}


def expected_shapes(dims: Sequence[int], batch: int, h: int, w: int,
                    indices: Sequence[int] = (0, 1, 2, 3)) -> List[tuple]:
    """The (N, C, H, W) of the maps of stages ``indices``: strides 4, 8, 16, 32 (ceil)."""
    return [(batch, dims[i], math.ceil(h / 2**(i + 2)), math.ceil(w / 2**(i + 2)))
            for i in indices]


def shapes(outs) -> List[tuple]:
    return [tuple(o.shape) for o in outs]


def check_output_shapes(model, dims: Sequence[int], batch: int, h: int, w: int) -> list:
    """The model's maps of a random input have the expected shapes and finite values."""
    with torch.no_grad():
        outs = model(torch.randn(batch, 3, h, w))
    assert shapes(outs) == expected_shapes(dims, batch, h, w), (h, w)
    assert all(torch.isfinite(o).all() for o in outs)
    return outs


def check_authors_param_count(cls, arch: str, dims: Sequence[int], authors: int) -> None:
    """The backbone with the authors' 1000-class linear head has their parameter count;
    each extra output stage adds one LayerNorm (weight and bias)."""
    model = cls(arch, out_indices=(3, ))
    head = dims[-1] * 1000 + 1000
    assert sum(p.numel() for p in model.parameters()) + head == authors
    full = cls(arch, out_indices=(0, 1, 2, 3))
    extra = sum(p.numel() for p in full.parameters()) - sum(
        p.numel() for p in model.parameters())
    assert extra == 2 * sum(dims[:3])


def frozen_prefixes(frozen_stages: int, patch_prefix: str) -> List[str]:
    """Module names frozen by ``frozen_stages`` as documented (all outputs selected);
    ``patch_prefix``: the name of the patch embeddings of stages 2-4 without the stage."""
    names = ['stem'] if frozen_stages >= 0 else []
    for i in range(1, frozen_stages + 1):
        if i > 1:
            names.append(f'{patch_prefix}{i}')
        names += [f'stage{i}', 'norm' if i == 4 else f'norm{i}']
    return names


def is_frozen(name: str, prefixes: List[str]) -> bool:
    return any(name == p or name.startswith(p + '.') for p in prefixes)


def attn_impl_results(make_model: Callable, x: torch.Tensor) -> List[tuple]:
    """(loss, input gradient, parameter gradients) of a training step of the model of each
    attention implementation, the reference's last; ``make_model(impl)`` returns a model in
    the dtype of ``x``."""
    results = []
    for impl in ATTN_IMPLS:
        model = make_model(impl).train()
        inputs = x.clone().requires_grad_()
        loss = sum((o * o.detach().roll(1, 1)).sum() for o in model(inputs))
        loss.backward()
        grads: Dict[str, torch.Tensor] = {n: p.grad for n, p in model.named_parameters()}
        results.append((loss.detach(), inputs.grad, grads))
    return results


def check_as_accurate_as_the_oracle(outs, oracle32, truth, bound: float, where=()) -> None:
    """float32 maps are about as close to the float64 truth as the oracle's own float32
    maps: a few oracle errors, plus float32 rounding at the maps' scale (the order of the
    sums differs between CPUs (AVX2, AVX-512) and thread counts); and below ``bound``."""
    for i, (out, ref, true) in enumerate(zip(outs, oracle32, truth)):
        assert out.dtype == torch.float32
        err = (out.double() - true).abs().max().item()
        oracle_err = (ref.double() - true).abs().max().item()
        scale = true.abs().max().item()
        assert err < 4 * oracle_err + 64 * torch.finfo(torch.float32).eps * scale, \
            (*where, f'stage {i}: max abs error {err:.3g}, oracle in float32: {oracle_err:.3g}')
        assert err < bound
