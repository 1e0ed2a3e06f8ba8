"""The one training loop at a site: batches of cases, a pluggable step (plain, Opacus DP-SGD,
exact per-case clipping), the optimizer, and the DP session's accounting."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from monai.utils import set_determinism
from torch import nn

from fedseg.client.prefetch import ahead_depth, prefetched
from fedseg.client.privacy import DPSession
from fedseg.client.steps import PlainStep, Step
from fedseg.client.tasks import Task
from fedseg.common.data import Case, SiteSpec
from fedseg.common.model_kinds import ModelSpec
from fedseg.common.precision import Precision
from fedseg.common.round_config import epoch_steps
from fedseg.common.transforms import PatchSize, roi_size

log = logging.getLogger(__name__)
PROGRESS_SECONDS = 30.0  # a progress line at most this often: short rounds stay quiet


@dataclass(frozen=True)
class TrainResult:
    """What one round of local training produced (scalars only)."""

    loss: float
    num_examples: int
    steps: int
    epsilon: float | None = None
    losses: tuple[float, ...] = ()  # each step's, for the site's own curves (never sent)
    seconds: float = 0.0  # the round's training, from loading the cases to the last step
    data_seconds: float = 0.0  # of which the steps waited for their patches (loading, cropping)


def round_steps(num_cases: int, batch_size: int, epochs: int, dp: DPSession | None) -> int:
    """Optimizer steps of a round: the DP plan's, else ``epochs`` passes of ``batch_size`` batches."""
    return dp.plan.steps if dp is not None else epoch_steps(num_cases, batch_size, epochs)


