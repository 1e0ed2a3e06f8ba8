"""Model factory (MONAI U-Net and DynUNet 2D/3D, torchvision Mask R-CNN) and the one rule that
splits shared from site-local tensors."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from monai.networks.nets import DynUNet, UNet
from torch import nn

from fedseg.common.maskrcnn import HEAD_PREFIXES, build_maskrcnn
from fedseg.common.model_kinds import PLANNED, ModelSpec

__all__ = ["ENSEMBLE_PREFIX", "ModelSpec", "PlannedUNet", "UNSEEN_PREFIX", "build_model", "deep_supervision_weights",
           "ensemble_members", "inference_network", "local_keys", "model_signature", "network_definition",
           "split_state", "unseen_norm_set", "unseen_norms", "with_ensemble"]

NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
# With local-layers=norm, a site also sends a copy of its norm tensors under this prefix; the
# server averages them into the unseen-site norm set, which only sites that never trained receive.
UNSEEN_PREFIX = "unseen-norm/"
DEEP_SUPERVISION = "deep_supervision_heads."  # DynUNet's extra outputs: trained on, never used to predict
ENSEMBLE_PREFIX = "ensemble-"  # ensemble-1/<key>: the previous round's model, ensemble-2/...: the one before


@dataclass(frozen=True)
class Network:
    """How one model kind is built, and which of its layers are its class-specific head (the
    registry, ``model_kinds.KINDS``, names one per kind)."""

    build: Callable[[ModelSpec], nn.Module]
    heads: Callable[[nn.Module], tuple[str, ...]]


def network_definition(spec: ModelSpec) -> dict[str, Any]:
    """MONAI's network class and keyword arguments for a U-Net ``spec`` (JSON-friendly: a MONAI
    Bundle's ``network_def`` takes them as they are)."""
    norms: dict[str, Any] = {
        "instance": ["instance", {"affine": True}],
        "batch": "batch",
        "group": ["group", {"num_groups": _num_groups(spec)}],
    }
    shape = {"spatial_dims": spec.spatial_dims, "in_channels": spec.in_channels, "out_channels": spec.out_channels}
    if spec.model == PLANNED:
        strides = [list(s) for s in spec.strides]
        return {"_target_": "DynUNet", **shape, "kernel_size": [list(k) for k in spec.kernels], "strides": strides,
                "upsample_kernel_size": strides[1:], "filters": list(spec.channels), "norm_name": norms[spec.norm],
                "deep_supervision": spec.deep_supervision > 0, "deep_supr_num": max(1, spec.deep_supervision),
                # not in place: Opacus' per-case gradient hooks (dp=sample) cannot see through it
                "act_name": ["leakyrelu", {"inplace": False, "negative_slope": 0.01}]}
    return {"_target_": "UNet", **shape, "channels": list(spec.channels), "strides": [2] * (len(spec.channels) - 1),
            "num_res_units": 1, "norm": norms[spec.norm]}


def deep_supervision_weights(spec: ModelSpec) -> list[float]:
    """Loss weight of the network's output and of each deep-supervision output, coarser ones
    halved, summing to 1 (nnU-Net's)."""
    raw = [0.5 ** i for i in range(spec.deep_supervision + 1)]
    return [w / sum(raw) for w in raw]


class PlannedUNet(DynUNet):
    """MONAI's DynUNet (nnU-Net's U-Net) whose state dict names each tensor once.

    DynUNet also registers every block under ``skip_layers``, the recursion its forward runs, so
    each tensor has a second name: it would cross the wire twice, and a site-local norm layer's
    second name would escape the shared/local split. The recursion stays; its registration goes.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        object.__setattr__(self, "skip_layers", self._modules.pop("skip_layers"))


def inference_network(model: nn.Module, spec: ModelSpec) -> tuple[nn.Module, ModelSpec]:
    """``model`` as MONAI's own class builds it for inference (a U-Net as it is; a DynUNet without
    the deep-supervision heads only training uses, which TorchScript cannot compile), in eval mode,
    and its spec: what a MONAI Bundle's ``network_def`` rebuilds and an exported graph runs."""
    if spec.model != PLANNED:
        return model.eval(), spec
    spec = dataclasses.replace(spec, deep_supervision=0)
    kwargs = network_definition(spec)
    plain = DynUNet(**{k: v for k, v in kwargs.items() if k != "_target_"})
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(DEEP_SUPERVISION)}
    loaded = plain.load_state_dict(state, strict=False)
    # MONAI's class also names each tensor under skip_layers: those are the same tensors, loaded
    if [k for k in loaded.missing_keys if not k.startswith("skip_layers.")] or loaded.unexpected_keys:
        raise ValueError(f"the DynUNet's weights do not fit its spec ({loaded})")
    return plain.eval(), spec


