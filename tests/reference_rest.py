"""An independent, purely functional ResT written from the paper's equations.

It shares no code with :mod:`mmrest`: it reads weights from a state dict in the authors'
key layout (https://github.com/wofmanaf/ResT, ``models/rest.py``) and applies
``torch.nn.functional`` ops one equation at a time, so a model that matches it computes
the authors' function. Used as the oracle in the tests.
"""
import math
from typing import Dict, List

import torch
import torch.nn.functional as F

ARCHS = {
    'lite': dict(embed_dims=[64, 128, 256, 512], depths=[2, 2, 2, 2]),
    'small': dict(embed_dims=[64, 128, 256, 512], depths=[2, 2, 6, 2]),
    'base': dict(embed_dims=[96, 192, 384, 768], depths=[2, 2, 6, 2]),
    'large': dict(embed_dims=[96, 192, 384, 768], depths=[2, 2, 18, 2]),
}
NUM_HEADS = [1, 2, 4, 8]
SR_RATIOS = [8, 4, 2, 1]
BN_EPS = 1e-5
LN_EPS = 1e-5
IN_EPS = 1e-5


def _bn(x, sd, p):
    return F.batch_norm(x, sd[p + '.running_mean'], sd[p + '.running_var'],
                        sd[p + '.weight'], sd[p + '.bias'], False, 0., BN_EPS)


def _ln(x, sd, p):
    return F.layer_norm(x, x.shape[-1:], sd[p + '.weight'], sd[p + '.bias'], LN_EPS)


def _linear(x, sd, p):
    return F.linear(x, sd[p + '.weight'], sd.get(p + '.bias'))


def _pa(x, sd, p):
    c = x.shape[1]
    gate = F.conv2d(x, sd[p + '.pa_conv.weight'], sd[p + '.pa_conv.bias'], padding=1, groups=c)
    return x * torch.sigmoid(gate)


