"""What a hospital allows, from its own node config (or, simulated, ``site_policies.json``):
nothing the server sends can relax it.

Two halves: the privacy policy (the most epsilon the site will spend, DP required, the least
noise, the k-threshold of group metrics), which ``privacy.DPSession`` applies to every DP round,
and the workload limits (most local epochs and steps per round, the model kinds it runs, the
largest patch and batch its GPU holds, most rounds a day), which ``admit_workload`` applies to
every training round before anything is trained or written.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from fedseg.common.model_kinds import KINDS
from fedseg.common.round_config import SiteRoundConfig


class PolicyRefusal(RuntimeError):
    """The site refuses a round because it would break the site's own policy."""


@dataclass(frozen=True)
class SitePolicy:
    """What the hospital allows (every limit None: no limit).

    Args:
        max_epsilon: total record-level epsilon the site will ever spend.
        require_dp: refuse any round that is not record-level DP (``dp=sample``).
        min_noise_multiplier: refuse DP rounds with less noise than this.
        min_group_cases: the fewest cases a fairness group needs before the site reports its
            Dice (the k-threshold); the server may ask for more, never for fewer.
        max_local_epochs: most passes over the site's training cases in one round.
        max_steps: most optimizer steps in one round (DP rounds count their DP-SGD steps).
        models: the model kinds the site runs (e.g. ``("unet",)``).
        max_patch_size: the largest training/inference patch edge, in voxels or pixels.
        max_batch_size: the most cases per optimizer step.
        max_rounds_per_day: the most training rounds in any 24 hours, over every run.
        share_fingerprint: send the server the site's dataset fingerprint at discovery (counts
            and sums over its training cases, ``common/plan.py``); False keeps it at the site.
    """

    max_epsilon: float | None = None
    require_dp: bool = False
    min_noise_multiplier: float = 0.0
    min_group_cases: int = 5
    max_local_epochs: int | None = None
    max_steps: int | None = None
    models: tuple[str, ...] | None = None
    max_patch_size: int | None = None
    max_batch_size: int | None = None
    max_rounds_per_day: int | None = None
    share_fingerprint: bool = True

    def group_threshold(self, asked: int) -> int:
        """The k-threshold the site uses when the server asks for ``asked``: never below its own."""
        return max(asked, self.min_group_cases)

    @classmethod
    def from_config(cls, raw: dict[str, Any], source: str) -> SitePolicy:
        """Parse the policy keys (``POLICY_KEYS``) of a node config; errors name ``source``."""
        try:
            policy = cls(
                max_epsilon=_optional(raw.get("max-epsilon"), float),
                require_dp=str(raw.get("require-dp", False)).lower() in ("true", "1", "yes"),
                min_noise_multiplier=float(raw.get("min-noise-multiplier", 0.0)),
                min_group_cases=int(raw.get("min-group-cases", cls.min_group_cases)),
                max_local_epochs=_optional(raw.get("max-local-epochs"), int),
                max_steps=_optional(raw.get("max-steps"), int),
                models=_optional(raw.get("models"), _names),
                max_patch_size=_optional(raw.get("max-patch-size"), int),
                max_batch_size=_optional(raw.get("max-batch-size"), int),
                max_rounds_per_day=_optional(raw.get("max-rounds-per-day"), int),
                share_fingerprint=str(raw.get("share-fingerprint", True)).lower() not in ("false", "0", "no"),
            )
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: bad site policy ({err})") from None
        if policy.max_epsilon is not None and policy.max_epsilon <= 0:
            raise ValueError(f"{source}: max-epsilon must be > 0")
        if policy.min_group_cases < 1:
            raise ValueError(f"{source}: min-group-cases must be >= 1")
        for limit in ("max_local_epochs", "max_steps", "max_patch_size", "max_batch_size", "max_rounds_per_day"):
            if (value := getattr(policy, limit)) is not None and value < 1:
                raise ValueError(f"{source}: {limit.replace('_', '-')} must be >= 1")
        if policy.models is not None and (unknown := sorted(set(policy.models) - set(KINDS))):
            raise ValueError(f"{source}: models names unknown kind(s) {unknown}; fedseg has {sorted(KINDS)}")
        return policy


POLICY_KEYS = tuple(f.name.replace("_", "-") for f in fields(SitePolicy))


def admit_model(policy: SitePolicy, cfg: SiteRoundConfig, site: str) -> None:
    """Refuse a message (training or evaluation) for a model kind or patch the site does not run.

    Raises:
        PolicyRefusal: naming the limit and what the message asks for.
    """
    if policy.models is not None and cfg.model.model not in policy.models:
        raise PolicyRefusal(f"site {site} refuses: model {cfg.model.model!r} is not among its models "
                            f"{list(policy.models)}")
    _within(site, "max-patch-size", max(cfg.patch_size), policy.max_patch_size)


def admit_workload(policy: SitePolicy, cfg: SiteRoundConfig, steps: int, rounds_today: int, site: str) -> None:
    """Refuse a training round beyond the site's limits, before anything is trained or written.

    Args:
        steps: the optimizer steps the round would take.
        rounds_today: training rounds the site took in the last 24 hours.

    Raises:
        PolicyRefusal: naming the limit and what the round asks for.
    """
    admit_model(policy, cfg, site)
    _within(site, "max-local-epochs", cfg.local_epochs, policy.max_local_epochs)
    _within(site, "max-steps", steps, policy.max_steps)
    _within(site, "max-batch-size", cfg.batch_size, policy.max_batch_size)
    if policy.max_rounds_per_day is not None and rounds_today >= policy.max_rounds_per_day:
        raise PolicyRefusal(f"site {site} refuses: it has trained {rounds_today} round(s) in the last 24 "
                            f"hours, its max-rounds-per-day is {policy.max_rounds_per_day}")


def _within(site: str, key: str, asked: int, limit: int | None) -> None:
    if limit is not None and asked > limit:
        raise PolicyRefusal(f"site {site} refuses: the round asks for {key.removeprefix('max-')} {asked}, "
                            f"over its {key} {limit}")


def _optional(value: Any, parse: Any) -> Any:
    return None if value in (None, "", "none") else parse(value)


def _names(value: Any) -> tuple[str, ...]:
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return tuple(str(v).strip() for v in items if str(v).strip())
