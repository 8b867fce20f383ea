from .base import ResTBase
from .rest import ResT
from .rest_v2 import ResTV2

__all__ = ['ResTBase', 'ResT', 'ResTV2']