def _build_unet(spec: ModelSpec) -> nn.Module:
    kwargs = network_definition(spec)
    return {"UNet": UNet, "DynUNet": PlannedUNet}[kwargs.pop("_target_")](**kwargs)


def _last_conv(model: nn.Module) -> tuple[str, ...]:
    return ([n for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)][-1] + ".",)


UNET = Network(_build_unet, _last_conv)
# the class-specific head of DynUNet: its output convolution and the deep-supervision outputs' ones
DYNUNET = Network(_build_unet, lambda model: ("output_block.", DEEP_SUPERVISION))
MASK_RCNN = Network(lambda spec: build_maskrcnn(spec.in_channels, spec.backbone, spec.norm, spec.image_size),
                    lambda model: HEAD_PREFIXES)


def build_model(spec: ModelSpec) -> nn.Module:
    """The network of ``spec``: MONAI U-Net with residual units, or torchvision Mask R-CNN.

    Raises:
        ValueError: the kind does not take this norm or spatial dimensionality.
    """
    kind = spec.kind
    if spec.norm not in kind.norms:
        raise ValueError(f"norm must be one of {kind.norms} for model={spec.model}, got {spec.norm!r}")
    if spec.spatial_dims not in kind.dims:
        raise ValueError(f"model={spec.model} is {'/'.join(map(str, kind.dims))}D only; "
                         f"the sites hold {spec.spatial_dims}D data")
    return kind.load("network").build(spec)


def local_keys(model: nn.Module, spec: ModelSpec, local_layers: str) -> set[str]:
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
        keys |= {k for k in state if k.startswith(spec.kind.load("network").heads(model))}
    return keys


def split_state(model: nn.Module, local: set[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(shared, local) detached copies of the model's state dict."""
    shared, kept = {}, {}
    for key, value in model.state_dict().items():
        (kept if key in local else shared)[key] = value.detach().clone()
    return shared, kept


def unseen_norm_set(state: dict[str, torch.Tensor], local: set[str]) -> dict[str, torch.Tensor]:
    """A site's contribution to the unseen-site norm set: its floating-point norm tensors (affine
    parameters, running statistics), renamed under ``UNSEEN_PREFIX``."""
    return {UNSEEN_PREFIX + k: v.detach().cpu().clone() for k, v in state.items()
            if k in local and torch.is_floating_point(v)}


def unseen_norms(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The unseen-site norm set of a global state dict, under the model's own key names."""
    return {k[len(UNSEEN_PREFIX):]: v for k, v in state.items() if k.startswith(UNSEEN_PREFIX)}


def with_ensemble(state: dict[str, Any], members: list[dict[str, Any]]) -> dict[str, Any]:
    """``state`` plus earlier models under ``ensemble-<j>/`` (j = 1: the most recent), in one
    record (Flower carries exactly one ArrayRecord per message)."""
    out = dict(state)
    for j, member in enumerate(members, start=1):
        out |= {f"{ENSEMBLE_PREFIX}{j}/{k}": v for k, v in member.items()}
    return out


def ensemble_members(state: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Inverse of ``with_ensemble``: (the model's own state, the earlier models, most recent first)."""
    own: dict[str, Any] = {}
    members: dict[int, dict[str, Any]] = {}
    for key, value in state.items():
        if key.startswith(ENSEMBLE_PREFIX):
            j, name = key[len(ENSEMBLE_PREFIX):].split("/", 1)
            members.setdefault(int(j), {})[name] = value
        else:
            own[key] = value
    return own, [members[j] for j in sorted(members)]


def model_signature(spec: ModelSpec, local_layers: str, local: dict[str, torch.Tensor]) -> str:
    """Short hash of the architecture and the site-local tensors' names, shapes and dtypes:
    local layers saved under one signature never load into a model of another."""
    layout = [(k, list(v.shape), str(v.dtype)) for k, v in sorted(local.items())]
    text = json.dumps([spec.to_dict(), local_layers, layout], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _num_groups(spec: ModelSpec) -> int:
    for groups in (8, 4, 2):
        if all(c % groups == 0 for c in (*spec.channels, spec.out_channels)):
            return groups
    return 1