def _emsa(x, H, W, sd, p, heads, sr):
    B, N, C = x.shape
    d = C // heads
    q = _linear(x, sd, p + '.q').reshape(B, N, heads, d).permute(0, 2, 1, 3)
    if sr > 1:
        m = x.permute(0, 2, 1).reshape(B, C, H, W)
        m = F.conv2d(m, sd[p + '.sr.weight'], sd[p + '.sr.bias'], stride=sr,
                     padding=sr // 2, groups=C)
        kv_in = _ln(m.reshape(B, C, -1).permute(0, 2, 1), sd, p + '.sr_norm')
    else:
        kv_in = x
    kv = _linear(kv_in, sd, p + '.kv').reshape(B, -1, 2, heads, d).permute(2, 0, 3, 1, 4)
    k, v = kv[0], kv[1]
    scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(d)
    if heads > 1:
        w = sd[p + '.transform_conv.weight'].reshape(heads, heads)
        scores = torch.einsum('gh,bhnm->bgnm', w, scores) + \
            sd[p + '.transform_conv.bias'].view(1, heads, 1, 1)
        a = torch.softmax(scores, dim=-1)
        mean = a.mean(dim=(2, 3), keepdim=True)
        var = ((a - mean)**2).mean(dim=(2, 3), keepdim=True)
        a = (a - mean) / torch.sqrt(var + IN_EPS)
    else:
        a = torch.softmax(scores, dim=-1)
    out = torch.matmul(a, v).permute(0, 2, 1, 3).reshape(B, N, C)
    return _linear(out, sd, p + '.proj')


def _block(x, H, W, sd, p, heads, sr):
    x = x + _emsa(_ln(x, sd, p + '.norm1'), H, W, sd, p + '.attn', heads, sr)
    h = F.gelu(_linear(_ln(x, sd, p + '.norm2'), sd, p + '.mlp.fc1'))
    return x + _linear(h, sd, p + '.mlp.fc2')


def reference_features(sd: Dict[str, torch.Tensor], x: torch.Tensor,
                       depths: List[int], out_norms=(), main_path: bool = True):
    """Maps of the four stages (eval mode), each NCHW.

    ``out_norms`` lists the stages (0-2) that have an output LayerNorm ``norm{i+1}``;
    ``main_path`` says whether the next stage consumes the normalised map.
    """
    s = 'stem'
    x = F.relu(_bn(F.conv2d(x, sd[s + '.conv1.weight'], stride=2, padding=1), sd, s + '.norm1'))
    x = F.relu(_bn(F.conv2d(x, sd[s + '.conv2.weight'], stride=1, padding=1), sd, s + '.norm2'))
    x = _pa(F.conv2d(x, sd[s + '.conv3.weight'], stride=2, padding=1), sd, s + '.pos')
    feats = []
    for i in range(4):
        if i > 0:
            p = f'patch_embed_{i + 1}'
            x = F.conv2d(x, sd[p + '.conv.weight'], sd[p + '.conv.bias'], stride=2, padding=1)
            x = _pa(_bn(x, sd, p + '.norm'), sd, p + '.pos')
        B, C, H, W = x.shape
        t = x.reshape(B, C, H * W).permute(0, 2, 1)
        for j in range(depths[i]):
            t = _block(t, H, W, sd, f'stage{i + 1}.{j}', NUM_HEADS[i], SR_RATIOS[i])
        if i == 3:
            t = _ln(t, sd, 'norm')
            out = t
        elif i in out_norms:
            out = _ln(t, sd, f'norm{i + 1}')
            if main_path:
                t = out
        else:
            out = t
        x = t.permute(0, 2, 1).reshape(B, C, H, W)
        feats.append(out.permute(0, 2, 1).reshape(B, C, H, W))
    return feats


def reference_logits(sd: Dict[str, torch.Tensor], x: torch.Tensor, depths: List[int]):
    """The authors' ImageNet classifier: final norm, global average pool, ``head``."""
    feat = reference_features(sd, x, depths)[-1]
    return F.linear(feat.mean(dim=(2, 3)), sd['head.weight'], sd['head.bias'])


def random_authors_state_dict(arch: str, num_classes: int = 1000, seed: int = 0,
                              out_norms=()) -> Dict[str, torch.Tensor]:
    """Random weights in the authors' key layout (with non-trivial BN statistics)."""
    g = torch.Generator().manual_seed(seed)
    dims, depths = ARCHS[arch]['embed_dims'], ARCHS[arch]['depths']

    def r(*shape, std=0.05):
        return torch.randn(*shape, generator=g) * std

    sd: Dict[str, torch.Tensor] = {}

    def bn(p, c):
        sd[p + '.weight'] = 1 + r(c, std=0.1)
        sd[p + '.bias'] = r(c, std=0.1)
        sd[p + '.running_mean'] = r(c, std=0.1)
        sd[p + '.running_var'] = 1 + torch.rand(c, generator=g)
        sd[p + '.num_batches_tracked'] = torch.tensor(100)

    def ln(p, c):
        sd[p + '.weight'] = 1 + r(c, std=0.1)
        sd[p + '.bias'] = r(c, std=0.1)

    def lin(p, cin, cout):
        sd[p + '.weight'] = r(cout, cin, std=cin**-0.5)
        sd[p + '.bias'] = r(cout, std=0.02)

    def pa(p, c):
        sd[p + '.pa_conv.weight'] = r(c, 1, 3, 3, std=0.3)
        sd[p + '.pa_conv.bias'] = r(c, std=0.1)

    c0 = dims[0]
    sd['stem.conv1.weight'] = r(c0 // 2, 3, 3, 3, std=0.2)
    bn('stem.norm1', c0 // 2)
    sd['stem.conv2.weight'] = r(c0 // 2, c0 // 2, 3, 3, std=0.05)
    bn('stem.norm2', c0 // 2)
    sd['stem.conv3.weight'] = r(c0, c0 // 2, 3, 3, std=0.05)
    pa('stem.pos', c0)
    for i in range(1, 4):
        p = f'patch_embed_{i + 1}'
        sd[p + '.conv.weight'] = r(dims[i], dims[i - 1], 3, 3, std=(9 * dims[i - 1])**-0.5)
        sd[p + '.conv.bias'] = r(dims[i], std=0.02)
        bn(p + '.norm', dims[i])
        pa(p + '.pos', dims[i])
    for i in range(4):
        c, h, sr = dims[i], NUM_HEADS[i], SR_RATIOS[i]
        for j in range(depths[i]):
            p = f'stage{i + 1}.{j}'
            ln(p + '.norm1', c)
            lin(p + '.attn.q', c, c)
            lin(p + '.attn.kv', c, 2 * c)
            lin(p + '.attn.proj', c, c)
            if sr > 1:
                sd[p + '.attn.sr.weight'] = r(c, 1, sr + 1, sr + 1, std=1.0 / (sr + 1))
                sd[p + '.attn.sr.bias'] = r(c, std=0.02)
                ln(p + '.attn.sr_norm', c)
            if h > 1:
                sd[p + '.attn.transform_conv.weight'] = r(h, h, 1, 1, std=0.5)
                sd[p + '.attn.transform_conv.bias'] = r(h, std=0.1)
            ln(p + '.norm2', c)
            lin(p + '.mlp.fc1', c, 4 * c)
            lin(p + '.mlp.fc2', 4 * c, c)
    for i in out_norms:
        ln(f'norm{i + 1}', dims[i])
    ln('norm', dims[3])
    if num_classes:
        lin('head', dims[3], num_classes)
    return sd
