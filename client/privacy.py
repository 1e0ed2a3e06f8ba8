"""Record-level DP at a site: Opacus DP-SGD, the site's privacy ledger, and the site's own policy.

The privacy unit is one case (patient): cases are Poisson-sampled and each sampled case
contributes one patch per step. U-Nets train through Opacus; Mask R-CNN through exact per-case
clipping by micro-batches (``private_gradient``), accounted by the same Opacus RDP accountant in
the same ledger and refused by the same policy. The ledger keeps the RDP accountant's history in the site's
state dir, so epsilon keeps growing across rounds and restarts and the server can never reset it.
"""

from __future__ import annotations

import json
import secrets
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.validators import ModuleValidator
from torch import nn

from fedseg.common.atomic import atomic_write_json

LEDGER_FILE = "privacy_ledger.json"
ACCOUNTANT = "rdp"  # Opacus RDPAccountant (Renyi DP of the subsampled Gaussian mechanism)


class PolicyRefusal(RuntimeError):
    """The site refuses a round because it would break the site's own privacy policy."""


@dataclass(frozen=True)
class SitePolicy:
    """What the hospital allows, from its own node config; nothing the server sends can relax it.

    Args:
        max_epsilon: total record-level epsilon the site will ever spend (None: no cap).
        require_dp: refuse any round that is not record-level DP (``dp=sample``).
        min_noise_multiplier: refuse DP rounds with less noise than this.
    """

    max_epsilon: float | None = None
    require_dp: bool = False
    min_noise_multiplier: float = 0.0

    @classmethod
    def from_config(cls, raw: dict[str, Any], source: str) -> SitePolicy:
        """Parse ``max-epsilon``, ``require-dp``, ``min-noise-multiplier``; errors name ``source``."""
        try:
            max_eps = raw.get("max-epsilon")
            policy = cls(
                max_epsilon=None if max_eps in (None, "", "none") else float(max_eps),
                require_dp=str(raw.get("require-dp", False)).lower() in ("true", "1", "yes"),
                min_noise_multiplier=float(raw.get("min-noise-multiplier", 0.0)),
            )
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: bad site privacy policy ({err})") from None
        if policy.max_epsilon is not None and policy.max_epsilon <= 0:
            raise ValueError(f"{source}: max-epsilon must be > 0")
        return policy

    def strictest(self, other: SitePolicy) -> SitePolicy:
        """The policy that satisfies both."""
        caps = [e for e in (self.max_epsilon, other.max_epsilon) if e is not None]
        return SitePolicy(min(caps) if caps else None, self.require_dp or other.require_dp,
                          max(self.min_noise_multiplier, other.min_noise_multiplier))


@dataclass(frozen=True)
class DPRound:
    """The DP-SGD parameters of one round at one site.

    Args:
        noise_multiplier: Gaussian noise std / max_grad_norm.
        max_grad_norm: per-case gradient clipping bound C.
        sample_rate: Poisson probability that a case is in a step's batch.
        steps: optimizer steps this round.
        delta: the delta epsilon is reported at.
    """

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    delta: float


