from .checkpoint import CheckpointError, safe_load_checkpoint

__all__ = ['CheckpointError', 'safe_load_checkpoint']
