"""The measurements of ``tools/analysis/gpu_check.py``: the agreement of two runs of a
model (outputs and parameter gradients under a precision) and the time and peak memory of
a speed case. Imported by path from the tool's folder."""
import contextlib
import gc
import math
import re
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

DTYPES = {'fp32': None, 'fp16': torch.float16, 'bf16': torch.bfloat16}
#: Max relative error of the fused model against the float32 reference, per quantity and
#: dtype: 2x or more over the errors measured with autocast, far below those of real
#: defects (a wrong op, a lost gradient or a core run in low precision give order 1).
TOLERANCES = {'outputs': {'fp32': 1e-4, 'fp16': 2e-2, 'bf16': 5e-2},
              'gradients': {'fp32': 1e-4, 'fp16': 1e-1, 'bf16': 2.5e-1}}


@dataclass(frozen=True)
class SpeedCase:
    """One speed case: ``kind`` is ``'infer'`` or ``'train'``; ``size`` is (H, W)."""
    kind: str
    size: Tuple[int, int]
    batch: int

    @property
    def name(self) -> str:
        return f'{self.kind} {self.size[0]}x{self.size[1]} b{self.batch}'


def randomize_weights(model: torch.nn.Module, seed: int) -> None:
    """``model.init_weights()``, then 1-D tensors drawn from ``seed``: norm scales
    1 + N(0, 0.1^2), biases and running means N(0, 0.1^2), running variances U(1, 2), so
    that no norm is the identity and no bias zero (a trained network's scale of weights
    would make the random network chaotic)."""
    torch.manual_seed(seed)
    model.init_weights()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if not tensor.is_floating_point() or tensor.dim() != 1:
                continue
            leaf = name.rpartition('.')[2]
            noise = torch.randn(tensor.shape, generator=gen)
            if leaf == 'running_var':
                value = 1 + torch.rand(tensor.shape, generator=gen)
            elif leaf == 'weight':
                value = 1 + 0.1 * noise
            else:
                value = 0.1 * noise
            tensor.copy_(value)


@contextlib.contextmanager
def strict_fp32() -> Iterator[None]:
    """TF32 off for matmuls and cuDNN convolutions (restored afterwards)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` (``'fp16'``, ``'bf16'``); nothing for ``'fp32'``."""
    if DTYPES[dtype] is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[dtype])


def run_pass(model: torch.nn.Module, state: Dict[str, torch.Tensor], x: torch.Tensor,
             x_train: torch.Tensor, dtype: str,
             seed: int) -> Tuple[List[torch.Tensor], Dict[str, torch.Tensor]]:
    """float32 eval-mode outputs on ``x`` and parameter gradients (by name) of a train
    step on ``x_train`` (loss ``sum((out * r).sum())``, ``r`` drawn from ``seed``), after
    loading ``state``."""
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad(), autocast(x.device, dtype):
        outs = [o.float() for o in model(x)]
    model.train()
    model.zero_grad(set_to_none=True)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    with autocast(x.device, dtype):
        train_outs = model(x_train)
        loss = sum((o.float() * torch.randn(o.shape, generator=gen, device=o.device)).sum()
                   for o in train_outs)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return outs, grads


def _finite(value: float) -> float:
    return value if math.isfinite(value) else math.inf


def output_error(outs: Sequence[torch.Tensor],
                 refs: Sequence[torch.Tensor]) -> Tuple[float, str]:
    """Largest ``max |out - ref| / max(1, max |ref|)`` over the stage maps (inf if not
    finite), and ``'stage i'``; ``ValueError`` if the maps differ in number or shape."""
    if len(outs) != len(refs):
        raise ValueError(f'{len(outs)} outputs vs {len(refs)} of the reference')
    worst, where = 0.0, ''
    for i, (out, ref) in enumerate(zip(outs, refs)):
        if out.shape != ref.shape:
            raise ValueError(f'stage {i + 1}: shape {tuple(out.shape)} vs reference '
                             f'{tuple(ref.shape)}')
        err = _finite(((out - ref).abs().max() / ref.abs().max().clamp(min=1)).item())
        if err >= worst:
            worst, where = err, f'stage {i + 1}'
    return worst, where


