"""The final per-site / held-out summary of a run's round records (mean, worst site, gap, best round)."""

from __future__ import annotations

import math
from typing import Any

INSTANCE_METRICS = ("pq", "aji", "ap50")  # reported by Mask R-CNN sites beside foreground Dice


def summarize(rounds: list[dict[str, Any]], training_sites: list[str],
              heldout_sites: list[str]) -> dict[str, Any]:
    """Final per-site and held-out metrics, mean, worst site, max-min gap and best round.

    Args:
        rounds: rounds.jsonl records, in order.
        training_sites: sites that trained.
        heldout_sites: sites that only evaluated.
    """
    if not rounds:
        return {"rounds": 0}
    last = rounds[-1]
    summary: dict[str, Any] = {"rounds": last["round"]}
    summary["sites"] = {s: last["eval"].get(s, {}) for s in training_sites}
    summary["in_federation"] = site_spread({s: m.get("dice") for s, m in summary["sites"].items()})
    if heldout_sites:
        summary["heldout"] = {s: last["eval"].get(s, {}) for s in heldout_sites}
        summary["heldout_summary"] = site_spread({s: m.get("dice") for s, m in summary["heldout"].items()})
    instance = {group: _instance_means(summary.get(group, {})) for group in ("sites", "heldout")}
    instance = {group: means for group, means in instance.items() if means}
    if instance:
        summary["instance"] = instance
    epsilon = {s: e for s in training_sites
               if (e := _latest(rounds, s, "epsilon")) is not None}
    if epsilon:
        summary["record_level_dp"] = {"epsilon": epsilon, "delta": _latest(rounds, next(iter(epsilon)), "delta"),
                                      "max_epsilon": max(epsilon.values())}
    if "client-level-dp" in last:
        summary["client_level_dp"] = last["client-level-dp"]
    means = [(r["round"], site_spread({s: r["eval"].get(s, {}).get("dice") for s in training_sites})["mean"])
             for r in rounds]
    scored = [(rnd, m) for rnd, m in means if m is not None]
    if scored:
        best = max(scored, key=lambda x: x[1])
        summary["best_round"] = {"round": best[0], "mean_dice": best[1]}
    return summary


def _instance_means(per_site: dict[str, dict[str, float]]) -> dict[str, dict[str, Any]]:
    """Mean and worst site of each instance score (PQ, AJI, AP@0.5) over sites that report it."""
    out = {}
    for metric in INSTANCE_METRICS:
        spread = site_spread({s: m.get(metric) for s, m in per_site.items()})
        if spread["mean"] is not None:
            out[metric] = {"mean": spread["mean"], "worst_site": spread["worst_site"],
                           "worst": spread["worst_dice"]}
    return out


def _latest(rounds: list[dict[str, Any]], site: str, key: str) -> Any:
    """A site's most recent training value of ``key`` (a site may have refused later rounds)."""
    for record in reversed(rounds):
        if key in record["train"].get(site, {}):
            return record["train"][site][key]
    return None


def site_spread(dice: dict[str, float | None]) -> dict[str, Any]:
    """Mean, worst site, max-min gap and standard deviation of per-site Dice (None/NaN skipped)."""
    values = {s: d for s, d in dice.items() if d is not None and math.isfinite(d)}
    if not values:
        return {"mean": None, "worst_site": None, "worst_dice": None, "gap": None, "std": None}
    mean = sum(values.values()) / len(values)
    worst = min(values, key=values.get)
    std = math.sqrt(sum((v - mean) ** 2 for v in values.values()) / len(values))
    return {"mean": mean, "worst_site": worst, "worst_dice": values[worst],
            "gap": max(values.values()) - values[worst], "std": std}