def train_local(
    model: nn.Module,
    task: Task,
    site: SiteSpec,
    cases: list[Case],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    patch_size: PatchSize,
    seed: int,
    proximal_mu: float = 0.0,
    global_params: dict[str, torch.Tensor] | None = None,
    device: str = "cpu",
    dp: DPSession | None = None,
    augment: bool = False,
    cache_mb: int = 0,
    precision: Precision | None = None,
    flips: tuple[int, ...] | None = None,
    compile_step: bool = False,
    step_memory_mb: int = 0,
) -> TrainResult:
    """Train ``model`` in place on ``cases``: one random patch per case per step it is in.

    Args:
        model: network, already holding the global shared weights and the site's local layers.
        task: the model kind's task (data, loss, optimizer, DP step).
        site: the site (spatial dims, task).
        cases: training cases, >= 1.
        epochs: passes over ``cases`` (with DP: the expected number of passes).
        batch_size: cases per optimizer step without DP; with DP (whose session sets the expected
            number of cases per step), cases per forward pass.
        lr: learning rate of the task's optimizer (with DP: the DP session's).
        patch_size: patch edge in pixels/voxels, or one size per axis.
        seed: seeds augmentation, cropping and (without DP) the order of cases.
        proximal_mu: FedProx weight; > 0 adds ``mu/2 * ||w - w_global||^2``.
        global_params: parameter name -> global value, needed when ``proximal_mu > 0``.
        device: torch device.
        dp: the round's DP session: its training settings (learning rate, momentum, K patches
            per case whose gradients are averaged before clipping), Poisson batches, clipped
            and noised steps, accounting; the ledger is written after the last step, before
            anything is returned.
        augment: random appearance changes (intensity, contrast, noise, blur, bias field; colour
            jitter for RGB) on every patch.
        cache_mb: keep the decoded cases for later rounds in this process, up to this many
            MiB in all (``client/site_cache.py``; 0: off).
        precision: mixed precision of the forward passes (``common/precision.py``; None:
            float32). DP steps always compute in float32.
        flips: spatial axes patches are randomly mirrored along (None: the site's modality
            decides, ``data.flip_axes``).
        compile_step: run the training forward through ``torch.compile`` (not with ``dp``); the
            compiled graph is reused by later rounds' models of the same architecture.
        step_memory_mb: on a CPU without ``dp``, a batch whose activations exceed this many MiB
            goes through the network in parts with the same summed gradient (0: whole batches;
            ``client/step_memory.py``).

    Returns:
        Mean training loss, number of cases (FedAvg's weight), optimizer steps, and the
        site's cumulative epsilon when ``dp`` is set.
    """
    started = time.perf_counter()
    set_determinism(seed=seed)
    data = task.training_data(site, cases, patch_size, seed, augment, cache_mb, flips)
    model.to(device).train()
    model.to(memory_format=training_layout(task.spec, device, private=dp is not None))
    if dp is None:
        forward = compiled(model) if compile_step else model
        step: Step = PlainStep(task, forward, device, proximal_anchors(model, proximal_mu, global_params, device),
                               proximal_mu, precision, step_memory_mb, site.name)
        batches, patches_per_case = shuffled_batches(len(cases), batch_size, epochs, seed), 1
        optimizer = step.wrap(task.optimizer(model, lr))
    else:
        patches_per_case = dp.training.patches_per_case
        # batch_size patches per forward pass (at least one case): memory stays what the site planned for
        step = dp.step(task.dp_step, task, model, device, max(1, batch_size // patches_per_case))
        batches = dp.batches()
        optimizer = step.wrap(task.optimizer(model, dp.training.lr, dp.training.momentum))
    losses: list[float] = []
    steps = 0
    total = round_steps(len(cases), batch_size, epochs, dp)
    first_step = last_line = time.monotonic()
    # the next batch's patches are cropped and augmented while this one trains, where a core is free
    ahead = prefetched(batches, lambda indices: [[data[i] for _ in range(patches_per_case)] for i in indices],
                       depth=ahead_depth(device, math.prod(roi_size(patch_size, site.spatial_dims))
                                         * batch_size * patches_per_case))
    waited = time.perf_counter() - started  # opening the cases (decoding them unless cached) counts as data
    try:
        while True:
            asked = time.perf_counter()
            patches = next(ahead, None)
            waited += time.perf_counter() - asked
            if patches is None:
                break
            optimizer.zero_grad(set_to_none=True)
            loss = step(patches)
            if loss is not None and not math.isfinite(loss):
                raise FloatingPointError(f"site {site.name}: training loss became {loss} at step "
                                         f"{steps}; lower 'lr' or check the images")
            optimizer.step()
            steps += 1
            if dp is not None:
                dp.stepped()
            if loss is not None:
                losses.append(loss)
            if time.monotonic() - last_line > PROGRESS_SECONDS and steps < total:
                last_line = time.monotonic()
                left = (last_line - first_step) / steps * (total - steps)
                log.info("site %s: step %d/%d, loss %.4f, about %.0fs left in this round", site.name,
                         steps, total, sum(losses[-10:]) / max(len(losses[-10:]), 1), left)
    finally:
        ahead.close()
        step.close()
        model.to(memory_format=torch.contiguous_format)  # what is saved and sent is laid out as usual
    epsilon = dp.close() if dp is not None else None
    return TrainResult(loss=sum(losses) / max(len(losses), 1), num_examples=len(cases), steps=steps,
                       epsilon=epsilon, losses=tuple(losses), seconds=time.perf_counter() - started,
                       data_seconds=waited)


def compiled(model: nn.Module) -> nn.Module:
    """``model`` through ``torch.compile``, sharing its parameters. Inductor compiles in this
    process: its default worker pool would start processes holding another copy of PyTorch."""
    from torch._inductor import config  # imported only where a run compiles

    config.compile_threads = 1
    return torch.compile(model)


def training_layout(spec: ModelSpec, device: str, private: bool = False) -> torch.memory_format:
    """Channels-last for a 3D U-Net trained without DP on a CPU, where its steps were faster
    (benchmarks/RESULTS.md, layout); the usual layout for DP steps and 2D (not faster) and on
    CUDA (not measured)."""
    if spec.kind.dense and spec.spatial_dims == 3 and device == "cpu" and not private:
        return torch.channels_last_3d
    return torch.contiguous_format


def shuffled_batches(n: int, batch_size: int, epochs: int, seed: int) -> Iterator[list[int]]:
    """Every case once per epoch, in a seeded order, ``batch_size`` per step."""
    rng = np.random.RandomState(seed)
    for _ in range(epochs):
        order = rng.permutation(n).tolist()
        yield from (order[i:i + batch_size] for i in range(0, n, batch_size))


def proximal_anchors(
    model: nn.Module, mu: float, global_params: dict[str, torch.Tensor] | None, device: str
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(parameter, its global value) pairs for FedProx's term; empty when ``mu`` is 0."""
    if mu <= 0 or not global_params:
        return []
    return [(p, global_params[name].detach().to(device)) for name, p in model.named_parameters()
            if name in global_params]