def _stage_of(name: str) -> str:
    """The part of the model a parameter belongs to: the digits of its top-level module
    (``patch_embed_2``, ``stage2`` and ``norm2`` are stage 2), else that module (``stem``,
    ``norm``)."""
    top = name.partition('.')[0]
    digits = re.sub(r'\D', '', top)
    return f'stage {digits}' if digits else top


def gradient_error(grads: Dict[str, torch.Tensor],
                   refs: Dict[str, torch.Tensor]) -> Tuple[float, str]:
    """Largest ``max |g - g_ref|`` relative to the largest reference gradient of the
    parameter's stage (:func:`_stage_of`; some gradients vanish analytically, so no
    per-parameter scale is meaningful), and the parameter; inf if not finite."""
    if set(grads) != set(refs):
        diff = sorted(set(grads) ^ set(refs))
        raise ValueError(f'gradients of different parameters: {diff[:5]}')
    group_peak: Dict[str, float] = {}
    for name, ref in refs.items():
        group = _stage_of(name)
        group_peak[group] = max(group_peak.get(group, 0.0), ref.abs().max().item())
    worst, where = 0.0, ''
    for name, ref in refs.items():
        scale = max(group_peak[_stage_of(name)], 1e-30)
        err = _finite((grads[name].float() - ref).abs().max().item() / scale)
        if err >= worst:
            worst, where = err, name
    return worst, where


def error_text(err: Exception) -> str:
    return f'{type(err).__name__}: {err}'


def agreement_rows(model: str, size: str, grad_batch: int, dtype: str, ref32: Any,
                   got: Any, own: Any) -> List[Dict[str, Any]]:
    """The outputs and gradients rows of one (model, size, dtype); ``got`` and ``own``
    are :func:`run_pass` results (fused; reference under autocast) or error messages."""
    rows = []
    for i, quantity in enumerate(('outputs', 'gradients')):
        row = dict(model=model, size=size, batch=2 if quantity == 'outputs' else grad_batch,
                   dtype=dtype, quantity=quantity, error=None, worst='',
                   tolerance=TOLERANCES[quantity][dtype], passed=False,
                   reference_error=own if isinstance(own, str) else None, exception=None)
        measure = output_error if quantity == 'outputs' else gradient_error
        try:
            if isinstance(got, str):
                raise RuntimeError(got)
            row['error'], row['worst'] = measure(got[i], ref32[i])
            row['passed'] = row['error'] < row['tolerance']
            if own is not None and not isinstance(own, str):
                row['reference_error'] = measure(own[i], ref32[i])[0]
        except Exception as err:  # noqa: BLE001  (reported as a failure)
            row['exception'] = got if isinstance(got, str) else error_text(err)
            row['passed'] = False
        rows.append(row)
    return rows


def time_case(model: torch.nn.Module, case: SpeedCase, dtype: str, device: torch.device,
              warmup: int, min_run_time: float) -> Tuple[float, Optional[int], int]:
    """Median seconds of one run, peak CUDA memory (None on the CPU) and the number of
    timed runs."""
    from torch.utils import benchmark
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(case.batch, 3, *case.size, generator=gen).to(device)
    if case.kind == 'infer':
        model.eval()

        def step() -> None:
            with torch.inference_mode(), autocast(device, dtype):
                model(x)
    else:
        model.train()

        def step() -> None:
            model.zero_grad(set_to_none=True)
            with autocast(device, dtype):
                loss = sum(o.float().mean() for o in model(x))
            loss.backward()

    cuda = device.type == 'cuda'
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        step()
    timer = benchmark.Timer(stmt='step()', globals=dict(step=step),
                            num_threads=torch.get_num_threads())
    measurement = timer.blocked_autorange(min_run_time=min_run_time)
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    model.zero_grad(set_to_none=True)
    return measurement.median, peak, len(measurement.times)
