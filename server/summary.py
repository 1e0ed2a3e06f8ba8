"""The final per-site / held-out summary of a run's round records (mean, worst site, gap, best round)."""

from __future__ import annotations

import math
from typing import Any

INSTANCE_METRICS = ("pq", "aji", "ap50")  # reported by Mask R-CNN sites beside foreground Dice
PRETRAINED_MARGIN = 0.01  # mean Dice below the pretrained model alone that a run is told about


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
    if groups := federation_groups({s: last["eval"].get(s, {}) for s in training_sites + heldout_sites}):
        summary["groups"] = groups
    means = [(r["round"], site_spread({s: r["eval"].get(s, {}).get("dice") for s in training_sites})["mean"])
             for r in rounds]
    scored = [(rnd, m) for rnd, m in means if m is not None]
    if scored:
        best = max(scored, key=lambda x: x[1])
        summary["best_round"] = {"round": best[0], "mean_dice": best[1]}
    return summary


def below_pretrained(summary: dict[str, Any]) -> str | None:
    """A plain warning when a run from pretrained weights ends more than ``PRETRAINED_MARGIN``
    mean Dice below what those weights scored alone at the training sites before round 1 (e.g.
    DP noise at few cases per site wearing away a good public model), with what to do about it."""
    start = summary.get("pretrained_alone", {}).get("in_federation", {}).get("mean")
    end = summary.get("in_federation", {}).get("mean")
    if start is None or end is None or end >= start - PRETRAINED_MARGIN:
        return None
    best = summary.get("best_round", {})
    return (f"the run's model ends at mean Dice {end:.3f} at the training sites, below the pretrained "
            f"model alone ({start:.3f}): training lost part of what the pretrained model knew (best "
            f"round: {best.get('round')}, {best.get('mean_dice', float('nan')):.3f}). Keep the pretrained "
            "model, or train fewer rounds; under dp=sample a larger epsilon or more cases per site "
            "leave more signal")


def federation_groups(per_site: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Fairness across the federation: each group's Dice over every site that reported it (each
    site only reports a group with at least ``min-group-cases`` cases), weighted by its cases;
    the worst group and the best-worst gap.

    Returns:
        ``{"per_group": {group: {"dice", "cases", "sites"}}, "worst_group", "worst_dice", "gap"}``,
        or {} when no site reported a group.
    """
    per_group: dict[str, dict[str, Any]] = {}
    for site, metrics in sorted(per_site.items()):
        for key, dice in metrics.items():
            if not key.startswith("group-dice:") or dice is None or not math.isfinite(dice):
                continue
            group = key.split(":", 1)[1]
            cases = metrics.get(f"group-cases:{group}", 0)
            entry = per_group.setdefault(group, {"weighted": 0.0, "cases": 0, "sites": []})
            entry["weighted"] += dice * cases
            entry["cases"] += cases
            entry["sites"].append(site)
    if not per_group:
        return {}
    groups = {g: {"dice": e["weighted"] / e["cases"], "cases": e["cases"], "sites": e["sites"]}
              for g, e in sorted(per_group.items()) if e["cases"]}
    worst = min(groups, key=lambda g: groups[g]["dice"])
    return {"per_group": groups, "worst_group": worst, "worst_dice": groups[worst]["dice"],
            "gap": max(g["dice"] for g in groups.values()) - groups[worst]["dice"]}


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
