"""`fedseg study`: baselines side by side on one study with the same step budget and seed.

local (each site alone), pooled (all training data in one place: allowed only in simulation),
fedavg, fedprox, fedbn (FedAvg with site-local norm layers). Every model is scored on every
site's validation split and on the held-out sites; local models give the cross-site matrix.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from fedseg.common.atomic import atomic_write_bytes, atomic_write_json
from fedseg.common.config import RunConfig
from fedseg.common.data import SiteSpec, read_site, split_training, study_sites
from fedseg.common.metrics import finite_mean
from fedseg.common.precision import site_precision
from fedseg.server.summary import INSTANCE_METRICS, site_spread
from fedseg.simulations.study_report import write_study_report
from fedseg.simulations.pooled import PooledNetwork, on_grid, pooled_network, run_device, train_pooled
from fedseg.common.round_config import SITE_CACHE_MB
from fedseg.simulations.simulate import simulate

log = logging.getLogger(__name__)
BASELINES = ("local", "pooled", "fedavg", "fedprox", "fedbn")
ENSEMBLE_ROUNDS = 3  # federated baselines: held-out sites also score the last 3 rounds' models averaged
FEDERATED = {"fedavg": dict(strategy="fedavg", local_layers="none"),
             "fedprox": dict(strategy="fedprox", local_layers="none"),
             "fedbn": dict(strategy="fedavg", local_layers="norm")}


def run_study(cfg: RunConfig, baselines: list[str], num_cpus: int | None = None,
              ray_address: str = "", gpus_per_site: float | None = None,
              site_cache_mb: int = SITE_CACHE_MB, split_site: int = 0,
              sites_at_once: int = 0) -> Path:
    """Train and score every baseline; write comparison.{json,csv}, cross_site.{json,csv}, study.html.
    ``num_cpus``, ``ray_address``, ``gpus_per_site``, ``site_cache_mb``, ``split_site``, ``sites_at_once``: as for
    ``simulate``.

    Returns:
        The study output folder.
    """
    unknown = set(baselines) - set(BASELINES)
    if unknown or not baselines:
        raise ValueError(f"baselines must be among {BASELINES}, got {baselines}")
    refs = study_sites(cfg.study_dir, split_site)
    specs = {r.name: read_site(r, seed=cfg.seed) for r in refs}
    training = [n for n in specs if n not in cfg.heldout_sites]
    heldout = [n for n in specs if n in cfg.heldout_sites]
    name = cfg.run_name or f"{Path(cfg.study_dir).name}-study-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(cfg.output_dir) / name
    out.mkdir(parents=True, exist_ok=True)
    # every in-process baseline trains the network the federation plans (model=auto): a local
    # model is not planned from its own site alone
    network = pooled_network(cfg, [specs[s] for s in training]) if set(baselines) - set(FEDERATED) else None
    if network is not None:  # and on the grid it plans: every site is scored in its images' own geometry
        specs = dict(zip(specs, on_grid(list(specs.values()), network.spacing)))
    scores: dict[str, dict[str, dict[str, float]]] = {}
    matrix: list[list[float | None]] = []
    rising: list[str] = []
    started = time.monotonic()
    for index, baseline in enumerate(baselines):
        elapsed = time.monotonic() - started
        eta = f", about {elapsed / index * (len(baselines) - index):.0f}s left" if index else ""
        log.info("study: baseline %d/%d %s%s", index + 1, len(baselines), baseline, eta)
        if baseline in FEDERATED:
            ensemble = ENSEMBLE_ROUNDS if heldout and cfg.model_kind.dense else cfg.heldout_ensemble
            run = simulate(cfg.replace(output_dir=str(out / "runs"), run_name=baseline, resume=False,
                                       heldout_ensemble=ensemble, **FEDERATED[baseline]), num_cpus=num_cpus,
                           ray_address=ray_address, gpus_per_site=gpus_per_site, site_cache_mb=site_cache_mb,
                           split_site=split_site, sites_at_once=sites_at_once)
            rounds = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
            scores[baseline] = {s: rounds[-1]["eval"].get(s, {}) for s in specs}
            if still_rising(rounds, training):
                rising.append(baseline)
                log.warning("study: %s's mean Dice was still rising in its last round; its budget "
                            "(rounds x local epochs) is too short to compare baselines fairly", baseline)
        elif baseline == "pooled":
            scores[baseline] = _train_and_score(cfg, specs, training, "pooled", network)
        else:
            local = {site: _train_and_score(cfg, specs, [site], site, network) for site in training}
            matrix = [[local[t][s].get("dice") for s in specs] for t in training]
            scores[baseline] = {s: local[s][s] for s in training}
            scores[baseline] |= {s: {k: _mean([local[t][s].get(k) for t in training]) for k in local[training[0]][s]}
                                 for s in heldout}  # an unseen site scored by every local model: their mean
    comparison = _rank(scores, training, heldout)
    atomic_write_json(out / "comparison.json", {"baselines": comparison, "training_sites": training,
                                                "heldout_sites": heldout, "config": cfg.to_dict()})
    _write_csv(out / "comparison.csv", comparison)
    cross = {"trained_at": training, "scored_at": list(specs), "dice": matrix}
    if matrix:
        atomic_write_json(out / "cross_site.json", cross)
        _write_csv(out / "cross_site.csv", [{"trained_at": t, **dict(zip(specs, row))}
                                            for t, row in zip(training, matrix)])
    budget = {"rounds": cfg.num_server_rounds, "local epochs": cfg.local_epochs, "batch size": cfg.batch_size,
              "steps per site": {s: cfg.num_server_rounds * cfg.local_epochs
                                 * -(-len(split_training(specs[s], cfg.val_fraction, cfg.seed)[0]) // cfg.batch_size)
                                 for s in training}}
    write_study_report(out, comparison, cross if matrix else None, budget, rising)
    log.info("study done in %.0fs: %s", time.monotonic() - started, out)
    return out


def still_rising(rounds: list[dict[str, Any]], sites: list[str], margin: float = 0.01) -> bool:
    """Whether the mean validation Dice over ``sites`` still rose by more than ``margin`` in the
    last round (a baseline that has not reached its plateau)."""
    means = [site_spread({s: r["eval"].get(s, {}).get("dice") for s in sites})["mean"] for r in rounds[-2:]]
    return len(means) == 2 and None not in means and means[1] - means[0] > margin


def _train_and_score(cfg: RunConfig, specs: dict[str, SiteSpec], train_at: list[str], seed_site: str,
                     network: PooledNetwork | None) -> dict[str, dict[str, float]]:
    """One model (``network``) trained in-process on the training splits of ``train_at`` with the
    step budget a federated run gives them (rounds x local epochs passes), scored at every site."""
    model, task, patch = train_pooled(cfg, [specs[s] for s in train_at], seed_site, network)
    device = run_device(cfg)
    with site_precision(cfg.amp, device, deterministic=cfg.deterministic).autocast():
        return {site: task.evaluate(model, spec, split_training(spec, cfg.val_fraction, cfg.seed)[1],
                                    patch_size=patch, device=device)
                for site, spec in specs.items()}


def _rank(scores: dict[str, dict[str, dict[str, float]]], training: list[str],
          heldout: list[str]) -> list[dict[str, Any]]:
    rows = []
    for baseline, metrics in scores.items():
        per_site = {s: metrics.get(s, {}).get("dice") for s in training + heldout}
        fed = site_spread({s: per_site[s] for s in training})
        held = site_spread({s: per_site[s] for s in heldout}) if heldout else {}
        row = {"baseline": baseline, "mean_dice": fed["mean"], "worst_site": fed["worst_site"],
               "worst_dice": fed["worst_dice"], "gap": fed["gap"], "heldout_mean_dice": held.get("mean"),
               "heldout_adapted_dice": _mean([metrics.get(s, {}).get("tta-dice") for s in heldout]),
               "heldout_ensemble_dice": _mean([metrics.get(s, {}).get("ensemble-dice") for s in heldout])}
        for metric in INSTANCE_METRICS:  # Mask R-CNN studies: PQ, AJI, AP@0.5 beside Dice
            if any(metric in metrics.get(s, {}) for s in training):
                row[f"mean_{metric}"] = _mean([metrics.get(s, {}).get(metric) for s in training])
                row[f"heldout_{metric}"] = _mean([metrics.get(s, {}).get(metric) for s in heldout])
        rows.append(row | {f"dice:{s}": per_site[s] for s in training + heldout})
    rows.sort(key=lambda r: -(r["mean_dice"] if r["mean_dice"] is not None else -1))
    for rank, row in enumerate(rows, start=1):
        row["rank"] = rank
    return rows


def _mean(values: list[float | None]) -> float | None:
    mean = finite_mean(values)
    return mean if math.isfinite(mean) else None  # JSON/CSV: empty, not NaN


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, buffer.getvalue().encode())
