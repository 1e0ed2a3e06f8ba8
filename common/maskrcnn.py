"""torchvision Mask R-CNN for instance sites: a CPU-sized ``slim`` build and ResNet-50-FPN.

Both are built by hand (never ``maskrcnn_resnet50_fpn``): that factory ignores the norm and
frozen-layer choices without downloaded weights, and nothing here may download anything.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torchvision.models import resnet18, resnet50
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign

# Nuclei and small lesions are 5-60 px across: anchors start at 8 px (torchvision's at 32).
ANCHOR_SIZES = ((8,), (16,), (32,), (64,), (128,))
ASPECT_RATIOS = ((0.5, 1.0, 2.0),) * len(ANCHOR_SIZES)
NUM_CLASSES = 2  # background + object: instance sites declare one foreground class
HEAD_PREFIXES = ("roi_heads.box_predictor.", "roi_heads.mask_predictor.")  # class-specific layers
MAX_DETECTIONS = 300  # a 256 px MoNuSeg crop holds up to ~150 nuclei
SCORE_THRESHOLD = 0.5  # detections scoring lower are dropped before their masks are pasted


def build_maskrcnn(in_channels: int, backbone: str, norm: str, image_size: int) -> MaskRCNN:
    """Mask R-CNN whose inputs are already-normalized ``image_size`` crops (never resized).

    Args:
        in_channels: image channels (3 for H&E, 1 for grayscale); a non-RGB stem is a new conv.
        backbone: ``slim`` (ResNet-18 body, 64-channel FPN and heads; ~0.1 s per crop on CPU) or
            ``resnet50`` (torchvision's ResNet-50-FPN layout, so its checkpoints load fully).
        norm: ``group``/``instance``: GroupNorm in body, FPN and mask head (DP-compatible,
            trained from scratch, kept at the site under local-layers=norm); ``frozen``:
            BatchNorm statistics frozen at their pretrained values, FPN without norm.
        image_size: crop / tile edge in pixels.
    """
    if backbone not in ("slim", "resnet50"):
        raise ValueError(f"backbone must be slim or resnet50, got {backbone!r}")
    norm_layer = _norm_layer(norm)
    body = (resnet18 if backbone == "slim" else resnet50)(weights=None, norm_layer=norm_layer)
    if in_channels != 3:
        body.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    stage_channels = [64, 128, 256, 512] if backbone == "slim" else [256, 512, 1024, 2048]
    width = 64 if backbone == "slim" else 256
    head_norm = None if norm == "frozen" else norm_layer
    fpn = BackboneWithFPN(body, {f"layer{k}": str(k - 1) for k in range(1, 5)}, stage_channels,
                          width, norm_layer=head_norm)
    if backbone == "slim":
        box_head, box_dim = TwoMLPHead(width * 7 * 7, 256), 256
        mask_head = MaskRCNNHeads(width, [width, width], 1, norm_layer=head_norm)
    else:
        box_head, box_dim = TwoMLPHead(width * 7 * 7, 1024), 1024
        mask_head = MaskRCNNHeads(width, [width] * 4, 1, norm_layer=head_norm)
    levels = ["0", "1", "2", "3"]
    return MaskRCNN(
        fpn,
        num_classes=None,
        min_size=image_size,
        max_size=image_size,
        image_mean=[0.0] * in_channels,  # fedseg's transforms already z-score each channel
        image_std=[1.0] * in_channels,
        rpn_anchor_generator=AnchorGenerator(ANCHOR_SIZES, ASPECT_RATIOS),
        rpn_pre_nms_top_n_train=1000, rpn_post_nms_top_n_train=500,
        rpn_pre_nms_top_n_test=1000, rpn_post_nms_top_n_test=500,
        box_roi_pool=MultiScaleRoIAlign(levels, 7, 2),
        box_head=box_head,
        box_predictor=FastRCNNPredictor(box_dim, NUM_CLASSES),
        box_batch_size_per_image=128,  # RoI heads dominate the cost
        box_detections_per_img=MAX_DETECTIONS,
        box_score_thresh=SCORE_THRESHOLD,
        mask_roi_pool=MultiScaleRoIAlign(levels, 14, 2),
        mask_head=mask_head,
        mask_predictor=MaskRCNNPredictor(width, width, NUM_CLASSES),
    )


def _norm_layer(norm: str) -> Callable[[int], nn.Module]:
    if norm == "frozen":
        return FrozenBatchNorm2d
    if norm == "group":
        return lambda channels: nn.GroupNorm(min(32, channels // 8) or 1, channels)
    if norm == "instance":  # GroupNorm with one channel per group is instance norm (affine)
        return lambda channels: nn.GroupNorm(channels, channels)
    raise ValueError(f"Mask R-CNN norm must be group, instance or frozen, got {norm!r}")
