"""Record-level DP at a site: the DP session of a round, the site's privacy ledger, its policy.

The privacy unit is one case (patient). A round under ``dp=sample`` is one ``DPSession``: plan
the round, let the site's own policy admit it, draw Poisson batches of cases from OS entropy,
take clipped and noised steps (Opacus' per-sample gradients for networks it supports, exact
per-case clipping by micro-batches for Mask R-CNN), account every step with Opacus' RDP
accountant, and write the ledger after the last step. The ledger lives in the site's state dir,
so epsilon keeps growing across rounds, runs and restarts, and the server can never reset it.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch import nn

from fedseg.common.atomic import atomic_write_json, private_dir
from fedseg.common.round_config import DPSettings
from fedseg.common.dp_recipe import ACCOUNTANT, DPRound, DPTraining, describe, noise_to_signal, site_round, warning

log = logging.getLogger(__name__)
LEDGER_FILE = "privacy_ledger.json"


class PolicyRefusal(RuntimeError):
    """The site refuses a round because it would break the site's own privacy policy."""


@dataclass(frozen=True)
class SitePolicy:
    """What the hospital allows, from its own node config; nothing the server sends can relax it.

    Args:
        max_epsilon: total record-level epsilon the site will ever spend (None: no cap).
        require_dp: refuse any round that is not record-level DP (``dp=sample``).
        min_noise_multiplier: refuse DP rounds with less noise than this.
        min_group_cases: the fewest cases a fairness group needs before the site reports its
            Dice (the k-threshold); the server may ask for more, never for fewer.
    """

    max_epsilon: float | None = None
    require_dp: bool = False
    min_noise_multiplier: float = 0.0
    min_group_cases: int = 5

    def group_threshold(self, asked: int) -> int:
        """The k-threshold the site uses when the server asks for ``asked``: never below its own."""
        return max(asked, self.min_group_cases)

    @classmethod
    def from_config(cls, raw: dict[str, Any], source: str) -> SitePolicy:
        """Parse ``max-epsilon``, ``require-dp``, ``min-noise-multiplier``, ``min-group-cases``;
        errors name ``source``."""
        try:
            max_eps = raw.get("max-epsilon")
            policy = cls(
                max_epsilon=None if max_eps in (None, "", "none") else float(max_eps),
                require_dp=str(raw.get("require-dp", False)).lower() in ("true", "1", "yes"),
                min_noise_multiplier=float(raw.get("min-noise-multiplier", 0.0)),
                min_group_cases=int(raw.get("min-group-cases", cls.min_group_cases)),
            )
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: bad site privacy policy ({err})") from None
        if policy.max_epsilon is not None and policy.max_epsilon <= 0:
            raise ValueError(f"{source}: max-epsilon must be > 0")
        if policy.min_group_cases < 1:
            raise ValueError(f"{source}: min-group-cases must be >= 1")
        return policy


