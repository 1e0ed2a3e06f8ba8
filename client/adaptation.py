"""Test-time adaptation at a site that never trained: norm statistics from its own unlabeled images."""

from __future__ import annotations

import torch
from monai.transforms import RandSpatialCrop, SpatialPad
from torch import nn

from fedseg.common.data import Case, SiteSpec, eval_transforms, to_dicts


@torch.no_grad()
def adapt_norm_statistics(model: nn.Module, spec: SiteSpec, cases: list[Case], *, patch_size: int,
                          seed: int, patches_per_case: int = 4, device: str = "cpu") -> int:
    """Recompute BatchNorm running statistics on a site's own images.

    Labels are not used. Only running means/variances (and their counters) change; no weight
    does. Instance/group norm already normalizes with each image's own statistics, so models
    without BatchNorm are returned unchanged.

    Returns:
        The number of BatchNorm layers adapted.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over every patch seen
    crop = RandSpatialCrop((patch_size,) * spec.spatial_dims, random_size=False)
    crop.set_random_state(seed=seed)
    transform = eval_transforms(spec)
    model.to(device).train()
    for item in to_dicts(cases):
        image = SpatialPad((patch_size,) * spec.spatial_dims)(transform(item)["image"])
        model(torch.stack([crop(image) for _ in range(patches_per_case)]).to(device))
    model.eval()
    return len(bns)
