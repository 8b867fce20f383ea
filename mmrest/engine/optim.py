"""Mixed precision on the CPU: bfloat16 autocast through mmengine's optimizer wrapper.

mmengine 0.10.7's ``AmpOptimWrapper`` refuses to run without a GPU (an assertion in its
constructor), although its ``autocast`` helper supports the CPU with bfloat16.
:class:`CPUAmpOptimWrapper` is the CPU counterpart: the forward pass (``train_step`` runs
it inside ``optim_context``) is autocast to bfloat16, the backward pass follows the
autocast graph, parameters, gradients and optimizer state stay float32. No loss scaling:
bfloat16 has float32's exponent range.
"""
from contextlib import contextmanager
from typing import Union

import torch
from mmengine.optim import OptimWrapper
from torch import nn

from ..registry import OPTIM_WRAPPERS


@OPTIM_WRAPPERS.register_module()
class CPUAmpOptimWrapper(OptimWrapper):
    """``OptimWrapper`` that autocasts the forward pass on the CPU.

    Args:
        dtype (str | torch.dtype): Autocast dtype; the CPU supports ``'bfloat16'``.
            Defaults to 'bfloat16'.
        **kwargs: Arguments of :class:`mmengine.optim.OptimWrapper`.
    """

    def __init__(self, dtype: Union[str, torch.dtype] = 'bfloat16', **kwargs) -> None:
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype, None)
        if dtype is not torch.bfloat16:
            raise ValueError(
                f'CPUAmpOptimWrapper: CPU autocast here supports dtype=bfloat16 only, got '
                f'{dtype!r}')
        super().__init__(**kwargs)
        self.cast_dtype = dtype

    @contextmanager
    def optim_context(self, model: nn.Module):
        """Gradient-accumulation context of ``OptimWrapper`` plus bfloat16 autocast.

        Args:
            model (nn.Module): The model being trained.
        """
        with super().optim_context(model), torch.autocast(
                device_type='cpu', dtype=self.cast_dtype):
            yield