class PrivacyLedger:
    """``state-dir/privacy_ledger.json``: accountant history and (epsilon, delta) after every round.

    Args:
        state_dir: the site's state folder.
    """

    def __init__(self, state_dir: str | Path) -> None:
        self.path = Path(state_dir) / LEDGER_FILE
        self.data = self._load()

    def _load(self) -> dict[str, Any]:
        if not self.path.is_file():
            return {"accountant": ACCOUNTANT, "history": [], "rounds": [], "planned_noise_multiplier": None}
        try:
            data = json.loads(self.path.read_text())
            assert data["accountant"] == ACCOUNTANT and isinstance(data["history"], list)
            return data
        except Exception as err:  # noqa: BLE001 - a damaged ledger must stop DP training
            raise RuntimeError(f"{self.path}: privacy ledger unreadable ({err}); refusing to train "
                               "until it is restored (a lost ledger would reset epsilon)") from err

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

    def record(self, server_round: int, plan: DPRound, accountant: RDPAccountant) -> float:
        """Store the accountant's history after a round (atomically); returns the new epsilon."""
        self.data["history"] = [list(h) for h in accountant.history]
        epsilon = accountant.get_epsilon(plan.delta)
        self.data["rounds"].append({
            "round": server_round, "noise_multiplier": plan.noise_multiplier,
            "max_grad_norm": plan.max_grad_norm, "sample_rate": plan.sample_rate,
            "steps": plan.steps, "epsilon": epsilon, "delta": plan.delta,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        atomic_write_json(self.path, self.data)
        return epsilon

    def set_planned_noise(self, noise_multiplier: float) -> None:
        """Remember the noise derived from ``dp-target-epsilon`` so restarts reuse it."""
        self.data["planned_noise_multiplier"] = noise_multiplier
        atomic_write_json(self.path, self.data)


def plan_round(cfg: Any, num_cases: int, ledger: PrivacyLedger) -> DPRound:
    """DP-SGD parameters for this round: Poisson rate b/N, steps per epoch ceil(N/b).

    With ``dp-target-epsilon`` > 0 the site derives its noise multiplier once, for all planned
    rounds, with Opacus' ``get_noise_multiplier``, and keeps it in the ledger.
    """
    steps_per_epoch = -(-num_cases // cfg.batch_size)
    sample_rate = 1.0 / steps_per_epoch
    steps = cfg.local_epochs * steps_per_epoch
    noise = cfg.dp_noise_multiplier
    if cfg.dp_target_epsilon > 0:
        noise = ledger.data.get("planned_noise_multiplier") or get_noise_multiplier(
            target_epsilon=cfg.dp_target_epsilon, target_delta=cfg.dp_delta, sample_rate=sample_rate,
            steps=steps * cfg.num_server_rounds, accountant=ACCOUNTANT)
        if ledger.data.get("planned_noise_multiplier") is None:
            ledger.set_planned_noise(noise)
    return DPRound(noise, cfg.dp_max_grad_norm, sample_rate, steps, cfg.dp_delta)


def admit(policy: SitePolicy, dp_mode: str, plan: DPRound | None, ledger: PrivacyLedger | None,
          site: str) -> None:
    """Refuse a round the site's policy forbids, before any training.

    Raises:
        PolicyRefusal: with the reason the server will log.
    """
    if policy.require_dp and dp_mode != "sample":
        raise PolicyRefusal(f"site {site} refuses: it requires record-level DP (dp=sample), "
                            f"the round asks for dp={dp_mode}")
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


def check_dp_compatible(model: nn.Module) -> None:
    """Raise ``ValueError`` with Opacus' reasons when the model cannot train under DP-SGD."""
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ValueError(f"model cannot train with DP-SGD: {errors[0]} (use norm=instance or group)")


def make_private(model: nn.Module, optimizer: torch.optim.Optimizer, loader: Any, plan: DPRound,
                 ledger: PrivacyLedger) -> tuple[nn.Module, torch.optim.Optimizer, Any, PrivacyEngine]:
    """Wrap model/optimizer/loader with Opacus, continuing the ledger's accountant.

    Poisson sampling and noise draw from OS entropy, never from the run seed: the server sets the
    seed, and noise it could predict would protect nothing.
    """
    with warnings.catch_warnings():  # "Secure RNG turned off": entropy is handled below
        warnings.simplefilter("ignore", UserWarning)
        engine = PrivacyEngine(accountant=ACCOUNTANT)
    engine.accountant = ledger.accountant()
    torch.seed()  # Opacus' Poisson sampler uses the global generator: reseed it from the OS
    noise = noise_generator("cpu")
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm, poisson_sampling=True, noise_generator=noise)
    if abs(loader.sample_rate - plan.sample_rate) > 1e-12:
        raise RuntimeError(f"Opacus sample rate {loader.sample_rate} != planned {plan.sample_rate}")
    # Opacus 1.6 crashes when the very first Poisson batch is empty; show its collate one real
    # batch so that an empty batch comes out as zero-length tensors of the right structure.
    loader.collate_fn([loader.dataset[0]])
    return model, optimizer, loader, engine


def noise_generator(device: str | torch.device) -> torch.Generator:
    """A generator seeded from OS entropy, never from the run seed (see ``make_private``)."""
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
