"""Shared helpers of the engine/tool tests: tiny demo data, configs and tool runs."""
import json
import os
import os.path as osp
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
PYTHON = sys.executable
DEMO_CONFIG = osp.join(REPO, 'configs', 'demo', 'retinanet_rest_lite_shapes.py')
TRAIN = osp.join(REPO, 'tools', 'train.py')
TEST = osp.join(REPO, 'tools', 'test.py')
TESTS = osp.dirname(osp.abspath(__file__))


def probe_hooks_text(*hooks: str) -> str:
    """Config lines that add hooks of tests/_probe_hooks.py (for tool subprocesses)."""
    listed = ', '.join(f'dict(type={hook!r})' for hook in hooks)
    return (f"custom_imports = dict(imports=['_probe_hooks'], allow_failed_imports=False)\n"
            f"custom_hooks = [{listed}]\n")


def read_probe(work_dir: str, rank: int = 0) -> List[dict]:
    """The records :class:`_probe_hooks.RecordRandomStreams` wrote for one rank."""
    with open(osp.join(work_dir, f'probe_rank{rank}.jsonl'), encoding='utf-8') as f:
        return [json.loads(line) for line in f if line.strip()]


def make_shapes_data(root: str, num_train: int = 16, num_val: int = 8,
                     img_size: Sequence[int] = (64, 64), seed: int = 0) -> str:
    """Write a small synthetic shapes dataset; returns its folder."""
    from mmrest.testing import generate_shapes_dataset
    generate_shapes_dataset(root, num_train=num_train, num_val=num_val,
                            img_size=tuple(img_size), seed=seed)
    return root


def pipelines_text(scale: tuple, annotations: str, pack: str, test_pack: str) -> str:
    """``train_pipeline`` and ``test_pipeline`` config lines: load the image and the
    annotations (``LoadAnnotations`` arguments), resize to ``scale``, flip (training), pack."""
    return f"""train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', {annotations}),
    dict(type='Resize', scale={scale!r}, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='{pack}'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale={scale!r}, keep_ratio=True),
    dict(type='LoadAnnotations', {annotations}),
    {test_pack},
]
"""


def demo_config_text(data_root: str,
                     max_iters: int = 6,
                     ckpt_interval: int = 3,
                     val_interval: Optional[int] = None,
                     with_val: bool = True,
                     batch_size: int = 2,
                     img_scale: Sequence[int] = (64, 64),
                     drop_path_rate: float = 0.1,
                     seed: int = 0,
                     max_keep_ckpts: int = 2,
                     extra: str = '') -> str:
    """A config inheriting the demo config, shrunk for tests (no imports inside)."""
    data_root = data_root.rstrip('/') + '/'
    scale = tuple(img_scale)
    val_interval = val_interval or max_iters
    pipelines = pipelines_text(
        scale, 'with_bbox=True', 'PackDetInputs',
        "dict(type='PackDetInputs',\n"
        "         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))")
    text = f"""_base_ = {DEMO_CONFIG!r}
data_root = {data_root!r}
{pipelines}train_dataloader = dict(
    batch_size={batch_size}, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator
model = dict(backbone=dict(drop_path_rate={drop_path_rate}))
train_cfg = dict(max_iters={max_iters}, val_interval={val_interval})
default_hooks = dict(
    logger=dict(interval=1),
    checkpoint=dict(interval={ckpt_interval}, max_keep_ckpts={max_keep_ckpts}))
randomness = dict(seed={seed}, deterministic=True)
env_cfg = dict(cudnn_benchmark=False)
"""
    if not with_val:
        text += 'val_dataloader = None\nval_cfg = None\nval_evaluator = None\n'
    return text + extra


def write_config(path: str, text: str) -> str:
    """Write a config file; returns its path."""
    os.makedirs(osp.dirname(path), exist_ok=True)
    with open(path, 'w', encoding='utf-8') as f:
        f.write(text)
    return path


