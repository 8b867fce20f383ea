"""Checkpoint files: safe reading, the allowlist of mmengine's types, atomic writing."""
from .atomic import AtomicLocalBackend, atomic_torch_save, atomic_write, remove_stale_temp_files
from .checkpoint import (CheckpointError, RestrictedUnpickler, UnsafeCheckpointError,
                         fetch_checkpoint, mmengine_safe_globals, restricted_torch_load,
                         safe_load_checkpoint, setup_safe_loading, torch_allowlist_usable,
                         verify_checkpoint_file)

__all__ = [
    'AtomicLocalBackend', 'CheckpointError', 'RestrictedUnpickler', 'UnsafeCheckpointError',
    'atomic_torch_save', 'atomic_write', 'fetch_checkpoint', 'mmengine_safe_globals',
    'remove_stale_temp_files', 'restricted_torch_load', 'safe_load_checkpoint',
    'setup_safe_loading', 'torch_allowlist_usable', 'verify_checkpoint_file'
]
