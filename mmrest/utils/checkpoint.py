"""Safe checkpoint loading: tensors and plain containers only, never arbitrary code."""
import os
import pickle
import zipfile
from typing import Any, Union

import torch


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unsafe, corrupted, or of the wrong model."""


def safe_load_checkpoint(path: Union[str, os.PathLike],
                         map_location: Union[str, torch.device] = 'cpu') -> Any:
    """Load a checkpoint file with ``torch.load(weights_only=True)``.

    Args:
        path (str | PathLike): Local checkpoint file.
        map_location (str | torch.device): Where to put the tensors. Defaults to 'cpu'.

    Returns:
        Any: The loaded object (tensors in plain containers).

    Raises:
        FileNotFoundError: If the file does not exist.
        CheckpointError: If the file holds anything but tensors and plain containers
            (its code is never run), or is truncated or corrupted.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint file not found: {path}')
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
        raise CheckpointError(
            f'refusing to load {path}: it contains objects other than tensors and plain '
            f'containers, and loading it could run code ({reason})') from err
    except (EOFError, zipfile.BadZipFile, RuntimeError, ValueError) as err:
        raise CheckpointError(
            f'cannot read checkpoint {path}: the file is truncated or corrupted '
            f'({type(err).__name__}: {err})') from err
