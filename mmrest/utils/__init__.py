from .checkpoint import (CheckpointError, atomic_torch_save, atomic_write, commit_file,
                         remove_stale_temp_files, safe_load_checkpoint, temp_path_for,
                         UnsafeCheckpointError, verify_checkpoint_file)

__all__ = [
    'CheckpointError', 'atomic_torch_save', 'atomic_write', 'commit_file',
    'remove_stale_temp_files', 'safe_load_checkpoint', 'temp_path_for',
    'UnsafeCheckpointError', 'verify_checkpoint_file'
]