def train_demo_reference(root: str, num_train: int, num_val: int, **config) -> tuple:
    """Shapes data and a shrunk demo config (``demo_config_text(**config)``) under
    ``root``, trained to the end in ``root/ref``; returns the config's path and the run's
    work dir."""
    data = make_shapes_data(osp.join(root, 'data'), num_train=num_train, num_val=num_val)
    config = write_config(osp.join(root, 'cfg.py'), demo_config_text(data, **config))
    ref = osp.join(root, 'ref')
    proc = run(train_cmd(config, ref))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return config, ref


def tool_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Environment of tool subprocesses: one thread each (deterministic, no contention);
    the repository and tests/ (for ``_probe_hooks``) on the path."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONHASHSEED='0')
    env['PYTHONPATH'] = os.pathsep.join([REPO, TESTS] + (
        [env['PYTHONPATH']] if env.get('PYTHONPATH') else []))
    if extra:
        env.update(extra)
    return env


def run(args: List[str], timeout: float = 600, env: Optional[Dict[str, str]] = None,
        cwd: str = REPO) -> subprocess.CompletedProcess:
    """Run a command to completion, capturing its output."""
    return subprocess.run(args, cwd=cwd, env=env or tool_env(), capture_output=True,
                          text=True, timeout=timeout)


def train_cmd(config: str, work_dir: str, *more: str) -> List[str]:
    """``python tools/train.py CONFIG --work-dir WORK_DIR ...``."""
    return [PYTHON, TRAIN, config, '--work-dir', work_dir, *more]


def load_ckpt(path: str) -> dict:
    """Load a checkpoint the way the tools do (safe loading)."""
    from mmrest.utils import safe_load_checkpoint
    return safe_load_checkpoint(path)


def read_last_checkpoint(work_dir: str) -> str:
    """The path ``last_checkpoint`` names."""
    with open(osp.join(work_dir, 'last_checkpoint'), encoding='utf-8') as f:
        return f.read().strip()


def scalars(work_dir: str) -> List[dict]:
    """The json lines of the newest run's scalar log in a work dir."""
    runs = sorted(d for d in os.listdir(work_dir) if osp.isdir(osp.join(work_dir, d))
                  and d[:8].isdigit())
    path = osp.join(work_dir, runs[-1], 'vis_data', 'scalars.json')
    with open(path, encoding='utf-8') as f:
        return [json.loads(line) for line in f if line.strip()]


def assert_same_tensors(a: dict, b: dict, atol: float = 0.0, what: str = 'state_dict') -> None:
    """Exact (or atol) equality of two flat dicts of tensors, naming the first mismatch."""
    import torch
    assert sorted(a) == sorted(b), f'{what}: different keys'
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, torch.Tensor):
            assert x.shape == y.shape and x.dtype == y.dtype, f'{what}[{key}]: shape/dtype'
            if atol == 0:
                assert torch.equal(x, y), \
                    f'{what}[{key}]: max diff {(x.double() - y.double()).abs().max().item()}'
            else:
                assert torch.allclose(x, y, atol=atol, rtol=0), f'{what}[{key}]'
        else:
            assert x == y, f'{what}[{key}]: {x!r} != {y!r}'


