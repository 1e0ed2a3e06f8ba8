"""The gradient step of one optimizer step at a site: plain (with FedProx's term and mixed
precision), Opacus DP-SGD with per-sample gradients (U-Net), or exact per-case clipping (Mask
R-CNN). The training loop (``trainer.py``) drives whichever the round needs."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch import nn

from fedseg.client.step_memory import balanced_parts, patches_per_pass, per_patch_bytes
from fedseg.common.dp_recipe import DPRound
from fedseg.common.precision import Precision


class TaskLoss(Protocol):
    """What a step needs of a model kind's task (``tasks.Task``): its loss and non-DP clipping."""

    grad_clip: float | None
    splits_batch: bool

    def loss(self, model: nn.Module, patches: list[Any], device: str) -> torch.Tensor:
        """The mean loss of ``model`` on ``patches``."""


class Step(Protocol):
    """One optimizer step's gradient: plain, Opacus DP-SGD or exact per-case clipping."""

    def wrap(self, optimizer: torch.optim.Optimizer) -> Any:
        """The optimizer this step drives (Opacus wraps it to clip and noise)."""

    def __call__(self, cases: list[list[Any]]) -> float | None:
        """Set the gradients for a batch of cases, each given as its patches (augmentation
        multiplicity: K patches of one case); returns the mean loss (None: no case)."""

    def close(self) -> None:
        """Undo what the step attached to the model."""


class PlainStep:
    """Non-private step: the task's loss (+ FedProx's term) under the site's mixed precision,
    backward (loss-scaled in fp16), optional clipping. On a CPU, a batch whose activations exceed
    ``memory_mb`` MiB goes through the network in parts whose gradients add up to the batch's
    (``step_memory.py``), where the task's loss allows it."""

    def __init__(self, task: TaskLoss, model: nn.Module, device: str,
                 anchors: list[tuple[torch.Tensor, torch.Tensor]], proximal_mu: float,
                 precision: Precision | None = None, memory_mb: int = 0, site: str = "") -> None:
        self.task, self.model, self.device = task, model, device
        self.anchors, self.proximal_mu = anchors, proximal_mu
        self.precision = precision or Precision(device)
        self.memory_mb, self.site = memory_mb, site
        self.scaler = self.precision.scaler()
        self.optimizer: torch.optim.Optimizer | None = None

    def wrap(self, optimizer: torch.optim.Optimizer) -> Any:
        self.optimizer = optimizer
        return optimizer if self.scaler is None else _ScaledOptimizer(optimizer, self.scaler)

    def __call__(self, cases: list[list[Any]]) -> float:
        patches = [patch for case in cases for patch in case]
        total = 0.0
        for i, part in enumerate(self.parts(patches)):
            with self.precision.autocast():
                loss = self.task.loss(self.model, part, self.device)
            loss = loss.float() * (len(part) / len(patches))  # the batch's mean loss, part by part
            if self.anchors and i == 0:
                loss = loss + self.proximal_mu / 2 * sum((p - a).pow(2).sum() for p, a in self.anchors)
            if not torch.isfinite(loss):
                return float(loss.detach())  # the training loop stops with a clear error
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += float(loss.detach())
        if self.task.grad_clip:
            if self.scaler and self.optimizer is not None:
                self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.task.grad_clip)
        return total

    def parts(self, patches: list[Any]) -> list[list[Any]]:
        """The batch as the forward passes take it: whole, or in parts within ``memory_mb``."""
        if self.memory_mb <= 0 or self.device != "cpu" or not self.task.splits_batch or len(patches) < 2:
            return [patches]

        def one_patch() -> torch.Tensor:  # measured eagerly: a compiled network would compile for it
            with self.precision.autocast():
                return self.task.loss(getattr(self.model, "_orig_mod", self.model), patches[:1], self.device)

        key = (getattr(self.task, "spec", None), tuple(patches[0]["image"].shape), self.precision)
        per_patch = per_patch_bytes(key, one_patch, self.site, len(patches), self.memory_mb)
        return balanced_parts(patches, patches_per_pass(self.memory_mb, len(patches), per_patch))

    def close(self) -> None:
        return None


