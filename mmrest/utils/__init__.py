"""Checkpoint files: safe reading, the allowlist of mmengine's types, atomic writing."""
from .atomic import (AtomicLocalBackend, atomic_torch_save, atomic_write, commit_file,
                     remove_stale_temp_files, temp_path_for)
from .checkpoint import (SAFE_GLOBAL_REASONS, CheckpointError, RestrictedUnpickler,
                         UnsafeCheckpointError, fetch_checkpoint, mmengine_safe_globals,
                         restricted_torch_load, safe_load_checkpoint, setup_safe_loading,
                         torch_allowlist_usable, verify_checkpoint_file)

__all__ = [
    'SAFE_GLOBAL_REASONS', 'AtomicLocalBackend', 'CheckpointError', 'RestrictedUnpickler',
    'UnsafeCheckpointError', 'atomic_torch_save', 'atomic_write', 'commit_file',
    'fetch_checkpoint', 'mmengine_safe_globals', 'remove_stale_temp_files',
    'restricted_torch_load', 'safe_load_checkpoint', 'setup_safe_loading', 'temp_path_for',
    'torch_allowlist_usable', 'verify_checkpoint_file'
]
