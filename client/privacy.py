"""Record-level DP at a site: the DP session of a round and the site's privacy ledger.

The privacy unit is one case (patient). A round under ``dp=sample`` is one ``DPSession``: plan
the round, let the site's own policy admit it, draw Poisson batches of cases from OS entropy,
take clipped and noised steps (``steps.py``: Opacus' per-sample gradients for networks it
supports, exact per-case clipping by micro-batches for Mask R-CNN), account every step with
Opacus' RDP accountant, and write the ledger after the last step. The ledger lives in the site's state dir,
so epsilon keeps growing across rounds, runs and restarts, and the server can never reset it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from opacus.accountants import RDPAccountant
from torch import nn

from fedseg.client.site_policy import PolicyRefusal, SitePolicy
from fedseg.client.steps import OpacusStep, PerCaseStep, Step, TaskLoss
from fedseg.common.atomic import atomic_write_json, private_dir
from fedseg.common.dp_recipe import ACCOUNTANT, DPRound, DPTraining, describe, noise_to_signal, site_round, warning
from fedseg.common.round_config import DPSettings

log = logging.getLogger(__name__)
LEDGER_FILE = "privacy_ledger.json"
LOCK_FILE = "privacy_ledger.lock"


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


class LedgerLock:
    """The site's ledger, held by one DP round at a time, from its plan (the budget check) to its
    record. Two federations sharing a state dir would otherwise each add their round to the
    history they read at the start, and the later write would drop the earlier round's steps.
    The operating system releases the lock of a process that dies.

    Args:
        state_dir: the site's state folder (``privacy_ledger.lock`` lives there).
    """

    def __init__(self, state_dir: str | Path) -> None:
        self.path = Path(state_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self, site: str) -> None:
        """Take the lock, waiting (and saying so) while another DP round at this site holds it."""
        private_dir(self.path.parent)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("site %s: another federation's DP round holds this site's privacy ledger; waiting "
                     "for it to finish", site)
            fcntl.flock(fd, fcntl.LOCK_EX)
        self._fd = fd

    def release(self) -> None:
        """Let the next DP round at this site go on (again: nothing)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class DPSession:
    """Record-level DP of one round at one site: plan -> policy admits -> sample, clip, noise,
    account -> ledger. Trainers see only this object (or None when DP is off).

    Open with ``DPSession.open``; nothing is written to the ledger before ``close``. The session
    holds the site's ledger (``LedgerLock``) from ``open`` to ``close`` or ``release``.
    """

    def __init__(self, training: DPTraining, plan: DPRound, ledger: PrivacyLedger, run: str,
                 server_round: int, num_cases: int, planned_noise: float | None, lock: LedgerLock) -> None:
        self.training, self.plan, self.ledger, self.lock = training, plan, ledger, lock
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
        lock = LedgerLock(state_dir)
        lock.acquire(site)
        try:
            ledger = PrivacyLedger(state_dir)
            training, plan = site_round(dp, num_cases, batch_size, epochs, ledger.planned_noise(run), lr_factor)
            admit(policy, dp, plan, ledger, site)
        except BaseException:
            lock.release()
            raise
        log.info("%s", describe(site, num_cases, training, plan, dp))
        if (text := warning(site, num_cases, training, plan, dp.warm_start)) is not None:
            log.warning("%s", text)
        return cls(training, plan, ledger, run, server_round, num_cases,
                   plan.noise_multiplier if dp.target_epsilon > 0 else None, lock)

    def batches(self) -> Iterator[list[int]]:
        """Poisson-sampled case indices per step, from OS entropy, never from the run seed (the
        server sets the seed, and a sample it could predict would protect nothing). An empty
        draw is still a (noise-only) step, as in Opacus."""
        generator = noise_generator("cpu")
        for _ in range(self.plan.steps):
            draw = torch.rand(self.num_cases, generator=generator) < self.plan.sample_rate
            yield torch.nonzero(draw).flatten().tolist()

    def step(self, step_kind: type[OpacusStep | PerCaseStep], task: TaskLoss, model: nn.Module, device: str,
             chunk_cases: int) -> Step:
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
        """Write the ledger (atomically) after the last step and let the next DP round at this
        site go on; returns the site's epsilon."""
        try:
            return self.ledger.record(self.run, self.server_round, self.plan, self._accountant,
                                      self._planned_noise, noise_to_signal(self.plan, self.training))
        finally:
            self.lock.release()

    def release(self) -> None:
        """Give up a round that will not be recorded (refused or failed before ``close``)."""
        self.lock.release()


def noise_generator(device: str | torch.device) -> torch.Generator:
    """A generator on ``device`` seeded from OS entropy, never from the run seed."""
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))
