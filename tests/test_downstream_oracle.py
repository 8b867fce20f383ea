"""Whole detectors and segmentors with ``mmrest.ResT`` / ``mmrest.ResTV2`` equal the same
models on the independent oracle backbones (tests/reference_rest*.py), weight for weight.

Right values in an unusual memory layout can still be misread downstream (mmcv 2.1.0's
``RoIAlign`` reads a channels-last map as NCHW), so losses, intermediate and final
predictions of this repository's RetinaNet, Mask R-CNN and UperNet configs are compared at
batch 1 and 2 on odd, non-square inputs; the oracle hands over contiguous NCHW maps.
"""
import copy
import functools
import os.path as osp
from typing import Dict, List, Sequence, Tuple

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
from reference_rest import ARCHS, random_authors_state_dict, reference_features
from reference_rest_v2 import random_authors_state_dict as random_authors_state_dict_v2
from reference_rest_v2 import reference_features as reference_features_v2
from torch import Tensor, nn

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
# whole detectors: `make test` runs them, test-fast does not; they need mmcv's ops
pytestmark = [pytest.mark.slow, pytest.mark.ops]

#: float32 agreement: |a - b| <= ATOL_REL * max(1, max |b|) + RTOL * |b|. Two float32
#: implementations differ by up to 1.6e-4 of the scale (ResT small; ResT V2 tiny: 3e-6,
#: see test_backbones.py); a misread layout is wrong by O(1).
RTOL, ATOL_REL = 1e-3, 1e-3

#: The configs compared: the smallest arch of each version with a config for the model.
CONFIGS = {
    'retinanet': {'v1': 'retinanet_rest_small_coco.py',
                  'v2': 'retinanet_restv2_tiny_3x_coco.py'},
    'mask_rcnn': {'v1': 'mask_rcnn_rest_small_coco.py',
                  'v2': 'mask_rcnn_restv2_tiny_3x_coco.py'},
    'upernet': {'v1': 'upernet_rest_small_ade20k.py', 'v2': 'upernet_restv2_tiny_ade20k.py'},
}
VERSIONS = ('v1', 'v2')

#: Each case: batch 1 (odd, non-square) and batch 2 (two odd sizes, padded to the
#: largest H and W, non-square).
BATCHES = {'batch1': [(97, 131)], 'batch2': [(101, 133), (95, 140)]}


def oracle_features_v1(state: Dict[str, Tensor], x: Tensor, arch: str,
                       out_norms: Sequence[int]) -> List[Tensor]:
    """ResT v1: each output norm is in the main path."""
    return reference_features(state, x, ARCHS[arch]['depths'], out_norms=out_norms,
                              main_path=True)


def oracle_features_v2(state: Dict[str, Tensor], x: Tensor, arch: str,
                       out_norms: Sequence[int]) -> List[Tensor]:
    """ResT V2 (``out_norm_in_main_path=False``): output norms on the returned maps only."""
    return reference_features_v2(state, x, arch, out_norms=out_norms, main_path=False)


#: Backbone type of the configs -> (random weights in the authors' layout, the oracle's
#: four stage maps).
ORACLES = {
    'mmrest.ResT': (random_authors_state_dict, oracle_features_v1),
    'mmrest.ResTV2': (random_authors_state_dict_v2, oracle_features_v2),
}


class OracleBackbone(nn.Module):
    """The oracle's maps of the same weights (:data:`ORACLES`), plain contiguous NCHW, of
    the stages in ``out_indices``."""

    def __init__(self, state_dict: Dict[str, Tensor], backbone_type: str, arch: str,
                 out_indices: Sequence[int]) -> None:
        super().__init__()
        self.state = state_dict
        self.features = ORACLES[backbone_type][1]
        self.arch = arch
        self.out_indices = tuple(out_indices)

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        out_norms = [i for i in self.out_indices if i < 3]
        feats = self.features(self.state, x, self.arch, out_norms)
        return tuple(feats[i].contiguous() for i in self.out_indices)


@functools.lru_cache(maxsize=None)
def _build_pair(config: str, test_cfg: Tuple[Tuple[str, float], ...]):
    return build_pair(config, dict(test_cfg))


def cached_pair(config: str, test_cfg: dict) -> Tuple[nn.Module, nn.Module]:
    """:func:`build_pair`, built once per config for the tests of this file (they only
    run the models in eval mode without gradients)."""
    model, oracle = _build_pair(config, tuple(sorted(test_cfg.items())))
    init_default_scope('mmseg' if config.startswith('upernet') else 'mmdet')
    return model, oracle


