"""Test-time adaptation at a site that never trained, on its own unlabeled images (no label is
used, nothing leaves the site): BatchNorm statistics, then the norm layers' affine parameters by
entropy minimization (TENT, Wang et al. 2021) for every norm kind."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from monai.transforms import RandSpatialCrop, SpatialPad
from torch import nn

from fedseg.common.data import Case, SiteSpec
from fedseg.common.transforms import PatchSize, eval_transforms, roi_size, to_dicts
from fedseg.common.models import NORM_TYPES

TENT_STEPS = 10  # bounded: a few steps, so a site cannot drift far from the federated model
TENT_LR = 1e-3


@torch.no_grad()
def site_images(spec: SiteSpec, cases: list[Case]) -> Sequence[torch.Tensor]:
    """A site's images (channel-first, normalized as for training), each read when it is used, so
    that a site of many large images holds one at a time; their labels are not read."""
    return _SiteImages(spec, cases)


class _SiteImages(Sequence):
    """Images read from disk at each access."""

    def __init__(self, spec: SiteSpec, cases: list[Case]) -> None:
        self.transform, self.items = eval_transforms(spec), to_dicts(cases)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> torch.Tensor:  # type: ignore[override]
        return self.transform(self.items[index])["image"]


def adapt_norm_statistics(model: nn.Module, images: Sequence[torch.Tensor], *, patch_size: PatchSize,
                          seed: int, patches_per_case: int = 4, device: str = "cpu") -> int:
    """Recompute BatchNorm running statistics on a site's own unlabeled images.

    Only running means/variances (and their counters) change; no weight does. Instance/group
    norm already normalizes with each image's own statistics, so models without BatchNorm are
    returned unchanged.

    Returns:
        The number of BatchNorm layers adapted.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over every patch seen
    model.to(device).train()
    for patches in _patches(images, patch_size, seed, patches_per_case):
        model(patches.to(device))
    model.eval()
    return len(bns)


def adapt_norm_affines(model: nn.Module, images: Sequence[torch.Tensor], *, patch_size: PatchSize,
                       seed: int, steps: int = TENT_STEPS, lr: float = TENT_LR,
                       device: str = "cpu") -> float:
    """TENT: a few Adam steps on the norm layers' affine parameters (every norm kind) that lower
    the entropy of the model's per-pixel predictions on the site's own images. Every other
    parameter and every statistic stays as it is.

    Returns:
        Mean prediction entropy (nats per pixel) after adaptation, on the last batch.
    """
    affines = [p for m in model.modules() if isinstance(m, NORM_TYPES)
               for p in (m.weight, m.bias) if p is not None]
    if not affines:
        return float("nan")
    frozen = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in affines:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(affines, lr=lr)
    model.to(device).eval()  # BatchNorm keeps its (adapted) statistics; the affines learn
    batches = list(_patches(images, patch_size, seed, patches_per_case=2))
    entropy = torch.tensor(float("nan"))
    try:
        with torch.enable_grad():  # also when called from inference code running under no_grad
            for step in range(steps):
                probs = model(batches[step % len(batches)].to(device)).softmax(dim=1)
                entropy = -(probs * probs.clamp_min(1e-8).log()).sum(dim=1).mean()
                optimizer.zero_grad(set_to_none=True)
                entropy.backward()
                optimizer.step()
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
    return float(entropy.detach())


def adapt_to_site(model: nn.Module, task: Any, images: Sequence[torch.Tensor], *, patch_size: PatchSize,
                  seed: int, device: str = "cpu") -> bool:
    """Both adaptations a model allows: BatchNorm statistics, then (per-pixel models; a detector
    has no per-pixel entropy) the norm affines.

    Returns:
        Whether anything changed (else the adapted model is the plain one).
    """
    statistics = adapt_norm_statistics(model, images, patch_size=patch_size, seed=seed, device=device)
    if task.dense_logits:
        adapt_norm_affines(model, images, patch_size=patch_size, seed=seed, device=device)
    return bool(statistics) or task.dense_logits


def _patches(images: Sequence[torch.Tensor], patch_size: PatchSize, seed: int,
             patches_per_case: int) -> Iterator[torch.Tensor]:
    """Per image, a batch of random patches (padded where the image is smaller)."""
    if not images:
        return
    dims = images[0].ndim - 1
    crop = RandSpatialCrop(roi_size(patch_size, dims), random_size=False)
    crop.set_random_state(seed=seed)
    pad = SpatialPad(roi_size(patch_size, dims))
    for image in images:
        padded = pad(image)
        yield torch.stack([torch.as_tensor(crop(padded)) for _ in range(patches_per_case)])
