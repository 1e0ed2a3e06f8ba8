"""The model kinds fedseg trains (MONAI U-Net, MONAI DynUNet as planned by ``model=auto``,
torchvision Mask R-CNN): one registry that says what
each kind accepts, where its network and its site task are built, and the ``ModelSpec`` that
rebuilds a network from a checkpoint.

Nothing here imports torch: the command line validates a run in milliseconds, and the network
and task modules are imported only by whoever builds them (``ModelKind.network``, ``.task``).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelKind:
    """What a model kind accepts and where its parts are built.

    Args:
        norms: accepted ``norm`` values.
        dims: accepted spatial dims.
        network: ``module:name`` of its ``models.Network`` (how it is built, which layers are its
            class-specific head).
        task: ``module:name`` of its site task class (``client/tasks.py``: data, loss, scores).
        site_task: the dataset.json ``task`` every site must declare ("" for any).
        norm_note: why some norm is not accepted, for the error message.
        downsamples: the patch is halved once per ``channels`` level after the first, so it
            must be divisible by 2 ** (levels - 1).
        dense: predicts per-pixel class probabilities (which ensembles average, explanation maps
            show and test-time adaptation minimizes the entropy of).
    """

    norms: tuple[str, ...]
    dims: tuple[int, ...]
    network: str
    task: str
    site_task: str = ""
    norm_note: str = ""
    downsamples: bool = False
    dense: bool = False

    def load(self, part: str) -> Any:
        """The object ``network`` or ``task`` names, imported on first use."""
        module, _, name = getattr(self, part).partition(":")
        return getattr(importlib.import_module(module), name)


KINDS: dict[str, ModelKind] = {
    "unet": ModelKind(("instance", "batch", "group"), (2, 3), "fedseg.common.models:UNET",
                      "fedseg.client.tasks:SemanticTask", "",
                      "'frozen' (pretrained BatchNorm statistics) is for model=maskrcnn",
                      downsamples=True, dense=True),
    # nnU-Net's U-Net (MONAI's DynUNet with deep supervision): what model=auto builds from the plan
    "dynunet": ModelKind(("instance", "batch", "group"), (2, 3), "fedseg.common.models:DYNUNET",
                         "fedseg.client.tasks:SemanticTask", "",
                         "'frozen' (pretrained BatchNorm statistics) is for model=maskrcnn", dense=True),
    "maskrcnn": ModelKind(("group", "instance", "frozen"), (2,), "fedseg.common.models:MASK_RCNN",
                          "fedseg.client.tasks:InstanceTask", "instance",
                          "Mask R-CNN trains on 1-4 crops per step, too few for BatchNorm "
                          "statistics; use group, instance, or frozen (statistics of the "
                          "pretrained weights)"),
}
AUTO_MODEL = "auto"  # run-config model=auto: the network nnU-Net's rules plan for the federation
PLANNED = "dynunet"  # the kind model=auto builds
MODELS = (AUTO_MODEL, "unet", "maskrcnn")  # what run-config 'model' accepts
NORMS = ("instance", "batch", "group", "frozen")
BACKBONES = ("slim", "resnet50")  # Mask R-CNN: ResNet-18 body for CPU sites, ResNet-50-FPN for GPU sites


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the network (saved beside every checkpoint).

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels (1 for MRI/CT, 3 for H&E RGB).
        out_channels: classes including background.
        channels: feature channels per U-Net level (stage).
        norm: ``instance`` (affine), ``batch``, ``group`` or ``frozen`` (Mask R-CNN).
        model: a key of ``KINDS`` (``unet`` or ``maskrcnn``).
        backbone: Mask R-CNN backbone (``slim`` or ``resnet50``).
        image_size: Mask R-CNN crop/tile edge (its inputs are never resized).
        kernels: DynUNet: convolution kernel per stage and axis.
        strides: DynUNet: downsampling stride per stage and axis (the first stage's are 1).
        deep_supervision: DynUNet: extra outputs of the decoder's lower levels trained on.
    """

    spatial_dims: int
    in_channels: int
    out_channels: int
    channels: tuple[int, ...]
    norm: str = "instance"
    model: str = "unet"
    backbone: str = "slim"
    image_size: int = 0
    kernels: tuple[tuple[int, ...], ...] = ()
    strides: tuple[tuple[int, ...], ...] = ()
    deep_supervision: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON/pickle-safe form."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelSpec:
        """Inverse of ``to_dict`` (a spec saved before DynUNet's keys existed reads as a U-Net's)."""
        nested = {k: tuple(tuple(v) for v in raw[k]) for k in ("kernels", "strides") if k in raw}
        return cls(**{**raw, "channels": tuple(raw["channels"]), **nested})

    @property
    def kind(self) -> ModelKind:
        """The registry's entry for this model kind."""
        return KINDS[self.model]