def build_pair(config: str, test_cfg: dict) -> Tuple[nn.Module, nn.Module]:
    """The config's model with random authors'-layout backbone weights, and a copy of it
    whose backbone is the oracle (all other weights shared by value)."""
    from mmengine.registry import MODELS
    cfg = Config.fromfile(osp.join(ROOT, 'configs', config))
    init_default_scope(cfg.default_scope)
    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.backbone.init_cfg = None
    for key, value in test_cfg.items():
        node = model_cfg.test_cfg
        *path, last = key.split('.')
        for part in path:
            node = node[part]
        node[last] = value
    torch.manual_seed(0)
    model = MODELS.build(model_cfg)
    model.init_weights()
    backbone = model.backbone
    backbone_type, arch = model_cfg.backbone.type, model_cfg.backbone.arch
    assert type(backbone).__name__ == backbone_type.split('.')[-1], backbone_type
    out_indices = tuple(model_cfg.backbone.out_indices)
    assert tuple(backbone.out_indices) == out_indices
    random_weights = ORACLES[backbone_type][0]
    sd = random_weights(arch, num_classes=0, seed=1,
                        out_norms=[i for i in out_indices if i < 3])
    backbone.load_state_dict(sd, strict=True)
    oracle = copy.deepcopy(model)
    oracle.backbone = OracleBackbone(sd, backbone_type, arch, out_indices)
    return model.eval(), oracle.eval()


# Modules whose outputs are compared, by model type (names in mmdet / mmseg models).
CAPTURED = {
    'retinanet': ['neck', 'bbox_head'],
    'mask_rcnn': ['neck', 'rpn_head', 'roi_head.bbox_roi_extractor', 'roi_head.bbox_head',
                  'roi_head.mask_roi_extractor', 'roi_head.mask_head'],
}


def flat_tensors(value) -> List[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in flat_tensors(v)]
    if isinstance(value, dict):
        return [t for k in sorted(value) for t in flat_tensors(value[k])]
    return []


def run(model: nn.Module, names: List[str], call) -> Tuple[object, Dict[str, List]]:
    """``call(model)`` with a fixed seed (proposal sampling), recording the outputs of
    the named submodules (every call of each, in order)."""
    captured: Dict[str, List[Tensor]] = {name: [] for name in names}
    handles = [
        model.get_submodule(name).register_forward_hook(
            lambda mod, args, out, name=name: captured[name].extend(
                t.detach().clone() for t in flat_tensors(out)))
        for name in names
    ]
    try:
        torch.manual_seed(0)
        with torch.no_grad():
            result = call(model)
    finally:
        for handle in handles:
            handle.remove()
    return result, captured


def assert_close(actual: Tensor, expected: Tensor, what: str) -> None:
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    if not expected.is_floating_point():
        assert torch.equal(actual, expected), what
        return
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL_REL * scale,
                               msg=lambda m: f'{what}: {m}')


def compare_captures(ours: Dict[str, List[Tensor]], oracle: Dict[str, List[Tensor]]):
    for name in oracle:
        assert len(ours[name]) == len(oracle[name]) > 0, name
        for i, (a, b) in enumerate(zip(ours[name], oracle[name])):
            assert_close(a, b, f'{name}[{i}]')


#: Up to one pixel in this many may flip between two implementations (top two class
#: scores within float32 rounding; one of 12,707 seen); the logits meet the bounds above.
PIXELS_PER_FLIP = 2000


