"""Model factory (MONAI U-Net 2D/3D, torchvision Mask R-CNN) and the one rule that splits shared
from site-local tensors."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from monai.networks.nets import UNet
from torch import nn
from torchvision.models.detection import MaskRCNN

from fedseg.common.config import RunConfig
from fedseg.common.maskrcnn import HEAD_PREFIXES, build_maskrcnn

NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the network (saved beside every checkpoint).

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels (1 for MRI/CT, 3 for H&E RGB).
        out_channels: classes including background.
        channels: feature channels per U-Net level.
        norm: ``instance`` (affine), ``batch``, ``group`` or ``frozen`` (Mask R-CNN).
        model: ``unet`` or ``maskrcnn``.
        backbone: Mask R-CNN backbone (``slim`` or ``resnet50``).
        image_size: Mask R-CNN crop/tile edge (its inputs are never resized).
    """

    spatial_dims: int
    in_channels: int
    out_channels: int
    channels: tuple[int, ...]
    norm: str = "instance"
    model: str = "unet"
    backbone: str = "slim"
    image_size: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON/pickle-safe form."""
        out = asdict(self)
        out["channels"] = list(self.channels)
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelSpec:
        """Inverse of ``to_dict``."""
        return cls(**{**raw, "channels": tuple(raw["channels"])})

    @classmethod
    def for_run(cls, cfg: RunConfig, spatial_dims: int, in_channels: int, out_channels: int) -> ModelSpec:
        """The run's model (architecture keys of ``cfg``) for data of this shape."""
        return cls(spatial_dims, in_channels, out_channels, cfg.channels, cfg.norm, cfg.model,
                   cfg.backbone, cfg.patch_size)


def build_model(spec: ModelSpec) -> nn.Module:
    """MONAI U-Net with residual units (``norm`` picks a DP-compatible norm by default), or
    torchvision Mask R-CNN for ``model=maskrcnn``."""
    if spec.model == "maskrcnn":
        if spec.spatial_dims != 2:
            raise ValueError("Mask R-CNN is 2D only; the sites hold 3D data")
        return build_maskrcnn(spec.in_channels, spec.backbone, spec.norm, spec.image_size)
    norms: dict[str, Any] = {
        "instance": ("instance", {"affine": True}),
        "batch": "batch",
        "group": ("group", {"num_groups": _num_groups(spec)}),
    }
    if spec.norm not in norms:
        raise ValueError(f"norm must be one of {sorted(norms)}, got {spec.norm!r}")
    return UNet(
        spatial_dims=spec.spatial_dims,
        in_channels=spec.in_channels,
        out_channels=spec.out_channels,
        channels=spec.channels,
        strides=(2,) * (len(spec.channels) - 1),
        num_res_units=1,
        norm=norms[spec.norm],
    )


def local_keys(model: nn.Module, local_layers: str) -> set[str]:
    """State-dict keys that never leave the site.

    ``none`` keeps only integer buffers local (e.g. BatchNorm's ``num_batches_tracked``, which
    averaging would corrupt); ``norm`` adds every normalization layer's affine parameters and
    running statistics (FedBN); ``norm+head`` also keeps the classifier: the U-Net's last
    convolution, Mask R-CNN's box and mask predictors. Mask R-CNN's frozen BatchNorm statistics
    are constants from the pretrained file and are shared, so every site (and an unseen one)
    runs the same backbone.
    """
    if local_layers not in ("none", "norm", "norm+head"):
        raise ValueError(f"local_layers must be none, norm or norm+head, got {local_layers!r}")
    state = model.state_dict()
    keys = {k for k, v in state.items() if not torch.is_floating_point(v)}
    if local_layers == "none":
        return keys
    for name, module in model.named_modules():
        if isinstance(module, NORM_TYPES):
            keys |= {k for k in state if k.startswith(f"{name}.")}
    if local_layers == "norm+head":
        if isinstance(model, MaskRCNN):
            heads = HEAD_PREFIXES
        else:
            heads = ([n for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)][-1] + ".",)
        keys |= {k for k in state if k.startswith(heads)}
    return keys


def split_state(model: nn.Module, local: set[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(shared, local) detached copies of the model's state dict."""
    shared, kept = {}, {}
    for key, value in model.state_dict().items():
        (kept if key in local else shared)[key] = value.detach().clone()
    return shared, kept


def _num_groups(spec: ModelSpec) -> int:
    for groups in (8, 4, 2):
        if all(c % groups == 0 for c in (*spec.channels, spec.out_channels)):
            return groups
    return 1