def seg_config_text(data_root: str, max_iters: int = 4, ckpt_interval: int = 2,
                    img_scale: Sequence[int] = (64, 64), seed: int = 0) -> str:
    """UperNet-ResT (configs/upernet_rest_small_ade20k.py, shrunk) on the shapes' semantic
    maps: background + the demo's shape classes."""
    from mmrest.testing import DEMO_CLASSES
    classes = ('background', ) + tuple(DEMO_CLASSES)
    palette = [(40 * i % 256, 90 * i % 256, 150 * i % 256) for i in range(len(classes))]
    data_root = data_root.rstrip('/') + '/'
    scale = tuple(img_scale)
    base = osp.join(REPO, 'configs', 'upernet_rest_small_ade20k.py')
    pipelines = pipelines_text(scale, 'reduce_zero_label=False', 'PackSegInputs',
                               "dict(type='PackSegInputs')")
    return f"""_base_ = {base!r}
data_root = {data_root!r}
crop_size = {scale!r}
metainfo = dict(classes={classes!r}, palette={palette!r})
{pipelines}dataset = dict(type='BaseSegDataset', data_root=data_root, metainfo=metainfo,
               img_suffix='.png', seg_map_suffix='.png', reduce_zero_label=False)
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(dataset, _delete_=True,
                 data_prefix=dict(img_path='train', seg_map_path='semantic/train'),
                 pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1, num_workers=0, persistent_workers=False,
    dataset=dict(dataset, _delete_=True,
                 data_prefix=dict(img_path='val', seg_map_path='semantic/val'),
                 pipeline=test_pipeline))
test_dataloader = val_dataloader
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(
        _delete_=True,
        type='mmrest.ResT',
        arch=dict(embed_dims=[32, 64, 128, 256], depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8],
                  mlp_ratios=[4, 4, 4, 4], sr_ratios=[8, 4, 2, 1]),
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.1,
        init_cfg=None),
    decode_head=dict(in_channels=[32, 64, 128, 256], channels=32,
                     num_classes={len(classes)}),
    auxiliary_head=dict(in_channels=128, channels=32, num_classes={len(classes)}))
train_cfg = dict(type='IterBasedTrainLoop', max_iters={max_iters}, val_interval={max_iters})
default_hooks = dict(
    logger=dict(interval=1),
    checkpoint=dict(by_epoch=False, interval={ckpt_interval}, max_keep_ckpts=2))
randomness = dict(seed={seed}, deterministic=True)
"""


def write_cls_annotations(data_root: str) -> None:
    """``<split>.txt`` lines ``<file> <label>``: the category of the first shape."""
    for split in ('train', 'val'):
        with open(osp.join(data_root, 'annotations', f'instances_{split}.json')) as f:
            coco = json.load(f)
        first = {}
        for ann in coco['annotations']:
            first.setdefault(ann['image_id'], ann['category_id'] - 1)
        with open(osp.join(data_root, f'{split}.txt'), 'w') as f:
            for img in coco['images']:
                f.write(f"{img['file_name']} {first.get(img['id'], 0)}\n")


def cls_config_text(data_root: str, max_epochs: int = 2, img_size: int = 64,
                    seed: int = 0, flip_prob: float = 0.5, extra: str = '') -> str:
    """ResT-Lite ImageNet recipe (configs/rest_lite_imagenet.py, shrunk, epoch-based,
    Mixup/CutMix kept) classifying the first shape of each image."""
    from mmrest.testing import DEMO_CLASSES
    classes = tuple(DEMO_CLASSES)
    data_root = data_root.rstrip('/') + '/'
    base = osp.join(REPO, 'configs', 'rest_lite_imagenet.py')
    return f"""_base_ = {base!r}
data_root = {data_root!r}
pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomFlip', prob={flip_prob}, direction='horizontal'),
    dict(type='Resize', scale=({img_size}, {img_size})),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=({img_size}, {img_size})),
    dict(type='PackInputs'),
]
metainfo = dict(classes={classes!r})
train_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False,
    dataset=dict(_delete_=True, type='CustomDataset', data_root=data_root,
                 ann_file='train.txt', data_prefix='train', metainfo=metainfo,
                 pipeline=pipeline))
val_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False,
    dataset=dict(_delete_=True, type='CustomDataset', data_root=data_root,
                 ann_file='val.txt', data_prefix='val', metainfo=metainfo,
                 pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_evaluator = val_evaluator
data_preprocessor = dict(num_classes={len(classes)})
model = dict(backbone=dict(init_cfg=None), head=dict(num_classes={len(classes)}))
param_scheduler = [dict(type='LinearLR', start_factor=0.1, by_epoch=True, begin=0, end=2,
                        convert_to_iter_based=True)]
train_cfg = dict(by_epoch=True, max_epochs={max_epochs}, val_interval=1)
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=1, max_keep_ckpts=2))
randomness = dict(seed={seed}, deterministic=True)
""" + extra