def compare_losses(ours: dict, oracle: dict, pixels: int = 0) -> None:
    """Equal losses; with ``pixels`` (labelled pixels of the batch), the segmentors'
    pixel accuracies (percent) to ``pixels / PIXELS_PER_FLIP`` pixels, at least one."""
    assert sorted(ours) == sorted(oracle)
    for key in oracle:
        for a, b in zip(flat_tensors(ours[key]), flat_tensors(oracle[key])):
            if pixels and key.endswith('acc_seg'):
                flips = max(1, pixels // PIXELS_PER_FLIP)
                assert abs(a.item() - b.item()) <= 100 * flips / pixels + 1e-4, (
                    f'loss {key}: {a.item()} vs {b.item()}, more than {flips} pixel(s) '
                    f'of {pixels} differ')
                continue
            assert_close(a, b, f'loss {key}')


# ------------------------------------------------------------------------- detection
def det_batch(model: nn.Module, sizes: List[Tuple[int, int]], with_mask: bool) -> dict:
    """A preprocessed mmdet batch (no padding to multiples of 32: odd sizes reach the
    backbone)."""
    from mmdet.testing import demo_mm_inputs
    torch.manual_seed(2)
    packed = demo_mm_inputs(len(sizes), [[3, h, w] for h, w in sizes],
                            num_items=[4] * len(sizes), num_classes=80,
                            with_mask=with_mask)
    model.data_preprocessor.pad_size_divisor = 1
    return model.data_preprocessor(packed, training=True)


def predictions_of(results, top: int) -> List[Tensor]:
    out = []
    for sample in results:
        pred = sample.pred_instances
        order = torch.argsort(pred.scores, descending=True, stable=True)[:top]
        out += [pred.scores[order], pred.bboxes[order], pred.labels[order]]
    return out


def spread_weights(module: nn.Module, std: float) -> None:
    """Re-draw a head's classifier weights with a larger std (seeded), so that the top
    scores of a randomly initialised head are far apart compared with float32 rounding
    and the ranking by score is stable."""
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        module.weight.copy_(torch.randn(module.weight.shape, generator=g) * std)


@pytest.mark.parametrize('batch', sorted(BATCHES))
@pytest.mark.parametrize('version', VERSIONS)
def test_retinanet_matches_oracle_backbone(version, batch):
    """RetinaNet end to end: losses, FPN and head outputs, the top predictions."""
    model, oracle = cached_pair(CONFIGS['retinanet'][version],
                               {'score_thr': 0.0, 'max_per_img': 100})
    for m in (model, oracle):
        spread_weights(m.bbox_head.retina_cls, 0.05)
    data = det_batch(model, BATCHES[batch], with_mask=False)
    inputs, samples = data['inputs'], data['data_samples']
    assert inputs.shape[-2] % 2 and inputs.shape[-1] != inputs.shape[-2]
    names = CAPTURED['retinanet']

    for i, (a, b) in enumerate(zip(model.backbone(inputs), oracle.backbone(inputs))):
        assert a.is_contiguous(), f'stage map {i} is not contiguous NCHW'
        assert_close(a, b, f'backbone map {i}')

    losses, ours = run(model, names, lambda m: m.loss(inputs, copy.deepcopy(samples)))
    losses_ref, theirs = run(oracle, names,
                             lambda m: m.loss(inputs, copy.deepcopy(samples)))
    compare_losses(losses, losses_ref)
    compare_captures(ours, theirs)

    def predict(m):
        return m.predict(inputs, copy.deepcopy(samples), rescale=False)

    (preds, ours), (preds_ref, theirs) = run(model, names, predict), run(oracle, names,
                                                                          predict)
    compare_captures(ours, theirs)
    for i, (a, b) in enumerate(zip(predictions_of(preds, 10),
                                   predictions_of(preds_ref, 10))):
        assert b.numel() > 0  # something to compare
        assert_close(a, b, f'prediction {i}')


def fixed_proposals(samples, per_image: int = 48) -> list:
    """Proposals that do not depend on the RPN: jittered ground-truth boxes and random
    boxes, the same for both models (fewer than the R-CNN sampler draws, so every one
    is used and the sample does not depend on the order of near-equal RPN scores)."""
    from mmengine.structures import InstanceData
    g = torch.Generator().manual_seed(5)
    out = []
    for sample in samples:
        h, w = sample.metainfo['img_shape']
        gt = sample.gt_instances.bboxes
        jitter = gt.repeat(4, 1) + torch.randn(len(gt) * 4, 4, generator=g) * 4
        xy = torch.rand(per_image - len(jitter), 2, generator=g) * torch.tensor([w, h])
        wh = torch.rand(per_image - len(jitter), 2, generator=g) * 40 + 4
        boxes = torch.cat([jitter, torch.cat([xy, xy + wh], 1)])
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        out.append(InstanceData(bboxes=boxes, scores=torch.ones(len(boxes))))
    return out


@pytest.mark.parametrize('batch', sorted(BATCHES))
@pytest.mark.parametrize('version', VERSIONS)
def test_mask_rcnn_matches_oracle_backbone(version, batch):
    """Mask R-CNN: FPN maps, RPN outputs and losses; on the same proposals RoI features,
    box and mask heads, R-CNN losses and predictions (the RPN's own proposals depend on
    near-equal anchor scores, not on the backbone)."""
    model, oracle = cached_pair(CONFIGS['mask_rcnn'][version],
                               {'rcnn.score_thr': 0.0, 'rcnn.max_per_img': 100})
    for m in (model, oracle):
        spread_weights(m.roi_head.bbox_head.fc_cls, 0.05)
    data = det_batch(model, BATCHES[batch], with_mask=True)
    inputs, samples = data['inputs'], data['data_samples']
    names = [n for n in CAPTURED['mask_rcnn'] if n.startswith('roi_head.')]
    feats, feats_ref = model.extract_feat(inputs), oracle.extract_feat(inputs)
    for i, (a, b) in enumerate(zip(model.backbone(inputs), oracle.backbone(inputs))):
        assert a.is_contiguous(), f'stage map {i} is not contiguous NCHW'
        assert_close(a, b, f'backbone map {i}')
    for i, (a, b) in enumerate(zip(feats, feats_ref)):
        assert_close(a, b, f'FPN map {i}')

    rpn, rpn_ref = run(model, ['rpn_head'],
                       lambda m: m.rpn_head.loss(feats, copy.deepcopy(samples))), run(
                           oracle, ['rpn_head'],
                           lambda m: m.rpn_head.loss(feats_ref, copy.deepcopy(samples)))
    compare_losses(rpn[0], rpn_ref[0])
    compare_captures(rpn[1], rpn_ref[1])

    proposals = fixed_proposals(samples)
    roi, roi_ref = (run(m, names, lambda m, f=f: m.roi_head.loss(
        f, copy.deepcopy(proposals), copy.deepcopy(samples)))
        for m, f in ((model, feats), (oracle, feats_ref)))
    compare_losses(roi[0], roi_ref[0])
    compare_captures(roi[1], roi_ref[1])

    pred, pred_ref = (run(m, names, lambda m, f=f: m.roi_head.predict(
        f, copy.deepcopy(proposals), copy.deepcopy(samples), rescale=False))
        for m, f in ((model, feats), (oracle, feats_ref)))
    compare_captures(pred[1], pred_ref[1])  # includes the mask logits
    for i, (a, b) in enumerate(zip(predictions_of_instances(pred[0]),
                                   predictions_of_instances(pred_ref[0]))):
        assert b.numel() > 0
        assert_close(a, b, f'prediction {i}')


def predictions_of_instances(results) -> List[Tensor]:
    """scores, boxes and labels of each image's InstanceData, in score order."""
    out = []
    for pred in results:
        order = torch.argsort(pred.scores, descending=True, stable=True)[:10]
        out += [pred.scores[order], pred.bboxes[order], pred.labels[order]]
    return out


# ---------------------------------------------------------------------- segmentation
def seg_batch(sizes: List[Tuple[int, int]]):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    g = torch.Generator().manual_seed(3)
    H, W = max(h for h, _ in sizes), max(w for _, w in sizes)
    inputs = torch.randn(len(sizes), 3, H, W, generator=g)
    samples = []
    for h, w in sizes:
        label = torch.full((1, H, W), 255, dtype=torch.long)
        label[:, :h, :w] = torch.randint(0, 150, (1, h, w), generator=g)
        sample = SegDataSample(gt_sem_seg=PixelData(data=label))
        sample.set_metainfo(dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(H, W)))
        samples.append(sample)
    return inputs, samples


