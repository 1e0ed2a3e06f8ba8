"""A run from pretrained weights: what they score at the sites before round 1, and whether they
are a warm start for these sites at all."""

from __future__ import annotations

import logging
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from fedseg.common.config import RunConfig
from fedseg.common.dp_recipe import NO_WARM_START
from fedseg.common.model_kinds import ModelSpec
from fedseg.common.models import build_model
from fedseg.common.records import METRICS
from fedseg.server.reply_checks import ReplyChecks, ReplyRefused
from fedseg.server.rounds import without_timings
from fedseg.server.run_folder import RunFolder
from fedseg.server.site_strategy import evaluate_message, reply_site, wire_form
from fedseg.server.summary import site_spread

log = logging.getLogger(__name__)


def score_pretrained(grid: Grid, folder: RunFolder, site_of: dict[int, str], training_sites: list[str],
                     heldout_sites: list[str], initial: ArrayRecord, config: ConfigRecord,
                     cfg: RunConfig, checks: ReplyChecks) -> None:
    """Every connected site scores the starting model as it is (its own norms included: the
    unseen-site norm set) on its validation split, before round 1; run.json's
    ``pretrained_alone`` keeps the scores, beside which the run's own Dice shows what federated
    training added (or lost). A site whose evaluation fails, or whose scores fail ``checks``, is
    left out, and logged."""
    config = ConfigRecord({**dict(config), "server-round": 0})
    wired = wire_form(initial, cfg.transfer_dtype)
    messages = [evaluate_message(wired, config, node) for node in sorted(set(grid.get_node_ids()) & set(site_of))]
    scores: dict[str, dict[str, float]] = {}
    for reply in grid.send_and_receive(messages, timeout=cfg.round_timeout):
        site = reply_site(site_of, reply)
        if reply.has_error():
            log.warning("site %s could not score the starting model: %s", site, reply.error.reason)
            continue
        try:
            checks.evaluate_reply(site, reply.content)
        except ReplyRefused as err:
            log.warning("site %s's scores of the starting model refused: %s", site, err)
            continue
        scores[site] = without_timings(dict(reply.content[METRICS]))
    scores = dict(sorted(scores.items()))
    entry: dict[str, Any] = {
        "sites": scores, "in_federation": site_spread({s: scores.get(s, {}).get("dice") for s in training_sites})}
    if heldout_sites:
        entry["heldout_summary"] = site_spread({s: scores.get(s, {}).get("dice") for s in heldout_sites})
    folder.write_run_info({**folder.read_run_info(), "pretrained_alone": entry})
    mean = entry["in_federation"]["mean"]
    log.info("the pretrained model alone (before round 1): mean Dice %s at the training sites (%s)",
             "n/a" if mean is None else f"{mean:.3f}",
             ", ".join(f"{s} {v['dice']:.3f}" for s, v in scores.items() if "dice" in v))


def pretrained_dice(cfg: RunConfig, info: dict[str, Any]) -> float:
    """What the run's pretrained weights scored at the training sites before round 1 (mean
    Dice; -1 for a run from scratch or one whose sites gave no Dice)."""
    mean = info.get("pretrained_alone", {}).get("in_federation", {}).get("mean")
    return float(mean) if cfg.pretrained_weights and mean is not None else -1.0


def without_failed_warm_start(cfg: RunConfig, spec: ModelSpec, info: dict[str, Any]) -> RunConfig:
    """The run's config for its rounds: as it is, unless its pretrained weights are a whole U-Net
    that scored below ``NO_WARM_START`` at the training sites before round 1 (a model of another
    distribution); then it trains from them as from scratch: the DP recipe's scratch learning
    rate, no server average (both tuned for a good start), and the sites' fresh local norms. A
    partial file (an encoder, a backbone) may score 0 and still help, so it is left alone."""
    mean = pretrained_dice(cfg, info)
    whole = (spec.kind.dense and (info.get("pretrained") or {}).get("skipped") == 0
             and info["pretrained"]["loaded"] == len(build_model(spec).state_dict()))
    if not whole or mean < 0 or mean >= NO_WARM_START:
        return cfg
    log.warning("the pretrained model scores mean Dice %.3f at the training sites: it is no warm "
                "start for these sites, so the run trains from it as from scratch", mean)
    return cfg.replace(pretrained_weights="")
