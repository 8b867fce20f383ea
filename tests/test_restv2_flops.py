"""tools/analysis/get_flops.py on ResT V2: parameters and the counts of its convention."""
import pytest
import torch
from _tools import load_script

gf = load_script('tools/analysis/get_flops.py')

# (parameters with the 1000-class head, the authors' models'; GFLOPs at 224x224 with the
# attention matmuls counted: a regression pin of this convention, within 0.3% of the
# authors' README's 4.1, 6.0, 7.9, 13.8, counted by mmcv 1.x's rules)
AUTHORS = {'tiny': (30_434_776, 4.11), 'small': (41_205_976, 5.98),
           'base': (55_965_208, 7.90), 'large': (86_532_520, 13.86)}
DIMS = {'tiny': [96, 192, 384, 768], 'small': [96, 192, 384, 768],
        'base': [96, 192, 384, 768], 'large': [128, 256, 512, 1024]}
DEPTHS = {'tiny': [1, 2, 6, 2], 'small': [1, 2, 12, 2], 'base': [1, 3, 16, 3],
          'large': [2, 3, 16, 2]}
SR = [8, 4, 2, 1]


@pytest.fixture(scope='module')
def counts():
    return {arch: gf.classifier_complexity(arch, family='ResTV2') for arch in AUTHORS}


@pytest.mark.parametrize('arch', list(AUTHORS))
def test_parameters_and_pinned_gflops(counts, arch):
    c, (params, gflops) = counts[arch], AUTHORS[arch]
    assert (c.params, round(c.flops / 1e9, 2)) == (params, gflops)


@pytest.mark.parametrize('arch', list(AUTHORS))
def test_attention_matmuls_equal_2nmc_and_no_instance_norm(counts, arch):
    matmul = 0
    for i in range(4):
        h = w = 224 // 2**(i + 2)
        keys = -(-h // SR[i]) * -(-w // SR[i])
        matmul += 2 * h * w * keys * DIMS[arch][i] * DEPTHS[arch][i]
    c = counts[arch]
    assert c.attn_matmul_flops == matmul
    assert c.attn_norm_flops == 0


def test_cli_prints_the_v2_table(capsys):
    gf.main(['--family', 'ResTV2', '--arch', 'tiny'])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith('| ResTV2 | params (M) | GFLOPs at 224x224')
    assert lines[2] == '| tiny | 30.43 (30,434,776) | 4.11 | 4.00 |'


def test_cli_refuses_archs_of_the_other_family(capsys):
    with pytest.raises(SystemExit):
        gf.main(['--family', 'ResTV2', '--arch', 'lite'])
    assert 'not a ResTV2 arch' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gf.main(['--family', 'ResTV2', '--paper-stem'])


def test_reference_attention_is_required():
    model = gf.ResTClassifier('tiny', family='ResTV2').eval()
    model.backbone.stage2[0].attn.attn_impl = 'lean'
    with pytest.raises(ValueError, match='attn_impl != "reference"'):
        gf.count_complexity(model, (torch.zeros(1, 3, 64, 64), ))
