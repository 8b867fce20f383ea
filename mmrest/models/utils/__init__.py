from .ckpt_convert import (BACKBONE_PREFIXES, check_rest_family, convert_rest_checkpoint,
                           normalize_rest_key, rest_checkpoint_family)

__all__ = ['BACKBONE_PREFIXES', 'check_rest_family', 'convert_rest_checkpoint',
           'normalize_rest_key', 'rest_checkpoint_family']
