"""tools/analysis/get_flops.py against outside facts: the parameters of the authors' models,
the attention matmuls written out, torch's own FLOP counter and the ResT paper's table."""
import os.path as osp

import pytest
import torch
from _tools import load_script
from torch.utils.flop_counter import FlopCounterMode

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
gf = load_script('tools/analysis/get_flops.py')

# (family, arch): parameters of the authors' models with 1000-class heads, embed_dims, depths
ARCHS = {
    ('ResT', 'lite'): (10_508_300, [64, 128, 256, 512], [2, 2, 2, 2]),
    ('ResT', 'small'): (13_679_708, [64, 128, 256, 512], [2, 2, 6, 2]),
    ('ResT', 'base'): (30_327_052, [96, 192, 384, 768], [2, 2, 6, 2]),
    ('ResT', 'large'): (51_676_156, [96, 192, 384, 768], [2, 2, 18, 2]),
    ('ResTV2', 'tiny'): (30_434_776, [96, 192, 384, 768], [1, 2, 6, 2]),
    ('ResTV2', 'small'): (41_205_976, [96, 192, 384, 768], [1, 2, 12, 2]),
    ('ResTV2', 'base'): (55_965_208, [96, 192, 384, 768], [1, 3, 16, 3]),
    ('ResTV2', 'large'): (86_532_520, [128, 256, 512, 1024], [2, 3, 16, 2]),
}
#: the ResT paper's GFLOPs (one decimal) and parameters (M)
PAPER = {'lite': (1.4, 10.49), 'small': (1.9, 13.66), 'base': (4.3, 30.28),
         'large': (7.9, 51.63)}
#: the operators torch's FlopCounterMode counts (2 per multiply-add)
MATMUL_OPS = ('conv', 'linear', 'matmul', 'addmm', 'mm', 'bmm', 'einsum')


def attention_matmuls(dims, depths, h, w):
    """q @ k^T and attn @ v: 2 * queries * keys * channels multiply-adds a block; the
    keys are the query map reduced by r (a conv of stride r, padded: ceil)."""
    total = 0
    for i, r in enumerate((8, 4, 2, 1)):
        qh, qw = -(-h // 2**(i + 2)), -(-w // 2**(i + 2))
        total += 2 * qh * qw * -(-qh // r) * -(-qw // r) * dims[i] * depths[i]
    return total


def torch_count(model, shape):
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(torch.zeros(1, 3, *shape))
    return counter.get_total_flops() // 2


@pytest.mark.parametrize('family, arch', list(ARCHS))
def test_classifiers_against_independent_counts(family, arch):
    params, dims, depths = ARCHS[(family, arch)]
    model = gf.Classifier(family, arch)
    c = gf.complexity(model, (224, 224))
    assert c.params == params
    assert c.attn_matmul == attention_matmuls(dims, depths, 224, 224)
    counted = torch_count(model, (224, 224))
    assert sum(v for k, v in c.by_operator.items() if k in MATMUL_OPS) == counted
    assert 0 < c.flops - counted < 0.02 * c.flops  # the rest: norms, pooling


def test_odd_input_counts_ceil_maps_and_the_real_key_count():
    c = gf.complexity(gf.Classifier('ResT', 'lite'), (97, 131))
    assert c.attn_matmul == attention_matmuls(*ARCHS[('ResT', 'lite')][1:], 97, 131)


@pytest.mark.slow
@pytest.mark.parametrize('arch', list(PAPER))
def test_paper_stem_reproduces_the_paper_table(arch):
    gflops, mparams = PAPER[arch]
    c = gf.complexity(gf.Classifier('ResT', arch, paper_stem=True), (224, 224))
    assert round((c.flops - c.attn_matmul) / 1e9, 1) == gflops
    assert round(c.params / 1e6, 2) == mparams


def _rows(capsys):
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith('| model | input | params | GFLOPs |')
    return [[x.strip() for x in line.strip('|').split('|')] for line in lines[2:]]


def test_cli_prints_a_row_per_arch(capsys):
    gf.main(['--family', 'ResTV2', '--arch', 'tiny', '--shape', '224'])
    (row, ) = _rows(capsys)
    assert row[:3] == ['ResTV2-tiny', '224x224', '30,434,776']
    assert float(row[3]) > float(row[4]) > 0


@pytest.mark.parametrize('argv', [['--family', 'ResTV2', '--arch', 'lite'],
                                  ['--family', 'ResTV2', '--paper-stem'],
                                  ['configs/rest_small_imagenet.py', '--arch', 'small'],
                                  ['--shape', '1', '2', '3']])
def test_cli_refuses_options_that_do_not_fit(argv, capsys):
    with pytest.raises(SystemExit) as info:
        gf.main(argv)
    assert info.value.code == 2 and 'error:' in capsys.readouterr().err


@pytest.mark.slow
def test_config_mode_counts_the_classifier_like_the_arch_mode():
    cfg = osp.join(ROOT, 'configs', 'rest_small_imagenet.py')
    c = gf.complexity(gf.config_model(cfg), (224, 224))
    assert c.params == ARCHS[('ResT', 'small')][0]
    assert c.flops == gf.complexity(gf.Classifier('ResT', 'small'), (224, 224)).flops


@pytest.mark.slow
@pytest.mark.parametrize('name, mparams', [('retinanet_rest_small_coco.py', 23.40),
                                           ('mask_rcnn_rest_small_coco.py', 33.32)])
def test_config_mode_on_detectors(capsys, name, mparams):
    cfg = osp.join(ROOT, 'configs', name)
    gf.main([cfg, '--shape', '128', '160'])
    (row, ) = _rows(capsys)
    assert row[:2] == [cfg, '128x160']
    assert round(int(row[2].replace(',', '')) / 1e6, 2) == mparams
    assert float(row[3]) > float(row[4]) > 0