class PrivacyLedger:
    """``state-dir/privacy_ledger.json``: the site's accountant history over every run, (epsilon,
    delta) after every round, and the noise each run derived from its target epsilon.

    Args:
        state_dir: the site's state folder.
    """

    def __init__(self, state_dir: str | Path) -> None:
        self.path = Path(state_dir) / LEDGER_FILE
        self.data = self._load()

    def _load(self) -> dict[str, Any]:
        if not self.path.is_file():
            return {"accountant": ACCOUNTANT, "history": [], "rounds": [], "planned_noise": {}}
        try:
            data = json.loads(self.path.read_text())
            assert data["accountant"] == ACCOUNTANT and isinstance(data["history"], list)
        except Exception as err:  # noqa: BLE001 - a damaged ledger must stop DP training
            raise RuntimeError(f"{self.path}: privacy ledger unreadable ({err}); refusing to train "
                               "until it is restored (a lost ledger would reset epsilon)") from err
        data.setdefault("planned_noise", {})
        return data

    def accountant(self) -> RDPAccountant:
        """Opacus RDP accountant holding every step this site ever took under DP."""
        acc = RDPAccountant()
        acc.load_state_dict({"history": [tuple(h) for h in self.data["history"]], "mechanism": ACCOUNTANT})
        return acc

    def epsilon(self, delta: float) -> float:
        """Cumulative epsilon at ``delta`` (0 before any DP step)."""
        return self.accountant().get_epsilon(delta) if self.data["history"] else 0.0

    def projected_epsilon(self, plan: DPRound) -> float:
        """Cumulative epsilon if ``plan`` were run now."""
        acc = self.accountant()
        acc.history.append((plan.noise_multiplier, plan.sample_rate, plan.steps))
        return acc.get_epsilon(plan.delta)

    def planned_noise(self, run: str) -> float | None:
        """The noise multiplier run ``run`` derived from its target epsilon, if it has one."""
        return self.data["planned_noise"].get(run)

    def record(self, run: str, server_round: int, plan: DPRound, accountant: RDPAccountant,
               planned_noise: float | None, noise_ratio: float) -> float:
        """Store the accountant's history after a round (atomically); returns the new epsilon."""
        self.data["history"] = [list(h) for h in accountant.history]
        epsilon = accountant.get_epsilon(plan.delta)
        if planned_noise is not None:
            self.data["planned_noise"][run] = planned_noise
        self.data["rounds"].append({
            "run": run, "round": server_round, "noise_multiplier": plan.noise_multiplier,
            "max_grad_norm": plan.max_grad_norm, "sample_rate": plan.sample_rate,
            "steps": plan.steps, "epsilon": epsilon, "delta": plan.delta,
            "noise_to_signal": noise_ratio, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        private_dir(self.path.parent)
        atomic_write_json(self.path, self.data)
        return epsilon


def admit(policy: SitePolicy, dp: DPSettings, plan: DPRound | None, ledger: PrivacyLedger | None,
          site: str) -> None:
    """Refuse a round the site's policy forbids, before anything is trained or written.

    Raises:
        PolicyRefusal: with the reason the server will log.
    """
    if policy.require_dp and dp.mode != "sample":
        raise PolicyRefusal(f"site {site} refuses: it requires record-level DP (dp=sample), "
                            f"the round asks for dp={dp.mode}")
    if plan is None or ledger is None:
        return
    if plan.noise_multiplier < policy.min_noise_multiplier:
        raise PolicyRefusal(f"site {site} refuses: noise multiplier {plan.noise_multiplier:.3g} is "
                            f"below its minimum {policy.min_noise_multiplier:.3g}")
    if policy.max_epsilon is not None:
        projected = ledger.projected_epsilon(plan)
        if projected > policy.max_epsilon:
            raise PolicyRefusal(
                f"site {site} refuses: this round would take its epsilon from "
                f"{ledger.epsilon(plan.delta):.3f} to {projected:.3f}, over its max-epsilon "
                f"{policy.max_epsilon:.3f} (delta={plan.delta:g})")


class Step(Protocol):
    """One optimizer step's gradient: plain, Opacus DP-SGD or exact per-case clipping."""

    def wrap(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """The optimizer this step drives (Opacus wraps it to clip and noise)."""

    def __call__(self, cases: list[list[Any]]) -> float | None:
        """Set the gradients for a batch of cases, each given as its patches (augmentation
        multiplicity: K patches of one case); returns the mean loss (None: no case)."""

    def close(self) -> None:
        """Undo what the step attached to the model."""


class DPSession:
    """Record-level DP of one round at one site: plan -> policy admits -> sample, clip, noise,
    account -> ledger. Trainers see only this object (or None when DP is off).

    Open with ``DPSession.open``; nothing is written to the ledger before ``close``.
    """

    def __init__(self, training: DPTraining, plan: DPRound, ledger: PrivacyLedger, run: str,
                 server_round: int, num_cases: int, planned_noise: float | None) -> None:
        self.training, self.plan, self.ledger = training, plan, ledger
        self.run, self.server_round, self.num_cases = run, server_round, num_cases
        self.expected_batch = plan.sample_rate * num_cases
        self._planned_noise = planned_noise
        self._accountant = ledger.accountant()

    @classmethod
    def open(cls, dp: DPSettings, policy: SitePolicy, state_dir: Path, *, num_cases: int,
             batch_size: int, epochs: int, run: str, server_round: int, site: str,
             lr_factor: float = 1.0) -> DPSession | None:
        """Plan the round (fedseg's DP recipe for whatever the run left to it) and let the site's
        policy admit it; None when the round is not DP. Logs what the site trains with, and a
        warning when the noise will swamp the signal.

        Args:
            batch_size, epochs: the round's non-private schedule (the DP round takes as many steps).
            lr_factor: the run's learning-rate schedule in this round (``lr-schedule``), applied
                to the DP learning rate as to the non-private one.

        Raises:
            PolicyRefusal: the site's policy refuses (nothing trained, nothing written).
            RuntimeError: the site's ledger is damaged.
        """
        if dp.mode != "sample":
            admit(policy, dp, None, None, site)
            return None
        ledger = PrivacyLedger(state_dir)
        training, plan = site_round(dp, num_cases, batch_size, epochs, ledger.planned_noise(run), lr_factor)
        admit(policy, dp, plan, ledger, site)
        log.info("%s", describe(site, num_cases, training, plan, dp))
        if (text := warning(site, num_cases, training, plan, dp.warm_start)) is not None:
            log.warning("%s", text)
        return cls(training, plan, ledger, run, server_round, num_cases,
                   plan.noise_multiplier if dp.target_epsilon > 0 else None)

    def batches(self) -> Iterator[list[int]]:
        """Poisson-sampled case indices per step, from OS entropy, never from the run seed (the
        server sets the seed, and a sample it could predict would protect nothing). An empty
        draw is still a (noise-only) step, as in Opacus."""
        generator = noise_generator("cpu")
        for _ in range(self.plan.steps):
            draw = torch.rand(self.num_cases, generator=generator) < self.plan.sample_rate
            yield torch.nonzero(draw).flatten().tolist()

    def step(self, step_kind: type, task: Any, model: nn.Module, device: str, chunk_cases: int) -> Step:
        """The clipped, noised step of ``step_kind`` (``OpacusStep`` or ``PerCaseStep``); the noise
        generator lives on the training device (Opacus draws noise where the parameters are).

        Args:
            chunk_cases: cases per forward pass (a logical batch is processed in chunks, so
                memory stays bounded whatever the expected batch).
        """
        return step_kind(task, model, self.plan, self.expected_batch, noise_generator(device), device,
                         chunk_cases)

    def stepped(self) -> None:
        """Account one optimizer step."""
        self._accountant.step(noise_multiplier=self.plan.noise_multiplier,
                              sample_rate=self.plan.sample_rate)

    def close(self) -> float:
        """Write the ledger (atomically) after the last step; returns the site's epsilon."""
        return self.ledger.record(self.run, self.server_round, self.plan, self._accountant,
                                  self._planned_noise, noise_to_signal(self.plan, self.training))


class OpacusStep:
    """DP-SGD step with Opacus' per-sample gradients (U-Net): each case's gradient (the mean over
    its K patches) is clipped to C, N(0, (sigma C)^2) is added to the sum, which is divided by
    the expected batch size. Cases go through the network ``chunk_cases`` at a time."""

    def __init__(self, task: Any, model: nn.Module, plan: DPRound, expected_batch: float,
                 generator: torch.Generator, device: str, chunk_cases: int = 8) -> None:
        check_dp_compatible(model)
        self.task, self.plan, self.expected_batch = task, plan, expected_batch
        self.generator, self.device, self.chunk_cases = generator, device, max(1, chunk_cases)
        # torch.func's vmap per-sample gradients: 1.45 s vs 2.1 s for Opacus' hooks on a 3D U-Net
        # step of 32 cases on one CPU core (the same gradients; tests check them by hand)
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

    def __init__(self, task: Any, model: nn.Module, plan: DPRound, expected_batch: float,
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


def noise_generator(device: str | torch.device) -> torch.Generator:
    """A generator on ``device`` seeded from OS entropy, never from the run seed."""
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


def private_gradient(params: list[nn.Parameter], case_losses: Iterable[torch.Tensor],
                     plan: DPRound, expected_batch_size: float, generator: torch.Generator) -> list[float]:
    """Set ``p.grad`` to one DP-SGD step's noisy mean of per-case gradients clipped to norm C.

    Each loss is one case's own forward pass (a micro-batch of one), so its gradient is exactly
    that case's: Opacus' per-layer grad samplers cannot do this for Mask R-CNN, whose RPN and
    RoI heads put proposals, not cases, on the batch axis (platform facts §4). Like Opacus, the
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
