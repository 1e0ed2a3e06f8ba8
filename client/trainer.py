"""Local training and evaluation at one site: MONAI data pipeline, DiceCE loss, sliding windows."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from monai.data import CacheDataset, DataLoader
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.transforms import RandSpatialCrop, SpatialPad
from monai.utils import set_determinism
from torch import nn

from fedseg.client.privacy import DPRound, PrivacyLedger, make_private
from fedseg.common.data import Case, SiteSpec, eval_transforms, to_dicts, train_transforms
from fedseg.common.metrics import SegmentationScores

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """What one round of local training produced (scalars only)."""

    loss: float
    num_examples: int
    steps: int
    epsilon: float | None = None


def train_local(
    model: nn.Module,
    spec: SiteSpec,
    cases: list[Case],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    patch_size: int,
    seed: int,
    proximal_mu: float = 0.0,
    global_params: dict[str, torch.Tensor] | None = None,
    device: str = "cpu",
    dp: tuple[DPRound, PrivacyLedger, int] | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``cases``: one random patch per case per epoch.

    Args:
        model: network, already holding the global shared weights and the site's local layers.
        spec: the site (spatial dims, task).
        cases: training cases, >= 1.
        epochs: passes over ``cases``.
        batch_size: cases per optimizer step.
        lr: SGD learning rate (momentum 0.9).
        patch_size: patch edge in pixels/voxels.
        seed: seeds sampling, augmentation and shuffling for this site and round.
        proximal_mu: FedProx weight; > 0 adds ``mu/2 * ||w - w_global||^2``.
        global_params: parameter name -> global value, needed when ``proximal_mu > 0``.
        device: torch device.
        dp: (plan, ledger, server round) for record-level DP-SGD; the ledger is updated after
            the last step, before anything is returned.

    Returns:
        Mean training loss, number of cases (FedAvg's weight), optimizer steps, and the
        site's cumulative epsilon when ``dp`` is set.
    """
    set_determinism(seed=seed)
    transform = train_transforms(spec, patch_size)
    transform.set_random_state(seed=seed)
    dataset = CacheDataset(to_dicts(cases), transform=transform, cache_rate=1.0, num_workers=0,
                           progress=False)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=0,
                        generator=torch.Generator().manual_seed(seed))
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    anchors = proximal_anchors(model, proximal_mu, global_params, device)
    model.to(device).train()
    net, engine = model, None
    if dp is not None:
        net, optimizer, loader, engine = make_private(model, optimizer, loader, dp[0], dp[1])
    with warnings.catch_warnings():
        # Opacus' hooks on the first layer, whose input needs no gradient: harmless
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        total, steps = _run_epochs(net, loader, optimizer, loss_fn, epochs, anchors, proximal_mu,
                                   spec.name, device)
    epsilon = None
    if engine is not None:
        net.remove_hooks()
        epsilon = dp[1].record(dp[2], dp[0], engine.accountant)
    model.cpu()
    return TrainResult(loss=total / max(steps, 1), num_examples=len(cases), steps=steps,
                       epsilon=epsilon)


def _run_epochs(net: nn.Module, loader: Any, optimizer: torch.optim.Optimizer, loss_fn: nn.Module,
                epochs: int, anchors: list[tuple[torch.Tensor, torch.Tensor]], proximal_mu: float,
                site: str, device: str) -> tuple[float, int]:
    """The one training loop: plain SGD, FedProx and DP-SGD (Opacus-wrapped) all run here."""
    total, steps = 0.0, 0
    for _ in range(epochs):
        for batch in loader:
            image, label = batch["image"].to(device), batch["label"].to(device)
            optimizer.zero_grad(set_to_none=True)
            if image.shape[0] == 0:  # Poisson drew no case: a noise-only DP-SGD step
                for p in net.parameters():
                    p.grad_sample = torch.zeros((0, *p.shape), device=p.device)
                optimizer.step()
                steps += 1
                continue
            loss = loss_fn(net(image), label)
            if anchors:
                loss = loss + proximal_mu / 2 * sum((p - a).pow(2).sum() for p, a in anchors)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"site {site}: training loss became {loss.item()} "
                                         f"at step {steps}; lower 'lr' or check the images")
            loss.backward()
            optimizer.step()
            total += loss.item()
            steps += 1
    return total, steps


@torch.no_grad()
def evaluate_local(
    model: nn.Module,
    spec: SiteSpec,
    cases: list[Case],
    *,
    patch_size: int,
    device: str = "cpu",
    min_group_cases: int = 5,
) -> dict[str, float]:
    """Score whole cases by sliding-window inference: per-label Dice and HD95 (physical units),
    and Dice per fairness group with at least ``min_group_cases`` cases."""
    model.to(device).eval()
    scores = SegmentationScores(spec.num_classes, min_group_cases)
    roi = (patch_size,) * spec.spatial_dims
    transform = eval_transforms(spec)
    for case, item in zip(cases, to_dicts(cases)):
        data = transform(item)
        image = data["image"].unsqueeze(0).to(device)
        logits = sliding_window_inference(image, roi_size=roi, sw_batch_size=4, predictor=model,
                                          overlap=0.25)
        pred = logits.argmax(dim=1, keepdim=True).cpu()
        spacing = tuple(float(s) for s in data["image"].pixdim)[: spec.spatial_dims]
        scores.add(pred, data["label"].unsqueeze(0), spacing, case.group)
    model.cpu()
    return scores.result()


@torch.no_grad()
def adapt_norm_statistics(model: nn.Module, spec: SiteSpec, cases: list[Case], *, patch_size: int,
                          seed: int, patches_per_case: int = 4, device: str = "cpu") -> int:
    """Test-time adaptation: recompute BatchNorm running statistics on a site's own images.

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
    model.cpu().eval()
    return len(bns)


def proximal_anchors(
    model: nn.Module, mu: float, global_params: dict[str, torch.Tensor] | None, device: str
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(parameter, its global value) pairs for FedProx's term; empty when ``mu`` is 0."""
    if mu <= 0 or not global_params:
        return []
    return [(p, global_params[name].detach().to(device)) for name, p in model.named_parameters()
            if name in global_params]
