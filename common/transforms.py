"""MONAI transforms of the site data contract: loading and normalizing a case, training patches
(with the run's flips and optional appearance augmentation), whole-case evaluation; and the flip
policy (which axes a modality may be mirrored along)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.transforms import (
    CastToTyped,
    Compose,
    DeleteItemsd,
    EnsureChannelFirst,
    EnsureChannelFirstd,
    EnsureType,
    EnsureTyped,
    FgBgToIndicesd,
    LoadImage,
    LoadImaged,
    NormalizeIntensity,
    NormalizeIntensityd,
    RandAdjustContrastd,
    RandBiasFieldd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Spacing,
    Spacingd,
    SpatialPadd,
    Transform,
)

from fedseg.common.data import Case, SiteSpec, image_reader
from fedseg.common.errors import ConfigError


def base_transforms(spec: SiteSpec, keep_instances: bool = False, resample_label: bool = True) -> list[Any]:
    """Deterministic loading: channel-first image (z-scored per channel) and integer label
    (instance ids kept as they are with ``keep_instances``, else foreground classes), both
    resampled to the run's ``spec.target_spacing`` where it has one (the label only with
    ``resample_label``: evaluation scores in the label's own geometry)."""
    reader = image_reader(spec.training[0].image if spec.training else spec.test[0].image)
    keys = ("image", "label") if resample_label else ("image",)
    resample = [Spacingd(keys=keys, pixdim=spec.target_spacing, mode=("bilinear", "nearest")[:len(keys)])
                ] if spec.target_spacing else []
    return [
        LoadImaged(keys=("image", "label"), reader=reader, image_only=True),
        EnsureChannelFirstd(keys=("image", "label")),
        NormalizeIntensityd(keys="image", channel_wise=True),  # then resampled, as nnU-Net and inference do
        *resample,
        _LabelToClasses(instance=spec.task == "instance" and not keep_instances, keep_instances=keep_instances),
        EnsureTyped(keys="image", dtype=torch.float32),
    ]


def image_transforms(path: Path) -> Compose:
    """Loading for inference on an unlabeled image in its own geometry, normalized as training's
    image path does (``resampled`` brings it onto a run's grid)."""
    return Compose([LoadImage(reader=image_reader(path), image_only=True), EnsureChannelFirst(),
                    NormalizeIntensity(channel_wise=True), EnsureType(dtype=torch.float32)])


def resampled(image: torch.Tensor, spacing: tuple[float, ...]) -> torch.Tensor:
    """A loaded (channel-first) image on the grid of ``spacing`` (mm per axis; empty: as it is)."""
    return Spacing(pixdim=spacing, mode="bilinear")(image) if spacing else image


def image_channels(spec: SiteSpec) -> int:
    """Channels of the site's images (1 for MRI/CT, 3 for RGB H&E), read from its first case."""
    first = (spec.training or spec.test)[0]
    return int(eval_transforms(spec)(to_dicts([first])[0])["image"].shape[0])


SCANNER = re.compile(r"\b(MRI?|CT|CBCT|PET|SPECT|X-?RAY|RADIOGRAPH\w*|MAMMOGRAPH\w*|ULTRASOUND|"
                     r"SONOGRAPH\w*|T1\w*|T2\w*|FLAIR|DWI|ADC)\b", re.IGNORECASE)


def is_histology(modality: str) -> bool:
    """A stained tissue slide (H&E), by the free-text modality of dataset.json."""
    return any(word in modality.upper() for word in ("H&E", "HISTO", "PATHOLOGY", "STAIN"))


def is_scan(modality: str) -> bool:
    """An image from a scanner (MRI and its sequences, CT, PET, X-ray, ultrasound), by the free-text
    modality of dataset.json."""
    return SCANNER.search(modality) is not None


def flip_axes(flips: str, spatial_dims: int, modalities: Iterable[str]) -> tuple[int, ...]:
    """The spatial axes training patches are randomly mirrored along (run-config ``flips``).
    ``auto``: none for scanner images and any 3D volume, which keep the patient's orientation:
    anatomy is not mirror-symmetric, and mirroring hides which end of a structure is which; every
    axis for other 2D images (histology tiles, photographs, synthetic blobs), which have no fixed
    orientation (benchmarks/RESULTS.md, ideas tried and not taken).

    Raises:
        ConfigError: an axis the images do not have.
    """
    if flips == "auto":
        oriented = spatial_dims == 3 or any(is_scan(m) for m in modalities)
        flips = "none" if oriented else "all"
    if flips in ("all", "none"):
        return tuple(range(spatial_dims)) if flips == "all" else ()
    axes = tuple(sorted({int(a) for a in flips.split(",")}))
    if axes[-1] >= spatial_dims:
        raise ConfigError(f"run-config 'flips' = {flips!r}: the images are {spatial_dims}D (axes 0-{spatial_dims - 1})")
    return axes


