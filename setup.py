"""mmrest: the ResT vision transformer as an OpenMMLab backbone.

Install the pinned stack with ``make install`` (see README); this file installs mmrest
itself (``pip install -e . --no-build-isolation --no-deps``).
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
    # Tested with Python 3.11, torch 2.14.1, mmengine 0.10.7 and mmcv 2.1.0 (README
    # "Install"). The minimum torch is what the code calls: the autocast queries by device
    # type (torch.amp.is_autocast_available, get_autocast_dtype: 2.4), the
    # (object, 'module.name') entries of torch.serialization.add_safe_globals (2.5), and
    # the weights_only=True default of torch.load that safe loading is built around (2.6).
    python_requires='>=3.9',
    install_requires=['torch>=2.6', 'mmengine>=0.10.0,<1.0', 'mmcv>=2.0.0,<2.2.0'],
    extras_require={
        'det': ['mmdet==3.3.0'],
        'seg': ['mmsegmentation==1.2.2', 'ftfy', 'regex'],
        'cls': ['mmpretrain==1.2.0'],
        'tests': ['pytest', 'hypothesis', 'scikit-image==0.26.0'],
        # ONNX export and ONNX Runtime (README "Deployment: ONNX")
        'deploy': ['onnx==1.23.1', 'onnxruntime==1.30.0', 'onnxscript==0.7.2'],
    },
    zip_safe=False,
)
