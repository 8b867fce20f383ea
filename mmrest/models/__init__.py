"""Models of mmrest; importing this module registers them."""
from .backbones import ResT

__all__ = ['ResT']