PatchSize = int | tuple[int, ...]  # an edge along every axis, or one size per axis


def roi_size(patch: int | Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    """A training patch / sliding-window ROI as one size per spatial axis: an edge (the same along
    every axis, as ``patch-size`` gives it) or the sizes a plan gives per axis.

    Raises:
        ValueError: per-axis sizes for another number of axes.
    """
    if isinstance(patch, int):
        return (patch,) * spatial_dims
    if len(patch) != spatial_dims:
        raise ValueError(f"patch {list(patch)} has {len(patch)} axes; the images have {spatial_dims}")
    return tuple(int(p) for p in patch)


def train_transforms(spec: SiteSpec, patch_size: PatchSize, keep_instances: bool = False,
                     augment: bool = False, flips: tuple[int, ...] | None = None) -> Compose:
    """Loading plus a foreground-balanced random patch per case, randomly mirrored along
    ``flips`` (None: ``flip_axes``' choice for the site's modality); with ``augment``, the
    appearance changes hospitals differ by (``appearance_transforms``)."""
    roi = roi_size(patch_size, spec.spatial_dims)
    if flips is None:
        flips = flip_axes("auto", spec.spatial_dims, [spec.modality])
    indices = ("label_fg_indices", "label_bg_indices")
    aug = [
        SpatialPadd(keys=("image", "label"), spatial_size=roi),
        # where the foreground and background lie, found once per case and cached with it (not
        # at every crop of a large tile); int32, half the size of the sampler's int64
        FgBgToIndicesd(keys="label"),
        CastToTyped(keys=indices, dtype=torch.int32),
        # the normalized image is cached in half precision (z-scores to 3 significant digits, below
        # the images' own noise: half the memory of float32) and each patch is float32 again
        CastToTyped(keys="image", dtype=torch.float16),
        RandCropByPosNegLabeld(keys=("image", "label"), label_key="label", spatial_size=roi,
                               pos=1, neg=1, num_samples=1, fg_indices_key=indices[0], bg_indices_key=indices[1]),
        DeleteItemsd(keys=indices),
        CastToTyped(keys="image", dtype=torch.float32),
    ] + [RandFlipd(keys=("image", "label"), prob=0.5, spatial_axis=a) for a in flips]
    return Compose(base_transforms(spec, keep_instances) + aug + (appearance_transforms(spec) if augment else []))


def appearance_transforms(spec: SiteSpec) -> list[Any]:
    """Scanner and stain differences, applied to the (z-scored) image only: intensity scale and
    shift (per channel: a colour/stain jitter for RGB H&E), contrast, noise, blur, and a smooth
    bias field for MRI/CT."""
    histology = is_histology(spec.modality)
    out = [RandScaleIntensityd(keys="image", factors=0.15, prob=0.5, channel_wise=True),
           RandShiftIntensityd(keys="image", offsets=0.15, prob=0.5, channel_wise=True),
           RandAdjustContrastd(keys="image", gamma=(0.8, 1.25), prob=0.3),
           RandGaussianNoised(keys="image", std=0.05, prob=0.2),
           RandGaussianSmoothd(keys="image", sigma_x=(0.25, 1.0), sigma_y=(0.25, 1.0),
                               sigma_z=(0.25, 1.0), prob=0.2)]
    if not histology:  # scanners' smooth intensity inhomogeneity
        out.append(RandBiasFieldd(keys="image", coeff_range=(0.0, 0.1), prob=0.3))
    return out


def eval_transforms(spec: SiteSpec, keep_instances: bool = False) -> Compose:
    """Loading only: whole images, scored by sliding-window or tiled inference; where the run
    resamples (``spec.target_spacing``), the image is on its grid and the label in its own."""
    return Compose(base_transforms(spec, keep_instances, resample_label=False))


def to_dicts(cases: list[Case]) -> list[dict[str, str]]:
    """MONAI dataset items for cases."""
    return [{"image": str(c.image), "label": str(c.label)} for c in cases]


class _LabelToClasses(Transform):
    """Cast labels to class maps, two bytes per voxel (what a site caches across rounds is then a
    quarter of int64's size; MONAI's losses and metrics take any integer type, but its crop
    sampler reads a uint8 label's background wrongly); instance masks become foreground
    (label > 0). Instance ids (``keep_instances``) stay int64. A MONAI ``Transform``, so that a
    ``CacheDataset`` caches its output and what follows it up to the first random transform."""

    def __init__(self, instance: bool, keep_instances: bool = False) -> None:
        self.instance, self.keep_instances = instance, keep_instances

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        label = torch.as_tensor(data["label"])
        label = (label > 0) if self.instance else torch.round(label)
        small = not self.keep_instances and (label.numel() == 0 or (label.min() >= 0 and label.max() <= 32767))
        out = dict(data)
        out["label"] = label.to(torch.int16 if small else torch.int64)
        return out
