"""tools/analysis/get_flops.py: the FLOPs convention that reproduces the published numbers."""
import os.path as osp

import pytest
import torch
from _tools import load_script

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
gf = load_script('tools/analysis/get_flops.py')

# The authors' released models with 1000-class heads: the parameter counts of their
# checkpoints (an outside fact), and the GFLOPs at 224x224 that this tool's convention
# gives them with the attention matmuls counted (get_flops.py's docstring, README "FLOPs
# and parameters"): a regression pin, not a number the authors published; the attention
# terms are checked against the analytic formulas below, the paper's rounded numbers in
# test_paper_stem_reproduces_the_paper_table.
RELEASED = {
    'lite': (10_508_300, 1.54),
    'small': (13_679_708, 2.11),
    'base': (30_327_052, 4.65),
    'large': (51_676_156, 8.39),
}
# The paper's table: GFLOPs (one decimal) and parameters (M, two decimals).
PAPER = {'lite': (1.4, 10.49), 'small': (1.9, 13.66), 'base': (4.3, 30.28),
         'large': (7.9, 51.63)}

ARCH = {  # embed_dims, depths, heads, sr ratios (README arch table)
    'lite': ([64, 128, 256, 512], [2, 2, 2, 2]),
    'small': ([64, 128, 256, 512], [2, 2, 6, 2]),
    'base': ([96, 192, 384, 768], [2, 2, 6, 2]),
    'large': ([96, 192, 384, 768], [2, 2, 18, 2]),
}
HEADS, SR = [1, 2, 4, 8], [8, 4, 2, 1]


@pytest.fixture(scope='module')
def released():
    return {arch: gf.classifier_complexity(arch) for arch in RELEASED}


@pytest.mark.parametrize('arch', list(RELEASED))
def test_released_models_parameters_and_pinned_gflops(released, arch):
    """The parameters of the authors' checkpoints; the GFLOPs pinned (see RELEASED)."""
    params, gflops = RELEASED[arch]
    c = released[arch]
    assert c.params == params
    assert round(c.flops / 1e9, 2) == gflops


@pytest.mark.parametrize('arch', list(RELEASED))
def test_attention_terms_equal_the_analytic_formulas(released, arch):
    """Matmuls: the authors' 2*h*w*(h//r)*(w//r)*dim per block; norms: 4 per map element."""
    dims, depths = ARCH[arch]
    matmul = norm = 0
    for i in range(4):
        h = w = 224 // 2**(i + 2)
        keys = (h // SR[i]) * (w // SR[i])
        matmul += 2 * h * w * keys * dims[i] * depths[i]
        if HEADS[i] > 1:
            norm += 4 * HEADS[i] * h * w * keys * depths[i]
    c = released[arch]
    assert c.attn_matmul_flops == matmul
    assert c.attn_norm_flops == norm
    assert c.flops_without_matmul == c.flops - matmul


def test_odd_input_counts_ceil_maps_and_the_real_key_count():
    c = gf.classifier_complexity('lite', (97, 131))
    # stage maps are ceil(H / 4) ... ; keys come from the sr conv (kernel r+1, stride r,
    # padding r//2) on them, e.g. 25x33 -> 3x4 at r=8.
    matmul = 0
    dims = [64, 128, 256, 512]
    for i in range(4):
        h, w = -(-97 // 2**(i + 2)), -(-131 // 2**(i + 2))
        r = SR[i]
        if r > 1:
            kh, kw = (h + 2 * (r // 2) - r - 1) // r + 1, (w + 2 * (r // 2) - r - 1) // r + 1
        else:
            kh, kw = h, w
        matmul += 2 * 2 * h * w * kh * kw * dims[i]
    assert c.attn_matmul_flops == matmul


@pytest.mark.slow
@pytest.mark.parametrize('arch', list(PAPER))
def test_paper_stem_reproduces_the_paper_table(arch):
    gflops, mparams = PAPER[arch]
    c = gf.classifier_complexity(arch, paper_stem=True)
    assert round(c.flops_without_matmul / 1e9, 1) == gflops
    assert round(c.params / 1e6, 2) == mparams


def test_reference_attention_is_required():
    model = gf.ResTClassifier('lite').eval()
    for m in model.modules():
        if hasattr(m, 'attn_impl'):
            m.attn_impl = 'lean'
    with pytest.raises(ValueError, match='attn_impl != "reference"'):
        gf.count_complexity(model, (torch.zeros(1, 3, 64, 64), ))


def test_cli_prints_the_table(capsys):
    gf.main(['--arch', 'lite', '--shape', '224'])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith('| ResT | params (M) | GFLOPs at 224x224')
    assert lines[2] == '| lite | 10.51 (10,508,300) | 1.54 | 1.47 |'


@pytest.mark.parametrize('flags', [['--paper-stem'], ['--arch', 'small'],
                                   ['--family', 'ResTV2', '--paper-stem']])
def test_classifier_options_with_a_config_are_refused(capsys, flags):
    """The options that choose the classifiers are not silently ignored with a config."""
    cfg = osp.join(ROOT, 'configs', 'rest_small_imagenet.py')
    with pytest.raises(SystemExit) as info:
        gf.main([cfg] + flags)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert 'without a config (a config names its own backbone)' in err
    for flag in flags:
        if flag.startswith('--'):
            assert flag in err


@pytest.mark.slow
def test_config_mode_counts_the_whole_classifier_like_the_arch_mode():
    """The mmpretrain config of ResT-Small counts the same as the standalone classifier."""
    c = gf.config_complexity(osp.join(ROOT, 'configs', 'rest_small_imagenet.py'), (224, 224))
    assert c.params == RELEASED['small'][0]
    assert round(c.flops / 1e9, 2) == RELEASED['small'][1]


@pytest.mark.slow
@pytest.mark.parametrize('name, params', [('retinanet_rest_small_coco.py', '23.40'),
                                          ('mask_rcnn_rest_small_coco.py', '33.32')])
def test_config_mode_on_detectors(capsys, name, params):
    cfg = osp.join(ROOT, 'configs', name)
    gf.main([cfg, '--shape', '128', '160'])
    row = capsys.readouterr().out.strip().splitlines()[-1]
    cells = [x.strip() for x in row.strip('|').split('|')]
    assert cells[:3] == [cfg, '128x160', params]
    with_mm, without = float(cells[3]), float(cells[4])
    assert with_mm > without > 0