class _ScaledOptimizer:
    """fp16: the step unscales the gradients and is skipped when they overflowed."""

    def __init__(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
        self.optimizer, self.scaler = optimizer, scaler

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.scaler.step(self.optimizer)
        self.scaler.update()


class OpacusStep:
    """DP-SGD step with Opacus' per-sample gradients (U-Net): each case's gradient (the mean over
    its K patches) is clipped to C, N(0, (sigma C)^2) is added to the sum, which is divided by
    the expected batch size. Cases go through the network ``chunk_cases`` at a time."""

    def __init__(self, task: TaskLoss, model: nn.Module, plan: DPRound, expected_batch: float,
                 generator: torch.Generator, device: str, chunk_cases: int = 8) -> None:
        check_dp_compatible(model)
        self.task, self.plan, self.expected_batch = task, plan, expected_batch
        self.generator, self.device, self.chunk_cases = generator, device, max(1, chunk_cases)
        # torch.func's vmap per-sample gradients: faster than Opacus' hooks on a U-Net step, the
        # same gradients (tests check them by hand)
        self.module = GradSampleModule(model, force_functorch=True)
        self.params = [p for p in self.module.parameters() if p.requires_grad]

    def wrap(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        return DPOptimizer(optimizer, noise_multiplier=self.plan.noise_multiplier,
                           max_grad_norm=self.plan.max_grad_norm,
                           expected_batch_size=self.expected_batch, generator=self.generator)

    def __call__(self, cases: list[list[Any]]) -> float | None:
        if not cases:  # Poisson drew no case: the optimizer adds noise to zero gradients
            for p in self.params:
                p.grad_sample = torch.zeros((0, *p.shape), device=p.device)
            return None
        per_case: dict[nn.Parameter, list[torch.Tensor]] = {p: [] for p in self.params}
        total = 0.0
        for start in range(0, len(cases), self.chunk_cases):
            chunk = cases[start:start + self.chunk_cases]
            patches = [patch for case in chunk for patch in case]
            loss = self.task.loss(self.module, patches, self.device)
            with warnings.catch_warnings():
                # Opacus' hooks on the first layer, whose input needs no gradient: harmless
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                loss.backward()
            total += float(loss.detach()) * len(chunk)
            for p in self.params:  # a case's gradient: the mean of its patches' (the unit is the case)
                grad = p.grad_sample
                per_case[p].append(grad.view(len(chunk), -1, *grad.shape[1:]).mean(dim=1))
                p.grad_sample = None
        for p in self.params:
            p.grad_sample = torch.cat(per_case[p])
        return total / len(cases)

    def close(self) -> None:
        self.module._close()


class PerCaseStep:
    """DP-SGD step by exact per-case clipping (Mask R-CNN, whose heads Opacus cannot split): one
    forward pass per case over its K patches."""

    def __init__(self, task: TaskLoss, model: nn.Module, plan: DPRound, expected_batch: float,
                 generator: torch.Generator, device: str, chunk_cases: int = 1) -> None:
        self.task, self.model, self.plan, self.expected_batch = task, model, plan, expected_batch
        self.generator, self.device = generator, device
        self.params = [p for p in model.parameters() if p.requires_grad]

    def wrap(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        return optimizer

    def __call__(self, cases: list[list[Any]]) -> float | None:
        losses: list[float] = []

        def case_losses() -> Iterator[torch.Tensor]:
            for patches in cases:
                loss = self.task.loss(self.model, patches, self.device)
                losses.append(float(loss.detach()))
                yield loss

        private_gradient(self.params, case_losses(), self.plan, self.expected_batch, self.generator)
        return sum(losses) / len(losses) if losses else None

    def close(self) -> None:
        return None


def check_dp_compatible(model: nn.Module) -> None:
    """Raise ``ValueError`` with Opacus' reasons when the model cannot train under DP-SGD."""
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ValueError(f"model cannot train with DP-SGD: {errors[0]} (use norm=instance or group)")


def private_gradient(params: list[nn.Parameter], case_losses: Iterable[torch.Tensor],
                     plan: DPRound, expected_batch_size: float, generator: torch.Generator) -> list[float]:
    """Set ``p.grad`` to one DP-SGD step's noisy mean of per-case gradients clipped to norm C.

    Each loss is one case's own forward pass (a micro-batch of one), so its gradient is exactly
    that case's: Opacus' per-layer grad samplers cannot do this for Mask R-CNN, whose RPN and
    RoI heads put proposals, not cases, on the batch axis. Like Opacus, the
    sum of clipped gradients plus N(0, (sigma C)^2) noise is divided by the expected batch size.

    Returns:
        Each case's gradient norm after clipping (<= C), in order.
    """
    total = [torch.zeros_like(p) for p in params]
    clipped_norms = []
    for loss in case_losses:
        if not math.isfinite(float(loss.detach())):  # the loop reports it; never clip a NaN
            continue
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        scale = min(1.0, plan.max_grad_norm / (float(norm) + 1e-6))
        for acc, g in zip(total, grads):
            acc.add_(g, alpha=scale)
        clipped_norms.append(float(norm) * scale)
    std = plan.noise_multiplier * plan.max_grad_norm
    for p, acc in zip(params, total):
        noise = torch.normal(0.0, std, acc.shape, generator=generator, device=acc.device)
        p.grad = (acc + noise) / expected_batch_size
    return clipped_norms
