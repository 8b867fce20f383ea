"""Building blocks of ResT."""
from .block import Mlp, ResTBlock
from .embed import ConvStem, PatchEmbed, PixelAttention, map_to_tokens, tokens_to_map
from .emsa import EMSA, emsa_reference

__all__ = [
    'EMSA', 'emsa_reference', 'Mlp', 'ResTBlock', 'ConvStem', 'PatchEmbed',
    'PixelAttention', 'map_to_tokens', 'tokens_to_map'
]
