from .ckpt_convert import (BACKBONE_PREFIXES, convert_rest_checkpoint,
                           normalize_rest_key)

__all__ = ['BACKBONE_PREFIXES', 'convert_rest_checkpoint', 'normalize_rest_key']
