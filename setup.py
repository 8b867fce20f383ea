"""mmrest: the ResT vision transformer as an OpenMMLab backbone.

``pip install -e .`` installs mmrest into an environment that has torch, mmengine and mmcv
(or mmcv-lite), changing none of them; ``make install`` builds the pinned, tested stack in
``.venv`` (see README).
"""
from setuptools import find_packages, setup


def _version() -> str:
    scope: dict = {}
    with open('mmrest/version.py', encoding='utf-8') as f:
        exec(f.read(), scope)
    return scope['__version__']


setup(
    name='mmrest',
    version=_version(),
    description='ResT (NeurIPS 2021) as an OpenMMLab backbone for mmdet, mmseg and '
    'mmpretrain',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    packages=find_packages(include=['mmrest', 'mmrest.*']),
    python_requires='>=3.9',
    # Nothing of the stack: torch, mmcv (or mmcv-lite, onedl-mmcv) and mmengine (or
    # onedl-mmengine) are the user's, as for mmdet; `import mmrest` checks their versions
    # (mmrest/stack_check.py) and `mim install` reads requirements/mminstall.txt.
    install_requires=[],
    extras_require={
        # the toolboxes (mmdet, mmsegmentation, mmpretrain, or the onedl-* fork) are the
        # user's too; these are what the tests and the ONNX export add
        'tests': ['pytest', 'hypothesis', 'scikit-image'],
        'deploy': ['onnx', 'onnxruntime', 'onnxscript'],
    },
    zip_safe=False,
)
