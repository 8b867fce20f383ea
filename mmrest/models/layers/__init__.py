"""Building blocks of ResT and ResT V2."""
from .block import Mlp, PreNormBlock, ResTBlock, add_residual
from .embed import (ConvStem, ConvStemV2, PatchEmbed, PatchEmbedV2, PixelAttention,
                    map_to_tokens, set_cpu_fusions, tokens_to_map)
from .emsa import EMSA, ReducedKVAttention, emsa_reference
from .emsa_v2 import EMSAv2

__all__ = [
    'EMSA', 'EMSAv2', 'emsa_reference', 'Mlp', 'PreNormBlock', 'ResTBlock', 'add_residual',
    'ConvStem', 'ConvStemV2', 'PatchEmbed', 'PatchEmbedV2', 'PixelAttention',
    'ReducedKVAttention', 'map_to_tokens', 'set_cpu_fusions', 'tokens_to_map'
]
