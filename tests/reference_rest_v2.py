"""An independent, purely functional ResT V2 written from the paper's equations.

ResT V2: Simpler, Faster and Stronger (Zhang & Yang, NeurIPS 2022,
https://arxiv.org/abs/2204.07366). It shares no code with :mod:`mmrest` (nor with
``reference_rest.py``): it reads weights from a state dict in the authors' key layout
(https://github.com/wofmanaf/ResT, ``models/rest_v2.py``; the output norms of stages 1-3
named ``norm1``-``norm3``) and applies ``torch.nn.functional`` ops one equation at a time,
in NCHW maps and (B, N, C) tokens:

- stem: conv3x3/2 (no bias), BN, ReLU, conv3x3/2 (no bias), BN, ReLU, conv1x1, PA, LN;
- patch embedding: conv3x3/2 (bias), PA, LN; PA(x) = x * sigmoid(dwconv3x3(x) + b);
- block: x + Attn(LN(x)), then x + MLP(LN(x)) (eval mode: no drop path);
- attention: q = Lin(x); x' = LN(dwconv_{r+1, stride r, pad r//2}(x)) if r > 1 else x;
  [k | v] = Lin(x'); O = softmax(q k^T / sqrt(d)) v per head (scores materialised);
  U = LN(PixelShuffle_r(conv3x3_groups=C(v as a C x h x w map))) cropped to the query
  map's top-left (H, W); out = Proj(O + U).

The up-sampling is written out element by element of the pixel shuffle: U[c, a r + i,
b r + j] = sum over the 3x3 window of V[c] times the weight of output channel
c r^2 + i r + j, with ``F.unfold`` and an einsum (not a grouped conv and
``pixel_shuffle``). Every LayerNorm has eps 1e-6.
"""
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

ARCHS = {
    'tiny': dict(embed_dims=[96, 192, 384, 768], depths=[1, 2, 6, 2], num_heads=[1, 2, 4, 8]),
    'small': dict(embed_dims=[96, 192, 384, 768], depths=[1, 2, 12, 2],
                  num_heads=[1, 2, 4, 8]),
    'base': dict(embed_dims=[96, 192, 384, 768], depths=[1, 3, 16, 3], num_heads=[1, 2, 4, 8]),
    'large': dict(embed_dims=[128, 256, 512, 1024], depths=[2, 3, 16, 2],
                  num_heads=[2, 4, 8, 16]),
}
SR_RATIOS = [8, 4, 2, 1]
EPS_LN = 1e-6
EPS_BN = 1e-5


def layer_norm(t: torch.Tensor, sd: Dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """LayerNorm over the last dim with ``name.weight`` and ``name.bias``."""
    return F.layer_norm(t, (t.shape[-1], ), sd[f'{name}.weight'], sd[f'{name}.bias'], EPS_LN)


def dense(t: torch.Tensor, sd: Dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return t @ sd[f'{name}.weight'].t() + sd[f'{name}.bias']


def batch_norm_eval(m: torch.Tensor, sd: Dict[str, torch.Tensor], name: str) -> torch.Tensor:
    shape = (1, -1, 1, 1)
    mean, var = sd[f'{name}.running_mean'].view(shape), sd[f'{name}.running_var'].view(shape)
    return (m - mean) / torch.sqrt(var + EPS_BN) * sd[f'{name}.weight'].view(shape) + \
        sd[f'{name}.bias'].view(shape)


def pixel_attention(m: torch.Tensor, sd: Dict[str, torch.Tensor], name: str) -> torch.Tensor:
    gate = F.conv2d(m, sd[f'{name}.pa_conv.weight'], sd[f'{name}.pa_conv.bias'], padding=1,
                    groups=m.shape[1])
    return m * torch.sigmoid(gate)


def to_tokens(m: torch.Tensor) -> torch.Tensor:
    return m.flatten(2).transpose(1, 2)


def to_map(t: torch.Tensor, H: int, W: int) -> torch.Tensor:
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], H, W)


