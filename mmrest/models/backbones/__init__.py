from .rest import ResT

__all__ = ['ResT']
