"""The transformer block of ResT and ResT V2: pre-norm attention and MLP with stochastic
depth."""
from typing import Optional, Tuple

from mmcv.cnn import build_norm_layer
from mmcv.cnn.bricks import DropPath
from torch import Tensor, nn

from .dispatch import blocked_norm_mlp
from .norm_mlp import norm_mlp


class Mlp(nn.Module):
    """fc, GELU, fc (with optional dropout), as in the authors' ``Mlp``.

    Args:
        in_features (int): Input and output channels.
        hidden_features (int): Hidden channels.
        drop (float): Dropout after each fc. Defaults to 0.
    """

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class PreNormBlock(nn.Module):
    """The block of ResT and ResT V2: ``x + DropPath(attn(LN(x)))`` then
    ``x + DropPath(MLP(LN(x)))``, with the version's ``attn`` (:class:`EMSA` or
    :class:`EMSAv2`, called as ``attn(tokens, hw_shape)``).

    Args:
        embed_dims (int): Channels of the tokens.
        attn (nn.Module): The attention.
        mlp_ratio (float): Hidden / input channels of the MLP. Defaults to 4.
        drop (float): Dropout after the MLP fcs. Defaults to 0.
        drop_path (float): Stochastic depth probability. Defaults to 0.
        norm_cfg (dict, optional): Config of the LayerNorms. Defaults to
            ``dict(type='LN')``.
    """

    def __init__(self,
                 embed_dims: int,
                 attn: nn.Module,
                 mlp_ratio: float = 4.,
                 drop: float = 0.,
                 drop_path: float = 0.,
                 norm_cfg: Optional[dict] = None) -> None:
        super().__init__()
        norm_cfg = dict(type='LN') if norm_cfg is None else norm_cfg
        self.norm1 = build_norm_layer(norm_cfg, embed_dims)[1]
        self.attn = attn
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = build_norm_layer(norm_cfg, embed_dims)[1]
        self.mlp = Mlp(embed_dims, int(embed_dims * mlp_ratio), drop=drop)

    def forward(self, x: Tensor, hw_shape: Tuple[int, int]) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), hw_shape))
        if blocked_norm_mlp(x, self.norm2, self.mlp):
            return x + self.drop_path(norm_mlp(x, self.norm2, self.mlp))
        return x + self.drop_path(self.mlp(self.norm2(x)))
