"""The run's record-level DP plan at the coordinator: what each training site will train with
under ``dp=sample``, computed by the same function the sites train with (``dp_recipe.site_round``)."""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

from fedseg.common.dp_recipe import describe, noise_to_signal, site_round, warning
from fedseg.common.round_config import SiteRoundConfig

log = logging.getLogger(__name__)


def dp_plans(round_config: SiteRoundConfig, train_cases: dict[str, int], announce: bool = True
             ) -> dict[str, dict[str, Any]]:
    """Each training site's round-1 DP settings and plan, for run.json; logged (``announce``) with
    a warning where the noise will swamp the signal.

    Args:
        round_config: the round config the sites receive.
        train_cases: training site -> its training cases, as discovery reported them.
    """
    plans = {}
    for site, cases in sorted(train_cases.items()):
        if not cases:
            continue
        training, plan = site_round(round_config.dp, cases, round_config.batch_size, round_config.local_epochs,
                                    lr_factor=round_config.lr_factor(1))
        if announce:
            log.info("%s", describe(site, cases, training, plan, round_config.dp))
            if text := warning(site, cases, training, plan, round_config.dp.warm_start):
                log.warning("%s", text)
        plans[site] = {**asdict(training), **asdict(plan), "noise_to_signal": noise_to_signal(plan, training)}
    return plans
