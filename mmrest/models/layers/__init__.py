"""Building blocks of ResT and ResT V2."""
from .block import Mlp, PreNormBlock
from .dispatch import ATTN_IMPLS, attend, map_to_tokens, tokens_to_map
from .embed import ConvStem, ConvStemV2, PatchEmbed, PatchEmbedV2, PixelAttention
from .emsa import EMSA, EMSAv2, ReducedKVAttention
from .emsa_ops import emsa_reference

__all__ = [
    'ATTN_IMPLS', 'EMSA', 'EMSAv2', 'attend', 'emsa_reference', 'Mlp', 'PreNormBlock',
    'ConvStem', 'ConvStemV2', 'PatchEmbed', 'PatchEmbedV2', 'PixelAttention',
    'ReducedKVAttention', 'map_to_tokens', 'tokens_to_map'
]
