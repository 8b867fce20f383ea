"""Distributed training on machines without a GPU (gloo on the CPU), where mmengine 0.10.7's
``init_dist`` calls ``torch.cuda.set_device`` and its DDP wrapper gets
``device_ids=[LOCAL_RANK]``."""
from typing import Any

import torch


def init_cpu_distributed(cfg: Any, launcher: str) -> bool:
    """Start a gloo process group on a machine without CUDA: ``mmengine.dist.init_dist``
    with the config's ``env_cfg.dist_cfg`` and ``backend='gloo'``, ``torch.cuda.set_device``
    a no-op meanwhile, and ``model_wrapper_cfg.device_ids=None``. Does nothing for
    ``launcher='none'`` or where CUDA is available.

    Args:
        cfg (Config): The config, modified in place.
        launcher (str): ``'none'``, ``'pytorch'``, ``'slurm'`` or ``'mpi'``.

    Returns:
        bool: Whether a CPU process group was started.
    """
    import torch.distributed as dist
    from mmengine.dist import init_dist
    if launcher == 'none' or torch.cuda.is_available():
        return False
    env_cfg = cfg.get('env_cfg') or {}
    dist_cfg = dict(env_cfg.get('dist_cfg') or {})
    dist_cfg['backend'] = 'gloo'
    env_cfg['dist_cfg'] = dist_cfg
    cfg.env_cfg = env_cfg
    wrapper = cfg.get('model_wrapper_cfg')
    if wrapper is None:
        wrapper = dict(type='MMDistributedDataParallel', broadcast_buffers=False,
                       find_unused_parameters=cfg.get('find_unused_parameters', False))
    wrapper['device_ids'] = None
    cfg.model_wrapper_cfg = wrapper
    if not dist.is_initialized():
        set_device = torch.cuda.set_device
        torch.cuda.set_device = _no_device  # there is no device to select
        try:
            init_dist(launcher, **dist_cfg)
        finally:
            torch.cuda.set_device = set_device
    return True


def _no_device(device: Any) -> None:
    pass
