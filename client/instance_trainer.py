"""Local training and evaluation of Mask R-CNN at an instance site: random crops for training,
overlapping tiles for whole-image inference, exact per-case DP-SGD."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from monai.data import CacheDataset, MetaTensor
from monai.utils import set_determinism
from torch import nn

from fedseg.client.privacy import DPRound, PrivacyLedger, noise_generator, private_gradient
from fedseg.client.trainer import TrainResult, proximal_anchors
from fedseg.common.data import Case, SiteSpec, eval_transforms, to_dicts, train_transforms
from fedseg.common.instance_metrics import InstanceScores
from fedseg.common.instances import Detections, predict_instances, targets_from_instances
from fedseg.common.maskrcnn import SCORE_THRESHOLD

GRAD_CLIP = 10.0  # non-DP only: keeps from-scratch Mask R-CNN stable in its first steps


def train_instances(
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
    """Train Mask R-CNN in place on one random crop per case per step (same arguments and
    result as ``trainer.train_local``).

    Without DP, each epoch visits the cases in a seeded order, ``batch_size`` per step. With DP,
    every step draws a Poisson sample of cases (rate ``plan.sample_rate``, from OS entropy),
    clips each case's gradient to C, adds Gaussian noise, and the Opacus RDP accountant from
    the site's ledger takes the step; the ledger is written before anything is returned.
    """
    set_determinism(seed=seed)
    transform = train_transforms(spec, patch_size, keep_instances=True)
    transform.set_random_state(seed=seed)
    dataset = CacheDataset(to_dicts(cases), transform=transform, cache_rate=1.0, num_workers=0,
                           progress=False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
    anchors = proximal_anchors(model, proximal_mu, global_params, device)
    model.to(device).train()
    losses: list[float] = []

    def crops_loss(items: list[tuple[torch.Tensor, Detections]]) -> torch.Tensor:
        loss = sum(model([i for i, _ in items], [t for _, t in items]).values())
        if anchors:
            loss = loss + proximal_mu / 2 * sum((p - a).pow(2).sum() for p, a in anchors)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"site {spec.name}: training loss became {loss.item()} at "
                                     f"step {len(losses)}; lower 'lr' or check the images")
        losses.append(float(loss.detach()))
        return loss

    if dp is None:
        for batch in _shuffled_batches(len(cases), batch_size, epochs, seed):
            optimizer.zero_grad(set_to_none=True)
            crops_loss([_crop(dataset, i, device) for i in batch]).backward()
            torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
            optimizer.step()
        steps, epsilon = len(losses), None
    else:
        plan, ledger, server_round = dp
        accountant = ledger.accountant()
        sampler, noise = noise_generator("cpu"), noise_generator(device)
        for batch in _poisson_batches(len(cases), plan, sampler):
            optimizer.zero_grad(set_to_none=True)
            private_gradient(params, (crops_loss([_crop(dataset, i, device)]) for i in batch), plan,
                             plan.sample_rate * len(cases), noise)
            optimizer.step()
            accountant.step(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate)
        steps = plan.steps
        epsilon = ledger.record(server_round, plan, accountant)
    model.cpu()
    return TrainResult(loss=sum(losses) / max(len(losses), 1), num_examples=len(cases), steps=steps,
                       epsilon=epsilon)


@torch.no_grad()
def segment_instances(model: nn.Module, image: torch.Tensor, tile: int, device: str = "cpu"
                      ) -> tuple[torch.Tensor, list[float]]:
    """Instance map (H, W) and per-instance scores of a whole (C, H, W) image, tile by tile
    (neighbouring tiles overlap by a quarter tile)."""
    model.to(device).eval()
    return predict_instances(lambda t: model([t.to(device)])[0], _plain(image), tile, tile // 4,
                             SCORE_THRESHOLD)


@torch.no_grad()
def evaluate_instances(model: nn.Module, spec: SiteSpec, cases: list[Case], *, patch_size: int,
                       device: str = "cpu", min_group_cases: int = 5) -> dict[str, float]:
    """PQ, AJI, AP@0.5 and foreground Dice/HD95 of whole cases by tiled inference."""
    scores = InstanceScores(min_group_cases)
    transform = eval_transforms(spec, keep_instances=True)
    for case, item in zip(cases, to_dicts(cases)):
        data = transform(item)
        pred, found = segment_instances(model, data["image"], patch_size, device)
        spacing = tuple(float(s) for s in data["image"].pixdim)[:2]
        scores.add(pred, found, _plain(data["label"][0]).long(), spacing, case.group)
    model.cpu()
    return scores.result()


def _crop(dataset: CacheDataset, index: int, device: str) -> tuple[torch.Tensor, Detections]:
    item = dataset[index]
    item = item[0] if isinstance(item, list) else item  # RandCropByPosNegLabeld returns a list
    target = targets_from_instances(_plain(item["label"][0]).long())
    return (_plain(item["image"]).to(device),
            {k: v.to(device) for k, v in target.items()})


def _shuffled_batches(n: int, batch_size: int, epochs: int, seed: int) -> Iterator[list[int]]:
    rng = np.random.RandomState(seed)
    for _ in range(epochs):
        order = rng.permutation(n).tolist()
        yield from (order[i:i + batch_size] for i in range(0, n, batch_size))


def _poisson_batches(n: int, plan: DPRound, generator: torch.Generator) -> Iterator[list[int]]:
    for _ in range(plan.steps):  # an empty draw is still a (noise-only) step, as in Opacus
        yield torch.nonzero(torch.rand(n, generator=generator) < plan.sample_rate).flatten().tolist()



def _plain(x: torch.Tensor) -> torch.Tensor:
    """A plain tensor: MONAI's MetaTensor would route every torchvision op through its hooks."""
    return x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)
