"""The documentation cannot rot silently: in README.md and docs/*.md every relative link
(and its anchor) resolves, every repository path and test name exists, every config named
loads, every ``python tools/...`` command shown answers ``--help`` and has the options
shown with it, and the table of
errors in docs/backbone_options.md is what the backbones raise."""
import functools
import glob
import itertools
import os
import os.path as osp
import re
import subprocess
import sys
from typing import Dict, List, Set, Tuple

import pytest
import torch
from mmengine.config import Config

import mmrest  # noqa: F401  (first: the configs' custom imports and the registry)
from mmrest.models import ResT, ResTV2

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
PAGES = ['README.md'] + sorted(
    osp.relpath(p, REPO) for p in glob.glob(osp.join(REPO, 'docs', '*.md')))
#: Top-level folders of the repository whose paths the pages may name.
REPO_FOLDERS = ('configs', 'tools', 'mmrest', 'tests', 'docs', 'requirements')
FENCE = re.compile(r'^```.*?^```', re.S | re.M)
LINK = re.compile(r'\[[^\]]*\]\(([^)\s]+)\)')
PATH = re.compile(r'(?<![\w./:-])((?:%s)/[\w./{},*-]*)(::\w+)?' % '|'.join(REPO_FOLDERS))
COMMAND = re.compile(r'(?<![\w/-])python3? (tools/[\w/]+\.py)')


@functools.lru_cache(maxsize=None)
def _text(page: str) -> str:
    with open(osp.join(REPO, page), encoding='utf-8') as f:
        return f.read()


def _without_code(text: str) -> str:
    return FENCE.sub('', text)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')


@functools.lru_cache(maxsize=None)
def _anchors(page: str) -> Set[str]:
    anchors: Set[str] = set()
    counts: Dict[str, int] = {}
    for match in re.finditer(r'^#{1,6} (.+)$', _without_code(_text(page)), re.M):
        slug = _slug(match.group(1))
        n = counts.get(slug, 0)
        anchors.add(slug if n == 0 else f'{slug}-{n}')
        counts[slug] = n + 1
    return anchors


def _expand_braces(path: str) -> List[str]:
    """``a_{x,y}_b`` -> ``['a_x_b', 'a_y_b']`` (any number of groups)."""
    parts = re.split(r'\{([^{}]*)\}', path)
    choices = [[p] if i % 2 == 0 else p.split(',') for i, p in enumerate(parts)]
    return [''.join(c) for c in itertools.product(*choices)]


@functools.lru_cache(maxsize=None)
def _repo_paths(page: str) -> Tuple[Tuple[str, str], ...]:
    """(path, test name or '') of every repository path the page names, braces expanded;
    web addresses are left out."""
    text = re.sub(r'https?://\S+', '', _text(page))
    found = []
    for match in PATH.finditer(text):
        raw = match.group(1).rstrip('.,')
        for path in _expand_braces(raw):
            found.append((path, (match.group(2) or '')[2:]))
    return tuple(dict.fromkeys(found))


def _all(kind) -> List[Tuple[str, str]]:
    return sorted({(page, item) for page in PAGES for item in kind(page)})


def _configs() -> List[str]:
    return sorted({p for page in PAGES for p, _ in _repo_paths(page)
                   if p.startswith('configs/') and p.endswith('.py')})


def _commands() -> List[str]:
    return sorted({m.group(1) for page in PAGES for m in COMMAND.finditer(_text(page))})


def _options_shown(script: str) -> Set[str]:
    """The ``--options`` the pages give ``script`` on the line of a command (up to a
    shell comment or the end of an inline code span)."""
    options: Set[str] = set()
    for page in PAGES:
        for line in _text(page).splitlines():
            for match in COMMAND.finditer(line):
                if match.group(1) == script:
                    rest = re.split(r'`| # ', line[match.end():])[0]
                    options.update(re.findall(r'(?<![\w-])--[a-z][\w-]*', rest))
    return options


def test_the_pages_exist_and_are_found():
    assert 'README.md' in PAGES and len(PAGES) >= 10
    for page in ('get_started', 'backbone_options', 'checkpoints', 'recipes', 'training',
                 'deployment', 'benchmarks', 'design', 'troubleshooting', 'changelog'):
        assert f'docs/{page}.md' in PAGES
    # what the other checks find, so that a broken pattern cannot pass them all
    assert len(_configs()) >= 20
    assert {'tools/demo.py', 'tools/train.py', 'tools/test.py'} <= set(_commands())