@pytest.mark.parametrize('batch', sorted(BATCHES))
@pytest.mark.parametrize('version', VERSIONS)
def test_segmentor_matches_oracle_backbone(version, batch):
    """UperNet: backbone maps, both heads, the losses (pixel accuracies included) and the
    logits; the classifiers' weights are spread so the top classes are far apart."""
    model, oracle = cached_pair(CONFIGS['upernet'][version], {})
    for m in (model, oracle):
        spread_weights(m.decode_head.conv_seg, 0.05)
        spread_weights(m.auxiliary_head.conv_seg, 0.05)
    inputs, samples = seg_batch(BATCHES[batch])
    with torch.no_grad():
        feats, feats_ref = model.extract_feat(inputs), oracle.extract_feat(inputs)
        for i, (a, b) in enumerate(zip(feats, feats_ref)):
            assert a.is_contiguous(), f'stage map {i} is not contiguous NCHW'
            assert_close(a, b, f'backbone map {i}')
        for head in ('decode_head', 'auxiliary_head'):
            assert_close(getattr(model, head)(feats), getattr(oracle, head)(feats_ref),
                         head)

    losses, _ = run(model, [], lambda m: m.loss(inputs, copy.deepcopy(samples)))
    losses_ref, _ = run(oracle, [], lambda m: m.loss(inputs, copy.deepcopy(samples)))
    compare_losses(losses, losses_ref, pixels=sum(h * w for h, w in BATCHES[batch]))

    preds, _ = run(model, [], lambda m: m.predict(inputs, copy.deepcopy(samples)))
    preds_ref, _ = run(oracle, [], lambda m: m.predict(inputs, copy.deepcopy(samples)))
    for sample, sample_ref, (h, w) in zip(preds, preds_ref, BATCHES[batch]):
        logits, logits_ref = sample.seg_logits.data, sample_ref.seg_logits.data
        assert logits.shape == (150, h, w)
        assert_close(logits, logits_ref, 'seg_logits')