def upsample_values(v_map: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    r: int, H: int, W: int) -> torch.Tensor:
    """PixelShuffle_r(conv3x3 with groups=C, C -> r^2 C) of a (B, C, h, w) map, top-left
    (H, W) crop, as (B, H, W, C)."""
    B, C, h, w = v_map.shape
    windows = F.unfold(v_map, 3, padding=1).view(B, C, 9, h, w)
    kernel = weight.view(C, r, r, 9)  # output channel c r^2 + i r + j, window position
    up = torch.einsum('bckyx,cijk->byixjc', windows, kernel) + \
        bias.view(C, r, r).permute(1, 2, 0).view(1, 1, r, 1, r, C)
    return up.reshape(B, h * r, w * r, C)[:, :H, :W]


def attention(t: torch.Tensor, H: int, W: int, sd: Dict[str, torch.Tensor], name: str,
              heads: int, r: int) -> torch.Tensor:
    B, N, C = t.shape
    d = C // heads
    q = dense(t, sd, name + '.q').view(B, N, heads, d).transpose(1, 2)
    if r > 1:
        reduced = F.conv2d(to_map(t, H, W), sd[name + '.sr.weight'], sd[name + '.sr.bias'],
                           stride=r, padding=r // 2, groups=C)
        h, w = reduced.shape[2:]
        source = layer_norm(to_tokens(reduced), sd, name + '.sr_norm')
    else:
        h, w, source = H, W, t
    kv = dense(source, sd, name + '.kv')
    k = kv[..., :C].reshape(B, h * w, heads, d).transpose(1, 2)
    v = kv[..., C:].reshape(B, h * w, heads, d).transpose(1, 2)
    scores = (q @ k.transpose(-1, -2)) * d**-0.5
    o = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(B, N, C)
    v_map = kv[..., C:].transpose(1, 2).reshape(B, C, h, w)  # channel head * d + j
    up = upsample_values(v_map, sd[name + '.up.0.weight'], sd[name + '.up.0.bias'], r, H, W)
    u = layer_norm(up, sd, name + '.up_norm').reshape(B, N, C)
    return dense(o + u, sd, name + '.proj')


def block(t: torch.Tensor, H: int, W: int, sd: Dict[str, torch.Tensor], name: str,
          heads: int, r: int) -> torch.Tensor:
    t = t + attention(layer_norm(t, sd, name + '.norm1'), H, W, sd, name + '.attn', heads, r)
    hidden = F.gelu(dense(layer_norm(t, sd, name + '.norm2'), sd, name + '.mlp.fc1'))
    return t + dense(hidden, sd, name + '.mlp.fc2')


def reference_features(sd: Dict[str, torch.Tensor], x: torch.Tensor, arch: str,
                       out_norms: Sequence[int] = (), main_path: bool = False
                       ) -> List[torch.Tensor]:
    """Maps of the four stages (eval mode), each NCHW.

    ``out_norms`` lists the stages (0-2) that have an output LayerNorm ``norm{i+1}``
    (stage 3 always goes through ``norm``); ``main_path`` says whether the next stage
    consumes the normalised map (the authors' ResT V2 downstream code: it does not).
    """
    settings = ARCHS[arch]
    m = F.relu(batch_norm_eval(F.conv2d(x, sd['stem.proj.0.weight'], stride=2, padding=1),
                               sd, 'stem.proj.1'))
    m = F.relu(batch_norm_eval(F.conv2d(m, sd['stem.proj.3.weight'], stride=2, padding=1),
                               sd, 'stem.proj.4'))
    m = pixel_attention(F.conv2d(m, sd['stem.proj.6.weight'], sd['stem.proj.6.bias']), sd,
                        'stem.pos')
    feats = []
    for i in range(4):
        if i == 0:
            embed = 'stem'
        else:
            embed = f'patch_{i + 1}'
            m = pixel_attention(F.conv2d(m, sd[embed + '.proj.weight'], sd[embed + '.proj.bias'],
                                         stride=2, padding=1), sd, embed + '.pos')
        H, W = m.shape[2:]
        t = layer_norm(to_tokens(m), sd, embed + '.norm')
        for j in range(settings['depths'][i]):
            t = block(t, H, W, sd, f'stage{i + 1}.{j}', settings['num_heads'][i], SR_RATIOS[i])
        if i == 3:
            t = out = layer_norm(t, sd, 'norm')
        elif i in out_norms:
            out = layer_norm(t, sd, f'norm{i + 1}')
            t = out if main_path else t
        else:
            out = t
        m = to_map(t, H, W)
        feats.append(to_map(out, H, W))
    return feats


def reference_logits(sd: Dict[str, torch.Tensor], x: torch.Tensor, arch: str) -> torch.Tensor:
    """The authors' ImageNet classifier: final norm, global average pool, ``head``."""
    feat = reference_features(sd, x, arch)[-1]
    return dense(feat.mean(dim=(2, 3)), sd, 'head')


def _weight_shapes(arch: str, num_classes: int,
                   out_norms: Sequence[int]) -> Dict[str, tuple]:
    """Name -> (kind, shape, fan-in) of every tensor of the authors' model, where kind is
    'weight', 'bias', 'scale' (norm weight), 'shift' (norm bias), 'mean', 'var' or
    'count' (BN statistics)."""
    settings = ARCHS[arch]
    dims = settings['embed_dims']
    spec: Dict[str, tuple] = {}

    def norm(name, c, batch=False):
        spec.update({f'{name}.weight': ('scale', (c, ), 1), f'{name}.bias': ('shift', (c, ), 1)})
        if batch:
            spec.update({f'{name}.running_mean': ('mean', (c, ), 1),
                         f'{name}.running_var': ('var', (c, ), 1),
                         f'{name}.num_batches_tracked': ('count', (), 1)})

    def layer(name, shape, fan_in, bias=True):
        spec[f'{name}.weight'] = ('weight', shape, fan_in)
        if bias:
            spec[f'{name}.bias'] = ('bias', shape[:1], 1)

    c0 = dims[0]
    layer('stem.proj.0', (c0 // 2, 3, 3, 3), 27, bias=False)
    norm('stem.proj.1', c0 // 2, batch=True)
    layer('stem.proj.3', (c0, c0 // 2, 3, 3), 9 * c0 // 2, bias=False)
    norm('stem.proj.4', c0, batch=True)
    layer('stem.proj.6', (c0, c0, 1, 1), c0)
    for i, c in enumerate(dims):
        embed = 'stem' if i == 0 else f'patch_{i + 1}'
        if i > 0:
            layer(embed + '.proj', (c, dims[i - 1], 3, 3), 9 * dims[i - 1])
        layer(embed + '.pos.pa_conv', (c, 1, 3, 3), 3)
        norm(embed + '.norm', c)
        r = SR_RATIOS[i]
        for j in range(settings['depths'][i]):
            p = f'stage{i + 1}.{j}'
            norm(p + '.norm1', c)
            layer(p + '.attn.q', (c, c), c)
            layer(p + '.attn.kv', (2 * c, c), c)
            if r > 1:
                layer(p + '.attn.sr', (c, 1, r + 1, r + 1), (r + 1)**2)
                norm(p + '.attn.sr_norm', c)
            layer(p + '.attn.up.0', (r * r * c, 1, 3, 3), 9)
            norm(p + '.attn.up_norm', c)
            layer(p + '.attn.proj', (c, c), 4 * c)
            norm(p + '.norm2', c)
            layer(p + '.mlp.fc1', (4 * c, c), c)
            layer(p + '.mlp.fc2', (c, 4 * c), 16 * c)
    for i in out_norms:
        norm(f'norm{i + 1}', dims[i])
    norm('norm', dims[3])
    if num_classes:
        layer('head', (num_classes, dims[3]), dims[3])
    return spec


def random_authors_state_dict(arch: str, num_classes: int = 1000, seed: int = 0,
                              out_norms: Sequence[int] = ()) -> Dict[str, torch.Tensor]:
    """Random weights in the authors' key layout: non-trivial BN statistics and norm
    affines, weights scaled by fan-in so that activations stay O(1) through the depth."""
    g = torch.Generator().manual_seed(seed)
    draw = {
        'weight': lambda shape, fan_in: torch.randn(shape, generator=g) * fan_in**-0.5,
        'bias': lambda shape, _: torch.randn(shape, generator=g) * 0.02,
        'scale': lambda shape, _: 1 + torch.randn(shape, generator=g) * 0.1,
        'shift': lambda shape, _: torch.randn(shape, generator=g) * 0.1,
        'mean': lambda shape, _: torch.randn(shape, generator=g) * 0.1,
        'var': lambda shape, _: 0.5 + torch.rand(shape, generator=g),
        'count': lambda shape, _: torch.tensor(500),
    }
    return {name: draw[kind](shape, fan_in)
            for name, (kind, shape, fan_in) in _weight_shapes(arch, num_classes,
                                                              out_norms).items()}