@pytest.mark.parametrize('page', PAGES)
def test_relative_links_resolve(page):
    bad = []
    for target in LINK.findall(_without_code(_text(page))):
        if re.match(r'^[a-z]+:', target):  # https:, mailto:
            continue
        path, _, anchor = target.partition('#')
        resolved = osp.normpath(osp.join(osp.dirname(page), path)) if path else page
        if not osp.exists(osp.join(REPO, resolved)):
            bad.append(f'{target}: no {resolved}')
        elif anchor and resolved.endswith('.md') and anchor not in _anchors(resolved):
            bad.append(f'{target}: no heading #{anchor} in {resolved}')
    assert not bad, f'{page}: {bad}'


@pytest.mark.parametrize('page', PAGES)
def test_repository_paths_and_test_names_exist(page):
    bad = []
    for path, test in _repo_paths(page):
        matches = glob.glob(osp.join(REPO, path))
        if not matches:
            bad.append(path)
        elif test and not re.search(rf'^(?:def|class) {test}\b',
                                    open(matches[0], encoding='utf-8').read(), re.M):
            bad.append(f'{path}::{test}')
    assert not bad, f'{page} names what the repository does not have: {bad}'


@functools.lru_cache(maxsize=None)
def _parsed(path: str) -> Config:
    # mmengine re-reads every model-index of a package for each ``pkg::`` base: parse once
    return Config.fromfile(osp.join(REPO, path))


@pytest.mark.parametrize('path', _configs())
def test_configs_named_load(path):
    cfg = _parsed(path)
    assert cfg.filename == osp.join(REPO, path)
    assert cfg._cfg_dict  # something was read


@pytest.mark.slow
@pytest.mark.parametrize('script', _commands())
def test_commands_shown_answer_help(script):
    proc = subprocess.run([sys.executable, script, '--help'], cwd=REPO, capture_output=True,
                          text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith('usage:'), proc.stdout[:500]
    unknown = sorted(o for o in _options_shown(script)
                     if not re.search(rf'{o}(?![\w-])', proc.stdout))
    assert not unknown, f'the pages give {script} options it does not have: {unknown}'


# --------------------------------------------------------------------- the README
def _section(text: str, heading: str) -> str:
    start = text.index(f'\n{heading}\n')
    end = text.find('\n## ', start + 1)
    return text[start:end if end > 0 else len(text)]


def test_readme_is_an_entry_point():
    text = _text('README.md')
    assert len(text.splitlines()) <= 250
    # CI runs the README's first commands: they stay `make demo` and `make test`
    first_block = FENCE.search(text).group(0).splitlines()[1:-1]
    assert [line.split('#')[0].strip() for line in first_block] == ['make demo', 'make test']
    for paper in ('arxiv.org/abs/2105.13677', 'arxiv.org/abs/2204.07366',
                  'github.com/wofmanaf/ResT'):
        assert paper in text
    environments = _section(text, '## Supported environments')
    # the stack matrix (tools/stacks.sh): each row names what the tests ran there
    for stack in ('| 3.9 | 2.1.2 |', '| 3.12 | 2.10.0 |', 'make test-stacks'):
        assert stack in environments, stack
    assert 'pip install -e .' in environments and 'python tools/demo.py' in environments
    own_config = _section(text, '## ResT in your own config')
    for needed in ('mean=[123.675, 116.28, 103.53]', 'std=[58.395, 57.12, 57.375]',
                   'bgr_to_rgb=True', 'in_channels=', 'mmrest.ResTV2',
                   'out_norm_in_main_path', 'pretrained=None'):
        assert needed in own_config, needed


@pytest.mark.parametrize('page', PAGES)
def test_no_issue_numbers(page):
    text = _without_code(_text(page))
    assert not re.findall(r'(?<![\w&/])#\d+\b|\b[Ii]ssues? \d+', text)


# ------------------------------------------------------------- the table of errors
def _error_rows() -> List[Tuple[str, str, str]]:
    section = _section(_text('docs/backbone_options.md'), '## Errors')
    rows = re.findall(r'^\| `([^|]+)` \| `(\w+)` \| ([^|]*) \|$', section, re.M)
    assert len(rows) >= 10
    return rows


@pytest.mark.parametrize('call, exception, names', _error_rows())
def test_table_of_errors_is_what_the_backbones_raise(call, exception, names):
    with pytest.raises(Exception) as info:
        eval(call, {'ResT': ResT, 'ResTV2': ResTV2, 'torch': torch})  # noqa: S307
    assert type(info.value).__name__ == exception, f'{call}: {info.value!r}'
    message = str(info.value)
    assert '\n' not in message
    for token in re.findall(r'`([^`]+)`', names):
        assert token in message, f'{call}: {token!r} not in {message!r}'
