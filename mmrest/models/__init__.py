"""Models of mmrest; importing this module registers them."""
from .backbones import ResT, ResTV2

__all__ = ['ResT', 'ResTV2']
